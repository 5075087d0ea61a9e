"""The demo's logic, without Gradio: the Compare tab (guidance policies side by side on the same prompt and seeds) and
the Edit tab (FlowOpt editing or inversion, iterate by iterate; FlowEdit). `app.py` is only the page: its events call
these functions with the page's values (`CompareRequest.from_page` and `compare`, `EditRequest.from_page` and `edit`,
`take_from_compare`, `upload`, `apply_preset`, `method_controls`, `mode_settings`; the Stops are in `sessions`), which
check them with the messages the page shows and stream the page's outputs.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from guidance import ClassifierFreeGuidance, GuidanceScheduler
from guidance.flowedit import DEFAULTS as FLOWEDIT_DEFAULTS
from guidance.flowopt import DEFAULTS as FLOWOPT_DEFAULTS
from guidance.flowopt import TARGET_GUIDANCE_SCALE
from guidance.metrics import psnr
from guidance.plot import plot_dynamic_trace, plot_residuals, plot_trace
from guidance.shapes.assets import ASSETS

from ..editing import FlowEditOutput, crop_top_left
from ..families import FAMILIES, FLOW_FAMILIES
from ..sampler import GuidedInputs, GuidedPipelineMixin, call_signature, progress_updates
from .models import SHAPES_MODELS, call_defaults, model_family
from .options import DEFAULT_CANDIDATES, METHOD_OPTIONS, METHODS, policy_from_options, shipped_coefficients
from .sessions import (
    LoadedModel,
    LoadedModels,
    Running,
    StopRequested,
    device_and_dtype,
    in_background,
    running_in,
)

MAX_POLICIES = 4
OFF = "off"
EDIT_MODEL = "shapes:sd3"
EDIT_MODES = ("FlowOpt edit", "invert, then regenerate", "FlowEdit", "Invert (reconstruction)")
FLOWOPT_EDIT, REGENERATE, FLOWEDIT, INVERT = EDIT_MODES
MAX_SCALE, MAX_STEPS, MAX_IMAGES, MAX_ITERATIONS, MAX_EDIT_SIDE = 30.0, 100, 8, 50, 2048
MAX_SEED = 2**31 - 1
METHOD_NAMES = {
    "cfg": "CFG",
    "scheduled": "scheduled CFG",
    "ag": "AG",
    "linear-ag": "LinearAG",
    "dynamic": "dynamic",
    "none": "no guidance",
}
MODELS = LoadedModels()  # shared by every session of the page


def evaluator_choices() -> list[tuple[str, str]]:
    """(label, evaluator spec) of the evaluators dynamic guidance can be given in the page."""
    return [
        ("latent CLIP head (shapes:sd, no decode)", str(ASSETS / "shapes-sd-latent-clip")),
        ("latent fidelity head (shapes:sd, no decode)", str(ASSETS / "shapes-sd-latent-fidelity")),
        ("CLIP on decoded pixels", "clip"),
        ("fidelity discriminator on decoded pixels (shapes:sd)", str(ASSETS / "shapes-sd-fidelity")),
    ]


SHAPES_SD_EVALUATORS = [spec for _, spec in evaluator_choices() if spec != "clip"]  # trained on shapes:sd only


# --------------------------------------------------------------------------------------------------- page values


def read_number(value: Any, name: str, low: float, high: float, integer: bool = False) -> float | int:
    """A box's `value` (a number, or text holding one) checked to lie in [low, high]; a ValueError naming the box."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{name} must be a number, got an empty box")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        shown = f"[{low:d}, {high:d}]" if integer else f"[{low:g}, {high:g}]"
        raise ValueError(f"{name} must be in {shown}, got {value:g}")
    if integer and value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value:g}")
    return int(value) if integer else float(value)


def read_prompt(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value.strip()


def read_model(model: Any, flow: bool = False) -> tuple[str, str]:
    """(name, family) of the model box: a shipped shapes model, `tiny:<family>` or an existing local diffusers folder
    (the page loads nothing from the hub); `flow`: it must be a flow model (SD3 or Flux), for editing. The checks
    before `model_family` word the page's messages for what a user types there."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be one of {list(SHAPES_MODELS)} or a local diffusers folder, got an empty box")
    model = model.strip()
    if model.startswith("shapes:") and model not in SHAPES_MODELS:
        raise ValueError(f"model {model!r}: the shipped shapes models are {list(SHAPES_MODELS)}")
    if model.startswith("tiny:") and model.removeprefix("tiny:") not in FAMILIES:
        raise ValueError(f"model {model!r}: tiny:<family> takes a family in {list(FAMILIES)}")
    if not model.startswith(("shapes:", "tiny:")) and not os.path.isdir(model):
        raise ValueError(
            f"model {model!r} is neither a shipped shapes model {list(SHAPES_MODELS)} nor an existing local diffusers "
            "folder"
        )
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"model folder {model!r} is not a diffusers pipeline: it has no model_index.json")
    family = model_family(model, argument="model")
    if flow and family not in FLOW_FAMILIES:
        raise ValueError(
            f"model {model!r} is a {family.upper()} model: editing needs a flow model (SD3 or Flux), e.g. shapes:sd3"
        )
    return model, family


def npo_folder(folder: Any, model: str) -> str:
    """The Self-NPO adapter folder: the one given, else the adapter shipped for a shapes model."""
    folder = folder.strip() if isinstance(folder, str) else ""
    if not folder:
        shipped = ASSETS / f"{SHAPES_MODELS.get(model, '')}-npo"
        if model not in SHAPES_MODELS or not shipped.is_dir():
            raise ValueError(f"no Self-NPO adapter is shipped for {model!r}: give an adapter folder")
        return str(shipped)
    if not (Path(folder).is_dir() and any(Path(folder).glob("*.safetensors"))):
        raise ValueError(f"the Self-NPO adapter must be a folder holding a LoRA .safetensors file, got {folder!r}")
    return folder


# --------------------------------------------------------------------------------------------------- policy slots


@dataclass
class PolicyControls:
    """One policy slot of the Compare tab, in the order of its widgets."""

    method: str = OFF
    guidance_scale: Any = 7.5
    final_guidance_scale: Any = 1.0
    schedule: str = "linear"
    threshold: Any = 0.995
    coefficients: str = ""
    candidates: str = ", ".join(f"{c:g}" for c in DEFAULT_CANDIDATES)
    evaluators: list = field(default_factory=list)
    guidance_start: Any = 0.0
    guidance_stop: Any = 1.0
    npo: bool = False


POLICY_FIELDS = [f.name for f in fields(PolicyControls)]
OPTION_OF_FIELD = {"evaluators": "evaluator"}  # a slot's field -> the guidance option it sets (same name otherwise)
# the controls each method shows (the rest are hidden): the options `policy_from_options` reads for it, and the NPO
# switch for every guided method
SHOWN = {OFF: (), "none": ()} | {
    method: tuple(name for name in POLICY_FIELDS if OPTION_OF_FIELD.get(name, name) in read) + ("npo",)
    for method, read in METHOD_OPTIONS.items()
    if method != "none"
}


def policy_values(slots: Sequence[PolicyControls]) -> list:
    """The flat values of the Compare tab's `MAX_POLICIES` slots, in widget order: `slots`, then slots left off."""
    slots = [*slots, *[PolicyControls()] * (MAX_POLICIES - len(slots))]
    return [value for slot in slots for value in astuple(slot)]


def read_slots(values: Sequence) -> list[PolicyControls]:
    """The slots of the page's flat values (the inverse of `policy_values`)."""
    width = len(POLICY_FIELDS)
    if len(values) != MAX_POLICIES * width:
        raise TypeError(f"compare takes {MAX_POLICIES} policies of {width} values, got {len(values)} values")
    return [PolicyControls(*values[k * width : (k + 1) * width]) for k in range(MAX_POLICIES)]


def method_controls(method: str) -> list[bool]:
    """Which of a slot's controls (`POLICY_FIELDS` after the method) its method shows."""
    if method not in SHOWN:
        raise ValueError(f"method must be one of {[OFF, *METHODS]}, got {method!r}")
    return [name in SHOWN[method] for name in POLICY_FIELDS[1:]]


def scale_options(controls: PolicyControls, where: str, model: str, steps: int) -> dict:
    return {"guidance_scale": read_number(controls.guidance_scale, f"{where}: guidance scale", 0, MAX_SCALE)}


def schedule_options(controls: PolicyControls, where: str, model: str, steps: int) -> dict:
    """A constant schedule reads no final scale."""
    constant = controls.schedule == "constant"
    final = (
        None
        if constant
        else read_number(controls.final_guidance_scale, f"{where}: final guidance scale", 0, MAX_SCALE)
    )
    return {"schedule": controls.schedule, "final_guidance_scale": final}


def threshold_options(controls: PolicyControls, where: str, model: str, steps: int) -> dict:
    threshold = read_number(controls.threshold, f"{where}: AG threshold", 0, 1)
    if threshold == 0:
        raise ValueError(f"{where}: AG threshold must be in (0, 1], got 0")
    return {"threshold": threshold}


def coefficients_options(controls: PolicyControls, where: str, model: str, steps: int) -> dict:
    """The folder given, else the one shipped for a shapes model at this step count."""
    coefficients = (controls.coefficients or "").strip() or shipped_coefficients(model, steps)
    if not coefficients:
        raise ValueError(
            f"{where}: LinearAG needs a coefficients folder (written by guided-calibrate-linear-ag); shipped only for "
            "shapes:sd and shapes:sd3 at 20 steps"
        )
    return {"coefficients": coefficients}


def dynamic_options(controls: PolicyControls, where: str, model: str, steps: int) -> dict:
    """Candidate scales (text: numbers separated by commas or spaces) and evaluators (none: the model's default)."""
    text = str(controls.candidates or "").replace(",", " ").split()
    if not text:
        raise ValueError(f"{where}: candidate scales must be numbers separated by commas, got an empty box")
    candidates = [read_number(c, f"{where}: candidate scale", 0, MAX_SCALE) for c in text]
    evaluators = list(controls.evaluators) or None
    foreign = [Path(e).name for e in evaluators or [] if e in SHAPES_SD_EVALUATORS]
    if foreign and model != "shapes:sd":
        raise ValueError(
            f"{where}: the evaluators {foreign} were trained on shapes:sd, not {model!r}; pick 'CLIP on decoded "
            "pixels' or none (the model's default)"
        )
    return {"candidates": candidates, "evaluator": evaluators}


def interval_options(controls: PolicyControls, where: str, model: str, steps: int) -> dict:
    start = read_number(controls.guidance_start, f"{where}: guidance interval start", 0, 1)
    stop = read_number(controls.guidance_stop, f"{where}: guidance interval stop", 0, 1)
    if start > stop:
        raise ValueError(f"{where}: guidance interval start ({start:g}) must be <= its stop ({stop:g})")
    return {"guidance_start": start, "guidance_stop": stop}


# a slot's control -> the reader of the guidance options it stands for, in the order they are checked
OPTION_READERS = {
    "guidance_scale": scale_options,
    "final_guidance_scale": schedule_options,
    "threshold": threshold_options,
    "coefficients": coefficients_options,
    "candidates": dynamic_options,
    "guidance_start": interval_options,
}


def policy_options(controls: PolicyControls, where: str, model: str, steps: int) -> dict:
    """The guidance options of a slot (checked; only what its method reads), for `policy_from_options`."""
    if controls.method not in SHOWN:
        raise ValueError(f"{where}: method must be one of {[OFF, *METHODS]}, got {controls.method!r}")
    options = {"guidance": controls.method}
    for name, read in OPTION_READERS.items():
        if name in SHOWN[controls.method]:
            options.update(read(controls, where, model, steps))
    return options


def policy_label(options: dict, npo: bool) -> str:
    """How the page names a policy: its method and the values it reads."""
    method, label = options["guidance"], METHOD_NAMES[options["guidance"]]
    if "guidance_scale" in options:
        label += f" {options['guidance_scale']:g}"
    if method == "scheduled" and options["final_guidance_scale"] is not None:
        label += f" -> {options['final_guidance_scale']:g} ({options['schedule']})"
    elif method == "scheduled":
        label += f" ({options['schedule']})"
    if method == "ag":
        label += f" (threshold {options['threshold']:g})"
    if method == "dynamic":
        evaluators = ", ".join(Path(e).name for e in options["evaluator"] or []) or "default evaluators"
        label += f" (candidates {' '.join(f'{c:g}' for c in options['candidates'])}; {evaluators})"
    if (options.get("guidance_start", 0), options.get("guidance_stop", 1)) != (0, 1):
        label += f", interval [{options['guidance_start']:g}, {options['guidance_stop']:g}]"
    return label + (" + Self-NPO" if npo else "")


# --------------------------------------------------------------------------------------------------- prompts


def truncation_note(pipe, text: str, name: str, max_sequence_length: int | None) -> str | None:
    """A note when `text` is longer than the pipeline's CLIP tokenizer reads (the pipeline cuts it, as diffusers does,
    with only a warning in the server's log), saying what the CLIP encoder reads and whether the T5 encoder (SD3,
    Flux) reads it all, up to `max_sequence_length` (its tokens). Call with the model's lock held: a fast tokenizer
    is not safe to share between threads while the pipeline sets its truncation."""
    from transformers import T5Tokenizer, T5TokenizerFast

    clip = getattr(pipe, "tokenizer", None)
    if clip is None or not text:
        return None
    tokens, limit = len(clip(text, verbose=False).input_ids) - 2, clip.model_max_length - 2  # less BOS and EOS
    if tokens <= limit:
        return None
    read = clip.decode(clip(text, max_length=limit + 2, truncation=True).input_ids, skip_special_tokens=True)
    note = f"The {name} is {tokens} tokens long: the model's CLIP text encoder reads only its first {limit}, {read!r}"
    tokenizers = (getattr(pipe, "tokenizer_3", None), getattr(pipe, "tokenizer_2", None))
    t5 = next((t for t in tokenizers if isinstance(t, (T5Tokenizer, T5TokenizerFast))), None)
    if t5 is not None and max_sequence_length is not None:
        t5_tokens = len(t5(text, verbose=False).input_ids) - 1  # less EOS
        if t5_tokens < max_sequence_length:
            note += "; its T5 encoder reads all of it"
        else:
            note += f"; its T5 encoder reads its first {max_sequence_length - 1} of its {t5_tokens} T5 tokens"
    return note + "."


def text_length(loaded: LoadedModel) -> int | None:
    """The T5 text length the pipeline runs with (`max_sequence_length`; SD3 and Flux), else None."""
    defaults = call_defaults(loaded.name, loaded.family)
    if "max_sequence_length" in defaults:
        return defaults["max_sequence_length"]
    parameter = call_signature(super(GuidedPipelineMixin, loaded.pipe).__call__).parameters.get("max_sequence_length")
    return None if parameter is None else parameter.default


def prompt_notes(loaded: LoadedModel, texts: dict[str, str]) -> list[str]:
    """`truncation_note` of each named text. Call with the model's lock held."""
    notes = [truncation_note(loaded.pipe, text, name, text_length(loaded)) for name, text in texts.items()]
    return [note for note in notes if note]


# --------------------------------------------------------------------------------------------------- Compare


@dataclass(frozen=True)
class CompareRequest:
    """A comparison, checked: the prompts, model and seeds every policy shares, and per slot in use its guidance
    options and Self-NPO adapter folder (None: no Self-NPO)."""

    prompt: str
    negative_prompt: str
    model: str
    num_inference_steps: int
    num_images: int
    seed: int
    options: dict[int, dict]
    adapters: dict[int, str | None]

    @classmethod
    def from_page(
        cls,
        prompt: Any,
        negative_prompt: Any,
        model: Any,
        num_inference_steps: Any,
        num_images: Any,
        seed: Any,
        npo_adapter: Any,
        policy_values: Sequence,
    ) -> CompareRequest:
        """The request of the Compare tab's values (`policy_values`: the slots' flat values, `MAX_POLICIES` times
        `POLICY_FIELDS`), with the page's messages for what is wrong."""
        prompt = read_prompt(prompt, "prompt")
        model, _ = read_model(model)
        steps = read_number(num_inference_steps, "steps", 1, MAX_STEPS, integer=True)
        images = read_number(num_images, "images per policy", 1, MAX_IMAGES, integer=True)
        seed = read_number(seed, "seed", 0, MAX_SEED, integer=True)
        chosen = {k: slot for k, slot in enumerate(read_slots(policy_values)) if slot.method != OFF}
        if not chosen:
            raise ValueError("choose a method for at least one policy")
        options = {k: policy_options(slot, f"policy {k + 1}", model, steps) for k, slot in chosen.items()}
        npo = {k: slot.npo and "npo" in SHOWN[slot.method] for k, slot in chosen.items()}
        adapters = {k: npo_folder(npo_adapter, model) if npo[k] else None for k in chosen}
        return cls(prompt, negative_prompt or "", model, steps, images, seed, options, adapters)


@dataclass
class PolicyResult:
    label: str
    images: list
    figure: Any
    nfe: float
    seconds: float


@contextmanager
def in_policy(k: int, errors: tuple[type[Exception], ...] = (ValueError, TypeError)) -> Iterator[None]:
    """An error of policy slot `k` raised in the block, as a ValueError that names the slot."""
    try:
        yield
    except errors as error:
        raise ValueError(f"policy {k + 1}: {error}") from error


def compare(request: CompareRequest, session: dict | None = None, progress: Callable | None = None) -> Iterator[tuple]:
    """The Compare tab: the request's policies on its prompt and seeds, each built and started before any runs.
    Yields the page's outputs after each policy: per slot (images, scale plot, NFEs and time), then the summary and the
    images kept for the Edit tab. Its Stop (`request_compare_stop(session)`, from the moment the call starts) ends it
    after the current step, keeping the policies that finished; `progress((done, total), desc=...)` after every
    step."""
    stop = threading.Event()
    with running_in(session, "compare", Running("the comparison", stop, "step")):
        yield from run_comparison(request, stop, progress)


def run_comparison(request: CompareRequest, stop: threading.Event, progress: Callable | None) -> Iterator[tuple]:
    loaded = MODELS.get(request.model)
    inputs, policies, notes = prepare_comparison(loaded, request)
    steps, device = request.num_inference_steps, device_and_dtype(loaded.family)[0]
    results: dict[int, PolicyResult] = {}
    for done, (k, policy) in enumerate(policies.items()):

        def on_step(step: int, total: int, done: int = done, k: int = k) -> None:
            if progress is not None:
                progress((done * total + step, len(policies) * total), desc=f"policy {k + 1}: step {step}/{total}")

        on_step(0, steps)
        label = policy_label(request.options[k], bool(request.adapters[k]))
        with in_policy(k):
            result = run_policy(loaded, inputs, policy, label, on_step, stop)
        if result is None:
            kept = "the policies that finished are kept" if results else "no policy had finished"
            stopped = f"**Stopped by you** during policy {k + 1} ({label}): {kept}."
            yield compare_outputs(results, request.prompt, compare_summary(results, steps, device, [stopped, *notes]))
            return
        results[k] = result
        if done + 1 < len(policies):
            yield compare_outputs(results, request.prompt, f"running... ({len(results)} done)")
    late = ["Stop came after the last step: every policy finished."] if stop.is_set() else []
    yield compare_outputs(results, request.prompt, compare_summary(results, steps, device, [*notes, *late]))


def prepare_comparison(
    loaded: LoadedModel, request: CompareRequest
) -> tuple[GuidedInputs, dict[int, GuidanceScheduler], list[str]]:
    """The inputs every policy runs on (`pipe.prepare`: prompts, seeds, scheduler; image i: seed + i), every policy
    built and a run of it started on them (a policy that cannot run fails now, named, before any runs), and the
    notes on the prompts."""
    with loaded.lock:
        seeds = [torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)]
        inputs = loaded.pipe.prepare(
            request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_images_per_prompt=request.num_images,
            num_inference_steps=request.num_inference_steps,
            generator=seeds,
            **call_defaults(loaded.name, loaded.family),
        )
        policies = {k: start_policy(loaded, inputs, request, k) for k in request.options}
        notes = prompt_notes(loaded, {"prompt": request.prompt, "negative prompt": request.negative_prompt})
    return inputs, policies, notes


def start_policy(loaded: LoadedModel, inputs: GuidedInputs, request: CompareRequest, k: int) -> GuidanceScheduler:
    """Slot `k`'s policy, with a run of it started on `inputs` (e.g. LinearAG checks its coefficients there)."""
    with in_policy(k, (ValueError, TypeError, OSError)):
        adapter = request.adapters[k]
        unconditional = loaded.negative_adapter(adapter) if adapter else None
        policy = policy_from_options(request.options[k], request.model, request.num_inference_steps, unconditional)
        loaded.pipe.start_run(inputs, policy, inputs.latents.shape[0])
    return policy


def run_policy(
    loaded: LoadedModel,
    inputs: GuidedInputs,
    guidance: GuidanceScheduler,
    label: str,
    on_step: Callable[[int, int], None],
    stop: threading.Event,
) -> PolicyResult | None:
    """One policy on the call's prepared inputs, timed, with the model's lock held for the run; `on_step(step, steps)`
    after every step, counted as diffusers' progress bar counts them (a second-order scheduler's two evaluations are
    one step). None when `stop` is set before its last step: the run ends after the current one."""
    updates = sorted(progress_updates(inputs.num_timesteps, inputs.num_inference_steps, inputs.scheduler.order, 0))

    def step_end(pipe, step, timestep, tensors):
        on_step(sum(i <= step for i in updates), len(updates))
        if stop.is_set() and step + 1 < inputs.num_timesteps:
            raise StopRequested
        return tensors

    with loaded.lock:
        if stop.is_set():
            return None
        started = time.perf_counter()
        try:
            result = loaded.pipe.denoise(inputs, guidance, callback_on_step_end=step_end)
        except StopRequested:
            return None
        images = loaded.pipe.decode(result.latents, inputs).images
        seconds = time.perf_counter() - started
    dynamic = any("candidate_scores" in extras for extras in result.trace.extras)
    figure = plot_dynamic_trace(result.trace) if dynamic else plot_trace(result.trace)
    return PolicyResult(label, images, figure, result.trace.nfe, seconds)


def compare_summary(results: dict[int, PolicyResult], steps: int, device: str, notes: list[str]) -> str:
    """A table of NFEs and wall time per policy, which one was cheapest (fewest NFEs, then time), then `notes`."""
    parts = []
    if results:
        rows = [f"| {slot + 1} | {r.label} | {r.nfe:g} | {r.seconds:.2f} |" for slot, r in results.items()]
        parts.append(
            "\n".join(["| policy | method | NFEs per image | wall time (s) |", "| --- | --- | --- | --- |", *rows])
        )
        slot, cheapest = min(results.items(), key=lambda item: (item[1].nfe, item[1].seconds))
        most = max(r.nfe for r in results.values())
        line = f"**Cheapest: policy {slot + 1}, {cheapest.label}**: {cheapest.nfe:g} model evaluations per image"
        if len(results) > 1 and most > 0:
            line += f" ({cheapest.nfe / most:.2f} of the most expensive's {most:g})"
        parts.append(f"{line}; {steps} steps on {device}.")
    return "\n\n".join(parts + notes)


def compare_outputs(results: dict[int, PolicyResult], prompt: str, summary: str) -> tuple:
    """The Compare tab's outputs: per slot (images, scale plot, cost; empty for a slot without a result), the summary,
    and the images kept for the Edit tab as (label, image, prompt)."""
    outputs = []
    for k in range(MAX_POLICIES):
        result = results.get(k)
        if result is None:
            outputs += [None, None, ""]
        else:
            cost = f"**{result.label}**: {result.nfe:g} NFEs per image, {result.seconds:.2f} s"
            outputs += [result.images, result.figure, cost]
    kept = [
        (f"policy {k + 1} ({r.label}), image {i + 1}", image, prompt)
        for k, r in results.items()
        for i, image in enumerate(r.images)
    ]
    return (*outputs, summary, kept)


# --------------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    policies: tuple[PolicyControls, ...]
    model: str = "shapes:sd"
    steps: int = 20


LATENT_HEADS = [spec for _, spec in evaluator_choices()[:2]]
PRESETS = {
    "AG and LinearAG against CFG (docs: Adaptive Guidance)": Preset(
        (
            PolicyControls("cfg", 7.5),
            PolicyControls("ag", 7.5, threshold=0.995),
            PolicyControls("ag", 7.5, threshold=0.999),
            PolicyControls("linear-ag", 7.5),
        )
    ),
    "Dynamic guidance against fixed scales (docs: dynamic guidance)": Preset(
        (
            PolicyControls("cfg", 7.5),
            PolicyControls("cfg", 15.0),
            PolicyControls("dynamic", candidates="5, 7.5, 10, 15", evaluators=LATENT_HEADS),
            PolicyControls("dynamic", evaluators=LATENT_HEADS),
        )
    ),
    "Self-NPO in the unconditional branch (docs: Self-NPO)": Preset(
        (
            PolicyControls("cfg", 7.5),
            PolicyControls("cfg", 7.5, npo=True),
            PolicyControls("ag", 7.5),
            PolicyControls("ag", 7.5, npo=True),
        )
    ),
    "Scheduled CFG and a guidance interval": Preset(
        (
            PolicyControls("cfg", 7.5),
            PolicyControls("scheduled", 15.0, final_guidance_scale=1.0),
            PolicyControls("scheduled", 15.0, final_guidance_scale=1.0, schedule="cosine"),
            PolicyControls("cfg", 7.5, guidance_start=0.0, guidance_stop=0.5),
        )
    ),
}


def apply_preset(preset: str) -> tuple:
    """The model, steps and every slot's values of a preset (the headline comparisons of the docs)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    chosen = PRESETS[preset]
    return (chosen.model, chosen.steps, *policy_values(chosen.policies))


# --------------------------------------------------------------------------------------------------- Edit


def upload(file: Any) -> PIL.Image.Image | None:
    """The uploaded file (a path, or an object with its path as `name`) as an RGB image; a readable error if it is
    not an image."""
    if file is None:
        return None
    path = getattr(file, "name", file)
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, PIL.UnidentifiedImageError):
        raise ValueError(f"the uploaded file {Path(path).name!r} is not an image (PNG, JPEG, WebP, ...)") from None


def take_from_compare(kept: list | None, choice: str | None) -> tuple:
    """The Compare image picked (its label), as the Edit tab's source image, with its prompt as the source prompt."""
    for label, image, prompt in kept or []:
        if label == choice:
            return image, prompt
    raise ValueError("run a comparison first, then pick one of its images")


# the Edit settings each mode reads besides the source prompt (the others are hidden)
MODE_CONTROLS = {
    FLOWOPT_EDIT: ("target_prompt", "iterations", "step_size", "guidance_scale"),
    REGENERATE: ("target_prompt", "guidance_scale"),
    FLOWEDIT: ("target_prompt", "guidance_scale"),
    INVERT: ("iterations", "step_size"),
}
EDIT_CONTROLS = ("target_prompt", "iterations", "step_size", "guidance_scale")
# FlowOpt's settings chosen for shapes:sd3 on the shapes world's training scenes (benchmarks/flowopt_editing.py);
# other models start from the papers' code defaults (chosen at 1024 px)
SHAPES_FLOWOPT = {
    "edit": {"num_inference_steps": 15, "n_max": 15, "iterations": 4, "step_size": 0.02},
    "invert": {"num_inference_steps": 10, "n_max": 10, "iterations": 30, "step_size": 0.2},
}


def check_mode(mode: Any) -> str:
    if mode not in MODE_CONTROLS:
        raise ValueError(f"mode must be one of {list(EDIT_MODES)}, got {mode!r}")
    return mode


def mode_settings(mode: str, model: str) -> tuple[tuple, list[bool]]:
    """The Edit tab's settings when a mode is picked for `model`: (T, n_max, iterations, step size, target guidance
    scale), and which of `EDIT_CONTROLS` the mode shows."""
    check_mode(mode)
    model, family = read_model(model, flow=True)
    shown = [name in MODE_CONTROLS[mode] for name in EDIT_CONTROLS]
    if mode == FLOWEDIT:
        flowedit = FLOWEDIT_DEFAULTS[family]
        return (flowedit["num_inference_steps"], flowedit["n_max"], 0, "", flowedit["target_guidance_scale"]), shown
    task = "invert" if mode == INVERT else "edit"
    settings = SHAPES_FLOWOPT[task] if model in SHAPES_MODELS else FLOWOPT_DEFAULTS[(family, task)]
    iterations = 0 if mode == REGENERATE else settings["iterations"]
    scale = 1.0 if task == "invert" else TARGET_GUIDANCE_SCALE
    return (settings["num_inference_steps"], settings["n_max"], iterations, f"{settings['step_size']:g}", scale), shown


@dataclass(frozen=True)
class EditRequest:
    """An edit, checked. Settings its mode does not read (`MODE_CONTROLS`) hold what the mode runs with: the target
    prompt the source prompt, no iterations, no step size, guidance 1."""

    model: str
    image: PIL.Image.Image
    mode: str
    source_prompt: str
    target_prompt: str
    num_inference_steps: int
    n_max: int
    iterations: int
    step_size: float | str | None
    guidance_scale: float
    seed: int

    @classmethod
    def from_page(
        cls,
        model: Any,
        image: Any,
        source_prompt: Any,
        target_prompt: Any,
        mode: Any,
        num_inference_steps: Any,
        n_max: Any,
        iterations: Any,
        step_size: Any,
        guidance_scale: Any,
        seed: Any,
    ) -> EditRequest:
        """The request of the Edit tab's values, with the page's messages for what is wrong."""
        model, _ = read_model(model, flow=True)
        if image is None:
            raise ValueError("give a source image: upload one, or take one from the Compare tab")
        reads = MODE_CONTROLS[check_mode(mode)]
        source_prompt = read_prompt(source_prompt, "source prompt")
        target_prompt = read_prompt(target_prompt, "target prompt") if "target_prompt" in reads else source_prompt
        steps = read_number(num_inference_steps, "steps T", 1, MAX_STEPS, integer=True)
        n_max = read_number(n_max, "n_max", 1, steps, integer=True)
        iterations = (
            read_number(iterations, "iterations", 0, MAX_ITERATIONS, integer=True) if "iterations" in reads else 0
        )
        step_size = read_step_size(step_size) if "step_size" in reads else None
        scale = (
            read_number(guidance_scale, "target guidance scale", 0, MAX_SCALE) if "guidance_scale" in reads else 1.0
        )
        seed = read_number(seed, "seed", 0, MAX_SEED, integer=True)
        if max(image.size) > MAX_EDIT_SIDE:
            raise ValueError(
                f"the image ({image.width}x{image.height}) is too large for the demo: its sides must be at most "
                f"{MAX_EDIT_SIDE} pixels"
            )
        return cls(model, image, mode, source_prompt, target_prompt, steps, n_max, iterations, step_size, scale, seed)

    def texts(self) -> dict[str, str]:
        """The prompts the mode reads, by their name in the page."""
        target = {"target prompt": self.target_prompt} if "target_prompt" in MODE_CONTROLS[self.mode] else {}
        return {"source prompt": self.source_prompt} | target


def read_step_size(value: Any) -> float | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return read_number(value, "step size (a number or 'auto')", 1e-6, 10)


@dataclass
class EditState:
    """What an edit shows so far: the iterates, their residuals and which one is kept (the lowest residual: FlowOpt's
    objective, the iterate whose image is closest to the source)."""

    iterates: list
    residuals: list
    status: str = ""
    notes: list = field(default_factory=list)  # shown under the status (prompts the model reads only in part)

    @property
    def best(self) -> int | None:
        finite = [k for k, r in enumerate(self.residuals) if math.isfinite(r[0])]
        return min(finite, key=lambda k: self.residuals[k][0]) if finite else None

    def outputs(self, result: Any = None) -> tuple:
        """The Edit tab's outputs: (iterates, the image kept: `result` or the best iterate, residual plot, status)."""
        best = self.best
        image = result if result is not None else (self.iterates[best] if best is not None else None)
        gallery = [(image, f"iteration {k}") for k, image in enumerate(self.iterates)]
        figure = plot_residuals(self.residuals, best) if self.residuals else None
        return gallery, image, figure, "\n\n".join([self.status, *self.notes])


def edit(request: EditRequest, session: dict | None = None, progress: Callable | None = None) -> Iterator[tuple]:
    """The Edit tab: FlowOpt editing with iterates streamed as they are computed (Stop keeps the best so far),
    "invert, then regenerate" (iterate 0), FlowEdit, or inversion with the reconstruction's PSNR. Yields (iterates,
    kept image, residual plot, status). Its Stop (`request_stop(session)`, from the moment the call starts) ends it
    after the current iteration; `progress((done, total), desc=..., unit=...)` after every iteration."""
    stop = threading.Event()
    with running_in(session, "edit", Running(request.mode, None if request.mode == FLOWEDIT else stop)):
        try:
            yield from run_edit(request, stop, progress)
        finally:  # finished, failed, or closed by the page (Stop of the queue, a closed tab): the worker stops too
            stop.set()


def run_edit(request: EditRequest, stop: threading.Event, progress: Callable | None) -> Iterator[tuple]:
    loaded = MODELS.get(request.model)
    source, cropped = editing_source(request, loaded.pipe.pixel_multiple())
    state = EditState([], [], f"running {request.mode} on {device_and_dtype(loaded.family)[0]}...")
    with loaded.lock:
        state.notes = cropped + prompt_notes(loaded, request.texts())
    yield state.outputs()
    for event in in_background(lambda emit: solve_edit(loaded, request, source, stop, emit)):
        if event[0] == "done":
            yield finished_edit(state, request, source, event[1])
            return
        _, iteration, picture, residuals = event
        state.iterates.append(picture)
        state.residuals.append(residuals)
        state.status = f"iteration {iteration} of {request.iterations}: residual {residuals[0]:.4f}"
        if progress is not None:
            progress((iteration + 1, request.iterations + 1), desc=f"iteration {iteration}", unit="iterations")
        yield state.outputs()


def editing_source(request: EditRequest, multiple: int) -> tuple[PIL.Image.Image, list[str]]:
    """The source image as the editing pipelines take it (cut at the bottom and right to multiples of the model's
    `pixel_multiple()`, as they cut it), and a note when it was cut."""
    image = request.image
    if min(image.size) < multiple:
        raise ValueError(
            f"the image ({image.width}x{image.height}) is too small for {request.model!r}: its sides must be at least "
            f"{multiple} pixels"
        )
    height, width = image.height - image.height % multiple, image.width - image.width % multiple
    source = crop_top_left(image.convert("RGB"), height, width)
    if source.size == image.size:
        return source, []
    cut = f"The image ({image.width}x{image.height}) was cut to {width}x{height} from its top left corner"
    return source, [f"{cut}: the model takes sides that are multiples of {multiple} pixels."]


def solve_edit(
    loaded: LoadedModel, request: EditRequest, source: PIL.Image.Image, stop: threading.Event, emit: Callable
) -> tuple[FlowEditOutput, float | None] | None:
    """The edit on the model (its lock held), emitting ("iterate", k, image, residuals) after every FlowOpt iteration
    and stopping after the one in which `stop` is set: (the pipeline's output, for Invert the PSNR of the VAE's round
    trip alone), or None when stopped before it started."""
    pipe, family = loaded.pipe, loaded.family

    def on_iteration(pipe, iteration: int, tensors: dict) -> dict | None:
        picture = decoded_image(pipe, tensors["latents"], source.height, source.width)
        emit("iterate", iteration, picture, tensors["residuals"])
        return {"stop": True} if stop.is_set() else None

    generator = torch.Generator().manual_seed(request.seed)
    common = dict(num_inference_steps=request.num_inference_steps, n_max=request.n_max, generator=generator)
    common.update(call_defaults(request.model, family))
    # the page shows the iterates decoded as they arrive: no final decode ("latent")
    run = dict(common, iterations=request.iterations, step_size=request.step_size, output_type="latent")
    run["callback_on_iteration"] = on_iteration
    policy = "target_guidance" if request.mode == FLOWEDIT else "guidance"
    scale = request.guidance_scale
    target = dict(guidance_scale=scale) if family == "flux" else {policy: ClassifierFreeGuidance(scale)}
    with loaded.lock:
        if stop.is_set():  # stopped while it waited for the model
            return None
        if request.mode == FLOWEDIT:
            return pipe.flowedit(source, request.source_prompt, request.target_prompt, **target, **common), None
        if request.mode == INVERT:
            return pipe.invert(source, request.source_prompt, **run), psnr(round_trip(pipe, source), source)
        return pipe.edit(source, request.source_prompt, request.target_prompt, **target, **run), None


def finished_edit(state: EditState, request: EditRequest, source: PIL.Image.Image, result: tuple | None) -> tuple:
    """The Edit tab's last outputs, from what `solve_edit` returned."""
    if result is None:
        state.status = "stopped by you before it started"
        return state.outputs()
    out, ceiling = result
    if request.mode == FLOWEDIT:
        state.status = f"FlowEdit done: {out.nfe:g} model evaluations"
        return state.outputs(out.images[0])
    why = {"callback": "stopped by you", "converged": "converged", "iterations": "all iterations done"}
    if request.mode == REGENERATE:
        why["iterations"] = "regenerated from the inversion"
    best = state.best
    state.status = (
        f"{why.get(out.stopped, out.stopped)} at iteration {len(state.residuals) - 1}; kept iteration {best} (the "
        f"lowest residual, {state.residuals[best][0]:.4f}: the closest to the source); {out.nfe:g} model evaluations"
    )
    if request.mode == INVERT:
        reconstruction = psnr(state.iterates[best], source)
        state.status += f". Reconstruction PSNR {reconstruction:.2f} dB (the VAE's round trip alone: {ceiling:.2f} dB)"
    return state.outputs()


@torch.no_grad()
def decoded_image(pipe, latents: torch.Tensor, height: int, width: int) -> PIL.Image.Image:
    """The PIL image of denoised latents in the denoiser's layout (Flux: packed)."""
    vae_latents = pipe.unpack_latents(latents.to(pipe.vae.dtype), height, width)
    return pipe.image_processor.postprocess(pipe.decode_for_guidance(vae_latents), output_type="pil")[0]


@torch.no_grad()
def round_trip(pipe, image: PIL.Image.Image) -> PIL.Image.Image:
    """The image through the VAE and back: the best any inversion can reconstruct."""
    latents = pipe.pixels_to_latents(pipe.image_processor.preprocess(image).to(pipe.device, pipe.vae.dtype))
    return decoded_image(pipe, latents, image.height, image.width)
