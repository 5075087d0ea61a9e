"""Dynamic CFG from online feedback against fixed scales, side by side in one run, on the shapes-world SD model.

Held-out captions for several seeds, 20 steps. For each method: accuracy per attribute (the attribute scorer,
never used as feedback), CLIP score of the final images (the shapes-world CLIP), mean chosen scale, NFEs and the
wall-time ratio to constant CFG 7.5. Methods: CFG at each fixed scale; DynamicGuidance (CLIP and fidelity feedback,
adaptive weights) with latent evaluators (the distilled heads on the next latent, no decode) and with pixel
evaluators (decoding every candidate's x0), each with the paper's candidates and with `--candidates`; and the
paper's ablation, the mean dynamic schedule (per-step mean of the chosen scales of the latent `--candidates` run)
applied to every prompt. Also the FLOPs of one latent head and of the UNet per latent. Writes the table and data
(benchmarks/results/dynamic-guidance.md/.json) and a figure (docs/figures/dynamic-guidance.png).

    python -m benchmarks.dynamic_guidance [--seeds 8] [--candidates 5 7.5 10 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.heldout import generate, heldout_set
from benchmarks.results import FIGURES, environment, machine, write_results
from guidance import ClassifierFreeGuidance, DynamicGuidance
from guidance.evaluators import ClipEvaluator
from guidance.evaluators.discriminator import FidelityDiscriminator
from guidance.evaluators.latent import LatentEvaluator
from guidance.scales import StepScale
from guidance.shapes.assets import ASSETS, shapes_clip
from pipelines.application.models import load_shapes_pipeline

FIXED = [1.0, 3.0, 5.0, 7.5, 10.0, 12.0, 15.0]
PAPER_CANDIDATES = (1.0, 3.0, 7.5, 11.0, 15.0)
ATTRIBUTES = ("color", "shape", "size", "background", "position")
FOLLOWED = ("color", "shape", "size", "background")  # shapes-sd leaves position at chance (docs/shapes-world.md)


class TimedDynamicGuidance(DynamicGuidance):
    """DynamicGuidance that adds up the seconds spent choosing: its `combine` (look-ahead, evaluators, choice) is all
    that it does beyond constant CFG, so `seconds / (run time - seconds)` is its overhead, free of machine noise."""

    seconds = 0.0

    def combine(self, step, request, predictions):
        start = time.perf_counter()
        try:
            return super().combine(step, request, predictions)
        finally:
            self.seconds += time.perf_counter() - start


class PerStepScale(StepScale):
    """A given scale per step (the mean dynamic schedule)."""

    def __init__(self, scales: list[float]):
        super().__init__()
        self.scales = list(scales)

    def value(self, step):
        return self.scales[step.step_index]


def megaflops(module, *inputs) -> float:
    """Forward FLOPs of `module` on these inputs, in millions (torch's FLOP counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() / 1e6


def clip_score(clip: ClipEvaluator, images: torch.Tensor, prompts: list[str]) -> float:
    with torch.no_grad():
        features = clip.image_features(images * 2 - 1)
        return (100 * (features * clip.text_features(prompts, features.device)).sum(-1)).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8, help="seeds per held-out caption")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument(
        "--candidates",
        type=float,
        nargs="+",
        default=[5.0, 7.5, 10.0, 15.0],
        help="the model's candidate scales (default: 5-15, where fixed CFG follows prompts on shapes-sd)",
    )
    parser.add_argument("--repeats", type=int, default=6, help="timing: rounds of CFG 7.5 and every dynamic row")
    parser.add_argument("--timing-seeds", type=int, default=1, help="timing: seeds per held-out caption")
    parser.add_argument("--captions", type=int, default=None, help="only the first held-out captions (smoke runs)")
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    parser.add_argument("--figures", default=str(FIGURES), help="folder for the figure")
    args = parser.parse_args()
    env = environment()
    world, scorer, captions, seeds, truth = heldout_set(args.seeds, args.captions)
    prompts = [caption for _ in seeds for caption in captions]
    pipe = load_shapes_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    clip = ClipEvaluator(shapes_clip())
    pixel = [ClipEvaluator(shapes_clip()), FidelityDiscriminator.from_pretrained(ASSETS / "shapes-sd-fidelity")]
    latent = [LatentEvaluator.from_pretrained(ASSETS / f"shapes-sd-latent-{kind}") for kind in ("clip", "fidelity")]
    tuned = f"candidates {' '.join(f'{c:g}' for c in args.candidates)}"
    headline = f"dynamic, latent, {tuned}"
    methods = {f"CFG {scale:g}": ClassifierFreeGuidance(scale) for scale in FIXED}
    for space, evaluators in (("latent", latent), ("pixel", pixel)):  # lookahead "auto": next latent / x0
        methods[f"dynamic, {space}, {tuned}"] = TimedDynamicGuidance(args.candidates, evaluators=evaluators)
        methods[f"dynamic, {space}, paper candidates"] = TimedDynamicGuidance(PAPER_CANDIDATES, evaluators=evaluators)
    results, feedback = {}, {}
    for name, policy in tqdm(methods.items(), desc="methods"):
        images, trace, seconds = generate(pipe, captions, seeds, args.steps, policy)
        results[name] = (images, trace)
        if isinstance(policy, TimedDynamicGuidance):
            feedback[name] = policy.seconds / (seconds - policy.seconds)
    mean_schedule = results[headline][1].scales_tensor().mean(1).tolist()
    mean_policy = ClassifierFreeGuidance(PerStepScale(mean_schedule))
    results["mean dynamic schedule"] = generate(pipe, captions, seeds, args.steps, mean_policy)[:2]
    # wall time: rounds of CFG 7.5 and every dynamic row, in turn (order reversed every other round); a row's ratio
    # is the median over rounds of its time over the same round's CFG time, so that drifts of the machine cancel
    timed = ["CFG 7.5"] + list(feedback)
    ratios = {name: [] for name in timed}
    timing_seeds = list(range(args.timing_seeds))
    for round_index in tqdm(range(args.repeats), desc="timing"):
        order = timed if round_index % 2 == 0 else timed[::-1]
        seconds = {name: generate(pipe, captions, timing_seeds, args.steps, methods[name])[2] for name in order}
        for name in timed:
            ratios[name].append(seconds[name] / seconds["CFG 7.5"])
    judged = len(truth) * len(FOLLOWED)
    lines = [
        f"Held-out captions: {len(captions)} x {len(seeds)} seeds = {len(truth)} images, {args.steps} steps. Accuracy "
        f"(%) by the attribute scorer (never feedback); attribute accuracy: mean of {', '.join(FOLLOWED)} "
        f"(position is at chance for every method on shapes-sd); errors: wrong attributes of those {judged}. "
        "CLIP score: 100 cos with the shapes-world CLIP. Dynamic: CLIP + fidelity evaluators, adaptive weights; "
        "latent heads score the next latent, pixel evaluators the decoded x0. Time ratio: wall time over CFG 7.5's on "
        f"{machine(env)}, median over {args.repeats} rounds of the timed rows in turn "
        f"({len(captions) * args.timing_seeds} images each; fixed scales cost CFG's time, CFG 1 half its NFEs). "
        "Feedback cost: the time spent choosing (look-ahead, evaluators, choice: all that dynamic guidance adds to "
        "CFG) over the rest of its own run.",
        "",
        "| method | " + " | ".join(ATTRIBUTES) + " | attribute accuracy | errors | CLIP score | mean scale | NFE | "
        "time ratio | feedback cost |",
        "| --- " * (len(ATTRIBUTES) + 8) + "|",
    ]
    errors_of = {}
    for name, (images, trace) in results.items():
        accuracy = scorer.accuracy(images * 2 - 1, truth, world)
        errors = errors_of[name] = round(sum(1 - accuracy[key] for key in FOLLOWED) * len(truth))
        ratio = f"{statistics.median(ratios[name]):.3f}" if name in ratios else "-"
        cost = f"{100 * feedback[name]:.1f}%" if name in feedback else "-"
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * accuracy[k]:.1f}" for k in ATTRIBUTES) + f" | "
            f"{100 * (1 - errors / judged):.2f} | {errors} | {clip_score(clip, images, prompts):.2f} | "
            f"{trace.scales_tensor().mean():.2f} | {trace.nfe:g} | {ratio} | {cost} |"
        )
    latent_in = torch.zeros(1, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    text = torch.zeros(1, 16, pipe.unet.config.cross_attention_dim)
    flops = {
        "unet_per_latent": megaflops(pipe.unet, latent_in, torch.tensor([500]), text),
        **{head.name: megaflops(head.network, latent_in, torch.tensor([500.0])) for head in latent},
    }
    lines += ["", "Forward MFLOP per latent: " + ", ".join(f"{k} {v:.1f}" for k, v in flops.items())]
    table = "\n".join(lines)
    print(table)
    data = {
        "rows": {
            name: {
                "errors": errors_of[name],
                "nfe": trace.nfe,
                "mean_scale": trace.scales_tensor().mean().item(),
                "time_ratio": statistics.median(ratios[name]) if name in ratios else None,
                "feedback_cost": feedback.get(name),
            }
            for name, (_, trace) in results.items()
        },
        "mean_schedule": mean_schedule,
        "megaflops": flops,
    }
    write_results("dynamic-guidance", table, data, args.out, env)
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    figure(results, headline, errors_of, judged, Path(args.figures) / "dynamic-guidance.png")


def figure(results, headline, errors, judged, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.2]})
    for name in (headline, headline.replace("latent", "pixel")):
        scales = results[name][1].scales_tensor()
        label = f"{name}" + (" (its mean is the mean dynamic schedule)" if name == headline else "")
        left.plot(scales.mean(1).tolist(), marker=".", label=label)
        left.fill_between(range(len(scales)), scales.quantile(0.25, 1), scales.quantile(0.75, 1), alpha=0.15)
    left.set_xlabel("step")
    left.set_ylabel("chosen scale: mean and quartiles")
    left.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    left.grid(alpha=0.3)
    names = list(errors)
    colors = ["C0" if n.startswith("CFG") else "C1" for n in names]
    bars = right.barh(names, [errors[n] for n in names], color=colors)
    right.bar_label(bars, [str(errors[n]) for n in names], padding=2, fontsize=7)
    right.set_xscale("log")
    right.set_xticks([10, 30, 100, 300], ["10", "30", "100", "300"])
    right.minorticks_off()
    right.invert_yaxis()
    right.set_xlabel(f"attribute errors of {judged}, fewer is better")
    right.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
