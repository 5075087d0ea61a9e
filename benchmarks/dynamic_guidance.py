"""Dynamic CFG from online feedback against fixed scales, side by side in one run, on the shapes-world SD model.

Held-out captions for several seeds, 20 steps. For each method: attribute accuracy (the attribute scorer, never
used as feedback), CLIP score of the final images (the shapes-world CLIP), mean chosen scale, NFEs and the
wall-time ratio to constant CFG. Methods: CFG at each fixed scale; DynamicGuidance with pixel evaluators (CLIP
and the fidelity discriminator, decoding every candidate) and with latent evaluators (their distilled heads, no
decode); and the paper's ablation, the mean dynamic schedule (per-step mean of the chosen scales) applied to
every prompt. Writes a table (stdout and assets/dynamic-guidance.md) and a figure (assets/dynamic-guidance.png).

    python benchmarks/dynamic_guidance.py [--seeds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from diffusers.configuration_utils import register_to_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from heldout import generate, heldout_set  # noqa: E402

from guidance import ClassifierFreeGuidance, DynamicGuidance  # noqa: E402
from guidance.evaluators import ClipEvaluator  # noqa: E402
from guidance.evaluators.discriminator import FidelityDiscriminator  # noqa: E402
from guidance.evaluators.latent import LatentEvaluator  # noqa: E402
from guidance.shapes.assets import ASSETS, load_pipeline  # noqa: E402

FIXED = [1.0, 3.0, 5.0, 7.5, 10.0, 15.0]
ATTRIBUTES = ("color", "shape", "background")


class StepScales(ClassifierFreeGuidance):
    """CFG with a given scale per step (the mean dynamic schedule)."""

    @register_to_config
    def __init__(self, scales: list[float] = (7.5,)):
        super().__init__(guidance_scale=max(scales))

    def scale_at(self, step):
        return self.config.scales[step.step_index]


def clip_score(clip: ClipEvaluator, images: torch.Tensor, prompts: list[str]) -> float:
    with torch.no_grad():
        features = clip.image_features(images * 2 - 1)
        return (100 * (features * clip.text_features(prompts, features.device)).sum(-1)).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per held-out caption")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of CFG and the dynamic runs")
    parser.add_argument("--out", default=str(ASSETS), help="folder for the table and figure")
    args = parser.parse_args()
    world, scorer, captions, seeds, truth = heldout_set(args.seeds)
    prompts = [caption for _ in seeds for caption in captions]
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    clip = ClipEvaluator()
    pixel = [ClipEvaluator(), FidelityDiscriminator.from_pretrained(ASSETS / "shapes-sd-fidelity")]
    latent = [LatentEvaluator.from_pretrained(ASSETS / f"shapes-sd-latent-{kind}") for kind in ("clip", "fidelity")]
    methods = {f"CFG {scale:g}": ClassifierFreeGuidance(scale) for scale in FIXED}
    methods["dynamic, pixel evaluators"] = DynamicGuidance(evaluators=pixel)
    methods["dynamic, latent evaluators"] = DynamicGuidance(evaluators=latent)
    rows, traces, times = {}, {}, {name: [] for name in methods}
    for name, policy in methods.items():
        images, trace, seconds = generate(pipe, captions, seeds, args.steps, policy)
        rows[name] = (images, trace)
        times[name].append(seconds)
        traces[name] = trace
        print(f"{name}: done", flush=True)
    mean_schedule = traces["dynamic, pixel evaluators"].scales_tensor().mean(1).tolist()
    methods["mean dynamic schedule"] = StepScales(mean_schedule)
    images, trace, seconds = generate(pipe, captions, seeds, args.steps, methods["mean dynamic schedule"])
    rows["mean dynamic schedule"], times["mean dynamic schedule"] = (images, trace), [seconds]
    for _ in range(args.repeats - 1):  # more timings, alternated, for the overhead ratios
        for name in ("CFG 7.5", "dynamic, latent evaluators", "dynamic, pixel evaluators"):
            times[name].append(generate(pipe, captions, seeds, args.steps, methods[name])[2])

    cfg_time = statistics.median(times["CFG 7.5"])
    lines = [
        f"Held-out captions: {len(captions)} x {len(seeds)} seeds, {args.steps} steps; accuracy (%) by the attribute "
        "scorer; CLIP score: 100 cos with the shapes-world CLIP; time ratio to CFG 7.5 (2 CPU cores).",
        "",
        "| method | " + " | ".join(ATTRIBUTES) + " | color+shape mean | CLIP score | mean scale | NFE | time ratio |",
        "| --- " * (len(ATTRIBUTES) + 6) + "|",
    ]
    summary = {}
    for name, (images, trace) in rows.items():
        accuracy = scorer.accuracy(images * 2 - 1, truth, world)
        both = (accuracy["color"] + accuracy["shape"]) / 2
        summary[name] = both
        ratio = statistics.median(times[name]) / cfg_time
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * accuracy[k]:.1f}" for k in ATTRIBUTES) + f" | {100 * both:.1f} | "
            f"{clip_score(clip, images, prompts):.2f} | {trace.scales_tensor().mean():.2f} | {trace.nfe:g} | "
            f"{ratio:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    (out / "dynamic-guidance.md").write_text(table + "\n")
    figure(traces, mean_schedule, summary, out / "dynamic-guidance.png")


def figure(traces, mean_schedule, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name in ("dynamic, pixel evaluators", "dynamic, latent evaluators"):
        scales = traces[name].scales_tensor()
        left.plot(scales.mean(1).tolist(), marker=".", label=f"{name}: mean")
        left.fill_between(range(len(scales)), scales.quantile(0.25, 1), scales.quantile(0.75, 1), alpha=0.2)
    left.plot(mean_schedule, linestyle="--", color="gray", label="mean dynamic schedule (pixel)")
    left.set_xlabel("step")
    left.set_ylabel("chosen scale (mean, quartiles)")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    names = list(summary)
    right.barh(names, [100 * summary[n] for n in names], color=["C0" if n.startswith("CFG") else "C1" for n in names])
    right.set_xlabel("held-out accuracy, mean of color and shape (%)")
    right.set_xlim(min(100 * v for v in summary.values()) - 5, 100)
    right.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
