"""Quality of the shapes-world models, measured in one run: does guidance make images follow held-out prompts?

For each model (shapes-sd, shapes-sd3) and guidance scale, generate every held-out caption (attribute
combinations never seen in training) for several seeds, and judge the images with the attribute scorer.
Also: the scorer's own accuracy and the open_clip model's caption-retrieval top-1 on real held-out images, and
the wall time of 8 images at 20 steps with CFG. Writes the table and data (benchmarks/results/shapes-quality.md/.json),
an accuracy-vs-scale plot and an image grid (docs/figures/).

    python -m benchmarks.shapes_quality [--seeds 2] [--steps 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.heldout import generate, heldout_set
from benchmarks.results import FIGURES, environment, machine, write_results
from guidance import ClassifierFreeGuidance
from guidance.shapes.assets import SHAPES_SD3_MAX_SEQUENCE_LENGTH, asset_path
from pipelines.application.models import load_shapes_pipeline

SCALES = [1.0, 3.0, 5.0, 7.5, 10.0]
MODELS = {"shapes-sd": {}, "shapes-sd3": {"max_sequence_length": SHAPES_SD3_MAX_SEQUENCE_LENGTH}}
REPORTED = ("color", "shape", "position", "size", "background")
GRID = [k * 6 + k % 6 for k in range(8)]  # one caption per held-out triple, sizes and backgrounds varied


def clip_retrieval(world, seeds) -> float:
    import open_clip

    folder = asset_path("shapes-clip")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    every = world.all_scenes()
    heldout = world.heldout_scenes()
    with torch.no_grad():
        text = model.encode_text(tokenizer([world.caption(s) for s in every]), normalize=True)
        hits = 0
        for seed in seeds:
            images = world.render(heldout, torch.Generator().manual_seed(1000 + seed))
            best = (model.encode_image(images, normalize=True) @ text.T).argmax(-1)
            hits += sum(every[i] == scene for i, scene in zip(best.tolist(), heldout, strict=True))
    return hits / (len(heldout) * len(seeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per held-out caption")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--captions", type=int, default=None, help="only the first held-out captions (smoke runs)")
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    parser.add_argument("--figures", default=str(FIGURES), help="folder for the plot and the grid")
    args = parser.parse_args()
    env = environment()
    world, scorer, captions, seeds, truth = heldout_set(args.seeds, args.captions)

    real = world.render(truth, torch.Generator().manual_seed(7))
    results = {
        "scorer_on_real_heldout": scorer.accuracy(real, truth, world),
        "clip_top1": clip_retrieval(world, seeds),
    }
    grids = {}
    for name, extra in MODELS.items():
        pipe = load_shapes_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        results[name] = {}
        for scale in SCALES:
            images = generate(pipe, captions, seeds, args.steps, ClassifierFreeGuidance(scale), **extra)[0] * 2 - 1
            results[name][scale] = scorer.accuracy(images, truth, world)
            grids.setdefault(name, []).append(images[[i for i in GRID if i < len(captions)]])
        generate(pipe, captions[:8], [0], args.steps, ClassifierFreeGuidance(7.5), **extra)  # warm-up
        seconds = generate(pipe, captions[:8], [0], args.steps, ClassifierFreeGuidance(7.5), **extra)[2]
        results[name]["seconds_8_images"] = seconds
        print(f"{name}: done", flush=True)

    lines = [
        f"Held-out captions: {len(captions)} x {len(seeds)} seeds, {args.steps} steps, attribute-scorer accuracy (%).",
        "",
        "| model | scale | " + " | ".join(REPORTED) + " |",
        "| --- | --- | " + " | ".join("---" for _ in REPORTED) + " |",
    ]
    for name in MODELS:
        for scale in SCALES:
            row = results[name][scale]
            lines.append(f"| {name} | {scale:g} | " + " | ".join(f"{100 * row[k]:.1f}" for k in REPORTED) + " |")
    real_row = results["scorer_on_real_heldout"]
    lines += [
        "",
        "Scorer on real held-out images: " + ", ".join(f"{k} {100 * real_row[k]:.1f}%" for k in REPORTED),
        f"open_clip caption retrieval top-1 on real held-out images (among all {len(world.all_scenes())} captions): "
        f"{100 * results['clip_top1']:.1f}%",
        f"{min(8, len(captions))} images, {args.steps} steps, CFG 7.5, {machine(env)}: "
        + ", ".join(f"{name} {results[name]['seconds_8_images']:.2f} s" for name in MODELS),
    ]
    table = "\n".join(lines)
    print(table)
    write_results("shapes-quality", table, results, args.out, env)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    plot(results, figures / "shapes-accuracy.png")
    grid(grids, [captions[i] for i in GRID if i < len(captions)], figures / "shapes-grid.png")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(MODELS), figsize=(9, 3.4), sharey=True)
    for axis, name in zip(axes, MODELS, strict=True):
        for attribute in ("color", "shape", "position"):
            axis.plot(SCALES, [100 * results[name][s][attribute] for s in SCALES], marker="o", label=attribute)
        axis.set_title(name)
        axis.set_xlabel("guidance scale")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on held-out captions (%)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def grid(grids, captions, path):
    """Rows: scales per model; columns: one held-out caption per held-out combination (seed 0)."""
    from PIL import Image, ImageDraw

    cell, label = 64, 110
    rows = [
        (name, scale, images)
        for name, per_scale in grids.items()
        for scale, images in zip(SCALES, per_scale, strict=True)
    ]
    canvas = Image.new("RGB", (label + cell * len(captions), cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, scale, images) in enumerate(rows):
        draw.text((4, r * cell + 26), f"{name[7:]} w={scale:g}", fill="black")
        for c, image in enumerate(images):
            pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(pixels).resize((cell, cell), Image.NEAREST), (label + c * cell, r * cell))
    canvas.save(path, optimize=True)
    (Path(path).with_suffix(".txt")).write_text("columns: " + " | ".join(captions) + "\n")


if __name__ == "__main__":
    main()
