"""Batch generation's throughput, side by side in one run: `generate_batch` (what `guided-generate` runs: PNGs with
their metadata written atomically, results.jsonl, resume bookkeeping) against a plain diffusers loop over the same
prompts with the same batch size that saves the PNGs; rounds alternate, images per second are medians. Target: at
least equal (ratio >= 1; the trace and the bookkeeping cost nothing). Then, on the CPU, how a whole
`guided-generate` run (start-up included) scales from 1 to 2 processes under `accelerate launch`.

    python -m benchmarks.batch_generation.py                     # shapes:sd on the CPU
    python -m benchmarks.batch_generation --model sd15 --device cuda --dtype float16
        --height 512 --batch-sizes 1 8 32 --processes          # (one command) a GPU: SD 1.5 size, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results import ROOT, environment, machine, write_results
from guidance.shapes.assets import load_world
from pipelines import GuidedStableDiffusionPipeline, GuidedStableDiffusionXLPipeline
from pipelines.application import generate_batch
from pipelines.application.models import load_shapes_pipeline


def pipelines(model: str, device: str, dtype: torch.dtype):
    """(guided, diffusers) pipelines on the same components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model == "shapes:sd":
        guided = load_shapes_pipeline("shapes-sd", dtype=dtype).to(device)
        return guided, StableDiffusionPipeline(**guided.components)
    from benchmarks.architectures import full_size_components

    components = full_size_components(model, dtype, device)
    xl = model == "sdxl"
    guided = (GuidedStableDiffusionXLPipeline if xl else GuidedStableDiffusionPipeline)(**components)
    return guided, (StableDiffusionXLPipeline if xl else StableDiffusionPipeline)(**components)


def diffusers_loop(pipe, prompts, folder: Path, steps: int, batch_size: int, size: int | None, scale: float) -> None:
    """What a person would write with diffusers alone: batches, one CPU generator per image, PNGs saved."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(start + k) for k in range(len(batch))]
        images = pipe(
            batch, num_inference_steps=steps, guidance_scale=scale, generator=generators, height=size, width=size
        ).images
        for k, image in enumerate(images):
            image.save(folder / f"{start + k:05d}.png")


def timed(run, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def side_by_side(args, prompts, scratch: Path) -> list[dict]:
    guided, reference = pipelines(args.model, args.device, getattr(torch, args.dtype))
    for pipe in (guided, reference):
        pipe.set_progress_bar_config(disable=True)
    rows = []
    for batch_size in args.batch_sizes:
        count = len(prompts) if args.model == "shapes:sd" else max(batch_size * 2, args.images // 8)
        subset = prompts[:count]
        variants = {
            "diffusers loop": lambda folder, b=batch_size, s=subset: diffusers_loop(
                reference, s, folder, args.steps, b, args.height, 7.5
            ),
            "generate_batch": lambda folder, b=batch_size, s=subset: generate_batch(
                s,
                folder,
                pipe=guided,
                model=args.model,
                num_inference_steps=args.steps,
                height=args.height,
                width=args.height,
                batch_size=b,
                guidance={"guidance_scale": 7.5},
                progress=False,
                overwrite=True,
            ),
        }
        for name, run in variants.items():  # warm-up
            run(scratch / "warm-up" / name.replace(" ", "-"))
        seconds = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, run in variants.items():
                folder = scratch / f"{name.replace(' ', '-')}-{batch_size}-{round_}"
                seconds[name].append(timed(lambda r=run, f=folder: r(f), args.device))
                shutil.rmtree(folder)
        ratio = statistics.median(
            d / g for d, g in zip(seconds["diffusers loop"], seconds["generate_batch"], strict=True)
        )
        row = {"batch_size": batch_size, "images": count, "throughput_ratio": ratio}
        row.update({f"{name} images/s": count / statistics.median(values) for name, values in seconds.items()})
        rows.append(row)
    return rows


def scaling(args, prompts, scratch: Path) -> list[dict]:
    """Whole `guided-generate` runs (start-up and model loading included) with 1 and 2 processes; the cores are
    shared out between the processes."""
    prompt_file = scratch / "prompts.txt"
    prompt_file.write_text("\n".join(prompts))
    cores = os.cpu_count() or 1
    rows = []
    for processes in args.processes:
        threads = max(cores // processes, 1)
        environment_ = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        launcher = [sys.executable, "-m", "pipelines.application.commands.generate"]
        if processes > 1:
            launcher = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                str(processes),
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "-m",
                "pipelines.application.commands.generate",
            ]
        out = scratch / f"processes-{processes}"
        command = [
            *launcher,
            "--prompts-file",
            str(prompt_file),
            "--num-inference-steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_sizes[0]),
            "--output-dir",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
        start = time.perf_counter()
        subprocess.run(command, env=environment_, cwd=ROOT, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        busy = {}  # per process, the seconds spent generating (from results.jsonl)
        for line in (out / "results.jsonl").read_text().splitlines():
            record = json.loads(line)
            busy[record["process"]] = busy.get(record["process"], 0.0) + record["seconds"]
        rows.append(
            {
                "processes": processes,
                "threads_each": threads,
                "seconds": seconds,
                "images/s": len(prompts) / seconds,
                "generating images/s": len(prompts) / max(busy.values()),
            }
        )
    for row in rows:
        row["speed-up"] = row["images/s"] / rows[0]["images/s"]
        row["generating speed-up"] = row["generating images/s"] / rows[0]["generating images/s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("shapes:sd", "sd15", "sdxl"), default="shapes:sd", help="the model")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--height", type=int, default=None, help="image size (square; default: the model's)")
    parser.add_argument("--images", type=int, default=64, help="prompts of the shapes world's held-out captions")
    parser.add_argument(
        "--scaling-images", type=int, default=256, help="images of each whole run timed for the process scaling"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="images per pipeline call")
    parser.add_argument("--rounds", type=int, default=10, help="alternated timed rounds")
    parser.add_argument(
        "--processes", type=int, nargs="*", default=[1, 2], help="CPU scaling: process counts (none: skip it)"
    )
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    args = parser.parse_args()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    world = load_world()
    captions = [world.caption(scene) for scene in world.heldout_scenes()]
    repeat = lambda count: (captions * (count // len(captions) + 1))[:count]  # noqa: E731
    prompts = repeat(args.images)
    env = environment(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        rows = side_by_side(args, prompts, Path(scratch))
        cpu_scaling = args.processes and args.device == "cpu"
        scaled = scaling(args, repeat(args.scaling_images), Path(scratch)) if cpu_scaling else []
    lines = [
        f"{args.model}, {args.steps} steps, CFG 7.5, {args.dtype}, {machine(env)}; {args.rounds} alternated rounds, "
        "median images per second; ratio: the median per-round ratio of the diffusers loop's time to "
        "generate_batch's (above 1: generate_batch is faster)",
        "",
        "| batch size | images | diffusers loop images/s | generate_batch images/s | throughput ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['batch_size']} | {row['images']} | {row['diffusers loop images/s']:.2f} | "
            f"{row['generate_batch images/s']:.2f} | {row['throughput_ratio']:.3f} |"
        )
    if scaled:
        lines += [
            "",
            f"Whole `guided-generate` runs of {args.scaling_images} images (start-up and model loading included), "
            f"batch size {args.batch_sizes[0]}, the {os.cpu_count()} cores shared out between the processes; "
            "generating: the images over the busiest process's generation time (from results.jsonl):",
            "",
            "| processes | torch threads each | seconds | images/s | speed-up | generating images/s | speed-up |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in scaled:
            lines.append(
                f"| {row['processes']} | {row['threads_each']} | {row['seconds']:.1f} | {row['images/s']:.2f} | "
                f"{row['speed-up']:.2f} | {row['generating images/s']:.2f} | {row['generating speed-up']:.2f} |"
            )
    table = "\n".join(lines)
    print(table)
    name = "batch-generation" if args.model == "shapes:sd" else f"batch-generation-{args.model}-{args.device}"
    write_results(name, table, {"side_by_side": rows, "scaling": scaled}, args.out, env)


if __name__ == "__main__":
    main()
