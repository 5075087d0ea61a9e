"""AG and LinearAG against CFG, side by side in one run, on the shapes-world models.

For each model (shapes-sd, shapes-sd3) and step count (20, 50): every held-out caption for several seeds with CFG,
Adaptive Guidance and LinearAG. Prints NFEs per image, the wall-time ratio to CFG (methods alternated, median of
repeats), attribute accuracy (the scorer) and the PSNR of each image to the CFG image of the same seed. LinearAG in
three placements of its exact steps (the unconditional passes that run): the first 20% (the default; the coefficients
shipped in assets/linear-ag for 20 steps), the second half (the paper replaces the pass in the first half of sampling)
and the last 20% (as many passes as the default); other placements and step counts calibrate on the 200 training
captions of assets/shapes-calibration-prompts.txt. `--split training` runs on training captions and other seeds (where
the placement is chosen). Also draws the per-step similarity gamma_t for a few prompts, one figure per model
(docs/figures/ag-similarity-sd.png, -sd3.png). Writes benchmarks/results/<--name>.md/.json.

    python -m benchmarks.adaptive_guidance [--seeds 2] [--steps 20 50] [--scale 7.5] [--thresholds 0.995 0.999]
    python -m benchmarks.adaptive_guidance --split training --name adaptive-guidance-training
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks.heldout import generate, heldout_set
from benchmarks.results import FIGURES, environment, machine, write_results
from guidance import AdaptiveGuidance, ClassifierFreeGuidance, LinearAdaptiveGuidance
from guidance.shapes.assets import ASSETS, SHAPES_SD3_MAX_SEQUENCE_LENGTH
from pipelines.application.models import load_shapes_pipeline
from pipelines.training.linear_ag import calibrate

MODELS = {"shapes-sd": {}, "shapes-sd3": {"max_sequence_length": SHAPES_SD3_MAX_SEQUENCE_LENGTH}}
ATTRIBUTES = ("color", "shape", "position")


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((images - reference) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


PLACEMENTS = {  # name -> the exact steps of a run of n timesteps (None: LinearAG's default, the first 20%)
    "first 20% exact": lambda n: None,
    "second half exact (the paper)": lambda n: list(range(n // 2, n)),
    "last 20% exact": lambda n: list(range(n - max(1, round(0.2 * n)), n)),
}


def linear_ag(name, pipe, steps, scale, extra, calibration_prompts, placement):
    exact = PLACEMENTS[placement](steps)  # the shapes models step once per evaluation (DDIM, FlowMatch Euler)
    folder = ASSETS / "linear-ag" / f"{name}-{steps}"
    if exact is None and folder.is_dir():
        return LinearAdaptiveGuidance.from_pretrained(folder, guidance_scale=scale)
    prompts = (ASSETS / "shapes-calibration-prompts.txt").read_text().split("\n")
    policy, _ = calibrate(pipe, [p for p in prompts if p][:calibration_prompts], steps, scale, exact, **extra)
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
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds of every method")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    parser.add_argument("--captions", type=int, default=None, help="only the first held-out captions (smoke runs)")
    parser.add_argument("--calibration-prompts", type=int, default=200, help="LinearAG calibration trajectories")
    parser.add_argument(
        "--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS), help="LinearAG's exact steps"
    )
    parser.add_argument("--split", default="heldout", choices=["heldout", "training"], help="captions and seeds")
    parser.add_argument("--name", default="adaptive-guidance", help="name of the results files")
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    parser.add_argument("--figures", default=str(FIGURES), help="folder for the similarity figures")
    args = parser.parse_args()
    env = environment()
    world, scorer, captions, seeds, truth = heldout_set(args.seeds, args.captions, args.split)
    thresholds = args.thresholds or [AdaptiveGuidance().config.threshold]
    rows, curves = [], {}
    for name in args.models:
        extra = MODELS[name]
        pipe = load_shapes_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        for steps in args.steps:
            methods = {
                "CFG": ClassifierFreeGuidance(args.scale),
                **{f"AG {t:g}": AdaptiveGuidance(args.scale, threshold=t) for t in thresholds},
                **{
                    f"LinearAG, {placement}": linear_ag(
                        name, pipe, steps, args.scale, extra, args.calibration_prompts, placement
                    )
                    for placement in args.placements
                },
            }
            # rounds of every method in turn, the order reversed every other round; a method's time ratio is the
            # median over rounds of its time over the same round's CFG time, so that drifts of the machine cancel
            ratios = {m: [] for m in methods}
            outputs = {}
            for round_index in range(args.repeats):
                order = list(methods) if round_index % 2 == 0 else list(methods)[::-1]
                seconds = {}
                for method in order:
                    images, trace, seconds[method] = generate(pipe, captions, seeds, steps, methods[method], **extra)
                    outputs[method] = (images, trace)
                for method in methods:
                    ratios[method].append(seconds[method] / seconds["CFG"])
            reference = outputs["CFG"][0]
            for method, (images, trace) in outputs.items():
                accuracy = scorer.accuracy(images * 2 - 1, truth, world)
                rows.append(
                    {
                        "model": name,
                        "steps": steps,
                        "method": method,
                        "nfe": trace.nfe,
                        "time_ratio": statistics.median(ratios[method]),
                        **{k: 100 * accuracy[k] for k in ATTRIBUTES},
                        "psnr": psnr(images, reference) if method != "CFG" else float("inf"),
                    }
                )
            if steps == args.steps[0]:
                probes = captions[:: max(1, len(captions) // 4)][:4]  # four different held-out combinations
                for compared in ("x0", "prediction", "xt_minus_prediction"):
                    probe = AdaptiveGuidance(args.scale, threshold=1.0, compared=compared)
                    _, trace, _ = generate(pipe, probes, [0], steps, probe, **extra)
                    curves.setdefault(name, {})[compared] = {
                        probes[b].removeprefix("a "): [step["similarity"][b] for step in trace.extras]
                        for b in range(len(probes))
                    }
            print(f"{name} {steps} steps: done", flush=True)

    header = "| model | steps | method | NFE | NFE ratio | time ratio | color | shape | position | PSNR to CFG (dB) |"
    lines = [
        f"{len(captions)} {'held-out' if args.split == 'heldout' else 'training'} captions x {len(seeds)} seeds "
        f"({seeds[0]}-{seeds[-1]}), scale {args.scale}, {machine(env)}; time ratio: "
        f"median over {args.repeats} rounds (order reversed every other round) of the wall time over the same "
        "round's CFG time.",
        "",
        header,
        "| --- " * 10 + "|",
    ]
    for row in rows:
        cfg_nfe = next(r["nfe"] for r in rows if r["model"] == row["model"] and r["steps"] == row["steps"])
        lines.append(
            f"| {row['model']} | {row['steps']} | {row['method']} | {row['nfe']:.1f} | {row['nfe'] / cfg_nfe:.3f} | "
            f"{row['time_ratio']:.3f} | {row['color']:.1f} | {row['shape']:.1f} | {row['position']:.1f} | "
            f"{row['psnr']:.1f} |"
        )
    for name, per_quantity in curves.items():
        for compared, per_prompt in per_quantity.items():
            first = next(iter(per_prompt.values()))
            lines.append(f"\n{name} {compared}: gamma_t of prompt 0: " + " ".join(f"{g:.4f}" for g in first))
    table = "\n".join(lines)
    print(table)
    write_results(args.name, table, {"rows": rows, "similarity": curves}, args.out, env)
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    for name, per_quantity in curves.items():
        shown = {f"{name}: {q}": per_quantity[q] for q in ("x0", "prediction")}
        similarity_plot(shown, Path(args.figures) / f"ag-similarity-{name.removeprefix('shapes-')}.png")


if __name__ == "__main__":
    main()
