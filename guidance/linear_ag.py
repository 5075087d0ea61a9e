"""LinearAG (Castillo et al., "Adaptive Guidance", arXiv 2312.12487, sec. 5): replace unconditional evaluations
by an affine combination of past predictions, with coefficients fitted offline by least squares.

At a synthesised step i: `eps_u_hat_i = b_0 eps_c_i + sum_{k=1..W} (b_k^c eps_c_{i-k} + b_k^u eps_u_{i-k}) + b_1`,
where `eps_u_{i-k}` is the unconditional prediction used at step i-k (exact or itself synthesised). The
unconditional pass runs only at `exact_steps` (by default the first 20% of steps, where the paths diverge most).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file, save_file

from .cfg import ClassifierFreeGuidance
from .scheduler import BranchRequest, GuidanceStep

COEFFICIENTS_FILE = "linear_ag_coefficients.safetensors"


def default_exact_steps(num_inference_steps: int) -> list[int]:
    return list(range(max(1, round(0.2 * num_inference_steps))))


def regressors(cond: list[torch.Tensor], uncond: list[torch.Tensor], i: int, window: int) -> torch.Tensor:
    """Features of step i, stacked on a last axis: eps_c_i, then (eps_c, eps_u) of the `window` previous steps
    (zeros before the first step), then the constant 1."""
    features = [cond[i]]
    for k in range(1, window + 1):
        features += [cond[i - k], uncond[i - k]] if i - k >= 0 else [torch.zeros_like(cond[i])] * 2
    features.append(torch.ones_like(cond[i]))
    return torch.stack(features, dim=-1)


class LinearAdaptiveGuidance(ClassifierFreeGuidance):
    """CFG whose unconditional prediction is exact at `exact_steps` and synthesised elsewhere (LinearAG).

    Build it with `LinearAdaptiveGuidance.from_pretrained(folder)` on coefficients written by the calibration
    command (`python -m guidance.calibrate_linear_ag`); they are tied to the step count, the diffusers scheduler
    class and the latent shape they were fitted for, and using them elsewhere is an error.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 20,
        exact_steps: list[int] | None = None,
        window: int = 2,
        scheduler_class: str | None = None,
        latent_shape: list[int] | None = None,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
    ):
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, start=start, stop=stop)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}")
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"`window` must be an int >= 0, got {window!r}")
        exact = default_exact_steps(num_inference_steps) if exact_steps is None else list(exact_steps)
        if not exact or any(not 0 <= s < num_inference_steps for s in exact):
            raise ValueError(f"`exact_steps` must be step indices in [0, {num_inference_steps}), got {exact_steps!r}")
        self.register_to_config(exact_steps=sorted(set(exact)))
        self.coefficients: torch.Tensor | None = None

    @property
    def num_features(self) -> int:
        return 2 + 2 * self.config.window

    def reset(self, batch_size: int, num_inference_steps: int) -> None:
        super().reset(batch_size, num_inference_steps)
        if self.coefficients is None:
            raise ValueError("LinearAdaptiveGuidance has no coefficients: load them with `from_pretrained(folder)`")
        if num_inference_steps != self.config.num_inference_steps:
            raise ValueError(
                f"LinearAG coefficients were fitted for {self.config.num_inference_steps} steps, this generation "
                f"has {num_inference_steps}: calibrate for {num_inference_steps} steps"
            )
        self.used_cond: list[torch.Tensor] = []
        self.used_uncond: list[torch.Tensor] = []

    def branches(self, step: GuidanceStep) -> BranchRequest:
        if step.step_index == 0:
            self._check_setup(step)
        exact = step.step_index in self.config.exact_steps
        return BranchRequest.full(step.latents.shape[0], uncond=exact and self.guided_at(step))

    def _check_setup(self, step: GuidanceStep) -> None:
        scheduler_class, shape = type(step.scheduler).__name__, list(step.latents.shape[1:])
        if self.config.scheduler_class not in (None, scheduler_class):
            raise ValueError(
                f"LinearAG coefficients were fitted with {self.config.scheduler_class}, the pipeline uses "
                f"{scheduler_class}: calibrate with this scheduler"
            )
        if self.config.latent_shape not in (None, shape):
            raise ValueError(
                f"LinearAG coefficients were fitted for latents of shape {self.config.latent_shape}, this generation "
                f"has {shape}: calibrate at this resolution"
            )

    def combine(self, step, request, predictions):
        cond, i = predictions["cond"], step.step_index
        synthesised = not request.uncond.any() and self.guided_at(step)
        if request.uncond.any():
            uncond = predictions["uncond"]
        else:
            features = regressors(self.used_cond + [cond], self.used_uncond + [cond], i, self.config.window)
            uncond = features @ self.coefficients[i].to(features)
        self.used_cond.append(cond)
        self.used_uncond.append(uncond)
        self.record_extra(uncond="synthesised" if synthesised else "exact" if request.uncond.any() else "none")
        if not self.guided_at(step):
            return cond, torch.ones(cond.shape[0])
        full = BranchRequest.full(cond.shape[0], uncond=True)
        return super().combine(step, full, {"cond": cond, "uncond": uncond})

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        save_file({"coefficients": self.coefficients.contiguous()}, Path(save_directory) / COEFFICIENTS_FILE)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **overrides) -> LinearAdaptiveGuidance:
        """Coefficients and config from a calibration folder; `overrides` may change guidance_scale/start/stop."""
        folder = Path(pretrained_model_name_or_path)
        config_path, weights_path = folder / cls.config_name, folder / COEFFICIENTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ValueError(
                    f"LinearAG coefficients folder {str(folder)!r} lacks {path.name}: run the calibration command "
                    "`python -m guidance.calibrate_linear_ag`"
                )
        try:
            config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
            policy = cls(**{**config, **overrides})
            coefficients = load_file(weights_path)["coefficients"]
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"LinearAG coefficients folder {str(folder)!r} is corrupt: {error}") from error
        expected = (policy.config.num_inference_steps, policy.num_features)
        if tuple(coefficients.shape) != expected:
            raise ValueError(
                f"LinearAG coefficients in {str(folder)!r} have shape {tuple(coefficients.shape)}, the config "
                f"implies {expected}"
            )
        policy.coefficients = coefficients
        return policy

    def new(self, **overrides) -> LinearAdaptiveGuidance:
        policy = super().new(**overrides)
        policy.coefficients = self.coefficients
        return policy


def fit_coefficients(
    cond: torch.Tensor, uncond: torch.Tensor, exact_steps: list[int], window: int
) -> tuple[torch.Tensor, list[float]]:
    """Least-squares coefficients per step from full-CFG calibration predictions of shape (steps, samples, ...).

    Fitted in order, feeding each synthesised step's own estimate to the later steps (as at inference), so errors
    that accumulate are fitted too. Returns the coefficients (steps, features) and each step's relative residual
    `||eps_u_hat - eps_u|| / ||eps_u||` (0 at exact steps).
    """
    steps = cond.shape[0]
    cond_steps = [c.double() for c in cond]
    used = [u.double() for u in uncond]
    coefficients = torch.zeros(steps, 2 + 2 * window, dtype=torch.float64)
    residuals = []
    for i in range(steps):
        if i in exact_steps:
            residuals.append(0.0)
            continue
        features = regressors(cond_steps, used, i, window)
        design, target = features.reshape(-1, features.shape[-1]), uncond[i].double().reshape(-1)
        solution = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
        coefficients[i] = solution
        used[i] = features @ solution
        residuals.append(float((used[i] - uncond[i].double()).norm() / uncond[i].double().norm()))
    return coefficients.float(), residuals
