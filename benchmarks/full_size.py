"""Every method at the released architectures' full size, with random weights, side by side in one run.

SD 1.5 at 512 px and SDXL at 1024 px (and SD3-medium without its T5 encoder at 512 px, which also times a FlowOpt
edit): a random model computes exactly what the released one does. Batch 1, a few steps, the methods alternated in
every round. Per method: NFEs per image, the NFE and wall-time ratios to our constant CFG, and the peak resident memory
while it ran (sampled every 20 ms). The rows:
  diffusers CFG (the parent pipeline at `guidance_scale`; its ratio to ours is the abstraction's cost, goal <= 1.01),
  CFG (ours), AG and LinearAG (their unconditional passes leave the batch: the time ratio should follow the NFE
  ratio within 3%), dynamic CFG with a latent head and 4 candidates (goal <= 1.05), Self-NPO's per-row adapter
  (rank 8; goal <= 1.10), and for SD3 a FlowOpt edit (its NFEs and peak memory).

    python -m benchmarks.full_size --model sd15 --steps 3 --repeats 2
    python -m benchmarks.full_size --model sdxl --steps 2 --repeats 1 --warmup 0
    python -m benchmarks.full_size --model sd3 --steps 3 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from benchmarks.architectures import full_size_components
from benchmarks.results import environment, machine, write_results
from guidance import AdaptiveGuidance, ClassifierFreeGuidance, DynamicGuidance, NegativeAdapter
from guidance.evaluators.latent import LatentEvaluator
from guidance.evaluators.networks import ConvEncoder
from guidance.lora import add_lora, lora_layers, set_active_adapters
from pipelines.families import DIFFUSERS_CLASSES, guided_class
from pipelines.training.linear_ag import calibrate

FAMILIES = {"sd15": "sd", "sdxl": "sdxl", "sd3": "sd3", "tiny": "sd3"}  # tiny: the smoke run of the tests
SIZES = {"sd15": 512, "sdxl": 1024, "sd3": 512, "tiny": 16}
PROMPT = "a photo of a red fox in the snow"


class PeakMemory:
    """The peak resident set of this process while the block runs, sampled from /proc every 20 ms (MiB)."""

    def __enter__(self):
        self.peak, self.running = resident_mib(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, resident_mib())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_mib())


def resident_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pipelines(model: str):
    """(diffusers' pipeline, ours) sharing one set of full-size components."""
    import diffusers

    family = FAMILIES[model]
    if model == "tiny":
        from pipelines.testing import tiny_components

        components = tiny_components(family)
    else:
        components = full_size_components(model, torch.float32, "cpu")
    pair = getattr(diffusers, DIFFUSERS_CLASSES[family])(**components), guided_class(family)(**components)
    for pipe in pair:
        pipe.set_progress_bar_config(disable=True)
    return pair


def npo_adapter(pipe) -> NegativeAdapter:
    """A rank-8 LoRA on the attention projections, off but for the unconditional rows (the cost of Self-NPO)."""
    torch.manual_seed(0)
    add_lora(pipe.denoiser, "npo", rank=8, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    set_active_adapters(lora_layers(pipe.denoiser), [])
    return NegativeAdapter("npo")


def methods(pipe, steps: int, scale: float, size: int) -> dict:
    latent = pipe.denoiser.config.sample_size if hasattr(pipe, "unet") else size // pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    torch.manual_seed(0)
    head = LatentEvaluator(ConvEncoder(channels, latent, 1, width=16, timestep_aware=True), "score")
    linear, _ = calibrate(pipe, [PROMPT], steps, scale, exact_steps=[0], height=size, width=size)
    return {
        "CFG": ClassifierFreeGuidance(scale),
        "AG": AdaptiveGuidance(scale, threshold=1e-6),  # every row stops after step 0: the cost of a skip
        "LinearAG": linear,
        "dynamic, latent head, 4 candidates": DynamicGuidance([3.0, 5.0, 7.5, 10.0], evaluators=[head]),
        "Self-NPO adapter": ClassifierFreeGuidance(scale, unconditional=npo_adapter(pipe)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(FAMILIES), default="sd15", help="architecture")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps")
    parser.add_argument("--scale", type=float, default=7.5, help="CFG scale")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds of every method (alternated)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds first (0 at SDXL's size, where one pass dwarfs the first call's overhead)",
    )
    parser.add_argument(
        "--only-cfg", action="store_true", help="only diffusers' CFG and ours: more rounds for the abstraction's cost"
    )
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    args = parser.parse_args()
    torch.manual_seed(0)
    reference, pipe = pipelines(args.model)
    size = SIZES[args.model]
    policies = (
        {"CFG": ClassifierFreeGuidance(args.scale)} if args.only_cfg else methods(pipe, args.steps, args.scale, size)
    )
    call = dict(prompt=PROMPT, num_inference_steps=args.steps, height=size, width=size, output_type="latent")
    runs = {"diffusers CFG": lambda: reference(**call, guidance_scale=args.scale, generator=torch.manual_seed(0))}
    for name, policy in policies.items():
        runs[name] = lambda policy=policy: pipe(**call, guidance=policy, generator=torch.manual_seed(0))
    times, peaks, nfes = {name: [] for name in runs}, {name: 0.0 for name in runs}, {}
    for round_index in range(args.warmup + args.repeats):  # the first `warmup` rounds are not timed
        order = list(runs) if round_index % 2 == 0 else list(runs)[::-1]
        for name in order:
            with PeakMemory() as memory:
                start = time.perf_counter()
                out = runs[name]()
                seconds = time.perf_counter() - start
            peaks[name] = max(peaks[name], memory.peak)
            nfes[name] = out.trace.nfe if getattr(out, "trace", None) is not None else 2.0 * args.steps
            if round_index >= args.warmup:
                times[name].append(seconds)
            print(f"round {round_index} {name}: {seconds:.1f} s", flush=True)
    rows = {
        name: {
            "nfe": nfes[name],
            "nfe_ratio": nfes[name] / nfes["CFG"],
            "seconds": statistics.median(times[name]),
            "time_ratio": statistics.median(t / cfg for t, cfg in zip(times[name], times["CFG"], strict=True)),
            "round_ratios": [t / cfg for t, cfg in zip(times[name], times["CFG"], strict=True)],
            "peak_mib": peaks[name],
        }
        for name in runs
    }
    if FAMILIES[args.model] == "sd3" and not args.only_cfg:
        rows["FlowOpt edit"] = flowopt_edit(pipe, size)
    env = environment("cpu")
    lines = [
        f"{args.model} at {size} px, random weights, float32, batch 1, {args.steps} steps, scale {args.scale}, "
        f"{machine(env)}; {args.repeats} alternated rounds after {args.warmup} untimed: median seconds, median of "
        "the rounds' ratios to CFG; latents out",
        "",
        "| method | NFE/image | NFE ratio | seconds | time ratio to CFG | each round's ratio | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['nfe']:g} | {row.get('nfe_ratio', float('nan')):.3f} | {row['seconds']:.1f} | "
            f"{row.get('time_ratio', float('nan')):.3f} | "
            f"{', '.join(f'{r:.3f}' for r in row.get('round_ratios', []))} | {row['peak_mib']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results(f"full-size-{args.model}-cpu" + ("-cfg" if args.only_cfg else ""), table, rows, args.out, env)


def flowopt_edit(pipe, size: int) -> dict:
    """A short FlowOpt edit (T 3, n_max 2, 1 iteration, CFG 3.5): its NFEs, time and peak memory."""
    from PIL import Image

    image = Image.new("RGB", (size, size), (180, 60, 40))
    with PeakMemory() as memory:
        start = time.perf_counter()
        out = pipe.edit(
            image, "a red square", "a blue square", num_inference_steps=3, n_max=2, iterations=1, output_type="latent"
        )
        seconds = time.perf_counter() - start
    return {"nfe": out.nfe, "seconds": seconds, "peak_mib": memory.peak}


if __name__ == "__main__":
    main()
