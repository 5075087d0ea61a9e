"""NFEs and wall time of AG and LinearAG against CFG on video (Wan) and inside a diffusers modular pipeline (SDXL,
our policies as its `guider`), side by side in one run.

Part 1, Wan at each (frames, steps): diffusers' `WanPipeline` with CFG, then `GuidedWanPipeline` with CFG, AG and
LinearAG. Part 2, the modular SDXL pipeline at each steps: diffusers' own `ClassifierFreeGuidance` guider, then
`PolicyGuider` around CFG, AG and LinearAG. The last column is the largest difference of the decoded output to
diffusers' CFG: for CFG the parity (0 = bitwise), for AG and LinearAG what they change. AG's threshold is set per
setup to end CFG halfway (a probe run's smallest similarity at the middle step); LinearAG is calibrated on that setup
(the first 20% of the steps exact). Runs are alternated after a
warm-up; the table gives median seconds and the median of the per-round ratios to diffusers' CFG. Timed runs stop at
the latents (`output_type="latent"`): decoding is the same for every variant.

    python -m benchmarks.video_guidance                                   # tiny components, CPU
    python -m benchmarks.video_guidance --size real --device cuda --dtype bfloat16 --frames 33 --steps 20
        # Wan 2.1 1.3B and SDXL with random weights at 480x832 and 1024 px (a one-layer text encoder of their width)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import diffusers
import numpy as np
import torch

from benchmarks.results import environment, machine, write_results
from guidance import AdaptiveGuidance, ClassifierFreeGuidance
from guidance.guider import PolicyGuider
from pipelines import GuidedStableDiffusionXLPipeline, GuidedWanPipeline
from pipelines.testing import disable_progress_bars, tiny_components, tiny_modular, tiny_t5_tokenizer
from pipelines.training.linear_ag import calibrate

PROMPTS = ["a red fox running through snow", "a small boat on a calm lake"]
CALIBRATION = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def wan_components(size: str, device: str, dtype: torch.dtype) -> dict:
    """Tiny Wan, or Wan 2.1 T2V 1.3B's transformer and VAE with random weights (text: one T5 layer of width 4096)."""
    if size == "tiny":
        components = tiny_components("wan")
    else:
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        torch.manual_seed(0)
        with torch.device(device):
            transformer = WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=12,
                attention_head_dim=128,
                in_channels=16,
                out_channels=16,
                text_dim=4096,
                freq_dim=256,
                ffn_dim=8960,
                num_layers=30,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                eps=1e-6,
                rope_max_seq_len=1024,
            )
            vae = AutoencoderKLWan()
            config = UMT5Config(vocab_size=128, d_model=4096, d_ff=64, d_kv=64, num_layers=1, num_heads=1)
            text = UMT5EncoderModel(config)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        components = {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": text,
            "tokenizer": tiny_t5_tokenizer(),
            "scheduler": scheduler,
            "transformer_2": None,
        }
    return placed(components, device, dtype)


def sdxl_modular(size: str, device: str, dtype: torch.dtype):
    """The modular SDXL pipeline (diffusers' `StableDiffusionXLAutoBlocks`) on tiny or full-size random components."""
    if size == "tiny":
        pipe = tiny_modular("sdxl")
    else:
        from benchmarks.architectures import full_size_components

        pipe = diffusers.StableDiffusionXLAutoBlocks().init_pipeline()
        components = full_size_components("sdxl", dtype, device)
        pipe.update_components(**{k: v for k, v in components.items() if k in pipe.component_names and v is not None})
    pipe.to(device=device, dtype=dtype)
    disable_progress_bars(pipe.blocks)
    return pipe


def placed(components: dict, device: str, dtype: torch.dtype) -> dict:
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.to(device=device, dtype=dtype).eval()
    return components


def timed(run: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def halfway_threshold(similarities: list[list[float | None]], steps: int) -> float:
    """A threshold AG crosses at the middle step: just below the rows' smallest similarity there."""
    middle = [s for s in similarities[steps // 2] if s is not None]
    return min(middle) - 1e-7


def compare(variants: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, dict]:
    """Median seconds and median per-round ratio to the first variant, over alternated rounds after a warm-up."""
    for run in variants.values():
        run()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(timed(run, device))
    base = next(iter(times.values()))
    return {
        name: {
            "seconds": statistics.median(values),
            "time_ratio": statistics.median(v / b for v, b in zip(values, base, strict=True)),
        }
        for name, values in times.items()
    }


def wan_setup(reference, guided, frames: int, steps: int, args, size: dict) -> dict[str, dict]:
    """The Wan variants at one (frames, steps): NFE, difference to diffusers' CFG, time."""
    common = dict(prompt=PROMPTS, num_frames=frames, num_inference_steps=steps, max_sequence_length=16, **size)

    def call(pipe, output_type, **kwargs):
        return pipe(**common, **kwargs, output_type=output_type, generator=torch.Generator().manual_seed(0))

    probe = call(guided, "latent", guidance=AdaptiveGuidance(args.scale, threshold=1.0))
    threshold = halfway_threshold(similarities(probe.trace), steps)
    text = {"num_frames": frames, "max_sequence_length": 16, **size}
    policies = {
        "guided CFG": ClassifierFreeGuidance(args.scale),
        "guided AG": AdaptiveGuidance(args.scale, threshold=threshold),
        "guided LinearAG": calibrate(guided, CALIBRATION, steps, args.scale, batch_size=2, **text)[0],
    }
    expected = call(reference, "np", guidance_scale=args.scale).frames
    rows = {"diffusers CFG": {"nfe": 2.0 * steps, "difference": 0.0}}
    for name, policy in policies.items():
        out = call(guided, "np", guidance=policy)
        rows[name] = {"nfe": out.trace.nfe, "difference": float(np.abs(out.frames - expected).max())}
    variants = {"diffusers CFG": lambda: call(reference, "latent", guidance_scale=args.scale)}
    for name, policy in policies.items():
        variants[name] = lambda p=policy: call(guided, "latent", guidance=p.new())
    for name, timing in compare(variants, args.repeats, args.device).items():
        rows[name].update(timing)
    return rows


def similarities(trace) -> list[list[float | None]]:
    return [extras["similarity"] for extras in trace.extras]


def modular_setup(pipe, steps: int, args, size: dict) -> dict[str, dict]:
    """The modular SDXL variants at one step count: diffusers' guider, then PolicyGuider around each policy."""
    common = dict(prompt=PROMPTS, num_inference_steps=steps, **size)

    def call(guider, output_type):
        pipe.update_components(guider=guider)
        return pipe(**common, output="images", output_type=output_type, generator=torch.Generator().manual_seed(0))

    probe = PolicyGuider(AdaptiveGuidance(args.scale, threshold=1.0), pipeline=pipe)
    call(probe, "latent")
    names = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    shared = {name: getattr(pipe, name) for name in names}
    classic = GuidedStableDiffusionXLPipeline(**shared, image_encoder=None, feature_extractor=None)
    classic.set_progress_bar_config(disable=True)
    policies = {
        "PolicyGuider CFG": ClassifierFreeGuidance(args.scale),
        "PolicyGuider AG": AdaptiveGuidance(args.scale, threshold=halfway_threshold(similarities(probe.trace), steps)),
        "PolicyGuider LinearAG": calibrate(classic, CALIBRATION, steps, args.scale, batch_size=2, **size)[0],
    }
    expected = np.asarray(call(diffusers.guiders.ClassifierFreeGuidance(guidance_scale=args.scale), "np"))
    rows = {"diffusers guider CFG": {"nfe": 2.0 * steps, "difference": 0.0}}
    guiders = {name: PolicyGuider(policy, pipeline=pipe) for name, policy in policies.items()}
    for name, guider in guiders.items():
        out = np.asarray(call(guider, "np"))
        rows[name] = {"nfe": guider.trace.nfe, "difference": float(np.abs(out - expected).max())}
    reference = diffusers.guiders.ClassifierFreeGuidance(guidance_scale=args.scale)
    variants = {"diffusers guider CFG": lambda: call(reference, "latent")}
    for name, guider in guiders.items():
        variants[name] = lambda g=guider: call(g, "latent")
    for name, timing in compare(variants, args.repeats, args.device).items():
        rows[name].update(timing)
    return rows


def table(title: str, setups: dict[str, dict[str, dict]]) -> list[str]:
    header = "| setup | variant | NFE | NFE ratio | median s | time ratio | max abs difference to diffusers' CFG |"
    lines = [f"### {title}", "", header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for setup, rows in setups.items():
        base = next(iter(rows.values()))["nfe"]
        for name, row in rows.items():
            lines.append(
                f"| {setup} | {name} | {row['nfe']:g} | {row['nfe'] / base:.3f} | {row['seconds']:.4f} | "
                f"{row['time_ratio']:.3f} | {row['difference']:.2e} |"
            )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny", help="tiny components or full size")
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33], help="Wan video lengths (4k + 1)")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8], help="denoising steps")
    parser.add_argument("--scale", type=float, default=5.0, help="CFG scale")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every variant once)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights")
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    wan_size = {"height": 16, "width": 16} if args.size == "tiny" else {"height": 480, "width": 832}
    sdxl_size = {"height": 32, "width": 32} if args.size == "tiny" else {"height": 1024, "width": 1024}

    components = wan_components(args.size, args.device, dtype)
    reference, guided = diffusers.WanPipeline(**components), GuidedWanPipeline(**components)
    for pipe in (reference, guided):
        pipe.set_progress_bar_config(disable=True)
    wan = {
        f"{frames} frames x {steps} steps": wan_setup(reference, guided, frames, steps, args, wan_size)
        for frames in args.frames
        for steps in args.steps
    }
    del reference, guided, components
    modular = sdxl_modular(args.size, args.device, dtype)
    sdxl = {f"{steps} steps": modular_setup(modular, steps, args, sdxl_size) for steps in args.steps}

    env = environment(args.device)
    size = "tiny components" if args.size == "tiny" else "Wan 2.1 1.3B and SDXL, random weights"
    lines = [
        f"{size}, {args.dtype}, scale {args.scale}, batch {len(PROMPTS)}, {machine(env)}; {args.repeats} alternated "
        "rounds: median seconds to the latents, median of the per-round ratios to diffusers' CFG; NFE per video or "
        "image; the last column: largest difference of the decoded output to diffusers' CFG (for CFG its parity, for "
        "AG and LinearAG what they change). AG ends CFG halfway, LinearAG runs the first 20% of the unconditional "
        "passes.",
        "",
    ]
    lines += table(f"Wan ({wan_size['height']}x{wan_size['width']}): WanPipeline vs GuidedWanPipeline", wan)
    lines += table(f"Modular SDXL ({sdxl_size['height']} px): diffusers' guider vs PolicyGuider", sdxl)
    text = "\n".join(lines)
    print(text)
    name = "video-guidance" if args.size == "tiny" else f"video-guidance-real-{args.device.split(':')[0]}"
    write_results(name, text, {"wan": wan, "modular_sdxl": sdxl}, args.out, env)


if __name__ == "__main__":
    main()
