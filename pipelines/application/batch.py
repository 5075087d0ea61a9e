"""Batch generation a person can run overnight and trust (`generate_batch`, which `guided-generate` wraps).

A run is a folder (`pipelines.application.runs`): `run.json` (what the images depend on: model, scheduler, dtype,
steps, size, seed, default guidance, the manifest's hash), one PNG per image (`00000.png`, ...; written atomically,
with its generation record inside) and `results.jsonl` (one line per image). Run again with the same settings, it
resumes: the images already there are kept, the missing ones generated, none twice; another run into the same folder
is refused. Every input (each row and its guidance, the sizes the model takes, the folder) is checked, and the model
loaded, before anything is written (`prepare_batch`); then `BatchRun.execute` writes. Under `accelerate launch`, the
missing images are split between the processes (accelerate's `PartialState`); each writes its own
`results-<process>.jsonl`, merged into `results.jsonl` at the end (and at the start of a resumed run).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from guidance import GuidanceScheduler
from guidance.checks import check_choice, check_image_side, check_int, check_seed
from guidance.npo import NegativeAdapter, load_npo_adapter

from .image_files import write_png
from .manifest import ImageJob, ManifestRow, image_jobs, read_manifest, rows_from
from .naming import PYTHON, Naming
from .options import GUIDANCE_OPTIONS, policy_from_options
from .paths import check_output_dir
from .runs import (
    PART_GLOB,
    RESULTS_FILE,
    RunError,
    RunFolder,
    append_lines,
    json_hash,
    mean_nfe,
    output_name,
    read_lines,
)
from .signals import RunInterrupted, signal_number

logger = logging.get_logger(__name__)

COMMAND = "guided-generate"
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class BatchSettings:
    """The settings of a run, besides its rows.

    Args:
        model: the model's name (see `pipelines.application.models`): loaded unless a pipeline is given, recorded in
            run.json and every image either way, and what picks the shipped LinearAG coefficients and evaluators of
            shapes:sd/shapes:sd3.
        scheduler, dtype, device: the sampler by name, the weights' dtype ("float32", "float16", "bfloat16"), the
            device (default: the process's device under accelerate, else CUDA when available, else CPU).
        num_inference_steps, height, width, max_sequence_length: as in the pipelines (height and width: multiples of
            the model's latent grid).
        seed: image `k` of the run uses `seed + k`, unless its row sets a seed (then image `j` of the row uses
            row seed + `j`); generators are on the CPU, so an image does not depend on the device.
        guidance: the default guidance options (`pipelines.application.options.GUIDANCE_OPTIONS`: `guidance`,
            `guidance_scale`, ...); a row's own override them.
        negative_prompt, num_images_per_prompt: the defaults of rows that set no `negative_prompt`, `num_images`.
        npo: a Self-NPO (or Diffusion-NPO) LoRA folder: loaded into the denoiser and used for the unconditional
            rows of every policy (`guidance.npo.NegativeAdapter`).
        batch_size: images per pipeline call (images with the same guidance are batched); halved on out-of-memory.
        compile: `torch.compile` the denoiser.
    """

    model: str
    scheduler: str | None = None
    dtype: str = "float32"
    device: str | None = None
    num_inference_steps: int = 20
    height: int | None = None
    width: int | None = None
    seed: int = 0
    guidance: Mapping[str, Any] | None = None
    negative_prompt: str | None = None
    num_images_per_prompt: int = 1
    max_sequence_length: int | None = None
    npo: str | Path | None = None
    batch_size: int = 8
    compile: bool = False

    def check(self, name: Naming = PYTHON) -> None:
        """Every setting that can be checked without the model; `name` spells them in errors."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(
                f"`{name('model')}` must be a model name (recorded in run.json and every image; with a "
                f"pipeline given as `pipe`, that pipeline's name), got {self.model!r}"
            )
        check_choice(name("dtype"), self.dtype, DTYPES)
        for count in ("num_inference_steps", "num_images_per_prompt", "batch_size"):
            check_int(name(count), getattr(self, count), minimum=1)
        check_seed(name("seed"), self.seed)
        for side in ("height", "width"):
            check_image_side(name(side), getattr(self, side), 1)
        if self.max_sequence_length is not None:
            check_int(name("max_sequence_length"), self.max_sequence_length, minimum=1)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(f"`{name('negative_prompt')}` must be a string, got {self.negative_prompt!r}")
        if self.npo is not None and not (Path(self.npo).is_dir() and any(Path(self.npo).glob("*.safetensors"))):
            raise ValueError(
                f"`{name('npo')}` must be a folder holding a LoRA .safetensors file, got {str(self.npo)!r}"
            )


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


def manifest_hash(rows: Sequence[ManifestRow]) -> str:
    """What the images depend on in the rows (not where they stand in the file)."""
    content = [{k: v for k, v in asdict(row).items() if k not in ("line", "source")} for row in rows]
    return json_hash(content)


def compile_denoiser(pipe) -> None:
    """`torch.compile` the UNet or transformer in place."""
    name = "unet" if pipe.denoiser is getattr(pipe, "unet", None) else "transformer"
    setattr(pipe, name, torch.compile(pipe.denoiser))


def image_multiple(pipe) -> int:
    """What the pipeline's image height and width must be multiples of."""
    from ..editing import FlowEditingMixin

    return pipe.pixel_multiple() if isinstance(pipe, FlowEditingMixin) else 8  # SD, SDXL: diffusers' check_inputs


def read_rows(manifest: str | Path | Sequence[str | Mapping[str, Any]], argument: str) -> list[ManifestRow]:
    """The rows of a manifest file or of Python values."""
    if isinstance(manifest, (str, Path)) and not (isinstance(manifest, str) and "\n" in manifest):
        return read_manifest(manifest, argument)
    return rows_from(manifest)


def build_policies(
    rows: Sequence[ManifestRow], jobs: Sequence[ImageJob], settings: BatchSettings, name: Naming = PYTHON
) -> dict[tuple, GuidanceScheduler]:
    """One policy per distinct guidance of the jobs; an error names the row whose guidance it is (by its fields), or
    the run's options (as `name` spells them)."""
    unconditional = NegativeAdapter("npo") if settings.npo is not None else None
    policies = {}
    for job in jobs:
        if job.guidance in policies:
            continue
        try:
            policies[job.guidance] = policy_from_options(
                job.guidance_options, settings.model, settings.num_inference_steps, unconditional
            )
        except (ValueError, TypeError, FileNotFoundError) as error:
            row = rows[job.row]
            if row.guidance:
                raise type(error)(f"{row.where}: its guidance: {error}") from None
            if name.flags:
                raise name.reworded(error, GUIDANCE_OPTIONS) from None
            raise type(error)(f"`guidance`: {error}") from None
    return policies


def load(settings: BatchSettings, pipe, device: str) -> tuple[Any, str]:
    """(pipeline, family): the one given, or the one `settings.model` names; with the NPO adapter loaded."""
    from ..families import family_of
    from .models import load_pipeline

    if pipe is None:
        pipe, family = load_pipeline(settings.model, getattr(torch, settings.dtype), device, settings.scheduler)
    else:
        family = family_of(pipe)
    if settings.npo is not None:
        load_npo_adapter(pipe, settings.npo)
    return pipe, family


def check_sizes(pipe, settings: BatchSettings, name: Naming) -> None:
    for side in ("height", "width"):
        check_image_side(name(side), getattr(settings, side), image_multiple(pipe))


def run_record(settings: BatchSettings, pipe, rows: Sequence[ManifestRow], jobs: Sequence[ImageJob], call: dict):
    """What the images depend on: run.json."""
    return {
        "model": settings.model,
        "scheduler": type(pipe.scheduler).__name__,
        "dtype": settings.dtype,
        "num_inference_steps": settings.num_inference_steps,
        "height": settings.height,
        "width": settings.width,
        "seed": settings.seed,
        "max_sequence_length": call.get("max_sequence_length"),
        "guidance": dict(sorted((settings.guidance or {}).items())),
        "negative_prompt": settings.negative_prompt,
        "num_images_per_prompt": settings.num_images_per_prompt,
        "npo": None if settings.npo is None else str(settings.npo),
        "manifest": manifest_hash(rows),
        "images": len(jobs),
    }


def groups(jobs: Sequence[ImageJob]) -> list[list[ImageJob]]:
    """Jobs that may share a batch, in the order their first image comes."""
    grouped: dict[tuple, list[ImageJob]] = {}
    for job in jobs:
        grouped.setdefault(job.group, []).append(job)
    return list(grouped.values())


@dataclass
class Progress:
    """One progress bar for the run: the main process counts the lines every process has written."""

    folder: Path
    bar: Any
    main: bool
    read: dict[Path, int]

    @classmethod
    def open(cls, folder: Path, total: int, shown: bool, main: bool) -> Progress:
        return cls(folder, tqdm(total=total, unit="image", desc="generating", disable=not (shown and main)), main, {})

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exception) -> None:
        self.bar.close()

    def update(self) -> None:
        if not self.main:
            return
        for path in self.folder.glob(PART_GLOB):
            with open(path, "rb") as handle:
                handle.seek(self.read.get(path, 0))
                new = handle.read()
            complete = new.rfind(b"\n") + 1
            self.read[path] = self.read.get(path, 0) + complete
            self.bar.update(new[:complete].count(b"\n"))


@dataclass
class BatchRun:
    """A checked run, ready to write: its folder, image jobs, policies and pipeline, what run.json records, the
    pipeline's extra arguments, the process state and, unless overwriting, the records of the images already there."""

    folder: RunFolder
    jobs: list[ImageJob]
    policies: dict[tuple, GuidanceScheduler]
    pipe: Any
    settings: BatchSettings
    record: dict
    call: dict
    state: Any
    overwrite: bool
    existing: dict[int, dict]

    @property
    def part(self) -> Path:
        return self.folder.path / f"results-{self.state.process_index:03d}.jsonl"

    def execute(self, progress: bool = True) -> BatchResult:
        """Write the run: the missing images, their lines, then the merged results. A KeyboardInterrupt (SIGINT,
        SIGTERM in the commands) drops the batch in progress and raises `RunInterrupted`."""
        started = time.perf_counter()
        try:
            done = self.start()
            pending = [job for job in self.jobs if job.index not in done]
            self.generate_pending(pending, progress)
        except KeyboardInterrupt as error:
            raise self.interrupted(error) from None
        self.state.wait_for_everyone()
        nfe = self.check_complete()
        return BatchResult(
            self.folder.path, len(self.jobs), len(pending), len(done), nfe, time.perf_counter() - started
        )

    def generate_pending(self, pending: list[ImageJob], progress: bool) -> None:
        """Every process its share of the missing images; then the main process merges the lines."""
        if self.settings.compile:
            compile_denoiser(self.pipe)
        self.pipe.set_progress_bar_config(disable=True)
        with Progress.open(self.folder.path, len(pending), progress, self.state.is_main_process) as bar:
            with self.state.split_between_processes(pending) as share:
                self.generate(share, bar)
            self.state.wait_for_everyone()
            if self.state.is_main_process:
                bar.bar.update(len(pending) - bar.bar.n)
                self.folder.merge(len(self.jobs))

    def start(self) -> set[int]:
        """The folder made ready by the main process; the indices already done, as the main process says, so that
        every process splits the same list."""
        if self.state.is_main_process:
            self.folder.start(self.record, self.overwrite, self.existing)
        self.state.wait_for_everyone()
        done = [sorted(self.existing) if self.state.is_main_process else None]
        if self.state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(done, from_process=0)
        return set(done[0])

    def interrupted(self, error: KeyboardInterrupt) -> RunInterrupted:
        """Where the run stopped; a single process also merges the lines written so far."""
        if self.state.num_processes == 1 and self.folder.path.is_dir():
            self.folder.merge(len(self.jobs))
        done = self.folder.count_done(len(self.jobs))
        return RunInterrupted(self.folder.path, done, len(self.jobs), signal_number(error))

    def check_complete(self) -> float:
        """The mean NFE per image; an error when images are missing after the run."""
        records = read_lines(self.folder.path / RESULTS_FILE)
        missing = sorted(set(range(len(self.jobs))) - {record["index"] for record in records})
        if missing:
            raise RunError(
                f"{len(missing)} images of the run are missing after it ({[output_name(i) for i in missing[:5]]}...): "
                "run the same command again to generate them"
            )
        return mean_nfe(records)

    def generate(self, jobs: Sequence[ImageJob], bar: Progress) -> None:
        """This process's share: batches by group, halved on out-of-memory; each image and its line written as soon
        as it is made."""
        batch_size = self.settings.batch_size
        for group in groups(jobs):
            position = 0
            while position < len(group):
                chunk = group[position : position + batch_size]
                try:
                    result, seconds = self.call_pipeline(chunk)
                except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError
                    batch_size = smaller_batch(len(chunk), error)
                    continue
                self.write(chunk, result, seconds)
                position += len(chunk)
                bar.update()

    def call_pipeline(self, chunk: list[ImageJob]):
        first, start = chunk[0], time.perf_counter()
        result = self.pipe(
            [job.prompt for job in chunk],
            negative_prompt=None if first.negative_prompt is None else [job.negative_prompt for job in chunk],
            num_inference_steps=self.settings.num_inference_steps,
            height=self.settings.height,
            width=self.settings.width,
            generator=[torch.Generator("cpu").manual_seed(job.seed) for job in chunk],
            guidance=self.policies[first.guidance],
            **self.call,
        )
        return result, (time.perf_counter() - start) / len(chunk)

    def write(self, chunk: list[ImageJob], result, seconds: float) -> None:
        """Each image atomically, then the batch's lines (a line lost to a kill is recovered from its PNG)."""
        nfes, records = result.trace.nfe_per_image(), []
        for k, (job, image) in enumerate(zip(chunk, result.images, strict=True)):
            record = self.image_record(job, image, nfes[k], [step[k] for step in result.trace.scales], seconds)
            write_png(image, self.folder.path / record["file"], record)
            records.append(record)
        append_lines(self.part, records)

    def image_record(self, job: ImageJob, image, nfe: float, scales: list[float], seconds: float) -> dict:
        return {
            "index": job.index,
            "row": job.row,
            "image": job.image,
            "file": output_name(job.index),
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "seed": job.seed,
            "guidance": job.guidance_options,
            "policy": json.loads(self.policies[job.guidance].to_json_string()),
            "nfe": nfe,
            "seconds": round(seconds, 4),
            "process": self.state.process_index,
            "scales": scales,
            "model": self.settings.model,
            "scheduler": self.record["scheduler"],
            "num_inference_steps": self.settings.num_inference_steps,
            "width": image.width,
            "height": image.height,
        }


def smaller_batch(size: int, error: Exception) -> int:
    """The batch size to retry with after running out of memory with `size` images."""
    if size == 1:
        raise RunError(
            "out of memory at batch size 1: use a smaller `--height`/`--width`, `--dtype float16`, or a larger device"
        ) from error
    logger.warning(f"out of memory with a batch of {size}: retrying with {size // 2}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return size // 2


def prepare_batch(
    manifest: str | Path | Sequence[str | Mapping[str, Any]],
    output_dir: str | Path,
    settings: BatchSettings,
    *,
    pipe=None,
    overwrite: bool = False,
    name: Naming = PYTHON,
) -> BatchRun:
    """Check everything (the settings, every row and its guidance, the folder, the model and the sizes it takes) and
    load the model; nothing is written. `name` spells the arguments in errors."""
    from accelerate import PartialState

    from .models import call_defaults

    settings.check(name)
    folder = RunFolder(check_output_dir(output_dir, name("output_dir")), COMMAND, name)
    rows = read_rows(manifest, name("manifest"))
    jobs = image_jobs(rows, settings.seed, settings.guidance, settings.negative_prompt, settings.num_images_per_prompt)
    policies = build_policies(rows, jobs, settings, name)
    # on CPUs, processes started by a launcher (accelerate launch --multi_gpu, torchrun) join with gloo
    state = PartialState(cpu=str(settings.device or "").startswith("cpu") or not torch.cuda.is_available())
    pipe, family = load(settings, pipe, settings.device or str(state.device))
    check_sizes(pipe, settings, name)
    call = call_defaults(settings.model, family, settings.max_sequence_length)
    record = run_record(settings, pipe, rows, jobs, call)
    folder.check(record, overwrite)
    existing = {} if overwrite else folder.records(len(jobs))
    return BatchRun(folder, jobs, policies, pipe, settings, record, call, state, overwrite, existing)


def batch_settings(settings: BatchSettings | None, keywords: dict) -> BatchSettings:
    """`settings`, or the settings the keywords name (not both)."""
    if settings is not None:
        if keywords:
            raise TypeError(f"give `settings` or its fields as keywords, not both (got {sorted(keywords)})")
        if not isinstance(settings, BatchSettings):
            raise TypeError(f"`settings` must be a BatchSettings, got {type(settings).__name__}")
        return settings
    known = [spec.name for spec in fields(BatchSettings)]
    unknown = sorted(set(keywords) - set(known))
    if unknown:
        raise TypeError(f"generate_batch() got unknown arguments {unknown}; the settings are {known}")
    if "model" not in keywords:
        raise TypeError("generate_batch() needs `model`, the model's name (with `pipe`: the name of that pipeline)")
    return BatchSettings(**keywords)


def generate_batch(
    manifest: str | Path | Sequence[str | Mapping[str, Any]],
    output_dir: str | Path,
    settings: BatchSettings | None = None,
    *,
    pipe=None,
    overwrite: bool = False,
    progress: bool = True,
    **keywords: Any,
) -> BatchResult:
    """Generate every image of a manifest into `output_dir`, resuming what is there.

    Args:
        manifest: a prompts file, a JSONL or CSV manifest (see `pipelines.application.manifest`), or a list of
            prompts or row dicts.
        output_dir: the run's folder.
        settings: the run's `BatchSettings`; or give its fields as keywords (`model=...`, `num_inference_steps=...`).
        pipe: a guided pipeline to use; else one is loaded from `settings.model`.
        overwrite: start over: remove what an earlier run wrote to `output_dir` (only that), once everything is
            checked.
        progress: one progress bar for the run (images per second, ETA).
    """
    run = prepare_batch(manifest, output_dir, batch_settings(settings, keywords), pipe=pipe, overwrite=overwrite)
    return run.execute(progress)
