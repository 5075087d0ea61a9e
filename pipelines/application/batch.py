"""Batch generation a person can run overnight and trust (`generate_batch`, which `guided-generate` wraps).

A run is a folder: `run.json` (what the images depend on: model, scheduler, dtype, steps, size, seed, default guidance,
the manifest's hash), one PNG per image (`00000.png`, ...; written atomically, with its generation record inside) and
`results.jsonl` (one line per image). Run again with the same settings, it resumes: the images already there are
kept, the missing ones generated, none twice; other settings into the same folder are refused. Under
`accelerate launch`, the missing images are split between the processes (accelerate's `PartialState`); each writes
its own `results-<process>.jsonl`, merged into `results.jsonl` at the end (and at the start of a resumed run).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from guidance.npo import NegativeAdapter, load_npo_adapter

from .image_files import TEMPORARY_SUFFIX, read_record, write_png
from .manifest import ImageJob, ManifestRow, image_jobs, read_manifest, rows_from
from .options import policy_from_options

logger = logging.get_logger(__name__)

RUN_FILE, RESULTS_FILE, PART_GLOB = "run.json", "results.jsonl", "results-*.jsonl"
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class BatchResult:
    """What a call did: the run's `images` (all of them), those `generated` by this call (every process), those
    `resumed` (already there), the mean NFE per image over the run, and this call's wall time."""

    output_dir: Path
    images: int
    generated: int
    resumed: int
    nfe_per_image: float
    seconds: float

    @property
    def results(self) -> Path:
        return self.output_dir / RESULTS_FILE

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


IMAGE_NAME = re.compile(r"\d{5,}\.png")


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def run_images(folder: Path) -> list[Path]:
    """The images a run wrote to `folder` (00000.png, ..., 100000.png, ...)."""
    return [path for path in folder.glob("*.png") if IMAGE_NAME.fullmatch(path.name)]


def read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a results file (a line cut short by a kill is skipped)."""
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def check_folder(folder: Path, config: dict, overwrite: bool) -> None:
    """Refuse a folder that holds another run (a different `run.json`, or images without one)."""
    if overwrite or not folder.is_dir():
        return
    run_file = folder / RUN_FILE
    if run_file.is_file():
        saved = json.loads(run_file.read_text())
        differences = [key for key in sorted(set(saved) | set(config)) if saved.get(key) != config.get(key)]
        if differences:
            described = "; ".join(f"{key}: {saved.get(key)!r} there, {config.get(key)!r} now" for key in differences)
            raise ValueError(
                f"`output_dir` {str(folder)!r} holds another run ({described}): use `--overwrite` (overwrite=True) "
                "to start over, or another folder"
            )
    elif run_images(folder):
        raise ValueError(
            f"`output_dir` {str(folder)!r} holds images but no {RUN_FILE} (not a guided-generate run): use "
            "`--overwrite` (overwrite=True) to start over, or another folder"
        )


def clear_run(folder: Path) -> None:
    """Remove the files a run writes (numbered PNGs, temporary files, results files, run.json), nothing else."""
    for path in run_images(folder):
        path.unlink()
    for pattern in (f"*{TEMPORARY_SUFFIX}", PART_GLOB, RESULTS_FILE, RUN_FILE):
        for path in folder.glob(pattern):
            path.unlink()


def merge_results(folder: Path, count: int) -> list[dict]:
    """Fold the processes' results files into `results.jsonl`, one line per image present, ordered; an image whose
    line was lost (killed between the rename and the line) gets it back from the record inside its PNG."""
    records: dict[int, dict] = {}
    for path in [folder / RESULTS_FILE, *sorted(folder.glob(PART_GLOB))]:
        if path.is_file():
            for record in read_lines(path):
                records.setdefault(record["index"], record)
    for index in range(count):
        present = (folder / image_name(index)).is_file()
        if not present:
            records.pop(index, None)
        elif index not in records:
            records[index] = read_record(folder / image_name(index))
    ordered = [records[index] for index in sorted(records)]
    write_atomically(folder / RESULTS_FILE, "".join(json.dumps(record) + "\n" for record in ordered))
    for path in folder.glob(PART_GLOB):
        path.unlink()
    return ordered


def manifest_hash(rows: Sequence[ManifestRow]) -> str:
    """What the images depend on in the rows (not where they stand in the file)."""
    content = [{k: v for k, v in asdict(row).items() if k not in ("line", "source")} for row in rows]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def compile_denoiser(pipe) -> None:
    """`torch.compile` the UNet or transformer in place."""
    name = "unet" if pipe.denoiser is getattr(pipe, "unet", None) else "transformer"
    setattr(pipe, name, torch.compile(pipe.denoiser))


def _groups(jobs: Sequence[ImageJob]) -> list[list[ImageJob]]:
    """Jobs that may share a batch, in the order their first image comes."""
    groups: dict[tuple, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return list(groups.values())


@dataclass
class _Generator:
    """One process's share of a run: batches by group, halves the batch on out-of-memory, writes each image and its
    line as soon as it is made."""

    pipe: Any
    folder: Path
    policies: dict
    policy_configs: dict
    settings: dict
    extra: dict
    part: Path
    process: int

    def generate(self, chunk: list[ImageJob]):
        first = chunk[0]
        start = time.perf_counter()
        result = self.pipe(
            [job.prompt for job in chunk],
            negative_prompt=None if first.negative_prompt is None else [job.negative_prompt for job in chunk],
            num_inference_steps=self.settings["num_inference_steps"],
            height=self.settings["height"],
            width=self.settings["width"],
            generator=[torch.Generator("cpu").manual_seed(job.seed) for job in chunk],
            guidance=self.policies[first.guidance],
            **self.extra,
        )
        return result, (time.perf_counter() - start) / len(chunk)

    def write(self, chunk: list[ImageJob], result, seconds: float) -> None:
        """Each image atomically, then the batch's lines (a line lost to a kill is recovered from its PNG)."""
        nfes, records = result.trace.nfe_per_image(), []
        for k, (job, image) in enumerate(zip(chunk, result.images, strict=True)):
            record = {
                "index": job.index,
                "row": job.row,
                "image": job.image,
                "file": image_name(job.index),
                "prompt": job.prompt,
                "negative_prompt": job.negative_prompt,
                "seed": job.seed,
                "guidance": job.guidance_options,
                "policy": self.policy_configs[job.guidance],
                "nfe": nfes[k],
                "seconds": round(seconds, 4),
                "process": self.process,
                "scales": [step[k] for step in result.trace.scales],
                "model": self.settings["model"],
                "scheduler": self.settings["scheduler"],
                "num_inference_steps": self.settings["num_inference_steps"],
                "width": image.width,
                "height": image.height,
            }
            write_png(image, self.folder / record["file"], record)
            records.append(record)
        with open(self.part, "a") as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in records))
            handle.flush()
            os.fsync(handle.fileno())

    def run(self, jobs: Sequence[ImageJob], batch_size: int, on_batch) -> None:
        for group in _groups(jobs):
            position = 0
            while position < len(group):
                chunk = group[position : position + batch_size]
                try:
                    result, seconds = self.generate(chunk)
                except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError
                    if len(chunk) == 1:
                        raise RuntimeError(
                            "out of memory at batch size 1: use a smaller `--height`/`--width`, `--dtype float16`, "
                            "or a larger device"
                        ) from error
                    batch_size = len(chunk) // 2
                    logger.warning(f"out of memory with a batch of {len(chunk)}: retrying with {batch_size}")
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                self.write(chunk, result, seconds)
                position += len(chunk)
                on_batch()


def _rows(manifest: str | Path | Sequence[str | Mapping[str, Any]]) -> list[ManifestRow]:
    if isinstance(manifest, (str, Path)) and not (isinstance(manifest, str) and "\n" in manifest):
        return read_manifest(manifest)
    return rows_from(manifest)


def generate_batch(
    manifest: str | Path | Sequence[str | Mapping[str, Any]],
    output_dir: str | Path,
    *,
    pipe=None,
    model: str | None = None,
    scheduler: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    num_inference_steps: int = 20,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    guidance: Mapping[str, Any] | None = None,
    negative_prompt: str | None = None,
    num_images_per_prompt: int = 1,
    max_sequence_length: int | None = None,
    npo: str | Path | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    compile: bool = False,
    progress: bool = True,
) -> BatchResult:
    """Generate every image of a manifest into `output_dir`, resuming what is there.

    Args:
        manifest: a prompts file, a JSONL or CSV manifest (see `pipelines.application.manifest`), or a list of prompts or row
            dicts.
        output_dir: the run's folder.
        pipe: a guided pipeline to use; else one is loaded from `model` (required). `model` names the run in
            `run.json` and in every image either way.
        scheduler, dtype, device: the sampler by name, the weights' dtype ("float32", "float16", "bfloat16"), the
            device (default: the process's device under accelerate, else CUDA when available, else CPU).
        num_inference_steps, height, width, max_sequence_length: as in the pipelines.
        seed: image `k` of the run uses `seed + k`, unless its row sets a seed (then image `j` of the row uses
            row seed + `j`); generators are on the CPU, so an image does not depend on the device.
        guidance: the default guidance options (`pipelines.application.options.GUIDANCE_OPTIONS`: `guidance`, `guidance_scale`,
            ...); a row's own override them.
        negative_prompt, num_images_per_prompt: the defaults of rows that set no `negative_prompt`, `num_images`.
        npo: a Self-NPO (or Diffusion-NPO) LoRA folder: loaded into the denoiser and used for the unconditional
            rows of every policy (`guidance.npo.NegativeAdapter`).
        batch_size: images per pipeline call (images with the same guidance are batched); halved on out-of-memory.
        overwrite: remove what a previous run wrote to `output_dir` first.
        compile: `torch.compile` the denoiser.
        progress: one progress bar for the run (images per second, ETA).
    """
    from accelerate import PartialState

    from ..families import family_of
    from .models import call_defaults, load_pipeline

    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}")
    numbers = (
        ("num_inference_steps", num_inference_steps),
        ("batch_size", batch_size),
        ("num_images_per_prompt", num_images_per_prompt),
    )
    for name, value in numbers:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an integer, got {seed!r}")
    if pipe is not None and not model:
        raise ValueError(
            "`model` must name the pipeline given as `pipe` (it is recorded in run.json and every image, and picks "
            "the shipped LinearAG coefficients and evaluators of shapes:sd/shapes:sd3)"
        )
    # on CPUs, processes started by a launcher (accelerate launch --multi_gpu, torchrun) join with gloo
    state = PartialState(cpu=str(device or "").startswith("cpu") or not torch.cuda.is_available())
    started = time.perf_counter()
    folder = Path(output_dir)
    rows = _rows(manifest)
    jobs = image_jobs(rows, seed, guidance, negative_prompt, num_images_per_prompt)
    if npo is not None and not (Path(npo).is_dir() and any(Path(npo).glob("*.safetensors"))):
        raise ValueError(f"`npo` must be a folder holding a LoRA .safetensors file, got {str(npo)!r}")
    unconditional = NegativeAdapter("npo") if npo is not None else None
    policies = {}
    for job in jobs:
        if job.guidance not in policies:
            try:
                policies[job.guidance] = policy_from_options(
                    job.guidance_options, model, num_inference_steps, unconditional
                )
            except (ValueError, TypeError, FileNotFoundError) as error:
                row = rows[job.row]
                where = f"{row.where}: its guidance" if row.guidance else "the run's guidance options"
                raise type(error)(f"{where}: {error}") from None
    if pipe is None:
        device = device or str(state.device)
        pipe, family = load_pipeline(model, getattr(torch, dtype), device, scheduler)
    else:
        family = family_of(pipe)
    if npo is not None:
        load_npo_adapter(pipe, npo)
    extra = call_defaults(model, family, max_sequence_length)
    settings = {
        "model": model,
        "scheduler": type(pipe.scheduler).__name__,
        "dtype": dtype,
        "num_inference_steps": num_inference_steps,
        "height": height,
        "width": width,
        "seed": seed,
        "max_sequence_length": extra.get("max_sequence_length"),
        "guidance": dict(sorted((guidance or {}).items())),
        "negative_prompt": negative_prompt,
        "num_images_per_prompt": num_images_per_prompt,
        "npo": None if npo is None else str(npo),
        "manifest": manifest_hash(rows),
        "images": len(jobs),
    }
    check_folder(folder, settings, overwrite)
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            clear_run(folder)
        for path in folder.glob(f"*{TEMPORARY_SUFFIX}"):
            path.unlink()
        write_atomically(folder / RUN_FILE, json.dumps(settings, indent=1))
        merge_results(folder, len(jobs))
    state.wait_for_everyone()
    # the main process says what is done, so that every process splits the same list
    done = [sorted(record["index"] for record in read_lines(folder / RESULTS_FILE)) if state.is_main_process else None]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(done, from_process=0)
    done = set(done[0])
    pending = [job for job in jobs if job.index not in done]
    if compile:
        compile_denoiser(pipe)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(pending), unit="image", desc="generating", disable=not (progress and state.is_main_process))

    read: dict[Path, int] = {}  # bytes of each process's results file counted so far

    def on_batch() -> None:  # the main process counts the lines every process has written
        if state.is_main_process:
            for path in folder.glob(PART_GLOB):
                with open(path, "rb") as handle:
                    handle.seek(read.get(path, 0))
                    new = handle.read()
                complete = new.rfind(b"\n") + 1
                read[path] = read.get(path, 0) + complete
                bar.update(new[:complete].count(b"\n"))

    part = folder / f"results-{state.process_index:03d}.jsonl"
    with state.split_between_processes(pending) as share:
        configs = {key: json.loads(policy.to_json_string()) for key, policy in policies.items()}
        _Generator(pipe, folder, policies, configs, settings, extra, part, state.process_index).run(
            share, batch_size, on_batch
        )
    state.wait_for_everyone()
    if state.is_main_process:
        bar.update(len(pending) - bar.n)
        merge_results(folder, len(jobs))
    bar.close()
    state.wait_for_everyone()
    records = read_lines(folder / RESULTS_FILE)
    missing = sorted(set(range(len(jobs))) - {record["index"] for record in records})
    if missing:
        raise RuntimeError(
            f"{len(missing)} images of the run are missing after it ({[image_name(i) for i in missing[:5]]}...): "
            "run the same command again to generate them"
        )
    nfe = sum(record["nfe"] for record in records) / max(len(records), 1)
    return BatchResult(folder, len(jobs), len(pending), len(done), nfe, time.perf_counter() - started)
