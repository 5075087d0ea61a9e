"""Gradio demo: compare guidance policies side by side on the same seeds, and edit or invert images with FlowOpt,
iterate by iterate.

A thin shell: widgets, validation and plots; the pipelines and guidance schedulers do the work. Every event is a
plain function of this module (`compare`, `edit`, `request_stop`, `request_compare_stop`, `take_from_compare`,
`upload`, `apply_preset`, `method_controls`, `mode_settings`), so the page, `gradio_client` and tests call the same
code. Run `python app.py` (needs the `demo` extra: `pip install -e ".[demo]"`).
"""

from __future__ import annotations

import inspect
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from guidance import ClassifierFreeGuidance
from guidance.npo import NegativeAdapter, load_npo_adapter
from guidance.plot import plot_dynamic_trace, plot_residuals, plot_trace
from guidance.shapes.assets import ASSETS
from pipelines.application.models import EMBEDDED_DEFAULT, SHAPES_MODELS, call_defaults, load_pipeline, model_family
from pipelines.application.options import (
    DEFAULT_CANDIDATES,
    METHOD_OPTIONS,
    METHODS,
    policy_from_options,
    shipped_coefficients,
)
from pipelines.families import FAMILIES
from pipelines.sampler import GuidedPipelineMixin, call_signature, progress_updates

MAX_POLICIES = 4
OFF = "off"
EDIT_MODEL = "shapes:sd3"
EDIT_MODES = ("FlowOpt edit", "invert, then regenerate", "FlowEdit", "Invert (reconstruction)")
MAX_SCALE, MAX_STEPS, MAX_IMAGES, MAX_ITERATIONS, MAX_EDIT_SIDE = 30.0, 100, 8, 50, 2048
CONCURRENCY = 2  # calls of one event in progress at once; calls on one model still take turns (its lock)
METHOD_CHOICES = [("off (slot unused)", "off"), ("CFG", "cfg"), ("scheduled CFG", "scheduled"), ("AG", "ag"),
                  ("LinearAG", "linear-ag"), ("dynamic", "dynamic"), ("none (no guidance)", "none")]  # fmt: skip
METHOD_NAMES = {"cfg": "CFG", "scheduled": "scheduled CFG", "ag": "AG", "linear-ag": "LinearAG", "dynamic": "dynamic",
                "none": "no guidance"}  # fmt: skip


def evaluator_choices() -> list[tuple[str, str]]:
    """(label, `load_evaluator` spec) of the evaluators dynamic guidance can be given in the page."""
    return [
        ("latent CLIP head (shapes:sd, no decode)", str(ASSETS / "shapes-sd-latent-clip")),
        ("latent fidelity head (shapes:sd, no decode)", str(ASSETS / "shapes-sd-latent-fidelity")),
        ("CLIP on decoded pixels", "clip"),
        ("fidelity discriminator on decoded pixels (shapes:sd)", str(ASSETS / "shapes-sd-fidelity")),
    ]


# --------------------------------------------------------------------------------------------------- validation


def read_number(value: Any, name: str, low: float, high: float, integer: bool = False) -> float | int:
    """`value` (a number, or text holding one) checked to lie in [low, high]; a ValueError naming the field."""
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
        shown = (lambda x: f"{x:d}") if integer else (lambda x: f"{x:g}")  # noqa: E731
        raise ValueError(f"{name} must be in [{shown(low)}, {shown(high)}], got {value:g}")
    if integer and value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value:g}")
    return int(value) if integer else float(value)


def read_prompt(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value.strip()


def read_model(model: Any, flow: bool = False) -> str:
    """A model name of the picker: a shipped shapes model, `tiny:<family>` or an existing local diffusers folder."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be one of {list(SHAPES_MODELS)} or a local diffusers folder, got an empty box")
    model = model.strip()
    if model.startswith("shapes:") and model not in SHAPES_MODELS:
        raise ValueError(f"model {model!r}: the shipped shapes models are {list(SHAPES_MODELS)}")
    if model.startswith("tiny:") and model.removeprefix("tiny:") not in FAMILIES:
        raise ValueError(f"model {model!r}: tiny:<family> takes a family in {list(FAMILIES)}")
    if not model.startswith(("shapes:", "tiny:")) and not os.path.isdir(model):
        raise ValueError(f"model {model!r} is neither a shipped shapes model {list(SHAPES_MODELS)} nor an "
                         "existing local diffusers folder")  # fmt: skip
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"model folder {model!r} is not a diffusers pipeline: it has no model_index.json")
    if flow and family_of(model) not in ("sd3", "flux"):
        raise ValueError(f"model {model!r} is a {family_of(model).upper()} model: editing needs a flow model "
                         "(SD3 or Flux), e.g. shapes:sd3")  # fmt: skip
    return model


def family_of(model: str) -> str:
    if model in SHAPES_MODELS:
        return "sd3" if model == "shapes:sd3" else "sd"
    if model.startswith("tiny:"):
        return model.removeprefix("tiny:")
    return model_family(model, argument="model")


def device_and_dtype(family: str) -> tuple[str, torch.dtype]:
    """CUDA in float16 (bfloat16 for Flux, which overflows in float16) when there is a GPU, else the CPU in float32."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if family == "flux" else torch.float16
    return "cpu", torch.float32


# --------------------------------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A pipeline shared by every session, with its lock: runs on one model take turns, since a Self-NPO pass puts
    hooks on the shared denoiser for its length (per-call state otherwise lives in the call)."""

    name: str
    pipe: Any
    family: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: dict = field(default_factory=dict)  # Self-NPO adapter folder -> its adapter name in the pipeline

    def negative_adapter(self, folder: str) -> NegativeAdapter:
        """Self-NPO's `NegativeAdapter` for adapter `folder`, loaded on first use (kept off but for the unconditional
        rows of the policies that ask for it). Call with the lock held."""
        if folder not in self.adapters:
            name = f"npo{len(self.adapters)}"
            try:
                load_npo_adapter(self.pipe, folder, adapter_name=name)
            except Exception as error:
                raise ValueError(
                    f"Self-NPO adapter {folder!r} could not be loaded into {self.name!r}: {error}"
                ) from error
            self.adapters[folder] = name
        return NegativeAdapter(self.adapters[folder])


class LoadedModels:
    """The models of the page, each loaded once (a lock per name, so one slow load does not hold up the others), at
    most `size` kept: the least recently used one that is not running is let go."""

    def __init__(self, size: int = 2):
        self.size, self.models, self.loading, self.lock = size, OrderedDict(), {}, threading.Lock()

    def get(self, model: str) -> LoadedModel:
        with self.lock:
            loading = self.loading.setdefault(model, threading.Lock())
        with loading:
            with self.lock:
                if model in self.models:
                    self.models.move_to_end(model)
                    return self.models[model]
            family = family_of(model)
            device, dtype = device_and_dtype(family)
            try:
                pipe, family = load_pipeline(model, dtype=dtype, device=device)
            except Exception as error:  # any failure to load is the user's model: say so in the page
                raise ValueError(f"model {model!r} could not be loaded: {error}") from error
            pipe.set_progress_bar_config(disable=True)
            with self.lock:
                self.models[model] = entry = LoadedModel(model, pipe, family)
                idle = [name for name, other in self.models.items() if name != model and not other.lock.locked()]
                for name in idle[: max(0, len(self.models) - self.size)]:
                    del self.models[name]
            return entry


MODELS = LoadedModels()


def npo_folder(folder: Any, model: str) -> str:
    """The Self-NPO adapter folder: the one given, else the adapter shipped for a shapes model."""
    folder = (folder or "").strip() if isinstance(folder, str) else ""
    if not folder:
        shipped = ASSETS / f"{SHAPES_MODELS.get(model, '')}-npo"
        if model not in SHAPES_MODELS or not shipped.is_dir():
            raise ValueError(f"no Self-NPO adapter is shipped for {model!r}: give an adapter folder")
        return str(shipped)
    if not (Path(folder).is_dir() and any(Path(folder).glob("*.safetensors"))):
        raise ValueError(f"the Self-NPO adapter must be a folder holding a LoRA .safetensors file, got {folder!r}")
    return folder


# --------------------------------------------------------------------------------------------------- sessions


@dataclass
class Running:
    """A run of a tab in a browser session (`gr.State`): what the tab's Stop ends, and after what."""

    name: str
    stop: threading.Event | None  # None: the run has nowhere to stop (FlowEdit)
    unit: str = "iteration"


class StopRequested(Exception):
    """Raised from a step callback: the run ends at once (no decode of a result nobody will see)."""


@contextmanager
def running_in(session: Any, tab: str, running: Running) -> Iterator[None]:
    """`running` is one of `tab`'s runs in this session (what its Stop ends) for the length of the block."""
    runs = session.setdefault(tab, []) if isinstance(session, dict) else []
    runs.append(running)
    try:
        yield
    finally:  # finished, failed, or closed by the page
        runs.remove(running)
        if not runs and isinstance(session, dict) and session.get(tab) is runs:
            del session[tab]


def request_stop(session: dict | None, tab: str = "edit") -> str:
    """A Stop button: this session's runs on `tab` ("edit": FlowOpt, keeping the best iterate so far; "compare": the
    policies that finished) end after their current iteration or step."""
    runs = (session or {}).get(tab) or []
    stoppable = [run for run in runs if run.stop is not None]
    if not runs:
        return "nothing is running"
    if not stoppable:
        return f"{runs[0].name} has no iterations to stop at: it runs to its end"
    for run in stoppable:
        run.stop.set()
    return f"stopping after the current {stoppable[0].unit}..."


def request_compare_stop(session: dict | None) -> str:
    """The Compare tab's Stop: the comparison ends after the current step; the policies that finished are kept."""
    return request_stop(session, "compare")


# --------------------------------------------------------------------------------------------------- Compare


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
SHAPES_SD_EVALUATORS = [spec for _, spec in evaluator_choices() if spec != "clip"]  # trained on shapes:sd only


def policy_options(controls: PolicyControls, where: str, model: str, steps: int) -> dict:
    """The guidance options of a slot (checked; only what its method reads), for `policy_from_options`."""
    method = controls.method
    if method not in SHOWN:
        raise ValueError(f"{where}: method must be one of {[OFF, *METHODS]}, got {method!r}")
    shown, options = SHOWN[method], {"guidance": method}
    if "guidance_scale" in shown:
        options["guidance_scale"] = read_number(controls.guidance_scale, f"{where}: guidance scale", 0, MAX_SCALE)
    if "final_guidance_scale" in shown:
        options["schedule"] = controls.schedule
        options["final_guidance_scale"] = None if controls.schedule == "constant" else read_number(
            controls.final_guidance_scale, f"{where}: final guidance scale", 0, MAX_SCALE)  # fmt: skip
    if "threshold" in shown:
        options["threshold"] = read_number(controls.threshold, f"{where}: AG threshold", 0, 1)
        if options["threshold"] == 0:
            raise ValueError(f"{where}: AG threshold must be in (0, 1], got 0")
    if "coefficients" in shown:
        options["coefficients"] = (controls.coefficients or "").strip() or shipped_coefficients(model, steps)
        if not options["coefficients"]:
            raise ValueError(f"{where}: LinearAG needs a coefficients folder (written by guided-calibrate-linear-ag); "
                             "shipped only for shapes:sd and shapes:sd3 at 20 steps")  # fmt: skip
    if "candidates" in shown:
        text = str(controls.candidates or "").replace(",", " ").split()
        if not text:
            raise ValueError(f"{where}: candidate scales must be numbers separated by commas, got an empty box")
        options["candidates"] = [read_number(c, f"{where}: candidate scale", 0, MAX_SCALE) for c in text]
        options["evaluator"] = list(controls.evaluators) or None
        foreign = [Path(e).name for e in options["evaluator"] or [] if e in SHAPES_SD_EVALUATORS]
        if foreign and model != "shapes:sd":
            raise ValueError(f"{where}: the evaluators {foreign} were trained on shapes:sd, not {model!r}; pick "
                             "'CLIP on decoded pixels' or none (the model's default)")  # fmt: skip
    if "guidance_start" in shown:
        start = read_number(controls.guidance_start, f"{where}: guidance interval start", 0, 1)
        stop = read_number(controls.guidance_stop, f"{where}: guidance interval stop", 0, 1)
        if start > stop:
            raise ValueError(f"{where}: guidance interval start ({start:g}) must be <= its stop ({stop:g})")
        options.update(guidance_start=start, guidance_stop=stop)
    return options


def policy_label(options: dict, npo: bool) -> str:
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


@dataclass
class PolicyResult:
    label: str
    images: list
    figure: Any
    nfe: float
    seconds: float


def compare_summary(results: dict[int, PolicyResult], steps: int, device: str, notes: list[str]) -> str:
    """A table of NFEs and wall time per policy, which one was cheapest (fewest NFEs, then time), then `notes`."""
    parts = []
    if results:
        rows = [f"| {slot + 1} | {r.label} | {r.nfe:g} | {r.seconds:.2f} |" for slot, r in results.items()]
        parts.append("\n".join(["| policy | method | NFEs per image | wall time (s) |", "| --- | --- | --- | --- |",
                                *rows]))  # fmt: skip
        slot, cheapest = min(results.items(), key=lambda item: (item[1].nfe, item[1].seconds))
        most = max(r.nfe for r in results.values())
        line = f"**Cheapest: policy {slot + 1}, {cheapest.label}**: {cheapest.nfe:g} model evaluations per image"
        if len(results) > 1 and most > 0:
            line += f" ({cheapest.nfe / most:.2f} of the most expensive's {most:g})"
        parts.append(f"{line}; {steps} steps on {device}.")
    return "\n\n".join(parts + notes)


def truncation_note(pipe, text: str, name: str, max_sequence_length: int | None) -> str | None:
    """A note when `text` is longer than the pipeline's CLIP tokenizer reads (the pipeline cuts it, as diffusers does,
    with only a warning in the server's log), saying what the CLIP encoder reads and whether the T5 encoder (SD3,
    Flux) reads it all, up to `max_sequence_length` (its tokens). Call with the model's lock held: a fast tokenizer
    is not safe to share between threads while the pipeline sets its truncation."""
    clip = getattr(pipe, "tokenizer", None)
    if clip is None or not text:
        return None
    tokens, limit = len(clip(text, verbose=False).input_ids) - 2, clip.model_max_length - 2  # less BOS and EOS
    if tokens <= limit:
        return None
    read = clip.decode(clip(text, max_length=limit + 2, truncation=True).input_ids, skip_special_tokens=True)
    note = f"The {name} is {tokens} tokens long: the model's CLIP text encoder reads only its first {limit}, {read!r}"
    t5 = next((t for t in (getattr(pipe, "tokenizer_3", None), getattr(pipe, "tokenizer_2", None))
               if type(t).__name__.startswith("T5")), None)  # fmt: skip
    if t5 is not None and max_sequence_length is not None:
        t5_tokens = len(t5(text, verbose=False).input_ids) - 1  # less EOS
        t5_read = "all of it" if t5_tokens < max_sequence_length else f"its first {max_sequence_length - 1} of its "\
            f"{t5_tokens} T5 tokens"  # fmt: skip
        note += f"; its T5 encoder reads {t5_read}"
    return note + "."


def prompt_notes(loaded: LoadedModel, texts: dict[str, str]) -> list[str]:
    """`truncation_note` of each named text. Call with the model's lock held."""
    notes = [truncation_note(loaded.pipe, text, name, text_length(loaded)) for name, text in texts.items()]
    return [note for note in notes if note]


def text_length(loaded: LoadedModel) -> int | None:
    """The T5 text length the pipeline runs with (`max_sequence_length`; SD3 and Flux), else None."""
    defaults = call_defaults(loaded.name, loaded.family)
    if "max_sequence_length" in defaults:
        return defaults["max_sequence_length"]
    parameter = call_signature(super(GuidedPipelineMixin, loaded.pipe).__call__).parameters.get("max_sequence_length")
    return None if parameter is None else parameter.default


def run_policy(loaded: LoadedModel, inputs, guidance, label: str, on_step: Callable,
               stop: threading.Event) -> PolicyResult | None:  # fmt: skip
    """One policy on the call's prepared inputs (`pipe.prepare`: prompts, seeds, scheduler; shared by every policy),
    timed, with the model's lock held for the run; `on_step(step, steps)` after every step, counted as diffusers'
    progress bar counts them (a second-order scheduler's two evaluations are one step). None when `stop` is set
    before its last step: the run ends after the current one."""
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


def compare(prompt, negative_prompt, model, num_inference_steps, num_images, seed, npo_adapter, *policy_values,
            session: dict | None = None, progress: Callable | None = None) -> Iterator[tuple]:  # fmt: skip
    """The Compare tab: up to `MAX_POLICIES` policies (slots of `PolicyControls` values, flat) on the same prompt
    and seeds. Every policy is checked and built before any runs. Yields the page's outputs after each policy: per
    slot (images, scale plot, NFEs and time), then the summary and the images kept for the Edit tab. Its Stop
    (`request_compare_stop(session)`, from the moment the call starts) ends it after the current step, keeping the
    policies that finished."""
    stop = threading.Event()
    with running_in(session, "compare", Running("the comparison", stop, "step")):
        yield from _compare(stop, progress, prompt, negative_prompt, model, num_inference_steps, num_images, seed,
                            npo_adapter, *policy_values)  # fmt: skip


def _compare(stop: threading.Event, progress: Callable | None, prompt, negative_prompt, model, num_inference_steps,
             num_images, seed, npo_adapter, *policy_values) -> Iterator[tuple]:  # fmt: skip
    prompt = read_prompt(prompt, "prompt")
    model = read_model(model)
    steps = read_number(num_inference_steps, "steps", 1, MAX_STEPS, integer=True)
    images = read_number(num_images, "images per policy", 1, MAX_IMAGES, integer=True)
    seed = read_number(seed, "seed", 0, 2**31 - 1, integer=True)
    width = len(POLICY_FIELDS)
    if len(policy_values) != MAX_POLICIES * width:
        raise TypeError(f"compare takes {MAX_POLICIES} policies of {width} values, got {len(policy_values)} values")
    slots = [PolicyControls(*policy_values[k * width : (k + 1) * width]) for k in range(MAX_POLICIES)]
    chosen = {k: slot for k, slot in enumerate(slots) if slot.method != OFF}
    if not chosen:
        raise ValueError("choose a method for at least one policy")
    options = {k: policy_options(slot, f"policy {k + 1}", model, steps) for k, slot in chosen.items()}
    adapters = {k: npo_folder(npo_adapter, model) if slot.npo and "npo" in SHOWN[slot.method] else None
                for k, slot in chosen.items()}  # fmt: skip
    loaded = MODELS.get(model)
    policies = {}
    with loaded.lock:  # every policy is built and starts a run on the call's inputs before any runs: fails now, named
        seeds = [torch.Generator().manual_seed(seed + i) for i in range(images)]  # image i: seed + i
        inputs = loaded.pipe.prepare(prompt, negative_prompt=negative_prompt or None, num_images_per_prompt=images,
                                     num_inference_steps=steps, generator=seeds,
                                     **call_defaults(loaded.name, loaded.family))  # fmt: skip
        for k, slot_options in options.items():
            try:
                unconditional = loaded.negative_adapter(adapters[k]) if adapters[k] else None
                policies[k] = policy_from_options(slot_options, model, steps, unconditional)
                loaded.pipe.start_run(inputs, policies[k], inputs.latents.shape[0])  # e.g. LinearAG's coefficients
            except (ValueError, TypeError, OSError) as error:
                raise ValueError(f"policy {k + 1}: {error}") from error
        notes = prompt_notes(loaded, {"prompt": prompt, "negative prompt": negative_prompt})
    device = device_and_dtype(loaded.family)[0]
    results: dict[int, PolicyResult] = {}
    for done, (k, policy) in enumerate(policies.items()):

        def on_step(step, total, done=done, k=k):
            if progress is not None:
                progress((done * total + step, len(policies) * total), desc=f"policy {k + 1}: step {step}/{total}")

        on_step(0, steps)
        label = policy_label(options[k], bool(adapters[k]))
        try:
            result = run_policy(loaded, inputs, policy, label, on_step, stop)
        except (ValueError, TypeError) as error:
            raise ValueError(f"policy {k + 1}: {error}") from error
        if result is None:
            kept = "the policies that finished are kept" if results else "no policy had finished"
            stopped = f"**Stopped by you** during policy {k + 1} ({label}): {kept}."
            yield compare_outputs(results, prompt, compare_summary(results, steps, device, [stopped, *notes]))
            return
        results[k] = result
        if done + 1 < len(policies):
            yield compare_outputs(results, prompt, f"running... ({len(results)} done)")
    late = ["Stop came after the last step: every policy finished."] if stop.is_set() else []
    yield compare_outputs(results, prompt, compare_summary(results, steps, device, [*notes, *late]))


def compare_outputs(results: dict[int, PolicyResult], prompt: str, summary: str) -> tuple:
    outputs = []
    for k in range(MAX_POLICIES):
        result = results.get(k)
        outputs += [result.images, result.figure,
                    f"**{result.label}**: {result.nfe:g} NFEs per image, {result.seconds:.2f} s"] if result else [
                    None, None, ""]  # fmt: skip
    kept = [(f"policy {k + 1} ({r.label}), image {i + 1}", image, prompt) for k, r in results.items()
            for i, image in enumerate(r.images)]  # fmt: skip
    return (*outputs, summary, kept)


# --------------------------------------------------------------------------------------------------- Edit


def upload(path: Any) -> Any:
    """The uploaded file as an RGB image; a readable error if it is not an image."""
    import PIL.Image

    if path is None:
        return None
    path = getattr(path, "name", path)
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


def in_background(work: Callable[[Callable], Any]) -> Iterator[tuple[str, Any]]:
    """Run `work(emit)` in a thread; yield what it emits, as it emits it, then ("done", its result); its exception
    is raised here."""
    events: queue.Queue = queue.Queue()

    def target():
        try:
            events.put(("done", work(lambda *event: events.put(event))))
        except BaseException as error:  # handed to the caller's thread
            events.put(("error", error))

    threading.Thread(target=target, daemon=True).start()
    while True:
        event = events.get()
        if event[0] == "error":
            raise event[1]
        yield event
        if event[0] == "done":
            return


def psnr(image, reference) -> float:
    """PSNR in dB of two PIL images of one size, in [0, 255]."""
    import numpy as np

    mse = float(np.mean((np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


FLOWOPT_MODES = (EDIT_MODES[0], EDIT_MODES[1], EDIT_MODES[3])
# the Edit settings each mode reads besides the source prompt (the others are hidden)
MODE_CONTROLS = {
    EDIT_MODES[0]: ("target_prompt", "iterations", "step_size", "guidance_scale"),
    EDIT_MODES[1]: ("target_prompt", "guidance_scale"),
    EDIT_MODES[2]: ("target_prompt", "guidance_scale"),
    EDIT_MODES[3]: ("iterations", "step_size"),
}
EDIT_CONTROLS = ("target_prompt", "iterations", "step_size", "guidance_scale")
# FlowOpt's settings chosen for shapes:sd3 on the shapes world's training scenes (README "FlowOpt"): T, n_max,
# iterations, step size; other models start from the papers' code defaults (chosen at 1024 px)
SHAPES_FLOWOPT = {"edit": (15, 15, 4, 0.02), "invert": (10, 10, 30, 0.2)}


def mode_settings(mode: str, model: str) -> tuple[tuple, list[bool]]:
    """The Edit tab's settings when a mode is picked for `model`: (T, n_max, iterations, step size, target guidance
    scale), and which of `EDIT_CONTROLS` the mode shows."""
    from guidance.flowedit import DEFAULTS as FLOWEDIT_DEFAULTS
    from guidance.flowopt import DEFAULTS as FLOWOPT_DEFAULTS
    from guidance.flowopt import TARGET_GUIDANCE_SCALE

    if mode not in MODE_CONTROLS:
        raise ValueError(f"mode must be one of {list(EDIT_MODES)}, got {mode!r}")
    family = family_of(read_model(model, flow=True))
    shown = [name in MODE_CONTROLS[mode] for name in EDIT_CONTROLS]
    if mode == EDIT_MODES[2]:
        flowedit = FLOWEDIT_DEFAULTS[family]
        return (flowedit["num_inference_steps"], flowedit["n_max"], 0, "", flowedit["target_guidance_scale"]), shown
    task = "invert" if mode == EDIT_MODES[3] else "edit"
    paper = FLOWOPT_DEFAULTS[(family, task)]
    steps, n_max, iterations, eta = SHAPES_FLOWOPT[task] if model in SHAPES_MODELS else tuple(paper.values())
    iterations = 0 if mode == EDIT_MODES[1] else iterations
    return (steps, n_max, iterations, f"{eta:g}", 1.0 if task == "invert" else TARGET_GUIDANCE_SCALE), shown


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
        best = self.best
        image = result if result is not None else (self.iterates[best] if best is not None else None)
        gallery = [(image, f"iteration {k}") for k, image in enumerate(self.iterates)]
        figure = plot_residuals(self.residuals, best) if self.residuals else None
        return gallery, image, figure, "\n\n".join([self.status, *self.notes])


def edit(model, image, source_prompt, target_prompt, mode, num_inference_steps, n_max, iterations, step_size,
         guidance_scale, seed, session, progress: Callable | None = None) -> Iterator[tuple]:  # fmt: skip
    """The Edit tab: FlowOpt editing with iterates streamed as they are computed (Stop keeps the best so far),
    "invert, then regenerate" (iterate 0), FlowEdit, or inversion with the reconstruction's PSNR. Settings a mode
    does not read (`MODE_CONTROLS`; hidden in the page) are not used. Yields (iterates, kept image, residual plot,
    status). Its Stop (`request_stop(session)`, from the moment the call starts) ends it after the current
    iteration."""
    stop = threading.Event()
    running = Running(mode if mode in MODE_CONTROLS else "the edit", None if mode == EDIT_MODES[2] else stop)
    with running_in(session, "edit", running):
        try:
            yield from _edit(stop, progress, model, image, source_prompt, target_prompt, mode, num_inference_steps,
                             n_max, iterations, step_size, guidance_scale, seed)  # fmt: skip
        finally:  # finished, failed, or closed by the page (Stop of the queue, a closed tab): the worker stops too
            stop.set()


def _edit(stop: threading.Event, progress: Callable | None, model, image, source_prompt, target_prompt, mode,
          num_inference_steps, n_max, iterations, step_size, guidance_scale, seed) -> Iterator[tuple]:  # fmt: skip
    model = read_model(model, flow=True)
    if image is None:
        raise ValueError("give a source image: upload one, or take one from the Compare tab")
    if mode not in MODE_CONTROLS:
        raise ValueError(f"mode must be one of {list(EDIT_MODES)}, got {mode!r}")
    reads = MODE_CONTROLS[mode]
    inverting, flowedit = mode == EDIT_MODES[3], mode == EDIT_MODES[2]
    source_prompt = read_prompt(source_prompt, "source prompt")
    target_prompt = read_prompt(target_prompt, "target prompt") if "target_prompt" in reads else source_prompt
    steps = read_number(num_inference_steps, "steps T", 1, MAX_STEPS, integer=True)
    n_max = read_number(n_max, "n_max", 1, steps, integer=True)
    iterations = read_number(iterations, "iterations", 0, MAX_ITERATIONS, integer=True) if "iterations" in reads else 0
    eta = None
    if "step_size" in reads:
        auto = isinstance(step_size, str) and step_size.strip().lower() == "auto"
        eta = "auto" if auto else read_number(step_size, "step size (a number or 'auto')", 1e-6, 10)
    scale = read_number(guidance_scale, "target guidance scale", 0, MAX_SCALE) if "guidance_scale" in reads else 1.0
    seed = read_number(seed, "seed", 0, 2**31 - 1, integer=True)
    if max(image.size) > MAX_EDIT_SIDE:
        raise ValueError(f"the image ({image.width}x{image.height}) is too large for the demo: its sides must be at "
                         f"most {MAX_EDIT_SIDE} pixels")  # fmt: skip
    loaded = MODELS.get(model)
    pipe, family = loaded.pipe, loaded.family
    multiple = pipe.pixel_multiple()
    if min(image.size) < multiple:
        raise ValueError(f"the image ({image.width}x{image.height}) is too small for {model!r}: its sides must be at "
                         f"least {multiple} pixels")  # fmt: skip
    height, width = image.height - image.height % multiple, image.width - image.width % multiple
    source = image.convert("RGB").crop((0, 0, width, height))
    cut = f"The image ({image.width}x{image.height}) was cut to {width}x{height} from its top left corner: the model"
    cropped = [f"{cut} takes sides that are multiples of {multiple} pixels."] if source.size != image.size else []

    def work(emit):
        def on_iteration(pipe, iteration, tensors):
            emit("iterate", iteration, decoded_image(pipe, tensors["latents"], height, width), tensors["residuals"])
            return {"stop": True} if stop.is_set() else None

        flux = family == "flux"
        common = dict(num_inference_steps=steps, n_max=n_max, generator=torch.Generator().manual_seed(seed),
                      **call_defaults(model, family))  # fmt: skip
        # the page shows the iterates decoded as they arrive: no final decode ("latent")
        run = dict(iterations=iterations, step_size=eta, callback_on_iteration=on_iteration, output_type="latent",
                   **common)  # fmt: skip
        policy = "target_guidance" if flowedit else "guidance"
        target = dict(guidance_scale=scale) if flux else {policy: ClassifierFreeGuidance(scale)}
        with loaded.lock:
            if stop.is_set():  # stopped while it waited for the model
                return None
            if flowedit:
                return pipe.flowedit(source, source_prompt, target_prompt, **target, **common), None
            if inverting:
                return pipe.invert(source, source_prompt, **run), psnr(round_trip(pipe, source), source)
            return pipe.edit(source, source_prompt, target_prompt, **target, **run), None

    state = EditState([], [], f"running {mode} on {device_and_dtype(family)[0]}...")
    texts = {"source prompt": source_prompt} | ({"target prompt": target_prompt} if "target_prompt" in reads else {})
    with loaded.lock:
        state.notes = cropped + prompt_notes(loaded, texts)
    yield state.outputs()
    for event in in_background(work):
        if event[0] == "iterate":
            _, iteration, picture, residuals = event
            state.iterates.append(picture)
            state.residuals.append(residuals)
            state.status = f"iteration {iteration} of {iterations}: residual {residuals[0]:.4f}"
            if progress is not None:
                progress((iteration + 1, iterations + 1), desc=f"iteration {iteration}", unit="iterations")
            yield state.outputs()
            continue
        if event[1] is None:
            state.status = "stopped by you before it started"
            yield state.outputs()
            return
        out, ceiling = event[1]
        if flowedit:
            state.status = f"FlowEdit done: {out.nfe:g} model evaluations"
            yield state.outputs(out.images[0])
            return
        why = {"callback": "stopped by you", "converged": "converged", "iterations": "all iterations done"}
        if mode == EDIT_MODES[1]:
            why["iterations"] = "regenerated from the inversion"
        best = state.best
        state.status = (f"{why.get(out.stopped, out.stopped)} at iteration {len(state.residuals) - 1}; kept "
                        f"iteration {best} (the lowest residual, {state.residuals[best][0]:.4f}: the closest to the "
                        f"source); {out.nfe:g} model evaluations")  # fmt: skip
        if inverting:
            state.status += (f". Reconstruction PSNR {psnr(state.iterates[best], source):.2f} dB (the VAE's round "
                             f"trip alone: {ceiling:.2f} dB)")  # fmt: skip
        yield state.outputs()


@torch.no_grad()
def decoded_image(pipe, latents: torch.Tensor, height: int, width: int):
    """The PIL image of denoised latents in the denoiser's layout (Flux: packed)."""
    vae_latents = pipe.unpack_latents(latents.to(pipe.vae.dtype), height, width)
    return pipe.image_processor.postprocess(pipe.decode_for_guidance(vae_latents), output_type="pil")[0]


@torch.no_grad()
def round_trip(pipe, image):
    """The image through the VAE and back: the best any inversion can reconstruct."""
    latents = pipe.pixels_to_latents(pipe.image_processor.preprocess(image).to(pipe.device, pipe.vae.dtype))
    return decoded_image(pipe, latents, image.height, image.width)


# --------------------------------------------------------------------------------------------------- presets


PRESETS = {
    "AG and LinearAG against CFG (README: Adaptive Guidance)": dict(
        model="shapes:sd", steps=20, policies=[
            PolicyControls("cfg", 7.5), PolicyControls("ag", 7.5, threshold=0.995),
            PolicyControls("ag", 7.5, threshold=0.999), PolicyControls("linear-ag", 7.5)]),
    "Dynamic guidance against fixed scales (README: dynamic guidance)": dict(
        model="shapes:sd", steps=20, policies=[
            PolicyControls("cfg", 7.5), PolicyControls("cfg", 15.0),
            PolicyControls("dynamic", candidates="5, 7.5, 10, 15", evaluators=[s for _, s in evaluator_choices()[:2]]),
            PolicyControls("dynamic", evaluators=[s for _, s in evaluator_choices()[:2]])]),
    "Self-NPO in the unconditional branch (README: Self-NPO)": dict(
        model="shapes:sd", steps=20, policies=[
            PolicyControls("cfg", 7.5), PolicyControls("cfg", 7.5, npo=True),
            PolicyControls("ag", 7.5), PolicyControls("ag", 7.5, npo=True)]),
    "Scheduled CFG and a guidance interval": dict(
        model="shapes:sd", steps=20, policies=[
            PolicyControls("cfg", 7.5), PolicyControls("scheduled", 15.0, final_guidance_scale=1.0),
            PolicyControls("scheduled", 15.0, final_guidance_scale=1.0, schedule="cosine"),
            PolicyControls("cfg", 7.5, guidance_start=0.0, guidance_stop=0.5)]),
}  # fmt: skip


def apply_preset(name: str) -> tuple:
    """The model, steps and every slot's values of a preset (the headline comparisons of the README)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    slots = preset["policies"] + [PolicyControls()] * (MAX_POLICIES - len(preset["policies"]))
    values = [value for slot in slots for value in astuple(slot)]
    return (preset["model"], preset["steps"], *values)


def method_controls(method: str) -> list[bool]:
    """Which of a slot's controls (`POLICY_FIELDS` after the method) its method shows."""
    if method not in SHOWN:
        raise ValueError(f"method must be one of {[OFF, *METHODS]}, got {method!r}")
    return [name in SHOWN[method] for name in POLICY_FIELDS[1:]]


# --------------------------------------------------------------------------------------------------- the page


def page_event(function: Callable, names: list[str], streams: bool = False, defaults: list | None = None,
               keywords: int = 0, cleared: list | None = None) -> Callable:  # fmt: skip
    """`function` as a Gradio event: parameters named after the widgets (what gradio_client's API shows; `defaults`:
    their initial values, so API calls may leave them out; the last `keywords` are passed to `function` by name), a
    progress bar in the page for the streaming ones, and every error shown as a readable message in the page, never
    a traceback (bad input, ValueError and TypeError, as its message; unexpected errors with their type, logged).
    A streaming event yields `cleared` first: a run clears the last one's results, so that an error never stands
    beside results that are not its own (in one event, so a second click while it runs is not taken, Gradio's
    trigger mode "once")."""
    import gradio as gr

    def readable(error: Exception) -> gr.Error:
        if isinstance(error, gr.Error):
            return error
        if isinstance(error, (ValueError, TypeError)):
            return gr.Error(str(error), print_exception=False)
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return gr.Error("out of GPU memory: try fewer images, fewer steps or a smaller image")
        if isinstance(error, ImportError):
            return gr.Error(f"{error}: install the demo's extra, pip install -e '.[demo]'")
        return gr.Error(f"{type(error).__name__}: {error}")

    def arguments(values: tuple) -> tuple[tuple, dict]:
        cut = len(values) - keywords
        return values[:cut], dict(zip(names[len(names) - keywords :], values[cut:], strict=True))

    def stream(*values):
        *values, progress = values
        positional, named = arguments(tuple(values))
        if cleared is not None:
            yield cleared
        try:
            yield from function(*positional, **named, progress=progress)
        except Exception as error:
            raise readable(error) from error

    def call(*values):
        positional, named = arguments(values)
        try:
            return function(*positional, **named)
        except Exception as error:
            raise readable(error) from error

    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    defaults = [inspect.Parameter.empty] * len(names) if defaults is None else defaults
    parameters = [inspect.Parameter(n, keyword, default=d) for n, d in zip(names, defaults, strict=True)]
    if streams:
        parameters.append(inspect.Parameter("progress", keyword, default=gr.Progress()))
    event = stream if streams else call
    event.__signature__ = inspect.Signature(parameters)
    event.__name__ = function.__name__
    return event


# small images (the shapes world's 32 px) drawn large and sharp
CSS = """
#source-image img, #edit-result img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#iterates img, [id^="images-"] img { image-rendering: pixelated; }
"""


def launch_demo(**kwargs) -> tuple[Any, str]:
    """Build the page and serve it (`kwargs`: Gradio's `launch` arguments); (the Blocks, its local URL)."""
    demo = build_demo()
    _, url, _ = demo.launch(css=CSS, **kwargs)
    return demo, url


def build_demo():
    import gradio as gr

    with gr.Blocks(title="Guidance schedulers") as demo:
        gr.Markdown(
            "## Guidance schedulers\n**Compare** guidance policies on the same prompt and seeds (images, the scale "
            "applied at every step, NFEs and time); **Edit** an image with FlowOpt and watch its iterates arrive. "
            f"Running on **{device_and_dtype('sd')[0]}**."
        )
        kept = gr.State([])
        session = gr.State({})
        with gr.Tab("Compare"):
            with gr.Row():
                preset = gr.Dropdown(list(PRESETS), value=None, label="preset (the README's comparisons)", scale=3)
                apply = gr.Button("Load preset", scale=1)
            with gr.Row():
                prompt = gr.Textbox(label="prompt", value="a large red circle at the center on white", scale=3)
                negative = gr.Textbox(label="negative prompt", scale=2)
            with gr.Row():
                model = gr.Dropdown(list(SHAPES_MODELS), value=EMBEDDED_DEFAULT, allow_custom_value=True,
                                    label="model (a shapes model, or a local diffusers folder)")  # fmt: skip
                steps = gr.Number(20, label="steps", precision=None)
                images = gr.Number(2, label="images per policy", precision=None)
                seed = gr.Number(0, label="seed (image k uses seed + k)", precision=None)
                adapter = gr.Textbox(label="Self-NPO adapter folder (empty: the shipped one)")
            slots, results = [], []
            with gr.Row():
                for k in range(MAX_POLICIES):
                    default = PolicyControls("cfg" if k == 0 else ("ag" if k == 1 else OFF))
                    with gr.Column(elem_id=f"policy-{k + 1}", min_width=220):
                        slots.append(policy_slot(gr, k, default))
            with gr.Row():
                run = gr.Button("Compare", variant="primary", elem_id="compare-button", scale=3)
                stop_compare = gr.Button("Stop (keep the policies done)", elem_id="compare-stop-button", scale=1)
                compare_stopping = gr.Markdown(elem_id="compare-stopping")
            summary = gr.Markdown(
                "*Results arrive below, policy by policy; here: the costs and the cheapest policy.*",
                elem_id="compare-summary",
                min_height=70,
            )
            with gr.Row():
                for k in range(MAX_POLICIES):
                    with gr.Column(min_width=220):
                        results += [
                            gr.Gallery(
                                label=f"policy {k + 1}", columns=2, height=220, format="png", elem_id=f"images-{k + 1}"
                            ),
                            gr.Plot(
                                label=f"policy {k + 1}: per-step guidance", show_label=False, elem_id=f"plot-{k + 1}"
                            ),
                            gr.Markdown(elem_id=f"cost-{k + 1}"),
                        ]
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    with gr.Row():
                        label = "flow model (shapes:sd3 or a local SD3/Flux folder)"
                        edit_model = gr.Dropdown([EDIT_MODEL], value=EDIT_MODEL, allow_custom_value=True, label=label)
                        mode = gr.Radio(list(EDIT_MODES), value=EDIT_MODES[0], label="mode")
                    file = gr.File(label="upload an image", type="filepath", elem_id="upload")
                    with gr.Row():
                        pick = gr.Dropdown(
                            [], label="or take an image of the Compare tab", scale=3, allow_custom_value=True
                        )
                        take = gr.Button("Take it", scale=1)
                    source = gr.Image(
                        type="pil",
                        label="source image",
                        interactive=False,
                        height=200,
                        elem_id="source-image",
                        format="png",
                    )
                    source_prompt = gr.Textbox(label="source prompt", value=prompt.value)
                    target_prompt = gr.Textbox(label="target prompt (not used by Invert)",
                                               value="a large blue circle at the center on white")  # fmt: skip
                    with gr.Row():
                        edit_steps = gr.Number(15, label="steps T", precision=None)
                        n_max = gr.Number(15, label="n_max", precision=None)
                        iterations = gr.Number(4, label="iterations", precision=None)
                    with gr.Row():
                        step_size = gr.Textbox("0.02", label="step size (a number or auto)")
                        target_scale = gr.Number(3.5, label="target guidance scale", precision=None)
                        edit_seed = gr.Number(0, label="seed", precision=None)
                with gr.Column():
                    with gr.Row():  # at the top: in sight on a laptop screen, beside the settings
                        start = gr.Button("Run", variant="primary", elem_id="edit-button")
                        stop = gr.Button("Stop (keep the best so far)", elem_id="stop-button")
                        edit_stopping = gr.Markdown(elem_id="edit-stopping")
                    kept_image = gr.Image(
                        label="result (the iterate kept)", elem_id="edit-result", height=256, format="png"
                    )
                    status = gr.Markdown(
                        "*Upload an image or take one from Compare, then Run.*", elem_id="edit-status", min_height=70
                    )
                    iterates = gr.Gallery(
                        label="iterates, as they arrive", columns=6, height=160, format="png", elem_id="iterates"
                    )
                    residuals = gr.Plot(label="residual per iteration", show_label=False, elem_id="residuals")

        slot_names = [f"policy{k + 1}_{name}" for k in range(MAX_POLICIES) for name in POLICY_FIELDS]
        slot_inputs = [c for slot in slots for c in slot]
        compare_inputs = [prompt, negative, model, steps, images, seed, adapter, *slot_inputs, session]
        compare_names = ["prompt", "negative_prompt", "model", "num_inference_steps", "num_images", "seed",
                         "npo_adapter", *slot_names, "session"]  # fmt: skip
        compare_shown = [*results, summary, kept]
        compare_event = page_event(compare, compare_names, True, [c.value for c in compare_inputs], keywords=1,
                                   cleared=[None, None, ""] * MAX_POLICIES + ["", []])  # fmt: skip
        run.click(lambda: "", None, compare_stopping, queue=False, api_name=False)  # the last run's Stop note
        run.click(compare_event, compare_inputs, compare_shown, api_name="compare", concurrency_limit=CONCURRENCY,
                  show_progress_on=[summary])  # fmt: skip
        stop_compare.click(page_event(request_compare_stop, ["session"]), session, compare_stopping,
                           api_name="stop_compare", concurrency_limit=None)  # fmt: skip
        kept.change(lambda items: gr.update(choices=[item[0] for item in items or []],
                                            value=items[0][0] if items else None), kept, pick,
                    api_name=False)  # fmt: skip
        apply.click(page_event(apply_preset, ["preset"]), [preset],
                    [model, steps, *slot_inputs], api_name="apply_preset")  # fmt: skip

        def show_controls(method: str) -> list:
            return [gr.update(visible=visible) for visible in method_controls(method)]

        for k, slot in enumerate(slots):
            slot[0].change(page_event(show_controls, ["method"]), slot[0], slot[1:],
                           api_name=f"method_controls_{k + 1}")  # fmt: skip

        def show_mode(mode: str, model: str) -> list:
            values, shown = mode_settings(mode, model)
            visible = dict(zip(EDIT_CONTROLS, shown, strict=True))
            controls = ["steps", "n_max", "iterations", "step_size", "guidance_scale"]
            return [gr.update(value=value, visible=visible.get(name, True)) for name, value in zip(controls, values,
                    strict=True)] + [gr.update(visible=visible["target_prompt"])]  # fmt: skip

        settings = [edit_steps, n_max, iterations, step_size, target_scale, target_prompt]
        mode.change(page_event(show_mode, ["mode", "model"]), [mode, edit_model], settings, api_name="mode_settings")
        edit_model.change(page_event(show_mode, ["mode", "model"]), [mode, edit_model], settings, api_name=False)
        # a refused upload empties the file box, so that another file can be dropped at once
        file.upload(page_event(upload, ["file"]), file, source, api_name="upload").failure(
            lambda: None, None, file, queue=False, api_name=False)  # fmt: skip
        take.click(page_event(take_from_compare, ["kept", "choice"]), [kept, pick],
                   [source, source_prompt], api_name="take_from_compare")  # fmt: skip
        edit_inputs = [edit_model, source, source_prompt, target_prompt, mode, edit_steps, n_max, iterations,
                       step_size, target_scale, edit_seed, session]  # fmt: skip
        edit_names = ["model", "image", "source_prompt", "target_prompt", "mode", "num_inference_steps", "n_max",
                      "iterations", "step_size", "guidance_scale", "seed", "session"]  # fmt: skip
        edit_event = page_event(edit, edit_names, True, [c.value for c in edit_inputs], cleared=[[], None, None, ""])
        start.click(lambda: "", None, edit_stopping, queue=False, api_name=False)
        start.click(edit_event, edit_inputs, [iterates, kept_image, residuals, status], api_name="edit",
                    concurrency_limit=CONCURRENCY, show_progress_on=[status])  # fmt: skip
        stop.click(page_event(request_stop, ["session"]), session, edit_stopping, api_name="stop",
                   concurrency_limit=None)  # fmt: skip
    demo.queue(default_concurrency_limit=CONCURRENCY)
    return demo


def policy_slot(gr, k: int, default: PolicyControls) -> list:
    """The widgets of policy slot `k`, in `POLICY_FIELDS` order; those its method does not read are hidden."""
    shown = SHOWN[default.method]
    show = lambda name: name in shown  # noqa: E731
    return [
        gr.Dropdown(METHOD_CHOICES, value=default.method, label=f"policy {k + 1}: method"),
        gr.Number(default.guidance_scale, label="guidance scale", visible=show("guidance_scale"), precision=None),
        gr.Number(
            default.final_guidance_scale,
            label="final guidance scale",
            visible=show("final_guidance_scale"),
            precision=None,
        ),  # fmt: skip
        gr.Dropdown(
            ["constant", "linear", "cosine"], value=default.schedule, label="schedule", visible=show("schedule")
        ),  # fmt: skip
        gr.Number(default.threshold, label="AG threshold", visible=show("threshold"), precision=None),
        gr.Textbox(
            default.coefficients, label="LinearAG coefficients folder (empty: shipped)", visible=show("coefficients")
        ),  # fmt: skip
        gr.Textbox(default.candidates, label="candidate scales", visible=show("candidates")),
        gr.CheckboxGroup(
            evaluator_choices(),
            value=list(default.evaluators),
            visible=show("evaluators"),
            label="evaluators (none: the model's default)",
        ),  # fmt: skip
        gr.Number(default.guidance_start, label="guidance from (0-1)", visible=show("guidance_start"), precision=None),
        gr.Number(default.guidance_stop, label="guidance until (0-1)", visible=show("guidance_stop"), precision=None),
        gr.Checkbox(default.npo, label="Self-NPO in the unconditional branch", visible=show("npo")),
    ]


def free_port() -> int:
    """A free local TCP port (for a server the tests or the screenshots start)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_screenshots(folder: str | os.PathLike, chromium: str) -> list[Path]:
    """The README's pictures of the page: a comparison (the AG preset) and a FlowOpt edit, each in headless Chromium
    (`chromium`: its executable, e.g. Debian's /usr/bin/chromium)."""
    from playwright.sync_api import expect, sync_playwright

    from guidance.shapes.world import ShapesWorld

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "demo-source.png"
    world = ShapesWorld.from_json(ASSETS / "shapes-world.json")
    scene = world.scene(color="red", shape="circle", size="large", position="center", background="white")
    world.render_images([scene])[0].save(image)
    demo, url = launch_demo(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    paths = [folder / "demo-compare.png", folder / "demo-edit.png"]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_label("preset (the README's comparisons)").click()
            page.get_by_role("option", name=next(iter(PRESETS))).click()
            page.get_by_role("button", name="Load preset").click()
            expect(page.get_by_label("policy 4: method")).to_have_value("LinearAG")  # the preset is in the page
            page.locator("#compare-button").click()
            expect(page.locator("#compare-summary")).to_contain_text("Cheapest", timeout=120_000)
            page.screenshot(path=paths[0], full_page=True)
            page.get_by_role("tab", name="Edit").click()
            page.locator("#upload input[type=file]").set_input_files(str(image))
            expect(page.locator("#source-image img")).to_be_visible(timeout=30_000)
            page.locator("#edit-button").click()
            expect(page.locator("#edit-status")).to_contain_text("kept iteration", timeout=120_000)
            page.screenshot(path=paths[1], full_page=True)
            browser.close()
    finally:
        demo.close()
        image.unlink()
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The guidance schedulers demo (Gradio).")
    parser.add_argument("--server-name", default=None, help="address to listen on (Gradio's default: 127.0.0.1)")
    parser.add_argument("--server-port", type=int, default=None, help="port (Gradio's default: 7860)")
    parser.add_argument("--screenshots", metavar="FOLDER", help="save the README's screenshots there, then exit")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable for --screenshots")
    arguments = parser.parse_args()
    if arguments.screenshots:
        print(*save_screenshots(arguments.screenshots, arguments.chromium), sep="\n")
    else:
        launch_demo(server_name=arguments.server_name, server_port=arguments.server_port)
