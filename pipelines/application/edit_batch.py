"""Edit runs (`guided-edit`): FlowOpt edits, FlowOpt inversions or FlowEdit edits of many images, into a run folder
that resumes as a generation run does (`pipelines.application.runs`): `run.json` (the model, the method with its
defaults for the family filled in, the guidance, the images' hash), one PNG per image with its record inside (an
inversion also writes its noise latents, `save_iterates` every iteration's image, both before the PNG), `results.jsonl`
and `summary.json`. Every row, every image and every setting is checked against the model before anything is written
(`prepare_edits`); then `EditRun.execute` writes. A batch holds images of one size; its random draws (FlowEdit's
noise, "auto"'s probes) come from a generator seeded with `seed` + the index of its first image."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from guidance import GuidanceScheduler
from guidance import flowedit as flowedit_method
from guidance.checks import check_choice, check_int, check_seed
from guidance.flowopt import TARGET_GUIDANCE_SCALE, FlowOptConfig

from .edit_manifest import EditJob, check_prompts, image_file, inspect_image, load_image
from .image_files import TEMPORARY_SUFFIX, edit_parameters, write_png
from .naming import PYTHON, Naming
from .options import GUIDANCE_OPTIONS, policy_from_options
from .paths import check_output_dir
from .runs import SUMMARY_FILE, RunFolder, append_lines, json_hash, mean_nfe, output_name, write_atomically
from .signals import RunInterrupted, signal_number

COMMAND = "guided-edit"
METHODS = ("flowopt", "flowedit")
DTYPES = ("float32", "float16", "bfloat16")
FLOWOPT_OPTIONS = ("iterations", "step_size", "tolerance", "min_improvement", "invert", "save_iterates")
FLOWEDIT_OPTIONS = ("n_avg", "source_guidance_scale")


@dataclass(frozen=True)
class EditSettings:
    """The settings of an edit run, besides its images.

    Args:
        model: a flow model's name (SD3, Flux; see `pipelines.application.models`), recorded in run.json.
        method: "flowopt" or "flowedit"; `invert`: FlowOpt inversion only (the noise that regenerates each image).
        num_inference_steps, n_max: T and the solves' steps (None: the method's defaults for the family).
        iterations, step_size, tolerance, min_improvement: FlowOpt's (`guidance.flowopt.FlowOptConfig`).
        n_avg, source_guidance_scale: FlowEdit's noise draws per step and source CFG (Flux: its embedded guidance).
        negative_prompt: the unconditional prompt of the guided solves.
        guidance: guidance options of the target solves (`pipelines.application.options.GUIDANCE_OPTIONS`); a missing
            `guidance_scale` is the method's target guidance.
        embedded_guidance_scale: Flux's guidance embedding in the target solves.
        seed: a batch's generator is seeded with `seed` + the index of its first image.
        batch_size: images of one size per pipeline call; `save_iterates`: also write every iteration's image.
        max_sequence_length, dtype, device: as for generation.
    """

    model: str
    method: str = "flowopt"
    invert: bool = False
    num_inference_steps: int | None = None
    n_max: int | None = None
    iterations: int | None = None
    step_size: float | str | None = None
    tolerance: float = 0.0
    min_improvement: float = 0.0
    n_avg: int = 1
    negative_prompt: str | None = None
    guidance: Mapping[str, Any] | None = None
    source_guidance_scale: float | None = None
    embedded_guidance_scale: float | None = None
    seed: int = 0
    batch_size: int = 8
    save_iterates: bool = False
    max_sequence_length: int | None = None
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def task(self) -> str:
        """ "invert", "flowopt" or "flowedit"."""
        return "invert" if self.invert else self.method

    def given(self, names: Sequence[str]) -> list[str]:
        """Those of `names` set away from their defaults."""
        defaults = {spec.name: spec.default for spec in fields(self)}
        return [name for name in names if getattr(self, name) != defaults[name]]

    def check(self, name: Naming = PYTHON) -> None:
        """Every setting that can be checked without the model; `name` spells them in errors."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"`{name('model')}` must be a flow model's name, got {self.model!r}")
        check_choice(name("method"), self.method, METHODS)
        method = f"`{name('method')}` flowedit"
        if self.method == "flowedit" and self.given(FLOWOPT_OPTIONS):
            given = [name(option) for option in self.given(FLOWOPT_OPTIONS)]
            raise ValueError(f"{given} are FlowOpt options; {method} takes none of them")
        if self.method == "flowopt" and self.given(FLOWEDIT_OPTIONS):
            given = [name(option) for option in self.given(FLOWEDIT_OPTIONS)]
            raise ValueError(f"{given} are FlowEdit options: add {method}, or drop them")
        for count in ("batch_size", "n_avg"):
            check_int(name(count), getattr(self, count), minimum=1)
        check_seed(name("seed"), self.seed)
        check_choice(name("dtype"), self.dtype, DTYPES)
        if self.max_sequence_length is not None:
            check_int(name("max_sequence_length"), self.max_sequence_length, minimum=1)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(f"`{name('negative_prompt')}` must be a string, got {self.negative_prompt!r}")


@dataclass
class EditResult:
    """What a call did: the run's `images`, those `edited` by this call, those `resumed` (already there), the mean
    NFE per image over the run, and the policy of the target solves."""

    output_dir: Path
    images: int
    edited: int
    resumed: int
    nfe_per_image: float
    guidance: GuidanceScheduler


METHOD_OPTIONS = ("num_inference_steps", "n_max", "iterations", "step_size", "tolerance", "min_improvement", "n_avg")


def method_settings(settings: EditSettings, family: str) -> dict:
    """The method's settings with its defaults for `family` filled in, checked: what run.json records."""
    if settings.method == "flowedit":
        defaults = flowedit_method.DEFAULTS[family]
        steps = settings.num_inference_steps or defaults["num_inference_steps"]
        n_max = settings.n_max or defaults["n_max"]
        FlowOptConfig(num_inference_steps=steps, n_max=n_max)  # the checks of T and n_max
        return {
            "num_inference_steps": steps,
            "n_max": n_max,
            "n_avg": settings.n_avg,
            "source_guidance_scale": settings.source_guidance_scale,
        }
    config = FlowOptConfig.defaults(
        family, "invert" if settings.invert else "edit", **{key: getattr(settings, key) for key in METHOD_OPTIONS[:-1]}
    )
    return {key: value for key, value in config.config.items() if not key.startswith("_")}


def guidance_options(settings: EditSettings, family: str) -> dict:
    """The guidance options of the target solves, the method's target scale filled in when none is given."""
    options = dict(settings.guidance or {})
    if options.get("guidance_scale") is None:
        if settings.invert or family == "flux":
            options["guidance_scale"] = 1.0  # Flux: its embedding carries the guidance
        elif settings.method == "flowedit":
            options["guidance_scale"] = flowedit_method.DEFAULTS[family]["target_guidance_scale"]
        else:
            options["guidance_scale"] = TARGET_GUIDANCE_SCALE
    return dict(sorted(options.items()))


def load(settings: EditSettings, pipe, name: Naming) -> tuple[Any, str]:
    """(pipeline, family): the one given or the one `settings.model` names; a flow model."""
    from ..editing import FlowEditingMixin
    from ..families import FLOW_FAMILIES, family_of
    from .models import load_pipeline, model_family

    if pipe is None:
        family = model_family(settings.model, f"`{name('model')}`")
        if family not in FLOW_FAMILIES:
            raise ValueError(
                f"`{name('model')}` {settings.model!r} is a {family} model; editing needs a flow model: "
                f"{list(FLOW_FAMILIES)} (e.g. shapes:sd3)"
            )
        pipe, family = load_pipeline(settings.model, getattr(torch, settings.dtype), settings.device)
    elif not isinstance(pipe, FlowEditingMixin):
        raise ValueError(f"`pipe` must be a flow pipeline ({list(FLOW_FAMILIES)}), got {type(pipe).__name__}")
    return pipe, family_of(pipe)


def jobs_hash(jobs: Sequence[EditJob], invert: bool) -> str:
    """What the outputs depend on in the jobs: each image's path and content, and its prompts."""
    content = [[job.image, job.sha256, job.source_prompt, None if invert else job.target_prompt] for job in jobs]
    return json_hash(content)


def size_groups(jobs: Sequence[EditJob], batch_size: int) -> list[list[EditJob]]:
    """Batches of at most `batch_size` images of one size (one pipeline call each), in the order sizes first come."""
    grouped: dict[tuple, list[EditJob]] = {}
    for job in jobs:
        grouped.setdefault(job.size, []).append(job)
    return [group[k : k + batch_size] for group in grouped.values() for k in range(0, len(group), batch_size)]


@dataclass
class EditRun:
    """A checked edit run, ready to write: its folder, images, settings, pipeline, the policy of the target solves,
    the method's settings, what run.json records, the pipeline's extra arguments and, unless overwriting, the
    records of the images already there."""

    folder: RunFolder
    jobs: list[EditJob]
    settings: EditSettings
    pipe: Any
    guidance: GuidanceScheduler
    method: dict
    record: dict
    call: dict
    overwrite: bool
    existing: dict[int, dict]

    @property
    def part(self) -> Path:
        return self.folder.path / "results-000.jsonl"

    def execute(self, on_image: Callable[[dict], None] | None = None) -> EditResult:
        """Write the run: the missing images (`on_image(record)` after each), their lines, the merged results and
        summary.json. A KeyboardInterrupt (SIGINT, SIGTERM in the commands) drops the batch in progress and raises
        `RunInterrupted`."""
        pending = [job for job in self.jobs if job.index not in self.existing]
        self.pipe.set_progress_bar_config(disable=True)
        try:
            self.folder.start(self.record, self.overwrite, self.existing)
            for batch in size_groups(pending, self.settings.batch_size):
                for record in self.edit(batch):
                    if on_image is not None:
                        on_image(record)
        except KeyboardInterrupt as error:
            if self.folder.path.is_dir():
                self.finish()
            done = self.folder.count_done(len(self.jobs))
            raise RunInterrupted(self.folder.path, done, len(self.jobs), signal_number(error)) from None
        nfe = mean_nfe(self.finish())
        return EditResult(self.folder.path, len(self.jobs), len(pending), len(self.existing), nfe, self.guidance)

    def finish(self) -> list[dict]:
        """Merge the lines into results.jsonl and write summary.json from them."""
        records = [record for _, record in sorted(self.folder.merge(len(self.jobs)).items())]
        summary = {
            "model": self.settings.model,
            "method": self.settings.task,
            "guidance": repr(self.guidance),
            "nfe_per_image": mean_nfe(records) if records else None,
            "images": records,
        }
        write_atomically(self.folder.path / SUMMARY_FILE, json.dumps(summary, indent=1))
        return records

    def edit(self, batch: list[EditJob]) -> list[dict]:
        """One pipeline call; each image's files written, then the batch's lines."""
        images, sources = [load_image(job) for job in batch], [job.source_prompt for job in batch]
        seed = self.settings.seed + batch[0].index
        kwargs = {**self.method_arguments(torch.Generator().manual_seed(seed)), **self.call}
        if self.settings.invert:
            result = self.pipe.invert(images, sources, **kwargs)
        else:
            targets = [job.target_prompt for job in batch]
            call = self.pipe.flowedit if self.settings.method == "flowedit" else self.pipe.edit
            result = call(images, sources, targets, **kwargs)
        records = [self.write(job, result, b, seed) for b, job in enumerate(batch)]
        append_lines(self.part, records)
        return records

    def method_arguments(self, generator: torch.Generator) -> dict:
        """The keyword arguments of `pipe.edit`, `pipe.invert` or `pipe.flowedit`."""
        s, method = self.settings, self.method
        embedded = {} if s.embedded_guidance_scale is None else {"guidance_scale": s.embedded_guidance_scale}
        common = {"num_inference_steps": method["num_inference_steps"], "n_max": method["n_max"], **embedded}
        if s.method == "flowedit":
            source = {} if s.source_guidance_scale is None else {"source_guidance_scale": s.source_guidance_scale}
            return {
                **common,
                **source,
                "target_guidance": self.guidance,
                "n_avg": s.n_avg,
                "generator": generator,
                "negative_prompt": s.negative_prompt,
            }
        flowopt = {key: method[key] for key in ("iterations", "step_size", "tolerance", "min_improvement")}
        negative = {} if s.invert else {"negative_prompt": s.negative_prompt}
        return {
            **common,
            **flowopt,
            **negative,
            "guidance": self.guidance,
            "generator": generator,
            "return_iterates": s.save_iterates,
        }

    def write(self, job: EditJob, result, b: int, seed: int) -> dict:
        """Image `b` of a result: its iterates and latents when asked for, then the PNG with its record."""
        name, record = output_name(job.index, ""), self.image_record(job, result, b, seed)
        if result.iterates:
            record["iterates"] = self.write_iterates(name, [iterate[b] for iterate in result.iterates])
        if self.settings.invert:
            record["latents"] = self.write_latents(name, result.latents[b : b + 1])
        write_png(result.images[b], self.folder.path / record["file"], record, edit_parameters(record))
        return record

    def image_record(self, job: EditJob, result, b: int, seed: int) -> dict:
        s = self.settings
        return {
            "index": job.index,
            "file": output_name(job.index),
            "image": job.image,
            "image_sha256": job.sha256,
            "source_prompt": job.source_prompt,
            "target_prompt": None if s.invert else job.target_prompt,
            "negative_prompt": s.negative_prompt,
            "method": s.task,
            "model": s.model,
            "seed": seed,
            "num_inference_steps": self.method["num_inference_steps"],
            "size": list(result.size),
            "residuals": [step[b] for step in result.residuals],
            "nfe": result.nfe,
            "stopped": result.stopped,
            "outcome": result.outcomes[b] if result.outcomes else None,
        }

    def write_iterates(self, name: str, iterates: list) -> str:
        """Every iteration's image into `<name>-iterates/`, put in place whole."""
        final = self.folder.path / f"{name}-iterates"
        temporary = final.with_name(final.name + TEMPORARY_SUFFIX)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        for k, iterate in enumerate(iterates):
            write_png(iterate, temporary / f"{k:02d}.png")
        shutil.rmtree(final, ignore_errors=True)  # an earlier try at this image, killed before its PNG
        os.replace(temporary, final)
        return f"{final.name}/"

    def write_latents(self, name: str, latents: torch.Tensor) -> str:
        final = self.folder.path / f"{name}-latents.safetensors"
        temporary = final.with_name(final.name + TEMPORARY_SUFFIX)
        save_file({"latents": latents.contiguous().cpu()}, temporary)
        os.replace(temporary, final)
        return final.name


def run_record(settings: EditSettings, method: dict, options: dict, jobs: Sequence[EditJob], call: dict) -> dict:
    """What the outputs depend on: run.json."""
    return {
        "model": settings.model,
        "dtype": settings.dtype,
        "method": settings.task,
        **method,
        "guidance": options,
        "negative_prompt": settings.negative_prompt,
        "embedded_guidance_scale": settings.embedded_guidance_scale,
        "seed": settings.seed,
        "save_iterates": settings.save_iterates,
        "max_sequence_length": call.get("max_sequence_length"),
        "manifest": jobs_hash(jobs, settings.invert),
        "images": len(jobs),
    }


def prepare_edits(
    jobs: Sequence[EditJob],
    output_dir: str | Path,
    settings: EditSettings,
    *,
    pipe=None,
    overwrite: bool = False,
    name: Naming = PYTHON,
) -> EditRun:
    """Check everything (the settings, the folder, every job's prompts and image, the settings against the model)
    and load the model; nothing is written. `name` spells the arguments in errors."""
    from .models import call_defaults

    settings.check(name)
    folder = RunFolder(check_output_dir(output_dir, name("output_dir")), COMMAND, name)
    check_prompts(jobs, settings.invert, name)
    for job in jobs:
        image_file(job)
    pipe, family = load(settings, pipe, name)
    if settings.embedded_guidance_scale is not None and family != "flux":
        raise ValueError(
            f"`{name('embedded_guidance_scale')}` is for Flux's guidance embedding; {settings.model!r} is {family}"
        )
    try:
        method = method_settings(settings, family)
    except (ValueError, TypeError) as error:
        raise name.reworded(error, METHOD_OPTIONS) from None
    options = guidance_options(settings, family)
    try:
        guidance = policy_from_options(options, settings.model, method["num_inference_steps"])
    except (ValueError, TypeError) as error:
        raise name.reworded(error, GUIDANCE_OPTIONS) from None
    jobs = [inspect_image(job, pipe.pixel_multiple(), pipe.largest_side()) for job in jobs]
    call = call_defaults(settings.model, family, settings.max_sequence_length)
    record = run_record(settings, method, options, jobs, call)
    folder.check(record, overwrite)
    existing = {} if overwrite else folder.records(len(jobs))
    return EditRun(folder, jobs, settings, pipe, guidance, method, record, call, overwrite, existing)


def edit_batch(
    jobs: Sequence[EditJob],
    output_dir: str | Path,
    settings: EditSettings,
    *,
    pipe=None,
    overwrite: bool = False,
    on_image: Callable[[dict], None] | None = None,
) -> EditResult:
    """Edit (or invert) every job's image into `output_dir`, resuming what is there (see the module docstring)."""
    return prepare_edits(jobs, output_dir, settings, pipe=pipe, overwrite=overwrite).execute(on_image)
