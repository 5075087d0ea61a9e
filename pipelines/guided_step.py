"""The guided denoising loop, written once and shared by every pipeline family.

At each step: ask the guidance scheduler which branches to run for which samples, run exactly those rows
through the denoiser in one batched forward pass (the negative branch in its own pass under the scheduler's
`branch_context`), let the scheduler combine the predictions, and step the diffusers scheduler. A family
supplies `_predict` (one denoiser call on a batch of rows), the prompt encoding and the decoding.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from guidance import BranchRequest, GuidanceScheduler, GuidanceStep

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Conditioning:
    """Denoiser keyword arguments: per-row tensors for each branch, and arguments shared by every row."""

    cond: dict[str, Any]
    uncond: dict[str, Any]
    shared: dict[str, Any] = field(default_factory=dict)


def take_rows(value: Any, rows: torch.Tensor | None) -> Any:
    """Rows `rows` of every tensor in a (nested) dict of denoiser arguments; all rows when `rows` is None."""
    if rows is None or value is None:
        return value
    if isinstance(value, dict):
        return {key: take_rows(item, rows) for key, item in value.items()}
    return value.index_select(0, rows.to(value.device))


def concat_rows(values: list[Any]) -> Any:
    """Concatenate along the batch the matching tensors of several (nested) dicts of denoiser arguments."""
    first = values[0]
    if len(values) == 1 or first is None:
        return first
    if isinstance(first, dict):
        return {key: concat_rows([value[key] for value in values]) for key in first}
    return torch.cat(values)


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


class GuidedPipelineMixin:
    """What the four guided pipelines share: `guidance=` dispatch, the guided loop and outputs with a trace.

    Class attributes a family sets: `_output_class` (a diffusers output dataclass with a `trace` field),
    `_guidance_owned_args` (call arguments that `guidance=` replaces, e.g. `guidance_scale`),
    `_unsupported_guided_args` (arguments the guided path does not implement; they must keep their default),
    `_callback_conditioning` (callback tensor name -> (branch, denoiser argument) it stands for).
    """

    _output_class: ClassVar[type]
    _guidance_owned_args: ClassVar[tuple[str, ...]] = ()
    _unsupported_guided_args: ClassVar[tuple[str, ...]] = ()
    _callback_conditioning: ClassVar[dict[str, tuple[str, str]]] = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        check_model_path(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __call__(self, *args, guidance: GuidanceScheduler | None = None, **kwargs):
        """Diffusers' `__call__` with one more argument, `guidance`: a `GuidanceScheduler` deciding CFG per step.

        Without `guidance` this is exactly the diffusers pipeline. With it, the output also has `trace`
        (appended last to the tuple when `return_dict=False`).
        """
        if guidance is None:
            return super().__call__(*args, **kwargs)
        if not isinstance(guidance, GuidanceScheduler):
            raise ValueError(f"`guidance` must be a GuidanceScheduler or None, got {type(guidance).__name__}")
        for name in self._guidance_owned_args:
            if name in kwargs:
                raise ValueError(f"`{name}` and `guidance` cannot both be given: `guidance` decides it at every step")
        bound = inspect.signature(super().__call__).bind(*args, **kwargs)
        bound.apply_defaults()
        call_args = dict(bound.arguments)
        extra = call_args.pop("kwargs", {})
        if extra:
            raise ValueError(f"arguments {sorted(extra)} are not supported together with `guidance`")
        for name in self._unsupported_guided_args:
            if call_args.get(name) is not None:
                raise ValueError(f"`{name}` is not supported together with `guidance`; got {call_args[name]!r}")
        self._check_prompt_batches(call_args.get("prompt"), call_args.get("negative_prompt"))
        self._guidance_prompts = _prompt_rows(call_args.get("prompt"), call_args.get("num_images_per_prompt") or 1)
        with torch.no_grad():
            return self._guided_call(guidance, **call_args)

    def decode_for_guidance(self, latents: torch.Tensor, decoder: Any = None) -> torch.Tensor:
        """Images in [-1, 1] from denoised latents, for evaluators that read pixels.

        `latents` are in the VAE's layout (`unpack_for_guidance`), scaled as the pipeline denoises them;
        `decoder` replaces the pipeline's VAE (e.g. diffusers' `AutoencoderTiny` for cheap feedback).
        """
        vae = decoder if decoder is not None else self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scaled = latents / vae.config.scaling_factor + shift
        return vae.decode(scaled.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    def unpack_for_guidance(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents in the VAE's (batch, channels, height, width) layout; Flux unpacks its tokens."""
        return latents

    @staticmethod
    def _check_prompt_batches(prompt: Any, negative_prompt: Any) -> None:
        if isinstance(prompt, list) and isinstance(negative_prompt, list) and len(prompt) != len(negative_prompt):
            raise ValueError(
                f"`negative_prompt` must have the batch size of `prompt` ({len(prompt)}), got {len(negative_prompt)}"
            )

    def _predict(self, latents: torch.Tensor, t: torch.Tensor, inputs: dict, shared: dict) -> torch.Tensor:
        """One denoiser call on a batch of rows; implemented by each family."""
        raise NotImplementedError

    def _guided_denoise(
        self,
        guidance: GuidanceScheduler,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        conditioning: Conditioning,
        step_kwargs: dict,
        callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> torch.Tensor:
        """The denoising loop of every guided pipeline; mirrors the loop of diffusers' `__call__`s."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self._check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        guidance.reset(batch_size=latents.shape[0], num_inference_steps=len(timesteps))
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                step = GuidanceStep(i, len(timesteps), t, latents, self.scheduler, self, self._guidance_prompts)
                request = guidance.branches(step)
                predictions = self._run_branches(guidance, request, latents, t, conditioning)
                if guidance.keeps_history:
                    guidance.history.append(predictions)
                guided, scales = guidance.combine(step, request, predictions)
                guidance.trace.record(scales, request.as_dict(), **guidance.take_extras())

                latents_dtype = latents.dtype
                latents = self.scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)  # as diffusers: works around a torch bug on mps

                if callback_on_step_end is not None:
                    latents = self._run_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, conditioning
                    )
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None
        return latents

    def _run_branches(
        self,
        guidance: GuidanceScheduler,
        request: BranchRequest,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
    ) -> dict[str, torch.Tensor]:
        """Run the requested rows: unconditional and conditional in one batch, the negative branch alone."""
        batch_size = latents.shape[0]
        rows = {name: _row_index(getattr(request, name)) for name in ("uncond", "cond", "negative")}
        joint = [name for name in ("uncond", "cond") if getattr(request, name).any()]  # diffusers' batch order
        predictions: dict[str, torch.Tensor] = {}
        if joint:
            inputs = concat_rows([take_rows(getattr(conditioning, name), rows[name]) for name in joint])
            model_input = concat_rows([take_rows(latents, rows[name]) for name in joint])
            output = self._predict(model_input, t, inputs, conditioning.shared)
            sizes = [batch_size if rows[name] is None else len(rows[name]) for name in joint]
            for name, chunk in zip(joint, output.split(sizes), strict=True):
                predictions[name] = _scatter_rows(chunk, rows[name], batch_size)
        if request.negative.any():
            inputs = take_rows(conditioning.uncond, rows["negative"])
            with guidance.branch_context("negative", self):
                output = self._predict(take_rows(latents, rows["negative"]), t, inputs, conditioning.shared)
            predictions["negative"] = _scatter_rows(output, rows["negative"], batch_size)
        return predictions

    def _check_callback_inputs(self, callback: Any, names: list[str]) -> None:
        if callback is None:
            return
        supported = ["latents", *self._callback_conditioning]
        unknown = [name for name in names if name not in supported]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown} are not available with `guidance`; use {supported}"
            )

    def _run_callback(
        self, callback: Any, names: list[str], i: int, t: torch.Tensor, latents: torch.Tensor, conditioning
    ) -> torch.Tensor:
        """Call `callback_on_step_end` as diffusers does; write back the tensors it returns."""
        tensors = {"latents": latents}
        for name, (branch, key) in self._callback_conditioning.items():
            tensors[name] = getattr(conditioning, branch)[key]
        outputs = callback(self, i, t, {name: tensors[name] for name in names})
        for name, (branch, key) in self._callback_conditioning.items():
            if name in outputs:
                getattr(conditioning, branch)[key] = outputs[name]
        return outputs.get("latents", latents)

    def _guided_output(self, trace, return_dict: bool, **fields):
        """The family's diffusers output plus `trace`; the tuple form appends the trace."""
        self.maybe_free_model_hooks()
        if not return_dict:
            return (*fields.values(), trace)
        return self._output_class(**fields, trace=trace)


def _prompt_rows(prompt: Any, num_images_per_prompt: int) -> list[str] | None:
    """The prompt of every latent row, in diffusers' order (each prompt repeated `num_images_per_prompt` times)."""
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return [text for text in prompts for _ in range(num_images_per_prompt)]


def _row_index(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the True rows, or None when all rows are selected (no copy needed)."""
    return None if bool(mask.all()) else mask.nonzero().squeeze(1)


def _scatter_rows(chunk: torch.Tensor, rows: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """A full-batch tensor with `chunk` at `rows` and NaN elsewhere."""
    if rows is None:
        return chunk
    full = chunk.new_full((batch_size, *chunk.shape[1:]), float("nan"))
    full[rows.to(chunk.device)] = chunk
    return full
