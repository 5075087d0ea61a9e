"""The guided sampler, written once and shared by every pipeline family, in public stages:

1. `prepare(**call arguments) -> GuidedInputs`: check inputs, encode prompts, set the timesteps of a private copy of
   the pipeline's diffusers scheduler, draw the initial latents: everything a run needs, in one object.
2. `denoise(inputs, guidance, latents=None, start_index=0) -> DenoiseOutput`: the guided loop from any timestep index
   to the end, on a fresh copy of the prepared scheduler, so it can run any number of times on the same inputs.
   At each step the guidance scheduler says which rows run which branch; exactly those rows go through the denoiser
   (conditional and unconditional rows in one batch when the same weights compute both), the policy combines the
   predictions and the diffusers scheduler steps.
3. `decode(latents, inputs, output_type) -> the family's output`; and `image_to_latents(image) -> latents` for editing.

A family implements `_prepare` (mirroring its diffusers `__call__` up to the loop, with diffusers' call arguments by
keyword), `denoiser_prediction` (one denoiser call) and `_decode`, and sets `__call__ = guided_call(<its diffusers
class>)`: the diffusers signature and docstring, plus a keyword-only `guidance`. No per-call state lives on the
pipeline: a run's scheduler, conditioning and trace belong to the run, and diffusers'
`_interrupt`/`_current_timestep`/`_num_timesteps` are per thread.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from guidance import BranchRequest, GuidanceRun, GuidanceScheduler, GuidanceStep, GuidanceTrace, GuidedPrediction
from guidance import vae as vae_latents
from guidance.checks import check_int
from guidance.denoised import copy_scheduler
from guidance.lora import denoiser_of

from .callbacks import CallbackTensor, callback_name, check_scale_change, read, tensor_names, write

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Conditioning:
    """Denoiser keyword arguments: per-row tensors for each branch (`cond`, `uncond`), arguments shared by every row
    (`shared`), and per-branch arguments without a batch axis (`branch_shared`, e.g. Flux's text positions)."""

    cond: dict[str, Any]
    uncond: dict[str, Any]
    shared: dict[str, Any] = field(default_factory=dict)
    branch_shared: dict[str, dict[str, Any]] = field(default_factory=dict)
    _joined: dict = field(default_factory=dict, repr=False, compare=False)

    def copy(self) -> Conditioning:
        """A copy whose dicts a callback may change without touching the prepared inputs."""
        return Conditioning(dict(self.cond), dict(self.uncond), dict(self.shared), dict(self.branch_shared))

    def changed(self) -> None:
        """Forget what was concatenated: a callback replaced a tensor."""
        self._joined.clear()

    def shareable(self) -> bool:
        """Whether the two branches can run in one batch: the same shapes beyond the batch axis (diffusers runs Flux's
        true CFG as two passes, so its prompt and negative embeddings may differ in length)."""
        if "shareable" not in self._joined:
            same = shapes(self.cond) == shapes(self.uncond)
            cond, uncond = self.branch_shared.get("cond", {}), self.branch_shared.get("uncond", {})
            self._joined["shareable"] = same and shapes(cond) == shapes(uncond)
        return self._joined["shareable"]

    def rows(self, names: list[str], rows: dict[str, torch.Tensor | None]) -> dict[str, Any]:
        """The denoiser arguments of these branches' rows, concatenated in order (with the first branch's arguments
        without a batch axis); when every row is taken (the usual case) computed once and kept, as diffusers
        concatenates its prompt embeddings once."""
        if any(rows[name] is not None for name in names):
            taken = concat_rows([take_rows(getattr(self, name), rows[name]) for name in names])
            return {**taken, **self.branch_shared.get(names[0], {})}
        key = tuple(names)
        if key not in self._joined:
            joined = concat_rows([getattr(self, name) for name in names])
            self._joined[key] = {**joined, **self.branch_shared.get(names[0], {})}
        return self._joined[key]


@dataclass
class GuidedInputs:
    """Everything one guided run needs, prepared once (`prepare`), reusable by any number of `denoise` calls."""

    latents: torch.Tensor
    """The initial latents, in the denoiser's layout (Flux: packed tokens), scaled for the scheduler."""
    timesteps: torch.Tensor
    num_inference_steps: int
    scheduler: Any
    """A private copy of the pipeline's diffusers scheduler with these timesteps set; `denoise` steps copies of it."""
    conditioning: Conditioning
    height: int
    width: int
    prompts: list[str] | None = None
    """The prompt of every latent row, in diffusers' order (None when given embeddings)."""
    step_kwargs: dict = field(default_factory=dict)
    """Extra arguments of `scheduler.step` (DDIM's `eta`; the generators of stochastic samplers, at their state after
    `prepare`: each `denoise` call draws from copies of them, so that it can be repeated)."""
    generator: Any = None

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_timesteps(self) -> int:
        """Model evaluations per row and branch of a full run (more than the steps for PNDM, Heun, ...)."""
        return len(self.timesteps)


@dataclass
class DenoiseOutput(BaseOutput):
    """The latents at the end of a `denoise` call and the trace of what guidance did."""

    latents: torch.Tensor
    trace: GuidanceTrace


@dataclass
class GuidedRun:
    """One run of a policy over prepared inputs: its scheduler copy, conditioning and trace (see `start_run`)."""

    pipeline: Any
    inputs: GuidedInputs
    guidance: GuidanceScheduler
    scheduler: Any
    conditioning: Conditioning
    trace: GuidanceTrace
    stopped_by: str | None = None
    """The step-end callback that stopped guidance (`pipe._guidance_scale` set to 1 or less); None while guided."""

    def predict(self, latents: torch.Tensor, step_index: int) -> GuidedPrediction:
        """One guided model evaluation at timestep index `step_index`: the policy's branches, exactly those rows
        through the denoiser, the policy's combination (recorded in the trace). The scheduler is not stepped."""
        inputs, pipe = self.inputs, self.pipeline
        t = inputs.timesteps[step_index]
        unpack = functools.partial(pipe.unpack_latents, height=inputs.height, width=inputs.width)
        step = GuidanceStep(
            step_index,
            inputs.num_timesteps,
            t,
            latents,
            self.scheduler,
            inputs.num_inference_steps,
            inputs.prompts,
            unpack,
            pipe.decode_for_guidance,
        )
        if self.stopped_by is not None:  # a callback stopped guidance: the conditional pass only, as diffusers then
            request = BranchRequest.full(step.batch_size, uncond=False)
            cond = pipe._run_branches(
                self.guidance, pipe.denoiser, self.scheduler, request, latents, t, self.conditioning
            )["cond"]
            guided = GuidedPrediction(cond, torch.ones(step.batch_size), {"guidance_stopped_by": self.stopped_by})
            self.trace.record(guided.scales, request.as_lists(), **guided.extras)
            return guided
        request = self.guidance.branches(step)
        predictions = pipe._run_branches(
            self.guidance, pipe.denoiser, self.scheduler, request, latents, t, self.conditioning
        )
        guided = self.guidance.combine(step, request, predictions)
        if not isinstance(guided, GuidedPrediction):
            raise TypeError(
                f"`{type(self.guidance).__name__}.combine` must return a GuidedPrediction, got {type(guided).__name__}"
            )
        self.trace.record(guided.scales, request.as_lists(), **guided.extras)
        return guided


class PerThread:
    """A pipeline attribute kept per thread: diffusers' loop flags, which callbacks read and set."""

    _values = threading.local()

    def __init__(self, default: Any):
        self.default = default

    def __set_name__(self, owner, name):
        self.name = name

    def table(self) -> weakref.WeakKeyDictionary:
        """This thread's values: pipeline -> {name: value}, forgotten with the pipeline."""
        if not hasattr(self._values, "table"):
            self._values.table = weakref.WeakKeyDictionary()
        return self._values.table

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return self.table().get(instance, {}).get(self.name, self.default)

    def __set__(self, instance, value):
        self.table().setdefault(instance, {})[self.name] = value


def check_model_path(pretrained_model_name_or_path: Any) -> None:
    """A local folder that does not exist gets a clear error instead of a failed hub lookup."""
    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        raise TypeError(
            "`pretrained_model_name_or_path` must be a local folder or a hub id (str or os.PathLike), got "
            f"{type(pretrained_model_name_or_path).__name__}"
        )
    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(path) or (_HUB_ID.match(path) and not path.startswith(".")):
        return
    raise ValueError(f"`pretrained_model_name_or_path` is not an existing folder nor a hub id: {path!r}")


def noise_latents(shape, generator, device, dtype, latents, init_noise_sigma) -> torch.Tensor:
    """Initial latents scaled by the run scheduler's `init_noise_sigma` (diffusers' SD `prepare_latents`, on the
    run's scheduler copy instead of the pipeline's own)."""
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(
            f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
            f" size of {shape[0]}. Make sure the batch size matches the length of the generators."
        )
    latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None else latents
    return latents.to(device) * init_noise_sigma


def prompt_rows(prompt: Any, num_images_per_prompt: int) -> list[str] | None:
    """The prompt of every latent row, in diffusers' order (each prompt repeated `num_images_per_prompt` times)."""
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return [text for text in prompts for _ in range(num_images_per_prompt)]


class GuidedPipelineMixin:
    """What the four guided pipelines share: `guidance=` dispatch, the stages and outputs with a trace.

    Class attributes a family sets: `_output_class` (a diffusers output dataclass with a `trace` field),
    `_guidance_owned_args` (call arguments that `guidance=` replaces, e.g. `guidance_scale`),
    `_unsupported_guided_args` (arguments the guided path does not implement -> what works instead; they must keep
    their default),
    `_callback_tensors` (callback tensor name -> the `CallbackTensor` it stands for).
    """

    _output_class: ClassVar[type]
    _guidance_owned_args: ClassVar[tuple[str, ...]] = ()
    _unsupported_guided_args: ClassVar[dict[str, str]] = {}
    _callback_tensors: ClassVar[dict[str, CallbackTensor]] = {}

    _interrupt = PerThread(False)
    _guidance_scale = PerThread(None)
    _current_timestep = PerThread(None)
    _num_timesteps = PerThread(None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        check_model_path(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The model guidance runs: the UNet or the transformer."""
        return denoiser_of(self)

    def _guided_call(self, args: tuple, kwargs: dict, guidance: GuidanceScheduler | None):
        """What `__call__` does: the diffusers call without `guidance`; with it `prepare`, `denoise`, `decode`, and
        the output also has `trace` (appended last to the tuple when `return_dict=False`)."""
        if guidance is None:
            return super().__call__(*args, **kwargs)
        check_guidance(guidance)
        call_args = self._call_arguments(args, kwargs)
        with torch.no_grad():
            inputs = self._prepare(**call_args)
            result = self.denoise(
                inputs,
                guidance,
                callback_on_step_end=call_args["callback_on_step_end"],
                callback_on_step_end_tensor_inputs=call_args["callback_on_step_end_tensor_inputs"],
            )
            output = self.decode(result.latents, inputs, call_args["output_type"])
        self.maybe_free_model_hooks()
        output.trace = result.trace
        if not call_args["return_dict"]:
            return tuple(getattr(output, f.name) for f in dataclasses.fields(output))
        return output

    def prepare(self, *args, scheduler: Any = None, **kwargs) -> GuidedInputs:
        """Stage 1: the inputs of a guided run from diffusers' call arguments (prompt, negative_prompt, height,
        width, num_inference_steps, generator, latents, ...); output and callback arguments are ignored.
        `scheduler`: a diffusers scheduler to run with instead of the pipeline's own (copied, never changed)."""
        call_args = self._call_arguments(args, kwargs)
        with torch.no_grad():
            return self._prepare(**call_args, scheduler=scheduler)

    def _call_arguments(self, args: tuple, kwargs: dict) -> dict:
        """Diffusers' `__call__` arguments bound with their defaults, checked for use with guidance."""
        for name in self._guidance_owned_args:
            if name in kwargs:
                raise ValueError(f"`{name}` and `guidance` cannot both be given: `guidance` decides it at every step")
        bound = call_signature(super().__call__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        call_args = dict(bound.arguments)
        call_args.pop("self")
        extra = call_args.pop("kwargs", {})
        if extra:
            raise ValueError(f"arguments {sorted(extra)} are not supported together with `guidance`")
        for name, instead in self._unsupported_guided_args.items():
            if call_args.get(name) is not None:
                raise ValueError(
                    f"`{name}` is not supported together with `guidance` (got {call_args[name]!r}): {instead}"
                )
        if call_args.get("timesteps") is None and call_args.get("sigmas") is None:
            check_int("num_inference_steps", call_args.get("num_inference_steps"), minimum=1)
        if "num_images_per_prompt" in call_args:
            check_int("num_images_per_prompt", call_args["num_images_per_prompt"], minimum=1)
        prompt, negative_prompt = call_args.get("prompt"), call_args.get("negative_prompt")
        if isinstance(prompt, list) and isinstance(negative_prompt, list) and len(prompt) != len(negative_prompt):
            raise ValueError(
                f"`negative_prompt` must have the batch size of `prompt` ({len(prompt)}), got {len(negative_prompt)}"
            )
        return call_args

    @torch.no_grad()
    def denoise(
        self,
        inputs: GuidedInputs,
        guidance: GuidanceScheduler,
        latents: torch.Tensor | None = None,
        start_index: int = 0,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        show_progress: bool = True,
    ) -> DenoiseOutput:
        """Stage 2: the guided loop from timestep index `start_index` to the end, on `latents` (default: the
        prepared ones), with a fresh copy of the prepared scheduler. Mirrors the loop of diffusers' `__call__`s."""
        check_guidance(guidance)
        latents = self._check_denoise_arguments(inputs, latents, start_index)
        names = tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._check_callback_inputs(callback_on_step_end, names)
        run = self.start_run(inputs, guidance, latents.shape[0], start_index)
        scheduler, timesteps = run.scheduler, inputs.timesteps
        # stochastic samplers draw from generators at their state after `prepare`, afresh in every call
        step_kwargs = {key: snapshot(value) for key, value in inputs.step_kwargs.items()}
        self._num_timesteps, self._interrupt = len(timesteps), False
        updates = progress_updates(len(timesteps), inputs.num_inference_steps, scheduler.order, start_index)
        with self._progress(len(updates), show_progress) as progress_bar:
            for i in range(start_index, len(timesteps)):
                if self.interrupt:
                    continue
                t = timesteps[i]
                self._current_timestep = t
                guided = run.predict(latents, i)

                latents_dtype = latents.dtype
                latents = scheduler.step(guided.prediction, t, latents, **step_kwargs, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)  # as diffusers: works around a torch bug on mps

                if callback_on_step_end is not None:
                    latents = self._step_end(run, callback_on_step_end, names, i, t, latents, guided)
                if i in updates:
                    progress_bar.update()
        self._current_timestep = None
        return DenoiseOutput(latents=latents, trace=run.trace)

    def start_run(self, inputs: GuidedInputs, guidance: GuidanceScheduler, batch_size: int, start_index: int = 0):
        """A `GuidedRun` of `guidance` over these inputs: a fresh scheduler copy, conditioning and trace, the policy
        reset. `denoise` is a loop over one; editing methods that step on their own (FlowEdit) use one directly."""
        check_guidance(guidance)
        scheduler = copy_scheduler(inputs.scheduler)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start_index)
        run = GuidedRun(self, inputs, guidance, scheduler, inputs.conditioning.copy(), GuidanceTrace(batch_size))
        latent_shape = tuple(inputs.latents.shape[1:])
        guidance.reset(
            GuidanceRun(
                batch_size, inputs.num_timesteps, inputs.num_inference_steps, scheduler, latent_shape, start_index
            )
        )
        return run

    def _check_denoise_arguments(self, inputs: Any, latents: Any, start_index: Any) -> torch.Tensor:
        if not isinstance(inputs, GuidedInputs):
            raise TypeError(f"`inputs` must be the GuidedInputs of `prepare`, got {type(inputs).__name__}")
        check_int("start_index", start_index, minimum=0, maximum=inputs.num_timesteps - 1)
        starts = step_starts(inputs.num_timesteps, inputs.num_inference_steps, inputs.scheduler.order)
        if start_index not in starts:
            raise ValueError(
                f"`start_index` {start_index} falls inside a step of {type(inputs.scheduler).__name__} (it evaluates "
                f"the model more than once per step, and only a step's first evaluation can start a run): use one "
                f"of {starts}"
            )
        if latents is None:
            if start_index > 0:
                raise ValueError(
                    f"`latents` are required with `start_index` {start_index}: the prepared latents are the noise of "
                    "step 0 (noise an image's latents to the step's timestep, e.g. with guidance.denoised.add_noise)"
                )
            return inputs.latents
        if not isinstance(latents, torch.Tensor) or latents.shape != inputs.latents.shape:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must have the prepared shape {tuple(inputs.latents.shape)}, got {shape}")
        return latents.to(inputs.latents.device, inputs.latents.dtype)

    def _progress(self, total: int, show: bool):
        if show:
            return self.progress_bar(total=total)
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=True)

    def _run_branches(
        self,
        guidance: GuidanceScheduler,
        denoiser: torch.nn.Module,
        scheduler: Any,
        request: BranchRequest,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
    ) -> dict[str, torch.Tensor]:
        """Run the requested rows: unconditional then conditional in one batch (diffusers' order) when the same
        weights compute both, else each branch in its own pass with its own model."""
        batch_size = latents.shape[0]
        model = guidance.unconditional
        together = model.shares_pass and conditioning.shareable()
        groups = [("uncond", "cond")] if together else [("cond",), ("uncond",)]
        predictions: dict[str, torch.Tensor] = {}
        for group in groups:
            names = [name for name in group if request.coverage(name) != "none"]
            if not names:
                continue
            rows = {
                name: None if request.coverage(name) == "all" else getattr(request, name).nonzero().squeeze(1)
                for name in names
            }
            separate = names == ["uncond"] and not model.shares_pass
            module = model.denoiser(denoiser) if separate else denoiser
            inputs = conditioning.rows(names, rows)
            model_input = concat_rows([take_rows(latents, rows[name]) for name in names])
            sizes = [batch_size if rows[name] is None else len(rows[name]) for name in names]
            branches = [name for name, size in zip(names, sizes, strict=True) for _ in range(size)]
            with model.context(module) if separate else model.rows_context(module, branches):
                output = self.denoiser_prediction(module, scheduler, model_input, t, inputs, conditioning.shared)
            chunks = output.split(sizes) if len(names) > 1 else (output,)
            for name, chunk in zip(names, chunks, strict=True):
                predictions[name] = scatter_rows(chunk, rows[name], batch_size)
        return predictions

    def _check_callback_inputs(self, callback: Any, names: list[str]) -> None:
        if callback is None:
            return
        supported = ["latents", *self._callback_tensors]
        unknown = [name for name in names if name not in supported]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown} are not available with `guidance`; use {supported}"
            )

    def _step_end(self, run: GuidedRun, callback: Any, names: list[str], i: int, t, latents, guided) -> torch.Tensor:
        """Call `callback_on_step_end` as diffusers does (`pipelines.callbacks`): it reads the run's tensors and
        `_guidance_scale`, and what it gives back applies to this run only."""
        if run.stopped_by is None:
            self._guidance_scale = float(guided.scales.max())
        before = self._guidance_scale
        joined = run.stopped_by is None
        tensors = {
            name: read(run.conditioning, self._callback_tensors[name], joined) for name in names if name != "latents"
        }
        outputs = callback(self, i, t, {"latents": latents, **tensors} if "latents" in names else tensors)
        for name, value in (outputs or {}).items():
            if name in self._callback_tensors:
                write(run.conditioning, self._callback_tensors[name], value, name, callback, run.trace.batch_size)
        if run.stopped_by is None and check_scale_change(before, self._guidance_scale, callback):
            run.stopped_by = callback_name(callback)
        return (outputs or {}).get("latents", latents)

    def decode(self, latents: torch.Tensor, inputs: GuidedInputs, output_type: str = "pil"):
        """Stage 3: the family's diffusers output (`images`, ...) for denoised `latents` of these inputs."""
        with torch.no_grad():
            return self._decode(latents, inputs, output_type)

    def image_to_latents(
        self,
        image: Any,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        sample_mode: str = "argmax",
    ) -> torch.Tensor:
        """Image(s) -> latents in the denoiser's layout, scaled as the pipeline denoises them (for editing).

        `image`: what diffusers' image processor takes (PIL images, arrays or tensors); it is resized to
        `height` x `width` when given, else to its size rounded down to a multiple of the VAE's factor.
        `sample_mode`: the posterior's mode ("argmax", deterministic) or a sample ("sample").
        """
        pixels = self.image_processor.preprocess(image, height=height, width=width)
        return self.pixels_to_latents(pixels, generator, sample_mode)

    def pixels_to_latents(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, sample_mode: str = "argmax"
    ) -> torch.Tensor:
        """Images in [-1, 1], (batch, 3, height, width) at a size the VAE takes -> latents as `image_to_latents`."""
        with torch.no_grad():
            latents = vae_latents.encode(self.vae, pixels, generator, sample_mode)
            return self.pack_latents(latents).to(self.denoiser.dtype)

    def decode_for_guidance(self, latents: torch.Tensor, decoder: Any = None) -> torch.Tensor:
        """Images in [-1, 1] (float32) from denoised latents in the VAE's layout, for evaluators that read pixels;
        `decoder` replaces the pipeline's VAE (e.g. diffusers' `AutoencoderTiny` for cheap feedback)."""
        return vae_latents.decode(decoder if decoder is not None else self.vae, latents).float().clamp(-1, 1)

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Denoiser latents -> the VAE's (batch, channels, height, width) layout; Flux unpacks its tokens."""
        return latents

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's layout -> the denoiser's; Flux packs 2x2 patches into tokens."""
        return latents

    def _prepare(self, *, scheduler: Any = None, **call_args) -> GuidedInputs:
        """The family's `GuidedInputs` from diffusers' call arguments (by keyword) and the `scheduler` to run with."""
        raise NotImplementedError

    def denoiser_prediction(self, denoiser, scheduler, latents, t, inputs: dict, shared: dict) -> torch.Tensor:
        """One call of `denoiser` on a batch of rows: `latents` at timestep `t`, with the rows' conditioning `inputs`
        (a branch's denoiser arguments, e.g. `Conditioning.rows`) and the `shared` ones; `scheduler` scales the input
        where the family's loop does (None: no scaling). Implemented by each family, as its diffusers loop calls the
        model."""
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor, inputs: GuidedInputs, output_type: str):
        raise NotImplementedError


@functools.lru_cache(maxsize=32)
def _signature_of(function) -> inspect.Signature:
    return inspect.signature(function)


def call_signature(method) -> inspect.Signature:
    """The signature of a pipeline class's diffusers `__call__` (with `self`), computed once per class."""
    return _signature_of(getattr(method, "__func__", method))


IP_ADAPTER_WITHOUT_GUIDANCE = (
    "call without `guidance` (diffusers' own IP-Adapter path); under `guidance` SD and SDXL take it"
)
GUIDANCE_DOC = """
        guidance (`GuidanceScheduler`, *optional*):
            A guidance policy deciding classifier-free guidance at every step (`guidance.ClassifierFreeGuidance`,
            `AdaptiveGuidance`, `LinearAdaptiveGuidance`, `DynamicGuidance`, ... or any composition of parts). It
            replaces the call's own guidance scale; the output then also has `trace` (appended last to the tuple when
            `return_dict=False`). Without it, the call is exactly the diffusers pipeline's.
"""


def guided_call(diffusers_class: type) -> Callable:
    """The `__call__` of a guided pipeline: the diffusers class's signature and docstring, plus a keyword-only
    `guidance` (derived here, so that a diffusers upgrade carries over)."""

    def __call__(self, *args, guidance: GuidanceScheduler | None = None, **kwargs):
        return self._guided_call(args, kwargs, guidance)

    signature = inspect.signature(diffusers_class.__call__)
    parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    guidance = inspect.Parameter(
        "guidance", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="GuidanceScheduler | None"
    )
    __call__.__signature__ = signature.replace(parameters=[*parameters, guidance, *extra])
    __call__.__doc__ = (diffusers_class.__call__.__doc__ or "").rstrip() + "\n" + GUIDANCE_DOC
    __call__.__qualname__ = f"Guided{diffusers_class.__name__}.__call__"
    return __call__


def guided_inputs(
    prompt: Any,
    num_images_per_prompt: int,
    generator: Any,
    latents,
    timesteps,
    num_inference_steps,
    scheduler,
    conditioning,
    height,
    width,
    step_kwargs=None,
) -> GuidedInputs:
    """A family's prepared inputs, with what every family takes from the call (the prompt of each row, the
    generator; the step arguments' generators at their state now)."""
    step_kwargs = {key: snapshot(value) for key, value in (step_kwargs or {}).items()}
    return GuidedInputs(
        latents,
        timesteps,
        num_inference_steps,
        scheduler,
        conditioning,
        height,
        width,
        prompt_rows(prompt, num_images_per_prompt),
        step_kwargs,
        generator,
    )


def check_guidance(guidance: Any) -> None:
    if not isinstance(guidance, GuidanceScheduler):
        raise TypeError(f"`guidance` must be a GuidanceScheduler or None, got {type(guidance).__name__}")


def snapshot(value: Any) -> Any:
    """A copy of a generator (or a list of them) at its current state; any other value as it is."""
    if isinstance(value, torch.Generator):
        copy = torch.Generator(device=value.device)
        copy.set_state(value.get_state())
        return copy
    if isinstance(value, list) and value and all(isinstance(v, torch.Generator) for v in value):
        return [snapshot(v) for v in value]
    return value


def step_starts(num_timesteps: int, num_inference_steps: int, order: int) -> list[int]:
    """The timestep indices where a step of the scheduler begins (every index for one evaluation per step; for Heun
    and other second-order solvers every other one; after PNDM's Runge-Kutta warm-up)."""
    ends = progress_updates(num_timesteps, num_inference_steps, order, 0)
    return sorted({0} | {end + 1 for end in ends if end + 1 < num_timesteps})


def progress_updates(num_timesteps: int, num_inference_steps: int, order: int, start_index: int) -> set[int]:
    """The indices after which diffusers' loops advance the progress bar (every `order` evaluations)."""
    warmup = max(num_timesteps - num_inference_steps * order, 0)
    last = num_timesteps - 1
    return {i for i in range(start_index, num_timesteps) if i == last or ((i + 1) > warmup and (i + 1) % order == 0)}


def shapes(arguments: Any) -> Any:
    """The shapes beyond the batch axis of every tensor of (nested) denoiser arguments."""
    if isinstance(arguments, dict):
        return {key: shapes(value) for key, value in arguments.items()}
    if isinstance(arguments, (list, tuple)):
        return [shapes(value) for value in arguments]
    return tuple(arguments.shape[1:]) if isinstance(arguments, torch.Tensor) else None


def take_rows(value: Any, rows: torch.Tensor | None) -> Any:
    """Rows `rows` of every tensor in a (nested) dict of denoiser arguments; all rows when `rows` is None."""
    if rows is None or value is None:
        return value
    if isinstance(value, dict):
        return {key: take_rows(item, rows) for key, item in value.items()}
    if isinstance(value, (list, tuple)):  # IP-Adapter's image embeddings: one tensor per adapter
        return [take_rows(item, rows) for item in value]
    return value.index_select(0, rows.to(value.device))


def concat_rows(values: list[Any]) -> Any:
    """Concatenate along the batch the matching tensors of several (nested) dicts of denoiser arguments."""
    first = values[0]
    if len(values) == 1 or first is None:
        return first
    if isinstance(first, dict):
        return {key: concat_rows([value[key] for value in values]) for key in first}
    if isinstance(first, (list, tuple)):
        return [concat_rows([value[k] for value in values]) for k in range(len(first))]
    return torch.cat(values)


def scatter_rows(chunk: torch.Tensor, rows: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """A full-batch tensor with `chunk` at `rows` and NaN elsewhere."""
    if rows is None:
        return chunk
    full = chunk.new_full((batch_size, *chunk.shape[1:]), float("nan"))
    full[rows.to(chunk.device)] = chunk
    return full
