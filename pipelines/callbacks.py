"""diffusers' step-end callbacks under `guidance=`: the tensors they read and replace, and the guidance scale they read
and set (`pipe._guidance_scale`, hence `pipe.guidance_scale` and `pipe.do_classifier_free_guidance`), presented as
diffusers' own loops present them, so that diffusers' callbacks (`SDCFGCutoffCallback`, `SDXLCFGCutoffCallback`,
`SD3CFGCutoffCallback`, `IPAdapterScaleCutoffCallback`, ...) work unchanged.

- A "joined" tensor is what diffusers concatenates under CFG: the unconditional rows, then the conditional ones (e.g.
  `prompt_embeds`). A callback may give back the same layout (2 x batch rows: both branches change) or the conditional
  rows alone (batch rows), as the CFG cut-off callbacks do once guidance has stopped.
- At every step `pipe._guidance_scale` is the largest scale the policy applied there (1.0 when no row was guided).
  A callback that sets it to 1 or less (the cut-off callbacks set 0.0) stops guidance for the rest of the run: only
  the conditional pass runs, and the trace says which callback stopped it. A policy decides every other scale, so
  setting another value is refused, naming the callback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback


@dataclass(frozen=True)
class CallbackTensor:
    """A tensor callbacks may read and replace: which rows (`branch`) of which denoiser argument (`path`)."""

    branch: Literal["joined", "cond", "uncond"]
    path: tuple[str, ...]


def callback_name(callback: Any) -> str:
    if isinstance(callback, MultiPipelineCallbacks):
        return " + ".join(callback_name(c) for c in callback.callbacks)
    if isinstance(callback, PipelineCallback):
        return type(callback).__name__
    return getattr(callback, "__name__", type(callback).__name__)


def tensor_names(callback: Any, names: list[str] | None) -> list[str]:
    """The tensors a callback receives: a diffusers `PipelineCallback`'s own, else `names` (default: the latents)."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        return list(callback.tensor_inputs)
    return list(names or ["latents"])


def get(arguments: dict, path: tuple[str, ...]) -> torch.Tensor:
    for key in path:
        arguments = arguments[key]
    return arguments


def put(arguments: dict, path: tuple[str, ...], value: torch.Tensor) -> None:
    for key in path[:-1]:
        arguments[key] = dict(arguments[key])  # the prepared inputs' own dicts stay as they were
        arguments = arguments[key]
    arguments[path[-1]] = value


def read(conditioning, spec: CallbackTensor, joined: bool) -> torch.Tensor:
    """The tensor as diffusers' loop holds it: joined rows while the run is guided, else the conditional ones."""
    if spec.branch != "joined":
        return get(getattr(conditioning, spec.branch), spec.path)
    cond = get(conditioning.cond, spec.path)
    return torch.cat([get(conditioning.uncond, spec.path), cond]) if joined else cond


def write(conditioning, spec: CallbackTensor, value: Any, name: str, callback: Any, batch_size: int) -> None:
    """Put a callback's replacement back into the run's conditioning (never into the prepared inputs)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"callback {callback_name(callback)} returned `{name}` as {type(value).__name__}, not a tensor"
        )
    if spec.branch != "joined":
        put(getattr(conditioning, spec.branch), spec.path, value)
    elif len(value) == 2 * batch_size:
        put(conditioning.uncond, spec.path, value[:batch_size])
        put(conditioning.cond, spec.path, value[batch_size:])
    elif len(value) == batch_size:
        put(conditioning.cond, spec.path, value)
    else:
        raise ValueError(
            f"callback {callback_name(callback)} returned `{name}` with {len(value)} rows; this run has {batch_size} "
            f"images: give {batch_size} rows (the conditional ones) or {2 * batch_size} (the unconditional rows, then "
            "the conditional ones, as diffusers concatenates them)"
        )
    conditioning.changed()


def check_scale_change(before: float, after: Any, callback: Any) -> bool:
    """Whether a callback's `_guidance_scale` stops guidance (True), leaves it (False), or asks what a policy decides
    (an error naming the callback)."""
    if after == before:
        return False
    if isinstance(after, (int, float)) and not isinstance(after, bool) and after <= 1:
        return True
    raise ValueError(
        f"callback {callback_name(callback)} set `_guidance_scale` to {after!r}: under `guidance=` the policy decides "
        "the scale at every step; a callback may stop guidance (a scale <= 1, as diffusers' CFG cut-off callbacks do) "
        "or the policy may be changed, e.g. a ScheduledGuidance or a guidance interval"
    )
