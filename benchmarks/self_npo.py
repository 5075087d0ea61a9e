"""Self-NPO on the shapes world, in one run: CFG against CFG with the shipped negative-preference adapter in the
unconditional branch (assets/shapes-sd-npo) at scales 3, 5, 7.5 and 10, NPO with Adaptive Guidance and with dynamic
guidance (each beside its own run without NPO), and the NPO model alone (the adapter on every row). Held-out
captions x seeds. Columns: attribute accuracy (the attribute scorer, never seen in training), errors, a Fréchet
distance between generated and real held-out images on the shapes-world CLIP's image features, CLIP score, NFEs,
wall-time ratio to CFG 7.5 (alternated rounds), peak memory (CUDA only). Figure: the same seeds with and without NPO.

    python -m benchmarks.self_npo [--seeds 4]
    python -m benchmarks.self_npo --model shapes-sd3 --seeds 2 --no-dynamic
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.dynamic_guidance import ATTRIBUTES, FOLLOWED, clip_score
from benchmarks.heldout import generate, heldout_set
from benchmarks.results import FIGURES, ROOT, environment, machine, write_results
from guidance import AdaptiveGuidance, ClassifierFreeGuidance, DynamicGuidance
from guidance.evaluators import ClipEvaluator
from guidance.evaluators.latent import LatentEvaluator
from guidance.lora import lora_layers, set_active_adapters
from guidance.npo import load_npo_adapter
from guidance.shapes.assets import ASSETS, SHAPES_SD3_MAX_SEQUENCE_LENGTH, shapes_clip
from pipelines.application.models import load_shapes_pipeline

SCALES = (3.0, 5.0, 7.5, 10.0)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (n, d)."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mean = ((a.mean(0) - b.mean(0)) ** 2).sum()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(mean + np.trace(cov_a + cov_b - 2 * np.real(root)))


class AdapterEverywhere:
    """The NPO model alone: the adapter on for every row of every pass (then off again)."""

    def __init__(self, pipe):
        self.layers = lora_layers(pipe.denoiser)

    def __enter__(self):
        set_active_adapters(self.layers, ["npo"])

    def __exit__(self, *exc):
        set_active_adapters(self.layers, [])


def memory_probe(args, name: str) -> float:
    """MiB: the peak resident set of a fresh process that loads the model and the adapter and generates one timing
    batch with method `name` (the same load in every probe, so differences are the method's)."""
    import json
    import subprocess

    command = [
        sys.executable,
        "-m",
        "benchmarks.self_npo",
        "--model",
        args.model,
        "--adapter",
        args.adapter,
        "--steps",
        str(args.steps),
        "--probe",
        name,
    ] + (["--captions", str(args.captions)] if args.captions else [])
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def probe(args, pipe, captions, extra, policy) -> None:
    """Run one timing batch and print the process's peak resident memory (Linux: ru_maxrss in KiB)."""
    import json
    import resource

    generate(pipe, captions, [0], args.steps, policy, **extra)
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per held-out caption")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--captions", type=int, default=None, help="only the first held-out captions (smoke runs)")
    parser.add_argument("--repeats", type=int, default=4, help="timing: alternated rounds")
    parser.add_argument("--no-dynamic", action="store_true", help="leave out the dynamic-guidance rows (slow on SD3)")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # memory_probe's child process
    parser.add_argument("--model", choices=("shapes-sd", "shapes-sd3"), default="shapes-sd", help="the model")
    parser.add_argument("--adapter", default=None, help="the Self-NPO LoRA folder (default: assets/<model>-npo)")
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    parser.add_argument("--figures", default=str(FIGURES), help="folder for the figure")
    args = parser.parse_args()
    env = environment()
    world, scorer, captions, seeds, truth = heldout_set(args.seeds, args.captions)
    prompts = [caption for _ in seeds for caption in captions]
    pipe = load_shapes_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    args.adapter = args.adapter or str(ASSETS / f"{args.model}-npo")
    npo = load_npo_adapter(pipe, args.adapter)
    clip = ClipEvaluator(shapes_clip())
    sd3 = args.model == "shapes-sd3"
    extra = {"max_sequence_length": SHAPES_SD3_MAX_SEQUENCE_LENGTH} if sd3 else {}
    if sd3:  # the latent heads are shapes-sd's; the CLIP scores decoded x0 estimates
        heads, dynamic = [ClipEvaluator(shapes_clip())], "dynamic (CLIP)"
    else:
        heads = [LatentEvaluator.from_pretrained(ASSETS / f"shapes-sd-latent-{kind}") for kind in ("clip", "fidelity")]
        dynamic = "dynamic (latent heads)"
    methods = {}
    for scale in SCALES:
        methods[f"CFG {scale:g}"] = lambda s=scale: ClassifierFreeGuidance(s)
        methods[f"CFG {scale:g} + NPO"] = lambda s=scale: ClassifierFreeGuidance(s, unconditional=npo)
    methods["AG 7.5"] = lambda: AdaptiveGuidance(7.5)
    methods["AG 7.5 + NPO"] = lambda: AdaptiveGuidance(7.5, unconditional=npo)
    if not args.no_dynamic:
        methods[dynamic] = lambda: DynamicGuidance((5, 7.5, 10, 15), evaluators=heads)
        methods[f"{dynamic} + NPO"] = lambda: DynamicGuidance((5, 7.5, 10, 15), evaluators=heads, unconditional=npo)
    if args.probe:
        probe(args, pipe, captions, extra, methods[args.probe]())
        return
    real = world.render(truth, torch.Generator().manual_seed(1))
    with torch.no_grad():
        real_features = clip.image_features(real)
    results = {}
    for name, policy in tqdm(methods.items(), desc="methods"):
        results[name] = generate(pipe, captions, seeds, args.steps, policy(), **extra)[:2]
    with AdapterEverywhere(pipe):
        alone = generate(pipe, captions, seeds, args.steps, ClassifierFreeGuidance(7.5), **extra)
    results["NPO model alone, CFG 7.5"] = alone[:2]
    timed = ["CFG 7.5", "CFG 7.5 + NPO", "AG 7.5 + NPO"]
    ratios, peak = {name: [] for name in timed}, {}
    for round_index in tqdm(range(args.repeats), desc="timing"):
        seconds = {}
        for name in timed if round_index % 2 == 0 else timed[::-1]:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            seconds[name] = generate(pipe, captions, seeds[:1], args.steps, methods[name](), **extra)[2]
            if torch.cuda.is_available():
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
    if not torch.cuda.is_available():  # on the CPU: the peak resident memory of a fresh process per method
        peak = {name: memory_probe(args, name) for name in timed}
        for name in timed:
            ratios[name].append(seconds[name] / seconds["CFG 7.5"])
    judged = len(truth) * len(FOLLOWED)
    lines = [
        f"Held-out captions: {len(captions)} x {len(seeds)} seeds = {len(truth)} images, {args.steps} steps, "
        f"{args.model}, adapter {Path(args.adapter).name}. Accuracy (%) by the attribute scorer; attribute accuracy: "
        f"the mean of {', '.join(FOLLOWED)}; errors: wrong attributes of those {judged}. FD: Fréchet distance to "
        f"{len(truth)} real held-out renders on the shapes-world CLIP's image features (lower is better). CLIP "
        f"score: 100 cos. Time ratio: wall time over CFG 7.5's on {machine(env)}, median of {args.repeats} "
        "alternated rounds. Peak memory: CUDA's peak allocation, or on the CPU the peak resident set of a fresh "
        "process per method (model and adapter loaded, one timing batch).",
        "",
        "| method | " + " | ".join(ATTRIBUTES) + " | attribute accuracy | errors | FD | CLIP score | NFE | time ratio "
        "| peak MiB |",
        "| --- " * (len(ATTRIBUTES) + 8) + "|",
    ]
    rows = {}
    for name, (images, trace) in results.items():
        accuracy = scorer.accuracy(images * 2 - 1, truth, world)
        errors = round(sum(1 - accuracy[key] for key in FOLLOWED) * len(truth))
        with torch.no_grad():
            distance = frechet_distance(clip.image_features(images * 2 - 1), real_features)
        ratio = statistics.median(ratios[name]) if name in ratios else None
        rows[name] = {
            "accuracy": accuracy,
            "errors": errors,
            "fd": distance,
            "nfe": trace.nfe,
            "time_ratio": ratio,
            "clip_score": clip_score(clip, images, prompts),
            "peak_mib": peak.get(name),
        }
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * accuracy[k]:.1f}" for k in ATTRIBUTES) + f" | "
            f"{100 * (1 - errors / judged):.2f} | {errors} | {distance:.4f} | {rows[name]['clip_score']:.2f} | "
            f"{trace.nfe:g} | {'-' if ratio is None else f'{ratio:.3f}'} | "
            f"{'-' if name not in peak else f'{peak[name]:.0f}'} |"
        )
    table = "\n".join(lines)
    print(table)
    name = "self-npo" if not sd3 else "self-npo-sd3"
    write_results(name, table, rows, args.out, env)
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    figure(results, len(captions), Path(args.figures) / f"{name}.png", args.model)


def figure(results, count: int, path: Path, model: str) -> None:
    """Seed 0, the first captions: CFG 7.5, CFG 7.5 + NPO, the NPO model alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["CFG 7.5", "CFG 7.5 + NPO", "NPO model alone, CFG 7.5"]
    columns = min(count, 8)
    fig, axes = plt.subplots(len(names), columns, figsize=(1.2 * columns, 1.3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(columns):
            axes[r][c].imshow(results[name][0][c].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(name.replace(", CFG 7.5", ""), fontsize=7)
    fig.suptitle(f"the same seeds with and without the Self-NPO adapter ({model}, held-out captions)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
