"""Side by side, in one run: the guided pipeline against diffusers' own pipeline on the same components.

Runs are alternated (diffusers, guided, diffusers, guided, ...) after a warm-up, so drift hits both alike; it
prints the median wall time of each variant, the median of the per-pair ratios to diffusers, and the NFEs.
Variants: diffusers CFG, guided constant CFG (the abstraction's overhead: goal ratio <= 1.02), and for scale:
guided CFG in the interval [0.5, 1] and guided without CFG, whose wall-time ratios should follow their NFEs.

    python -m benchmarks.guided_vs_diffusers.py                          # tiny SD on the CPU
    python -m benchmarks.guided_vs_diffusers --model sd15 --device cuda --dtype float16 --height 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import torch

from benchmarks.results import environment, machine, write_results
from guidance import ClassifierFreeGuidance
from pipelines import GuidedStableDiffusionPipeline, GuidedStableDiffusionXLPipeline
from pipelines.testing import tiny_components


def build(model: str, device: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model == "tiny":
        components = tiny_components("sd")
        for module in components.values():
            if isinstance(module, torch.nn.Module):
                module.to(device=device, dtype=dtype)
    else:
        from benchmarks.architectures import full_size_components

        components = full_size_components(model, dtype, device)
    xl = model == "sdxl"
    reference = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline)(**components)
    guided = (GuidedStableDiffusionXLPipeline if xl else GuidedStableDiffusionPipeline)(**components)
    for pipe in (reference, guided):
        pipe.set_progress_bar_config(disable=True)
    return reference, guided


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15", "sdxl"), default="tiny", help="components to time")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--scale", type=float, default=7.5, help="CFG scale")
    parser.add_argument("--height", type=int, default=32, help="image size in pixels (square)")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds (each runs every variant once)")
    parser.add_argument("--output-type", default="np", help="pipeline output type ('latent' times denoising only)")
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    args = parser.parse_args()

    diffusers.utils.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    reference, guided = build(args.model, args.device, dtype)
    common = dict(
        prompt=["a red circle on a blue background"] * args.batch,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.height,
        output_type=args.output_type,
    )
    variants = {
        "diffusers CFG": lambda: reference(**common, guidance_scale=args.scale),
        "guided CFG": lambda: guided(**common, guidance=ClassifierFreeGuidance(args.scale)),
        "guided CFG interval [0.5, 1]": lambda: guided(
            **common, guidance=ClassifierFreeGuidance(args.scale, start=0.5)
        ),
        "guided no CFG (scale 1)": lambda: guided(**common, guidance=ClassifierFreeGuidance(1.0)),
    }
    nfe = {"diffusers CFG": 2.0 * args.steps}
    for name, run in variants.items():  # warm-up, and the NFEs from the traces
        result = run()
        if hasattr(result, "trace"):
            nfe[name] = result.trace.nfe

    def timed(run) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            times[name].append(timed(run))
    base = times["diffusers CFG"]
    env = environment(args.device)
    lines = [
        f"{args.model}, {args.steps} steps, {args.height}px, batch {args.batch}, {args.dtype}, "
        f"output {args.output_type}, "
        f"{machine(env)}; {args.repeats} alternated rounds: median seconds, median of the per-round ratios to "
        "diffusers' own pipeline",
        "",
        "| variant | median s | time ratio | NFE | NFE ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows = {}
    for name, values in times.items():
        ratio = statistics.median(value / b for value, b in zip(values, base, strict=True))
        rows[name] = {"seconds": statistics.median(values), "time_ratio": ratio, "nfe": nfe[name]}
        lines.append(
            f"| {name} | {statistics.median(values):.4f} | {ratio:.3f} | {nfe[name]:g} | "
            f"{nfe[name] / nfe['diffusers CFG']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results(f"guided-vs-diffusers-{args.model}-{args.device.split(':')[0]}", table, rows, args.out, env)


if __name__ == "__main__":
    main()
