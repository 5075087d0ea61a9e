"""AG and LinearAG against CFG, side by side in one run, on the shapes-world models.

For each model (shapes-sd, shapes-sd3) and step count (20, 50): every held-out caption for several seeds with
CFG, Adaptive Guidance and LinearAG. Prints NFEs per image, the wall-time ratio to CFG (methods alternated,
median of repeats), attribute accuracy (the scorer) and the PSNR of each image to the CFG image of the same
seed. LinearAG uses the coefficients shipped in assets/linear-ag for 20 steps and calibrates itself for other
step counts. Also draws the per-step similarity gamma_t for a few prompts (assets/ag-similarity.png).

    python benchmarks/adaptive_guidance.py [--seeds 2] [--steps 20 50] [--scale 7.5] [--thresholds 0.995 0.999]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from heldout import generate, heldout_set  # noqa: E402

from guidance import AdaptiveGuidance, ClassifierFreeGuidance, LinearAdaptiveGuidance  # noqa: E402
from guidance.calibrate_linear_ag import calibrate  # noqa: E402
from guidance.shapes.assets import ASSETS, load_pipeline  # noqa: E402
from guidance.shapes.train import SD3_MAX_SEQUENCE_LENGTH  # noqa: E402

MODELS = {"shapes-sd": {}, "shapes-sd3": {"max_sequence_length": SD3_MAX_SEQUENCE_LENGTH}}
ATTRIBUTES = ("color", "shape", "position")


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((images - reference) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def linear_ag(name, pipe, steps, scale, extra):
    folder = ASSETS / "linear-ag" / f"{name}-{steps}"
    if folder.is_dir():
        return LinearAdaptiveGuidance.from_pretrained(folder, guidance_scale=scale)
    prompts = (ASSETS / "shapes-calibration-prompts.txt").read_text().split("\n")
    policy, _ = calibrate(pipe, [p for p in prompts if p], steps, scale, **extra)
    return policy


def similarity_plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(10, 3.4))
    for axis, (title, per_prompt) in zip(axes, curves.items(), strict=True):
        for label, values in per_prompt.items():
            axis.plot(range(len(values)), values, label=label, linewidth=1.2)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("cosine similarity cond vs uncond")
    axes[0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per held-out caption")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="step counts")
    parser.add_argument("--scale", type=float, default=7.5, help="CFG scale of every method")
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=None, help="AG thresholds, one row each (default: AG's own)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per method (alternated)")
    parser.add_argument("--plot", default=str(ASSETS / "ag-similarity.png"), help="similarity figure path")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    args = parser.parse_args()
    world, scorer, captions, seeds, truth = heldout_set(args.seeds)
    thresholds = args.thresholds or [AdaptiveGuidance().config.threshold]
    rows, curves = [], {}
    for name in args.models:
        extra = MODELS[name]
        pipe = load_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        for steps in args.steps:
            methods = {
                "CFG": ClassifierFreeGuidance(args.scale),
                **{f"AG {t:g}": AdaptiveGuidance(args.scale, threshold=t) for t in thresholds},
                "LinearAG": linear_ag(name, pipe, steps, args.scale, extra),
            }
            times = {m: [] for m in methods}
            outputs = {}
            for _ in range(args.repeats):
                for method, guidance in methods.items():
                    images, trace, seconds = generate(pipe, captions, seeds, steps, guidance, **extra)
                    outputs[method] = (images, trace)
                    times[method].append(seconds)
            reference = outputs["CFG"][0]
            for method, (images, trace) in outputs.items():
                accuracy = scorer.accuracy(images * 2 - 1, truth, world)
                rows.append(
                    {
                        "model": name,
                        "steps": steps,
                        "method": method,
                        "nfe": trace.nfe,
                        "time_ratio": statistics.median(times[method]) / statistics.median(times["CFG"]),
                        **{k: 100 * accuracy[k] for k in ATTRIBUTES},
                        "psnr": psnr(images, reference) if method != "CFG" else float("inf"),
                    }
                )
            if steps == args.steps[0]:
                for compared in ("x0", "prediction", "xt_minus_prediction"):
                    probe = AdaptiveGuidance(args.scale, threshold=1.0, compared=compared)
                    _, trace, _ = generate(pipe, captions[:4], [0], steps, probe, **extra)
                    curves[f"{name}: {compared}"] = {
                        captions[b][2:24]: [step["similarity"][b] for step in trace.extras] for b in range(4)
                    }
                    print(
                        f"{name} {compared}: gamma_t of prompt 0 "
                        + " ".join(f"{g:.4f}" for g in curves[f"{name}: {compared}"][captions[0][2:24]])
                    )
            print(f"{name} {steps} steps: done", flush=True)

    header = "| model | steps | method | NFE | NFE ratio | time ratio | color | shape | position | PSNR to CFG (dB) |"
    lines = [header, "| --- " * 10 + "|"]
    for row in rows:
        cfg_nfe = next(r["nfe"] for r in rows if r["model"] == row["model"] and r["steps"] == row["steps"])
        lines.append(
            f"| {row['model']} | {row['steps']} | {row['method']} | {row['nfe']:.1f} | {row['nfe'] / cfg_nfe:.3f} | "
            f"{row['time_ratio']:.3f} | {row['color']:.1f} | {row['shape']:.1f} | {row['position']:.1f} | "
            f"{row['psnr']:.1f} |"
        )
    print(f"{len(captions)} held-out captions x {len(seeds)} seeds, scale {args.scale}")
    print("\n".join(lines))
    keep = {k: v for k, v in curves.items() if k.endswith(": x0") or k.endswith(": prediction")}
    similarity_plot(keep if len(keep) > 1 else curves, args.plot)


if __name__ == "__main__":
    main()
