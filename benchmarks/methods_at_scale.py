"""Wall time of the per-step guidance methods against constant CFG at real scale, side by side in one run.

Full-size SD 1.5 (512 px) or SDXL (1024 px) architectures with random weights (`architectures.py`; a random
model computes exactly as much as the released one). Methods alternate within each repeat; the median time of
each is divided by CFG's. Reports NFEs per image and the wall-time ratio, which should track the NFE ratio:
  AG (threshold 0.995; with random weights its skips say nothing about quality, only about cost),
  LinearAG (coefficients calibrated here on 2 trajectories: timing only),
  DynamicGuidance with 5 candidates and a latent evaluator (no decode) or a pixel evaluator (one VAE decode of
  every candidate per step, the cost the paper's latent evaluators avoid).

    python -m benchmarks.methods_at_scale --model sd15 --batch-size 8 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.guided_vs_diffusers import build
from benchmarks.results import environment, machine, write_results
from guidance import AdaptiveGuidance, ClassifierFreeGuidance, DynamicGuidance
from guidance.evaluators import RewardEvaluator
from guidance.evaluators.latent import LatentEvaluator
from guidance.evaluators.networks import ConvEncoder
from pipelines.training.linear_ag import calibrate


def methods(pipe, steps: int, scale: float, device: str, dtype: torch.dtype) -> dict:
    latent_size = pipe.unet.config.sample_size
    torch.manual_seed(0)
    head = ConvEncoder(4, latent_size, 1, width=64, timestep_aware=True).to(device, dtype)
    linear, _ = calibrate(pipe, ["a photo of a cat", "a red car"], steps, scale, batch_size=2)
    brightness = RewardEvaluator(lambda images, _: images.float().nan_to_num().mean(dim=(1, 2, 3)), name="pixel")
    return {
        "CFG": ClassifierFreeGuidance(scale),
        "AG": AdaptiveGuidance(scale),
        "LinearAG": linear,
        "Dynamic (latent evaluator)": DynamicGuidance(evaluators=[LatentEvaluator(head, "score")], lookahead="x0"),
        "Dynamic (pixel evaluator)": DynamicGuidance(evaluators=[brightness]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "tiny"], help="architecture")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--scale", type=float, default=7.5, help="CFG scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (alternated)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", default="float16", help="torch dtype of the models")
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    _, pipe = build(args.model, args.device, dtype)  # the guided pipeline of guided_vs_diffusers
    policies = methods(pipe, args.steps, args.scale, args.device, dtype)
    prompts = [f"a photo of object {k}" for k in range(args.batch_size)]

    def run(policy):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance=policy,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, out.trace.nfe

    for policy in policies.values():
        run(policy)  # warm-up
    times, nfes = {name: [] for name in policies}, {}
    for _ in range(args.repeats):
        for name, policy in policies.items():
            seconds, nfes[name] = run(policy)
            times[name].append(seconds)
    cfg_time = statistics.median(times["CFG"])
    env = environment(args.device)
    lines = [
        f"{args.model}, batch {args.batch_size}, {args.steps} steps, {args.dtype}, {machine(env)}, median of "
        f"{args.repeats} alternated repeats; latents out (no final decode)",
        "",
        "| method | NFE/image | NFE ratio | seconds | time ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows = {}
    for name in policies:
        median = statistics.median(times[name])
        rows[name] = {"nfe": nfes[name], "seconds": median, "time_ratio": median / cfg_time}
        lines.append(
            f"| {name} | {nfes[name]:.1f} | {nfes[name] / nfes['CFG']:.3f} | {median:.3f} | {median / cfg_time:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results(f"methods-at-scale-{args.model}-{args.device.split(':')[0]}", table, rows, args.out, env)


if __name__ == "__main__":
    main()
