"""The one abstraction of this project: a guidance scheduler.

A guidance scheduler is to classifier-free guidance what a diffusers scheduler is to sampling: a small,
configurable, stateful policy that never runs the model. At each model evaluation of a sampling run the sampler
asks it which branches to evaluate for which rows (`branches`), runs exactly those passes, and hands the
predictions back (`combine`) to get one guided prediction, which the diffusers scheduler steps.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .unconditional import BASE_MODEL, UnconditionalModel

BRANCH_NAMES = ("uncond", "cond")


@dataclass
class GuidanceRun:
    """What a policy learns when a sampling run starts (`GuidanceScheduler.reset`)."""

    batch_size: int
    num_timesteps: int
    """Model evaluations per row and branch of a whole run: `len(timesteps)`."""
    num_inference_steps: int
    """The step count the caller asked for; PNDM, Heun and other multi-stage schedulers evaluate more often."""
    scheduler: Any = None
    """The run's diffusers scheduler (read it, copy it to look ahead; never step it)."""
    latent_shape: tuple[int, ...] = ()
    """Shape of one row of latents, in the denoiser's layout."""
    start_index: int = 0
    """The first timestep index this run evaluates (0 for generation; later for editing and partial solves)."""


@dataclass
class GuidanceStep:
    """Everything a policy may look at around one model evaluation (one entry of the timesteps)."""

    step_index: int
    """Index into the run's timesteps: one model evaluation per row and branch."""
    num_timesteps: int
    timestep: torch.Tensor
    latents: torch.Tensor
    scheduler: Any
    """The run's diffusers scheduler: copy it to look ahead, never step it."""
    num_inference_steps: int | None = None
    prompts: list[str] | None = None
    """The prompt of every batch row (None when the pipeline was given embeddings only)."""
    unpack: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Denoiser latents -> the VAE's (batch, channels, height, width) layout (Flux unpacks its tokens)."""
    decode: Callable[..., torch.Tensor] | None = None
    """`decode(latents, decoder=None)`: VAE-layout latents -> images in [-1, 1], for evaluators that read pixels
    (`decoder` replaces the pipeline's VAE)."""

    @property
    def progress(self) -> float:
        """Fraction of the run's timesteps done: 0.0 at the first evaluation, 1.0 at the last."""
        return self.step_index / max(self.num_timesteps - 1, 1)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def sigma(self) -> torch.Tensor | None:
        """The noise level of this step for schedulers that keep `sigmas` aligned with their timesteps, else None."""
        sigmas = getattr(self.scheduler, "sigmas", None)
        if sigmas is None or self.step_index >= len(sigmas):
            return None
        return sigmas[self.step_index]


def coverage(mask: torch.Tensor) -> Literal["all", "some", "none"]:
    """Whether a bool mask selects every row, some or none."""
    return "all" if bool(mask.all()) else "some" if bool(mask.any()) else "none"


@dataclass
class BranchRequest:
    """Which branches to evaluate, as one bool mask of shape (batch,) per branch (on the CPU).

    A row whose mask is False for a branch gets no forward pass for it: the batch really shrinks.
    """

    cond: torch.Tensor
    uncond: torch.Tensor

    @classmethod
    def full(cls, batch_size: int, uncond: bool | torch.Tensor = True) -> BranchRequest:
        """Conditional pass for every row; unconditional where `uncond` says (a bool or a mask)."""
        ones = torch.ones(batch_size, dtype=torch.bool)
        if isinstance(uncond, torch.Tensor):
            return cls(cond=ones, uncond=uncond.to(torch.bool).cpu())
        request = cls(cond=ones, uncond=torch.full((batch_size,), bool(uncond)))
        request._coverage = {"cond": "all", "uncond": "all" if uncond else "none"}  # known: no reduction needed
        return request

    def coverage(self, name: str) -> Literal["all", "some", "none"]:
        """Whether branch `name` runs for every row, some or none (computed once per request)."""
        cache = self.__dict__.setdefault("_coverage", {})
        if name not in cache:
            cache[name] = coverage(getattr(self, name))
        return cache[name]

    def as_lists(self) -> dict[str, list[bool]]:
        """The masks as lists of bools (what the trace keeps)."""
        coverage = {name: self.coverage(name) for name in BRANCH_NAMES}
        size = len(self.cond)
        return {
            name: [coverage[name] == "all"] * size if coverage[name] != "some" else getattr(self, name).tolist()
            for name in BRANCH_NAMES
        }


@dataclass
class GuidedPrediction:
    """What `combine` returns: the guided prediction, the scale applied per row, and what the method records."""

    prediction: torch.Tensor
    scales: torch.Tensor
    """Shape (batch,): the scale applied to each row (1.0 where the row ran unguided)."""
    extras: dict = field(default_factory=dict)
    """Method-specific values for this step's trace entry (similarities, candidate scores, ...)."""


class GuidanceScheduler(ConfigMixin):
    """Base class of every guidance method: subclasses implement `branches` and `combine`.

    The constructor's arguments are the config (decorate `__init__` with `@register_to_config`), so every policy
    has `save_pretrained`, `from_pretrained` and `new(**overrides)`. The sampler calls `reset` when a run starts,
    then `branches` and `combine` at every model evaluation. `unconditional` says which weights compute the
    unconditional branch (the base model unless a policy says otherwise). A policy object serves one run at a
    time, as a diffusers scheduler does; give each thread its own (`policy.new()`).
    """

    config_name = "guidance_config.json"
    unconditional: UnconditionalModel = BASE_MODEL

    def __init_subclass__(cls, **kwargs):
        """Record each policy's constructor arguments (objects included), so that `new` can rebuild it."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_init(cls.__dict__["__init__"])

    def reset(self, run: GuidanceRun) -> None:
        """Forget the previous run; called once per sampling run before the first evaluation."""

    def branches(self, step: GuidanceStep) -> BranchRequest:
        """Which model branches to evaluate, per row, at this step."""
        raise NotImplementedError

    def combine(
        self, step: GuidanceStep, request: BranchRequest, predictions: dict[str, torch.Tensor]
    ) -> GuidedPrediction:
        """Combine the branch predictions into one guided prediction.

        `predictions[name]` has the full batch size, NaN in the rows for which the branch did not run; a branch
        that ran for no row is absent.
        """
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the config (`guidance_config.json`) to `save_directory`, as diffusers schedulers do."""
        self.save_config(save_directory, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **objects
    ):
        """Load a policy saved with `save_pretrained` (a local folder or a hub id).

        `objects` are constructor arguments a config cannot hold (evaluators, a decoder, an unconditional model)
        or values to override.
        """
        return cls.from_config_dict(cls.load_config(pretrained_model_name_or_path, subfolder=subfolder), **objects)

    @classmethod
    def from_config_dict(cls, config: dict, **objects) -> GuidanceScheduler:
        """The policy a saved config describes (keys the constructor does not take are left out); `objects` go to
        the constructor, or to the saved part that takes them (a `DynamicScale`'s `evaluators`)."""
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        arguments = {key: value for key, value in config.items() if key in names}
        for name in [name for name in objects if name not in names]:
            takers = [key for key, value in arguments.items() if name in part_parameters(value)]
            if not takers:
                raise TypeError(f"`{cls.__name__}` and its saved parts take no argument `{name}`")
            arguments[takers[0]] = {**arguments[takers[0]], name: objects.pop(name)}
        return cls(**{**arguments, **objects})

    def new(self, **overrides) -> GuidanceScheduler:
        """A fresh policy of the same class and arguments, some replaced (diffusers' `.new`); no run state."""
        arguments = getattr(self, "_arguments", None)
        if arguments is None:  # a subclass without its own __init__: rebuild from the config
            arguments = {k: v for k, v in self.config.items() if not k.startswith("_")}
        unknown = sorted(set(overrides) - set(arguments))
        if unknown:
            raise ValueError(
                f"`{type(self).__name__}.new` got unknown config keys {unknown}; valid: {sorted(arguments)}"
            )
        fresh = {key: value.new() if isinstance(value, GuidancePart) else value for key, value in arguments.items()}
        return type(self)(**{**fresh, **overrides})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class GuidancePart(ConfigMixin):
    """A piece a policy is composed of (a scale rule, a skipping rule): configurable and reset per run.

    Its config is saved inside the policy's (`to_dict`, with `_class_name`) and rebuilt from it (`part_from_config`).
    """

    config_name = "guidance_part.json"

    @register_to_config
    def __init__(self):
        pass

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_init(cls.__dict__["__init__"])

    def reset(self, run: GuidanceRun) -> None:
        """Forget the previous run."""

    def save_tensors(self, folder: str | os.PathLike) -> None:
        """Write what the config cannot hold (fitted coefficients) next to the policy's config."""

    def load_tensors(self, folder: str | os.PathLike) -> None:
        """Read what `save_tensors` wrote."""

    def to_dict(self) -> dict:
        return {"_class_name": type(self).__name__, **{k: v for k, v in self.config.items() if not k.startswith("_")}}

    def new(self, **overrides) -> GuidancePart:
        """A fresh part with the same arguments (objects shared), some replaced."""
        return type(self)(**{**self._arguments, **overrides})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def part_classes() -> dict[str, type[GuidancePart]]:
    """Every `GuidancePart` subclass imported so far, by name (what a saved config may name)."""
    found, pending = {}, [GuidancePart]
    while pending:
        for subclass in pending.pop().__subclasses__():
            found[subclass.__name__] = subclass
            pending.append(subclass)
    return found


def part_parameters(value: Any) -> set[str]:
    """The constructor parameters of the part a saved dict describes (none for any other value)."""
    if not isinstance(value, dict) or value.get("_class_name") not in part_classes():
        return set()
    return set(inspect.signature(part_classes()[value["_class_name"]].__init__).parameters)


def part_from_config(value: Any) -> Any:
    """A part rebuilt from its saved dict (`{"_class_name": ..., ...}`); any other value as it is."""
    if not isinstance(value, dict) or "_class_name" not in value:
        return value
    classes = part_classes()
    name = value["_class_name"]
    if name not in classes:
        raise ValueError(f"saved guidance part {name!r} is unknown; known parts: {sorted(classes)}")
    return classes[name](**{k: v for k, v in value.items() if k != "_class_name"})


_recording = threading.local()


def _recording_init(init):
    """Wrap `__init__`: parts saved as dicts become parts again, the outermost call's arguments are kept in
    `_arguments` (for `new`), and parts in the config are stored as their dicts (JSON)."""
    signature = inspect.signature(init)

    def named(bound: inspect.BoundArguments) -> dict:
        arguments = {k: part_from_config(v) for k, v in bound.arguments.items() if k != "self"}
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        return arguments

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        # keyword arguments only: diffusers' `register_to_config` pairs positional ones with the parameters that
        # are not in `ignore_for_config`, which shifts them when an ignored parameter comes first
        bound = signature.bind(self, *args, **kwargs)
        arguments = named(bound)
        if getattr(_recording, "active", set()) & {id(self)}:  # a constructor called from the outermost one
            return init(self, **arguments)
        _recording.active = getattr(_recording, "active", set()) | {id(self)}
        try:
            init(self, **arguments)
        finally:
            _recording.active = _recording.active - {id(self)}
        bound.apply_defaults()
        object.__setattr__(self, "_arguments", {**named(bound), **arguments})
        parts = {k: v.to_dict() for k, v in self.config.items() if isinstance(v, GuidancePart)}
        if parts:
            self.register_to_config(**parts)

    return wrapper


GuidancePart.__init__ = _recording_init(GuidancePart.__init__)  # parts without a constructor of their own


def check_scale(name: str, value: Any) -> float:
    """A guidance scale: a finite real number >= 0, else an error naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """A fraction of sampling progress in [0, 1], else an error naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")
    return float(value)
