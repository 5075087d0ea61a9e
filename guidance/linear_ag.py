"""LinearAG (Castillo et al., "Adaptive Guidance", arXiv 2312.12487, sec. 5): replace unconditional evaluations
by an affine combination of past predictions, with coefficients fitted offline by least squares.

At a synthesised step i: `eps_u_hat_i = b_0 eps_c_i + sum_{k=1..W} (b_k^c eps_c_{i-k} + b_k^u eps_u_{i-k}) + b_1`,
where `eps_u_{i-k}` is the unconditional prediction used at step i-k (exact or itself synthesised). The
unconditional pass runs only at `exact_steps` (by default the first 20% of the evaluations). Steps are indices of
the run's timesteps: one model evaluation each (PNDM and Heun evaluate more often than `num_inference_steps`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file, save_file

from .cfg import ComposedGuidance, UnconditionalSkip
from .scales import GuidanceScale
from .scheduler import GuidanceRun, GuidanceStep
from .unconditional import UnconditionalModel

COEFFICIENTS_FILE = "linear_ag_coefficients.safetensors"
CALIBRATE = "`guided-calibrate-linear-ag` (python -m pipelines.application.commands.calibrate_linear_ag)"


def default_exact_steps(num_timesteps: int) -> list[int]:
    return list(range(max(1, round(0.2 * num_timesteps))))


def regressors(cond: list[torch.Tensor], uncond: list[torch.Tensor], i: int, window: int) -> torch.Tensor:
    """Features of step i, stacked on a last axis: eps_c_i, then (eps_c, eps_u) of the `window` previous steps
    (zeros before the first step), then the constant 1."""
    features = [cond[i]]
    for k in range(1, window + 1):
        features += [cond[i - k], uncond[i - k]] if i - k >= 0 else [torch.zeros_like(cond[i])] * 2
    features.append(torch.ones_like(cond[i]))
    return torch.stack(features, dim=-1)


class LinearAGSkip(UnconditionalSkip):
    """LinearAG's rule: the unconditional pass runs at `exact_steps` only, and is synthesised elsewhere from the
    coefficients fitted for one scheduler class, step count and latent shape. Trace extras: `uncond` ("exact",
    "synthesised" or "none")."""

    ignore_for_config = ["coefficients"]

    @register_to_config
    def __init__(
        self,
        num_inference_steps: int = 20,
        num_timesteps: int | None = None,
        exact_steps: list[int] | None = None,
        window: int = 2,
        scheduler_class: str | None = None,
        latent_shape: list[int] | None = None,
        timesteps: list[float] | None = None,
        coefficients: torch.Tensor | None = None,
    ):
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}")
        total = num_inference_steps if num_timesteps is None else num_timesteps
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"`num_timesteps` must be an int >= 1 or None, got {num_timesteps!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"`window` must be an int >= 0, got {window!r}")
        exact = default_exact_steps(total) if exact_steps is None else list(exact_steps)
        if not exact or any(not 0 <= s < total for s in exact):
            raise ValueError(f"`exact_steps` must be step indices in [0, {total}), got {exact_steps!r}")
        if timesteps is not None and len(timesteps) != total:
            raise ValueError(f"`timesteps` must list the {total} timesteps of the fit, got {len(timesteps)}")
        self.register_to_config(num_timesteps=total, exact_steps=sorted(set(exact)))
        self.interval = (0.0, 1.0)
        self.coefficients = None
        if coefficients is not None:  # checked against the interval when a policy takes this rule (check_interval)
            self.set_coefficients(coefficients, check=False)

    def new(self, **overrides) -> LinearAGSkip:
        """A fresh rule with the same coefficients (they are not in the config), some arguments replaced."""
        return super().new(**{"coefficients": self.coefficients, **overrides})

    @property
    def num_features(self) -> int:
        return 2 + 2 * self.config.window

    def set_coefficients(self, coefficients: torch.Tensor, source: str = "`coefficients`", check: bool = True) -> None:
        expected = (self.config.num_timesteps, self.num_features)
        if not isinstance(coefficients, torch.Tensor) or tuple(coefficients.shape) != expected:
            shape = (
                tuple(coefficients.shape) if isinstance(coefficients, torch.Tensor) else type(coefficients).__name__
            )
            raise ValueError(f"LinearAG coefficients in {source} have shape {shape}, the config implies {expected}")
        self.coefficients = coefficients.float()
        if check:
            self.check_fitted()

    def check_fitted(self) -> None:
        """Every step the interval may synthesise needs fitted coefficients: a step that was exact at calibration has
        none (its row is zero), so dropping it from `exact_steps` would synthesise its prediction from nothing."""
        if self.coefficients is None:
            return
        start, stop = self.interval
        total, exact = self.config.num_timesteps, set(self.config.exact_steps)
        unfitted = [
            i
            for i in range(total)
            if start <= i / max(total - 1, 1) <= stop and i not in exact and not self.coefficients[i].any()
        ]
        if unfitted:
            calibrated = [i for i in range(total) if not self.coefficients[i].any()]
            raise ValueError(
                f"LinearAG coefficients have no fit for steps {unfitted}, which were exact at calibration (exact "
                f"steps of the fit: {calibrated}): keep them in `exact_steps`, got {sorted(exact)}"
            )

    def describe(self) -> str:
        config = self.config
        return (
            f"{config.scheduler_class or 'any scheduler'} with {config.num_inference_steps} inference steps "
            f"({config.num_timesteps} timesteps)"
        )

    def check_interval(self, start: float, stop: float) -> None:
        """The interval must not guide a synthesised step whose history never ran (it would come from nothing)."""
        self.interval = (start, stop)
        self.check_fitted()
        total, window, exact = self.config.num_timesteps, self.config.window, set(self.config.exact_steps)
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
        if self.coefficients is None:
            raise ValueError(f"LinearAG has no coefficients: load a calibration folder written by {CALIBRATE}")
        config = self.config
        scheduler_class = type(run.scheduler).__name__ if run.scheduler is not None else None
        fitted = (config.scheduler_class or scheduler_class, config.num_inference_steps, config.num_timesteps)
        if fitted != (scheduler_class, run.num_inference_steps, run.num_timesteps):
            raise ValueError(
                f"LinearAG coefficients were fitted for {self.describe()}, this run uses {scheduler_class} with "
                f"{run.num_inference_steps} inference steps ({run.num_timesteps} timesteps): calibrate for it "
                f"with {CALIBRATE}"
            )
        run_timesteps = [float(t) for t in run.scheduler.timesteps] if run.scheduler is not None else None
        same = run_timesteps is None or (
            len(config.timesteps or []) == len(run_timesteps)
            and all(
                abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(config.timesteps, run_timesteps, strict=True)
            )
        )
        if config.timesteps is not None and not same:
            raise ValueError(
                f"LinearAG coefficients were fitted for the timesteps {[round(t, 2) for t in config.timesteps]}, this "
                f"run's are {[round(t, 2) for t in run_timesteps]} (another spacing or sigma schedule): calibrate "
                f"for it with {CALIBRATE}"
            )
        if config.latent_shape not in (None, list(run.latent_shape)):
            raise ValueError(
                f"LinearAG coefficients were fitted for latents of shape {config.latent_shape}, this run has "
                f"{list(run.latent_shape)}: calibrate at this resolution"
            )
        if run.start_index != 0:
            raise ValueError(
                f"LinearAG synthesises from the predictions of the first steps, so a run must start at step 0, "
                f"got a run starting at step {run.start_index}"
            )
        self.used_cond: list[torch.Tensor | None] = []
        self.used_uncond: list[torch.Tensor | None] = []
        self.real: list[bool] = []  # per step: its unconditional prediction ran or was synthesised from real ones

    def rows(self, step: GuidanceStep, needed: bool) -> torch.Tensor:
        exact = step.step_index in self.config.exact_steps
        return torch.full((step.batch_size,), needed and exact, dtype=torch.bool)

    def complete(self, step, request, cond, uncond, needed):
        i, window = step.step_index, self.config.window
        if request.uncond.all():
            used, kind, real = uncond, "exact", True
        else:
            missing = [j for j in range(max(i - window, 0), i) if not self.real[j]]
            fitted = bool(self.coefficients[i].any())
            real = fitted and not missing
            if needed and not real:
                why = (
                    f"it was exact at calibration (no coefficients); exact steps now: {self.config.exact_steps}"
                    if not fitted
                    else f"the unconditional predictions of steps {missing}, which it is built from, never ran"
                )
                raise ValueError(
                    f"LinearAG cannot synthesise the unconditional prediction of step {i}: {why} (a scale rule or "
                    "interval that leaves out exact steps)"
                )
            if real:
                features = regressors(self.used_cond + [cond], self.used_uncond + [cond], i, window)
                used = (features.float() @ self.coefficients[i].to(cond.device)).to(cond.dtype)
            else:
                used = torch.zeros_like(cond)  # a placeholder no guided step may use (checked above)
            kind = "synthesised" if needed else "none"
        self.used_cond.append(cond)
        self.used_uncond.append(used)
        self.real.append(real)
        if i - window >= 0:  # no later step reads that far back
            self.used_cond[i - window] = self.used_uncond[i - window] = None
        return used, torch.full((step.batch_size,), needed, dtype=torch.bool), {"uncond": kind}

    def save_tensors(self, folder: str | os.PathLike) -> None:
        if self.coefficients is not None:
            save_file({"coefficients": self.coefficients.contiguous()}, Path(folder) / COEFFICIENTS_FILE)

    def load_tensors(self, folder: str | os.PathLike) -> None:
        path = Path(folder) / COEFFICIENTS_FILE
        if not path.is_file():
            raise ValueError(f"LinearAG coefficients folder {str(folder)!r} lacks {path.name}: run {CALIBRATE}")
        try:
            coefficients = load_file(path)["coefficients"]
        except (KeyError, OSError, RuntimeError) as error:
            raise ValueError(f"LinearAG coefficients folder {str(folder)!r} is corrupt: {error}") from error
        self.set_coefficients(coefficients, repr(str(folder)))


class LinearAdaptiveGuidance(ComposedGuidance):
    """CFG whose unconditional prediction is exact at `exact_steps` and synthesised elsewhere (LinearAG).

    Build it with `LinearAdaptiveGuidance.from_pretrained(folder)` on coefficients written by the calibration
    command; they are tied to the scheduler class, the step count (and the timesteps it makes) and the latent shape
    they were fitted for, and using them elsewhere is an error. Shorthand for
    `ClassifierFreeGuidance(guidance_scale, skip=LinearAGSkip(...), ...)`.
    """

    ignore_for_config = [*ComposedGuidance.ignore_for_config, "coefficients"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float | GuidanceScale = 7.5,
        num_inference_steps: int = 20,
        num_timesteps: int | None = None,
        exact_steps: list[int] | None = None,
        window: int = 2,
        scheduler_class: str | None = None,
        latent_shape: list[int] | None = None,
        timesteps: list[float] | None = None,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        unconditional: UnconditionalModel | None = None,
        coefficients: torch.Tensor | None = None,
    ):
        skip = LinearAGSkip(
            num_inference_steps=num_inference_steps,
            num_timesteps=num_timesteps,
            exact_steps=exact_steps,
            window=window,
            scheduler_class=scheduler_class,
            latent_shape=latent_shape,
            timesteps=timesteps,
            coefficients=coefficients,
        )
        self.register_to_config(num_timesteps=skip.config.num_timesteps, exact_steps=skip.config.exact_steps)
        self._compose(guidance_scale, guidance_rescale, start, stop, skip, unconditional)

    @property
    def coefficients(self) -> torch.Tensor | None:
        return self.skip.coefficients

    def new(self, **overrides) -> LinearAdaptiveGuidance:
        """A fresh policy with the same coefficients, some arguments replaced."""
        return super().new(**{"coefficients": self.coefficients, **overrides})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **overrides) -> LinearAdaptiveGuidance:
        """Coefficients and config from a calibration folder; `overrides` may change guidance_scale, start, stop,
        exact_steps or set `unconditional`."""
        folder = Path(pretrained_model_name_or_path)
        if not (folder / cls.config_name).is_file():
            raise ValueError(f"LinearAG coefficients folder {str(folder)!r} lacks {cls.config_name}: run {CALIBRATE}")
        try:
            config = cls.load_config(folder)
        except (ValueError, OSError) as error:  # diffusers reports an unreadable JSON as OSError
            raise ValueError(f"LinearAG coefficients folder {str(folder)!r} is corrupt: {error}") from error
        policy = cls.from_config_dict(config, **overrides)
        policy.load_tensors(folder)
        return policy


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
