"""The one abstraction of this project: a guidance scheduler.

A guidance scheduler is to classifier-free guidance what a diffusers scheduler is to sampling: a small,
configurable, stateful policy that never runs the model. At each model evaluation of a sampling run the sampler
asks it which branches to evaluate for which rows (`branches`), runs exactly those passes, and hands the
predictions back (`combine`) to get one guided prediction, which the diffusers scheduler steps.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

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


class Configurable(ConfigMixin):
    """What policies and their parts share, as diffusers does it: the constructor's arguments are the config
    (`@register_to_config`, saved as JSON); runtime objects a config cannot hold (evaluators, a calibration, an
    unconditional model, a decoder) are listed in `ignore_for_config`, kept as attributes of the same names and passed
    by keyword to the constructor, `from_config`, `from_pretrained` and `new`."""

    ignore_for_config: ClassVar[list[str]] = []

    @classmethod
    def from_config(cls, config: dict | None = None, **kwargs):
        """An object of this class from a saved config; `kwargs` replace config values or give runtime objects. What
        a saved config says of a runtime object (an evaluator's name) reaches the constructor, which says what to
        pass."""
        config, runtime = dict(config or {}), {}
        for name in cls.ignore_for_config:
            saved = config.pop(name, None)
            if name in kwargs:
                runtime[name] = kwargs.pop(name)
            elif saved is not None:
                runtime[name] = saved
        cls.check_arguments(kwargs)
        arguments, _, _ = cls.extract_init_dict(config, **kwargs)
        return cls(**arguments, **runtime)

    @classmethod
    def check_arguments(cls, kwargs: dict) -> None:
        """Every name of `kwargs` is a constructor argument, else an error listing the valid ones."""
        valid = sorted(set(inspect.signature(cls.__init__).parameters) - {"self"})
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"`{cls.__name__}` got unknown arguments {unknown}; valid: {valid}")

    def runtime_objects(self) -> dict[str, Any]:
        """The runtime objects this object was built with, by constructor argument."""
        return {name: getattr(self, name) for name in self.ignore_for_config}

    def new(self, **kwargs):
        """A fresh object of the same config and runtime objects, `kwargs` replacing some (diffusers' guiders' `new`):
        no run state."""
        return self.from_config(self.config, **{**self.runtime_objects(), **kwargs})

    def save_objects(self, folder: str | os.PathLike) -> None:
        """Write the runtime objects that files can hold (fitted coefficients) beside the config."""

    @classmethod
    def load_objects(cls, folder: str | os.PathLike, config: dict) -> dict[str, Any]:
        """The runtime objects `save_objects` wrote to `folder` for this saved `config`, by constructor argument."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class GuidanceScheduler(Configurable):
    """Base class of every guidance method: subclasses implement `branches` and `combine`.

    The constructor's arguments are the config (decorate `__init__` with `@register_to_config`), so every policy
    has `save_pretrained`, `from_pretrained` and `new(**kwargs)`. The sampler calls `reset` when a run starts,
    then `branches` and `combine` at every model evaluation. `unconditional` says which weights compute the
    unconditional branch (the base model unless a policy says otherwise). A policy object serves one run at a
    time, as a diffusers scheduler does; give each thread its own (`policy.new()`).
    """

    config_name = "guidance_config.json"
    unconditional: UnconditionalModel = BASE_MODEL

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
        """Write the config (`guidance_config.json`) and the runtime objects files can hold to `save_directory`."""
        self.save_config(save_directory, **kwargs)
        self.save_objects(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """Load a policy saved with `save_pretrained` from a folder or a hub id (offline: from the local cache);
        `kwargs` as in `from_config` (runtime objects a config cannot hold, values to replace)."""
        folder = local_folder(pretrained_model_name_or_path)
        folder = os.path.join(folder, subfolder) if subfolder else folder
        if not os.path.isfile(os.path.join(folder, cls.config_name)):
            raise ValueError(f"{folder!r} is not a saved guidance policy: it has no {cls.config_name}")
        config = cls.load_config(folder)
        cls.check_arguments(kwargs)
        not_given = {key: value for key, value in config.items() if key not in kwargs}
        return cls.from_config(config, **cls.load_objects(folder, not_given), **kwargs)


def local_folder(name: str | os.PathLike) -> str:
    """A local folder, or the snapshot of a hub repository (from the local cache when offline)."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"`pretrained_model_name_or_path` must be a folder or a hub id, got {type(name).__name__}")
    path = os.fspath(name)
    if os.path.isdir(path) or path.count("/") != 1 or path.startswith((".", "/")):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path)
    except Exception as error:  # the hub raises many kinds (offline, not found, gated)
        raise ValueError(f"{path!r} is neither a local folder nor a reachable (or cached) hub id: {error}") from error


class GuidancePart(Configurable):
    """A piece a policy is composed of (a scale rule, a skipping rule): configurable and reset per run.

    Its config is saved inside the policy's (`to_dict`, with `_class_name`) and rebuilt from it (`part_from_config`).
    """

    config_name = "guidance_part.json"

    @register_to_config
    def __init__(self):
        pass

    def reset(self, run: GuidanceRun) -> None:
        """Forget the previous run."""

    def to_dict(self) -> dict:
        return {"_class_name": type(self).__name__, **{k: v for k, v in self.config.items() if not k.startswith("_")}}


REGISTERED_PARTS: dict[str, type[GuidancePart]] = {}


def register_part(cls: type[GuidancePart]) -> type[GuidancePart]:
    """Make a part class of your own loadable from saved configs (the shipped ones are known already)."""
    if not (isinstance(cls, type) and issubclass(cls, GuidancePart)):
        raise TypeError(f"`cls` must be a GuidancePart subclass, got {cls!r}")
    REGISTERED_PARTS[cls.__name__] = cls
    return cls


def part_classes() -> dict[str, type[GuidancePart]]:
    """The part classes a saved config may name: the shipped ones and those given to `register_part`."""
    from .adaptive import AdaptiveSkip
    from .diffusers_guider import GuiderScale
    from .dynamic import DynamicScale
    from .linear_ag import LinearAGSkip
    from .scales import ConstantScale, ScheduledScale

    shipped = (ConstantScale, ScheduledScale, DynamicScale, GuiderScale, AdaptiveSkip, LinearAGSkip)
    return {**{cls.__name__: cls for cls in shipped}, **REGISTERED_PARTS}


def is_part_config(value: Any) -> bool:
    return isinstance(value, dict) and "_class_name" in value


def part_from_config(value: dict, folder: str | os.PathLike | None = None) -> GuidancePart:
    """A part rebuilt from its saved dict (`{"_class_name": ..., ...}`), with the runtime objects it saved in `folder`
    when given."""
    classes = part_classes()
    name = value["_class_name"]
    if name not in classes:
        raise ValueError(
            f"saved guidance part {name!r} is unknown; known parts: {sorted(classes)} (register yours with "
            "guidance.register_part)"
        )
    cls = classes[name]
    objects = cls.load_objects(folder, value) if folder is not None else {}
    return cls.from_config(value, **objects)
