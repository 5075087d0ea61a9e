"""FlowOpt inversion and editing on the shapes world (shapes:sd3), side by side with its baselines in one run.

Sources are real images from the world's renderer (never model samples): every held-out scene (or, with
`--split training`, training scenes). Edits change one attribute to the next value of its list: colour, background
and shape (position and size reported apart, as harder). Success: the attribute scorer reads the target value;
preservation: it reads every other attribute unchanged; for colour edits also the PSNR to the source outside the
shape. Methods: iterate 0 ("invert, then regenerate"), FlowOpt with a fixed and with the "auto" step size, FlowOpt
with Adaptive Guidance inside its solves, FlowOpt with the paper's settings, and FlowEdit with its own; NFEs per image
and wall time. Inversion: the PSNR of every iterate to the source against the VAE round trip's.

The settings were chosen on training scenes by `--split training` (the sweep, results file
`flowopt-editing-training`); the held-out run (the default) uses them. Figures: docs/figures/flowopt-curves.png and
docs/figures/flowopt-grid.png.

    python -m benchmarks.flowopt_editing [--split training] [--scenes 48]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.results import FIGURES, environment, machine, write_results
from guidance import AdaptiveGuidance
from guidance.shapes.assets import SHAPES_SD3_MAX_SEQUENCE_LENGTH, load_scorer, load_world
from guidance.shapes.world import ATTRIBUTES
from pipelines.application.models import load_shapes_pipeline

EXTRA = {"max_sequence_length": SHAPES_SD3_MAX_SEQUENCE_LENGTH, "output_type": "pt"}
MAIN_EDITS, HARD_EDITS = ("color", "background", "shape"), ("position", "size")
# chosen on training scenes (`--split training`, benchmarks/results/flowopt-editing-training.md)
CHOSEN = {
    "edit": {"num_inference_steps": 15, "n_max": 15, "step_size": 0.02, "iterations": 4},
    "auto_iterations": 1,
    "invert": {"num_inference_steps": 10, "n_max": 10, "step_size": 0.2},
}
PAPER_EDIT = {"num_inference_steps": 15, "n_max": 12, "step_size": 0.01, "iterations": 8}
INVERSION_ITERATIONS = 30
# the training sweep
SWEEP_N_MAX, SWEEP_STEP_SIZES, SWEEP_INVERSION_STEP_SIZES = (12, 15), (0.02, 0.05, 0.1), (0.01, 0.05, 0.1, 0.2, 0.5)


@dataclass
class Cases:
    """Source scenes and images ([0, 1]), their captions, and per edited attribute the target scenes, captions and
    (colour) the mask of pixels outside the shape."""

    scenes: list
    images: torch.Tensor
    captions: list[str]
    targets: dict
    target_captions: dict
    outside: torch.Tensor


def make_cases(world, split: str, count: int | None, seed: int = 0) -> Cases:
    if split == "heldout":
        scenes = world.heldout_scenes()[:count]
    else:
        scenes = world.training_scenes()
        random.Random(seed).shuffle(scenes)
        scenes = scenes[: count or 48]

    def shifted(scene, attribute):
        values = world.values[attribute]
        return replace(scene, **{attribute: values[(values.index(getattr(scene, attribute)) + 1) % len(values)]})

    targets = {a: [shifted(s, a) for s in scenes] for a in MAIN_EDITS + HARD_EDITS}
    render = lambda s: world.render(s, torch.Generator().manual_seed(seed + 1))  # noqa: E731  same jitter per image
    images = render(scenes)
    outside = (images == render(targets["color"])).all(1, keepdim=True)
    captions = {a: [world.caption(s) for s in t] for a, t in targets.items()}
    return Cases(scenes, (images + 1) / 2, [world.caption(s) for s in scenes], targets, captions, outside)


def psnr(images: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per image, for images in [0, 1]; over the pixels of `mask` when given."""
    mask = torch.ones_like(images[:, :1]) if mask is None else mask.float()
    mse = ((images - reference) ** 2 * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * images.shape[1])
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def judge(scorer, world, images: torch.Tensor, cases: Cases, attribute: str) -> dict:
    """Success, preservation, their product and (colour) the PSNR outside the shape, of edited images in [0, 1]."""
    predicted = scorer.predict(images * 2 - 1)
    truth = world.labels(cases.targets[attribute])
    success = predicted[attribute] == truth[attribute]
    preserved = torch.stack([predicted[a] == truth[a] for a in ATTRIBUTES if a != attribute]).all(0)
    metrics = {"success": success.float().mean().item(), "preservation": preserved.float().mean().item()}
    metrics["product"] = metrics["success"] * metrics["preservation"]
    if attribute == "color":
        metrics["psnr_outside"] = psnr(images, cases.images, cases.outside).mean().item()
    return metrics


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def edit(pipe, cases: Cases, attribute: str, **settings):
    return timed(
        lambda: pipe.edit(list(cases.images), cases.captions, cases.target_captions[attribute], **settings, **EXTRA)
    )


def invert(pipe, cases: Cases, **settings):
    return timed(lambda: pipe.invert(list(cases.images), cases.captions, **settings, **EXTRA))


def curves(pipe, scorer, world, cases: Cases, attributes, **settings) -> dict:
    """Per attribute and iteration k, the metrics of the edit stopped at k (one run with its iterates)."""
    out = {}
    for attribute in attributes:
        result, _ = edit(pipe, cases, attribute, return_iterates=True, **settings)
        out[attribute] = [judge(scorer, world, image, cases, attribute) for image in result.iterates]
    return out


def mean_product(per_attribute: dict, k: int) -> float:
    return sum(values[min(k, len(values) - 1)]["product"] for values in per_attribute.values()) / len(per_attribute)


def inversion_curve(pipe, cases: Cases, iterations: int, **settings) -> dict:
    result, seconds = invert(pipe, cases, iterations=iterations, return_iterates=True, **settings)
    psnrs = [psnr(image, cases.images).mean().item() for image in result.iterates]
    residuals = [sum(r) / len(r) for r in result.residuals]
    return {"psnr": psnrs, "residual": residuals, "nfe": result.nfe, "seconds": seconds}


def vae_ceiling(pipe, cases: Cases) -> float:
    """PSNR of the VAE's round trip of the sources: what no inversion can beat."""
    latents = pipe.pixels_to_latents(cases.images * 2 - 1)
    return psnr(pipe.decode_for_guidance(latents) / 2 + 0.5, cases.images).mean().item()


def training_sweep(pipe, scorer, world, cases: Cases, args) -> tuple[str, dict]:
    """Edits: every (n_max, eta) over 8 iterations; the best k >= 1 on colour and background (mean success x
    preservation, ties to the colour PSNR outside the shape). Auto: its best k. Inversion: the step size of the best
    PSNR after `--inversion-iterations`."""
    rows, edits = [], {}
    for n_max in args.sweep_n_max:
        for step_size in args.sweep_step_sizes:
            settings = {"num_inference_steps": 15, "n_max": n_max, "step_size": step_size, "iterations": 8}
            edits[(n_max, step_size)] = curves(pipe, scorer, world, cases, ("color", "background"), **settings)
    for n_max in args.sweep_n_max:
        settings = {
            "num_inference_steps": 15,
            "n_max": n_max,
            "step_size": "auto",
            "iterations": 8,
            "generator": torch.Generator().manual_seed(0),
        }
        edits[(n_max, "auto")] = curves(pipe, scorer, world, cases, ("color", "background"), **settings)
    for (n_max, step_size), per_attribute in edits.items():
        for k in range(len(per_attribute["color"])):
            color = per_attribute["color"][min(k, len(per_attribute["color"]) - 1)]
            rows.append((n_max, step_size, k, mean_product(per_attribute, k), color["psnr_outside"]))
    fixed = [r for r in rows if r[1] != "auto" and r[2] >= 1]
    best = max(fixed, key=lambda r: (round(r[3], 3), r[4]))
    best_auto = max((r for r in rows if r[1] == "auto" and r[2] >= 1 and r[0] == best[0]), key=lambda r: (r[3], r[4]))
    inversion = {
        eta: inversion_curve(pipe, cases, args.inversion_iterations, step_size=eta)
        for eta in args.sweep_inversion_step_sizes
    }
    best_inversion = max(inversion, key=lambda eta: inversion[eta]["psnr"][-1])
    lines = [
        f"Training scenes: {len(cases.scenes)} rendered sources, shapes:sd3, target CFG 3.5, T 15. Score: the mean "
        "over colour and background edits of success x preservation after k iterations (k = 0: iterate 0); "
        "PSNR: colour edits, outside the shape.",
        "",
        "| n_max | step size | " + " | ".join(f"k={k}" for k in range(9)) + " |",
        "| --- " * 11 + "|",
    ]
    for (n_max, step_size), per_attribute in edits.items():
        cells = []
        for k in range(9):
            color = per_attribute["color"][min(k, len(per_attribute["color"]) - 1)]
            cells.append(f"{mean_product(per_attribute, k):.3f} / {color['psnr_outside']:.1f} dB")
        lines.append(f"| {n_max} | {step_size} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| inversion step size | " + " | ".join(f"PSNR k={k}" for k in (0, 5, 10, 20, 30)) + " |",
        "| --- " * 6 + "|",
    ]
    for eta, curve in inversion.items():
        picks = [curve["psnr"][min(k, len(curve["psnr"]) - 1)] for k in (0, 5, 10, 20, 30)]
        lines.append(f"| {eta} | " + " | ".join(f"{p:.2f}" for p in picks) + " |")
    chosen = {
        "edit": {"num_inference_steps": 15, "n_max": best[0], "step_size": best[1], "iterations": best[2]},
        "auto_iterations": best_auto[2],
        "invert": {"num_inference_steps": 10, "n_max": 10, "step_size": best_inversion},
    }
    lines += ["", f"Chosen: {chosen}"]
    data = {"chosen": chosen, "rows": [list(r) for r in rows], "inversion": {str(k): v for k, v in inversion.items()}}
    return "\n".join(lines), data


def heldout_run(pipe, scorer, world, cases: Cases, args, env) -> tuple[str, dict, dict]:
    edit_settings = dict(CHOSEN["edit"])
    k = edit_settings["iterations"]
    auto = {**edit_settings, "step_size": "auto", "iterations": CHOSEN["auto_iterations"]}
    methods = {
        "iterate 0 (invert, regenerate)": lambda a: edit(pipe, cases, a, **{**edit_settings, "iterations": 0}),
        f"FlowOpt, eta {edit_settings['step_size']}, {k} it.": lambda a: edit(pipe, cases, a, **edit_settings),
        f"FlowOpt, auto, {auto['iterations']} it.": lambda a: edit(
            pipe, cases, a, **auto, generator=torch.Generator().manual_seed(0)
        ),
        f"FlowOpt + AG 0.995, eta {edit_settings['step_size']}, {k} it.": lambda a: edit(
            pipe, cases, a, **edit_settings, guidance=AdaptiveGuidance(3.5)
        ),
        "FlowOpt, the paper's settings": lambda a: edit(pipe, cases, a, **PAPER_EDIT),
        "FlowEdit, its settings (T 50, n_max 33, CFG 3.5/13.5)": lambda a: timed(
            lambda: pipe.flowedit(
                list(cases.images),
                cases.captions,
                cases.target_captions[a],
                generator=torch.Generator().manual_seed(0),
                **EXTRA,
            )
        ),
    }
    table, outputs = {}, {}
    for name, run in tqdm(methods.items(), desc="methods"):
        for attribute in args.attributes:
            result, seconds = run(attribute)
            metrics = judge(scorer, world, result.images, cases, attribute)
            table[(name, attribute)] = {**metrics, "nfe": result.nfe, "seconds_per_image": seconds / len(cases.scenes)}
            outputs[(name, attribute)] = result.images
    ceiling = vae_ceiling(pipe, cases)
    inversion = {
        f"eta {CHOSEN['invert']['step_size']}": inversion_curve(
            pipe, cases, args.inversion_iterations, **CHOSEN["invert"]
        ),
        "auto": inversion_curve(
            pipe,
            cases,
            args.inversion_iterations,
            **{**CHOSEN["invert"], "step_size": "auto"},
            generator=torch.Generator().manual_seed(0),
        ),
        "eta 0.01 (the paper's)": inversion_curve(
            pipe, cases, args.inversion_iterations, **{**CHOSEN["invert"], "step_size": 0.01}
        ),
    }
    gains = gain_estimates(pipe, cases, edit_settings)
    edit_curves = curves(
        pipe,
        scorer,
        world,
        cases,
        [a for a in ("color", "background") if a in args.attributes],
        **{**edit_settings, "iterations": 8},
    )
    markdown = held_out_markdown(table, inversion, ceiling, edit_curves, cases, args, env, gains)
    data = {
        "edits": {f"{name} | {attribute}": row for (name, attribute), row in table.items()},
        "inversion": inversion,
        "vae_ceiling_psnr": ceiling,
        "edit_curves": edit_curves,
        "auto_gain_estimates": gains,
        "chosen": CHOSEN,
    }
    return markdown, data, {"inversion": inversion, "ceiling": ceiling, "edit_curves": edit_curves, "outputs": outputs}


def gain_estimates(pipe, cases: Cases, settings: dict, probes=(2, 20)) -> dict:
    """ "auto"'s estimate of the solve's gain L (1 / its first step size), per image, with its 2 power-iteration
    probes and with a longer power iteration: how far the short estimate is from the converged one."""
    estimates = {}
    for count in probes:
        result, _ = edit(
            pipe,
            cases,
            "color",
            **{**settings, "step_size": "auto", "iterations": 0},
            probes=count,
            generator=torch.Generator().manual_seed(0),
        )
        estimates[count] = [1 / eta for eta in result.step_sizes[0]]
    short, long = estimates[probes[0]], estimates[probes[-1]]
    ratios = [a / b for a, b in zip(short, long, strict=True)]
    return {
        "probes": list(probes),
        "L": {str(k): v for k, v in estimates.items()},
        "ratio": ratios,
        "median_ratio": float(torch.tensor(ratios).median()),
    }


def held_out_markdown(table, inversion, ceiling, edit_curves, cases, args, env, gains) -> str:
    names = list(dict.fromkeys(name for name, _ in table))
    lines = [
        f"Held-out scenes: {len(cases.scenes)} rendered sources (every held-out combination of colour, shape and "
        f"position, both sizes, every background), shapes:sd3 ({machine(env)}). Success / preservation in %; PSNR "
        "outside the shape for colour edits; NFE: model evaluations per image, everything included (UniInv, "
        "solves, both CFG branches); seconds per image from one batched run. Settings chosen on training scenes: "
        f"{CHOSEN}.",
        "",
    ]
    for title, attributes in (("Edits", MAIN_EDITS), ("Harder edits", HARD_EDITS)):
        attributes = [a for a in attributes if a in args.attributes]
        if not attributes:
            continue
        header = " | ".join(f"{a} success / preserved / product" for a in attributes)
        lines += [
            f"**{title}**",
            "",
            f"| method | {header} | colour PSNR outside | NFE | s / image |",
            "| --- " * (len(attributes) + 4) + "|",
        ]
        for name in names:
            rows = [table[(name, a)] for a in attributes]
            cells = " | ".join(
                f"{100 * r['success']:.0f} / {100 * r['preservation']:.0f} / {r['product']:.2f}" for r in rows
            )
            color = table.get((name, "color"), {}).get("psnr_outside")
            color_cell = f"{color:.2f} dB" if color is not None else "-"
            lines.append(
                f"| {name} | {cells} | {color_cell} | {rows[0]['nfe']:g} | {rows[0]['seconds_per_image']:.3f} |"
            )
        lines.append("")
    lines += [
        f"**Inversion** (VAE round trip, the ceiling: {ceiling:.2f} dB)",
        "",
        "| step size | " + " | ".join(f"PSNR k={k}" for k in (0, 1, 5, 10, 30)) + " | first k within 1 dB | NFE |",
        "| --- " * 8 + "|",
    ]
    for name, curve in inversion.items():
        within = next((k for k, value in enumerate(curve["psnr"]) if value >= ceiling - 1), None)
        picks = [curve["psnr"][min(k, len(curve["psnr"]) - 1)] for k in (0, 1, 5, 10, 30)]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{p:.2f}" for p in picks)
            + f" | {within if within is not None else 'never'} | {curve['nfe']:g} |"
        )
    lines += [
        "",
        "Edit curves (FlowOpt at the chosen step size, 8 iterations; product per k): "
        + "; ".join(f"{a}: " + " ".join(f"{m['product']:.2f}" for m in values) for a, values in edit_curves.items()),
    ]
    lines += [
        "",
        f"**auto's gain estimate**: L from {gains['probes'][0]} power-iteration probes over L from "
        f"{gains['probes'][1]}, median over the scenes {gains['median_ratio']:.3f} (range "
        f"{min(gains['ratio']):.3f} to {max(gains['ratio']):.3f}); auto's guarantee is its backtracking (a "
        "non-increasing residual), not this estimate.",
    ]
    return "\n".join(lines)


def figures(pipe, cases: Cases, found: dict, folder: Path, attributes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, curve in found["inversion"].items():
        axes[0].plot(curve["psnr"], label=name)
        axes[1].semilogy(curve["residual"], label=name)
    axes[0].axhline(found["ceiling"], color="k", linestyle="--", linewidth=1, label="VAE round trip")
    axes[0].set(title="inversion: PSNR of f(z_k) to the source", xlabel="iteration k", ylabel="dB")
    axes[1].set(title="inversion: residual RMS |f(z_k) - y|", xlabel="iteration k")
    for attribute, values in found["edit_curves"].items():
        axes[2].plot([m["product"] for m in values], marker=".", label=f"{attribute}: success x preservation")
    if "color" in found["edit_curves"]:
        twin = axes[2].twinx()
        twin.plot([m["psnr_outside"] for m in found["edit_curves"]["color"]], "k:", label="colour: PSNR outside")
        twin.set_ylabel("dB")
        twin.legend(loc="center right", fontsize=7)
    axes[2].set(title="edits against FlowOpt iterations", xlabel="iteration k", ylim=(0, 1.05))
    for axis, where in zip(axes, ("lower right", "upper right", "lower left"), strict=True):
        axis.legend(fontsize=7, loc=where)
    fig.tight_layout()
    fig.savefig(folder / "flowopt-curves.png", dpi=110)
    plt.close(fig)
    # grid: per attribute, two examples: the source, FlowOpt's iterates 0..4, FlowEdit's result
    rows, row_labels = [], []
    picked = sorted({0, len(cases.scenes) // 2})
    for attribute in [a for a in MAIN_EDITS if a in attributes]:
        subset = Cases(
            [cases.scenes[i] for i in picked],
            cases.images[picked],
            [cases.captions[i] for i in picked],
            {attribute: [cases.targets[attribute][i] for i in picked]},
            {attribute: [cases.target_captions[attribute][i] for i in picked]},
            cases.outside[picked],
        )
        result, _ = edit(pipe, subset, attribute, **{**CHOSEN["edit"], "iterations": 4}, return_iterates=True)
        flowedit = [
            out for (name, a), out in found["outputs"].items() if a == attribute and name.startswith("FlowEdit")
        ]
        for row, index in enumerate(picked):
            rows.append([subset.images[row], *(x[row] for x in result.iterates), flowedit[0][index]])
            row_labels.append(f"{attribute}: -> {getattr(cases.targets[attribute][index], attribute)}")
    titles = ["source"] + [f"FlowOpt k={k}" for k in range(len(rows[0]) - 2)] + ["FlowEdit"]
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(1.3 * len(titles), 1.35 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            axes[r][c].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=7)
        axes[r][0].set_ylabel(row_labels[r], fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "flowopt-grid.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--split",
        choices=("heldout", "training"),
        default="heldout",
        help="heldout: the benchmark with the chosen settings; training: the sweep they come from",
    )
    parser.add_argument(
        "--scenes", type=int, default=None, help="sources (default: every held-out scene; 48 training)"
    )
    parser.add_argument("--attributes", nargs="+", default=list(MAIN_EDITS + HARD_EDITS), help="edits to run")
    parser.add_argument("--inversion-iterations", type=int, default=INVERSION_ITERATIONS, help="inversion iterations")
    parser.add_argument("--sweep-n-max", type=int, nargs="+", default=list(SWEEP_N_MAX), help="training: n_max grid")
    parser.add_argument(
        "--sweep-step-sizes", type=float, nargs="+", default=list(SWEEP_STEP_SIZES), help="training: edit step sizes"
    )
    parser.add_argument(
        "--sweep-inversion-step-sizes",
        type=float,
        nargs="+",
        default=list(SWEEP_INVERSION_STEP_SIZES),
        help="training: inversion step sizes",
    )
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    parser.add_argument("--figures", default=str(FIGURES), help="folder for the figures")
    args = parser.parse_args()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    env = environment()
    world, scorer = load_world(), load_scorer()
    pipe = load_shapes_pipeline("shapes-sd3")
    pipe.set_progress_bar_config(disable=True)
    cases = make_cases(world, args.split, args.scenes)
    if args.split == "training":
        markdown, data = training_sweep(pipe, scorer, world, cases, args)
        print(markdown)
        write_results("flowopt-editing-training", markdown, data, args.out, env)
        return
    markdown, data, found = heldout_run(pipe, scorer, world, cases, args, env)
    print(markdown)
    write_results("flowopt-editing", markdown, data, args.out, env)
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    figures(pipe, cases, found, Path(args.figures), args.attributes)


if __name__ == "__main__":
    main()
