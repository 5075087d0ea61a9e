"""LinearAG (Castillo et al., "Adaptive Guidance", arXiv 2312.12487, sec. 5): replace unconditional evaluations
by an affine combination of past predictions, with coefficients fitted offline by least squares.

At a synthesised step i: `eps_u_hat_i = b_0 eps_c_i + sum_{k=1..W} (b_k^c eps_c_{i-k} + b_k^u eps_u_{i-k}) + b_1`,
where `eps_u_{i-k}` is the unconditional prediction used at step i-k (exact or itself synthesised). The
unconditional pass runs only at `exact_steps` (by default those the calibration kept exact: the first 20% of the
evaluations). Steps are indices of the run's timesteps: one model evaluation each (PNDM and Heun evaluate more often
than `num_inference_steps`). The fit itself (`LinearAGCalibration`) is a runtime object saved beside the config.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from safetensors import safe_open
from safetensors.torch import save_file

from .cfg import ComposedGuidance, UnconditionalSkip
from .checks import check_int
from .scales import GuidanceScale
from .scheduler import GuidanceRun, GuidanceStep
from .unconditional import UnconditionalModel

COEFFICIENTS_FILE = "linear_ag_coefficients.safetensors"
CALIBRATE = "`guided-calibrate-linear-ag` (or pipelines.training.linear_ag.calibrate)"


def default_exact_steps(num_timesteps: int) -> list[int]:
    return list(range(max(1, round(0.2 * num_timesteps))))


@dataclass
class LinearAGCalibration:
    """A LinearAG fit: the coefficients of every step, shape (num_timesteps, 2 + 2 window), zero at the steps that were
    exact at calibration, and what they hold for (the scheduler class, step count, timesteps and latent shape)."""

    coefficients: torch.Tensor = field(repr=False)
    exact_steps: list[int]
    window: int
    num_inference_steps: int
    scheduler_class: str | None = None
    latent_shape: list[int] | None = None
    timesteps: list[float] | None = None

    def __post_init__(self):
        check_int("window", self.window, minimum=0)
        check_int("num_inference_steps", self.num_inference_steps, minimum=1)
        shape = tuple(self.coefficients.shape) if isinstance(self.coefficients, torch.Tensor) else None
        if shape is None or len(shape) != 2 or shape[1] != 2 + 2 * self.window:
            raise ValueError(
                f"LinearAG coefficients must have shape (timesteps, {2 + 2 * self.window}) for window "
                f"{self.window}, got {shape or type(self.coefficients).__name__}"
            )
        self.coefficients = self.coefficients.float()
        if not self.exact_steps or any(not 0 <= s < shape[0] for s in self.exact_steps):
            raise ValueError(f"`exact_steps` must be step indices in [0, {shape[0]}), got {self.exact_steps!r}")
        if self.timesteps is not None and len(self.timesteps) != shape[0]:
            raise ValueError(f"`timesteps` must list the {shape[0]} timesteps of the fit, got {len(self.timesteps)}")

    @property
    def num_timesteps(self) -> int:
        return self.coefficients.shape[0]

    def describe(self) -> str:
        return (
            f"{self.scheduler_class or 'any scheduler'} with {self.num_inference_steps} inference steps "
            f"({self.num_timesteps} timesteps)"
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """One safetensors file: the coefficients, and the rest as JSON in its metadata."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        described = {key: value for key, value in asdict(self).items() if key != "coefficients"}
        save_file(
            {"coefficients": self.coefficients.contiguous()},
            Path(folder) / COEFFICIENTS_FILE,
            metadata={"linear_ag": json.dumps(described)},
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> LinearAGCalibration:
        path = Path(folder) / COEFFICIENTS_FILE
        if not path.is_file():
            raise ValueError(f"LinearAG coefficients folder {str(folder)!r} lacks {path.name}: run {CALIBRATE}")
        try:
            with safe_open(path, "pt") as handle:
                described = json.loads((handle.metadata() or {})["linear_ag"])
                coefficients = handle.get_tensor("coefficients")
            return cls(coefficients, **described)
        except (KeyError, OSError, RuntimeError, TypeError, ValueError) as error:
            raise ValueError(
                f"LinearAG coefficients folder {str(folder)!r} is corrupt ({error}): run {CALIBRATE} again"
            ) from error


def regressors(cond: list[torch.Tensor], uncond: list[torch.Tensor], i: int, window: int) -> torch.Tensor:
    """Features of step i, stacked on a last axis: eps_c_i, then (eps_c, eps_u) of the `window` previous steps
    (zeros before the first step), then the constant 1."""
    features = [cond[i]]
    for k in range(1, window + 1):
        features += [cond[i - k], uncond[i - k]] if i - k >= 0 else [torch.zeros_like(cond[i])] * 2
    features.append(torch.ones_like(cond[i]))
    return torch.stack(features, dim=-1)


class LinearAGSkip(UnconditionalSkip):
    """LinearAG's rule: the unconditional pass runs at `exact_steps` only (default: those the calibration kept exact),
    and is synthesised elsewhere from `calibration`, fitted for one scheduler class, step count and latent shape. Trace
    extras: `uncond` ("exact", "synthesised" or "none")."""

    ignore_for_config = ["calibration"]

    @register_to_config
    def __init__(self, exact_steps: list[int] | None = None, *, calibration: LinearAGCalibration | None = None):
        if calibration is not None and not isinstance(calibration, LinearAGCalibration):
            raise TypeError(f"`calibration` must be a LinearAGCalibration or None, got {type(calibration).__name__}")
        self.calibration = calibration
        if exact_steps is not None:
            exact_steps = sorted({check_int("exact_steps", s, minimum=0) for s in exact_steps})
            total = calibration.num_timesteps if calibration is not None else None
            if not exact_steps or (total is not None and exact_steps[-1] >= total):
                raise ValueError(f"`exact_steps` must be step indices in [0, {total}), got {exact_steps!r}")
            self.register_to_config(exact_steps=exact_steps)
        self.interval = (0.0, 1.0)

    @property
    def exact_steps(self) -> list[int]:
        given = self.config.exact_steps
        return given if given is not None else (self.calibration.exact_steps if self.calibration else [])

    @property
    def window(self) -> int:
        return self.calibration.window

    def check_fitted(self) -> None:
        """Every step the interval may synthesise needs fitted coefficients: a step that was exact at calibration has
        none (its row is zero), so dropping it from `exact_steps` would synthesise its prediction from nothing."""
        if self.calibration is None:
            return
        start, stop = self.interval
        total, exact, coefficients = (
            self.calibration.num_timesteps,
            set(self.exact_steps),
            self.calibration.coefficients,
        )
        unfitted = [
            i
            for i in range(total)
            if start <= i / max(total - 1, 1) <= stop and i not in exact and not coefficients[i].any()
        ]
        if unfitted:
            calibrated = [i for i in range(total) if not coefficients[i].any()]
            raise ValueError(
                f"LinearAG coefficients have no fit for steps {unfitted}, which were exact at calibration (exact "
                f"steps of the fit: {calibrated}): keep them in `exact_steps`, got {sorted(exact)}"
            )

    def check_interval(self, start: float, stop: float) -> None:
        """The interval must not guide a synthesised step whose history never ran (it would come from nothing)."""
        self.interval = (start, stop)
        if self.calibration is None:
            return
        self.check_fitted()
        total, window, exact = self.calibration.num_timesteps, self.window, set(self.exact_steps)
        guided = [i for i in range(total) if start <= i / max(total - 1, 1) <= stop]
        if not guided or guided[0] == 0:
            return
        first = guided[0]
        for i in range(first, min(first + window, guided[-1] + 1)):
            if i not in exact:
                raise ValueError(
                    f"LinearAG's guidance interval [{start}, {stop}] guides steps {first}-{guided[-1]} of {total}, "
                    f"but step {i} would be synthesised from the unconditional predictions of steps "
                    f"{max(i - window, 0)}-{i - 1}, and those before step {first} never run (exact steps: "
                    f"{sorted(exact)}): start the interval at 0, or calibrate with exact steps "
                    f"{list(range(first, first + window))}"
                )

    def reset(self, run: GuidanceRun) -> None:
        if self.calibration is None:
            raise ValueError(f"LinearAG has no coefficients: load a calibration folder written by {CALIBRATE}")
        self.check_run(run)
        self.used_cond: list[torch.Tensor | None] = []
        self.used_uncond: list[torch.Tensor | None] = []
        self.real: list[bool] = []  # per step: its unconditional prediction ran or was synthesised from real ones

    def check_run(self, run: GuidanceRun) -> None:
        """The run must be what the coefficients were fitted for: scheduler, step count, timesteps, latent shape."""
        fit = self.calibration
        scheduler_class = type(run.scheduler).__name__ if run.scheduler is not None else None
        fitted = (fit.scheduler_class or scheduler_class, fit.num_inference_steps, fit.num_timesteps)
        if fitted != (scheduler_class, run.num_inference_steps, run.num_timesteps):
            raise ValueError(
                f"LinearAG coefficients were fitted for {fit.describe()}, this run uses {scheduler_class} with "
                f"{run.num_inference_steps} inference steps ({run.num_timesteps} timesteps): calibrate for it "
                f"with {CALIBRATE}"
            )
        run_timesteps = [float(t) for t in run.scheduler.timesteps] if run.scheduler is not None else None
        same = run_timesteps is None or (
            len(fit.timesteps or []) == len(run_timesteps)
            and all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(fit.timesteps, run_timesteps, strict=True))
        )
        if fit.timesteps is not None and not same:
            raise ValueError(
                f"LinearAG coefficients were fitted for the timesteps {[round(t, 2) for t in fit.timesteps]}, this "
                f"run's are {[round(t, 2) for t in run_timesteps]} (another spacing or sigma schedule): calibrate "
                f"for it with {CALIBRATE}"
            )
        if fit.latent_shape not in (None, list(run.latent_shape)):
            raise ValueError(
                f"LinearAG coefficients were fitted for latents of shape {fit.latent_shape}, this run has "
                f"{list(run.latent_shape)}: calibrate at this resolution"
            )
        if run.start_index != 0:
            raise ValueError(
                f"LinearAG synthesises from the predictions of the first steps, so a run must start at step 0, "
                f"got a run starting at step {run.start_index}"
            )

    def rows(self, step: GuidanceStep, needed: bool) -> torch.Tensor:
        exact = step.step_index in self.exact_steps
        return torch.full((step.batch_size,), needed and exact, dtype=torch.bool)

    def complete(self, step, request, cond, uncond, needed):
        i, window, coefficients = step.step_index, self.window, self.calibration.coefficients
        if request.uncond.all():
            used, kind, real = uncond, "exact", True
        else:
            missing = [j for j in range(max(i - window, 0), i) if not self.real[j]]
            fitted = bool(coefficients[i].any())
            real = fitted and not missing
            if needed and not real:
                why = (
                    f"it was exact at calibration (no coefficients); exact steps now: {self.exact_steps}"
                    if not fitted
                    else f"the unconditional predictions of steps {missing}, which it is built from, never ran"
                )
                raise ValueError(
                    f"LinearAG cannot synthesise the unconditional prediction of step {i}: {why} (a scale rule or "
                    "interval that leaves out exact steps)"
                )
            if real:
                features = regressors(self.used_cond + [cond], self.used_uncond + [cond], i, window)
                used = (features.float() @ coefficients[i].to(cond.device)).to(cond.dtype)
            else:
                used = torch.zeros_like(cond)  # a placeholder no guided step may use (checked above)
            kind = "synthesised" if needed else "none"
        self.used_cond.append(cond)
        self.used_uncond.append(used)
        self.real.append(real)
        if i - window >= 0:  # no later step reads that far back
            self.used_cond[i - window] = self.used_uncond[i - window] = None
        return used, torch.full((step.batch_size,), needed, dtype=torch.bool), {"uncond": kind}

    def save_objects(self, folder: str | os.PathLike) -> None:
        if self.calibration is not None:
            self.calibration.save_pretrained(folder)

    @classmethod
    def load_objects(cls, folder: str | os.PathLike, config: dict) -> dict[str, Any]:
        return {"calibration": LinearAGCalibration.from_pretrained(folder)}


class LinearAdaptiveGuidance(ComposedGuidance):
    """CFG whose unconditional prediction is exact at `exact_steps` and synthesised elsewhere (LinearAG).

    Build it with `LinearAdaptiveGuidance.from_pretrained(folder)` on a folder written by the calibration (or pass
    `calibration=`); the coefficients are tied to the scheduler class, the step count (and the timesteps it makes)
    and the latent shape they were fitted for, and using them elsewhere is an error. Shorthand for
    `ClassifierFreeGuidance(guidance_scale, skip=LinearAGSkip(exact_steps, calibration=...), ...)`.

    Args:
        guidance_scale: CFG scale `w`, or a scale rule.
        exact_steps: the steps whose unconditional pass runs; None: those the calibration kept exact. Steps exact at
            calibration have no coefficients and must stay exact.
        guidance_rescale, start, stop, unconditional: as in `ClassifierFreeGuidance`.
        calibration: the fit (`LinearAGCalibration`), a runtime object saved beside the config.
    """

    ignore_for_config = ["calibration", "unconditional"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float | GuidanceScale = 7.5,
        exact_steps: list[int] | None = None,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        *,
        calibration: LinearAGCalibration | None = None,
        unconditional: UnconditionalModel | None = None,
    ):
        skip = LinearAGSkip(exact_steps, calibration=calibration)
        self._compose(guidance_scale, guidance_rescale, start, stop, skip, unconditional)

    @property
    def calibration(self) -> LinearAGCalibration | None:
        return self.skip.calibration

    @property
    def coefficients(self) -> torch.Tensor | None:
        return None if self.calibration is None else self.calibration.coefficients

    @classmethod
    def load_objects(cls, folder: str | os.PathLike, config: dict) -> dict[str, Any]:
        return {**super().load_objects(folder, config), "calibration": LinearAGCalibration.from_pretrained(folder)}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> LinearAdaptiveGuidance:
        """The policy and its coefficients from a calibration folder; `kwargs` may change guidance_scale, start, stop,
        exact_steps or set `unconditional`."""
        folder = Path(pretrained_model_name_or_path)
        if not (folder / cls.config_name).is_file():
            raise ValueError(f"LinearAG coefficients folder {str(folder)!r} lacks {cls.config_name}: run {CALIBRATE}")
        try:
            cls.load_config(folder)
        except (ValueError, OSError) as error:  # diffusers reports an unreadable JSON as OSError
            raise ValueError(f"LinearAG coefficients folder {str(folder)!r} is corrupt: {error}") from error
        return super().from_pretrained(folder, **kwargs)


def fit_coefficients(
    cond: torch.Tensor, uncond: torch.Tensor, exact_steps: list[int], window: int
) -> tuple[torch.Tensor, list[float]]:
    """Least-squares coefficients per step from full-CFG calibration predictions of shape (steps, samples, ...).

    Fitted in order, feeding each synthesised step's own estimate to the later steps (as at inference), so errors
    that accumulate are fitted too. Solved in float64 on the CPU whatever the device (MPS has no float64).
    Returns the coefficients (steps, features) in float32 and each step's relative residual
    `||eps_u_hat - eps_u|| / ||eps_u||` (0 at exact steps).
    """
    steps = cond.shape[0]
    cond_steps = [c.detach().cpu().double() for c in cond]
    target_steps = [u.detach().cpu().double() for u in uncond]
    used = list(target_steps)
    coefficients = torch.zeros(steps, 2 + 2 * window, dtype=torch.float64)
    residuals = []
    for i in range(steps):
        if i in exact_steps:
            residuals.append(0.0)
            continue
        features = regressors(cond_steps, used, i, window)
        design, target = features.reshape(-1, features.shape[-1]), target_steps[i].reshape(-1)
        solution = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
        coefficients[i] = solution
        used[i] = features @ solution
        residuals.append(float((used[i] - target_steps[i]).norm() / target_steps[i].norm()))
    return coefficients.float(), residuals
