"""FlowOpt ("FlowOpt: Fast Optimization Through Whole Flow Processes for Training-Free Editing", arXiv 2510.22010):
inversion and editing with a flow model by zero-order optimisation through the whole sampling process.

Notation of the paper: `z` is the latent at grid index `n_start = T - n_max` of a T-step flow schedule; `f_c(z)` the
first-order Euler solve from there to sigma 0 with prompt `c` (eq. 3); `y` the VAE latent of the source image. The
iteration (eq. 6) is `z_{k+1} = z_k - eta (f_c(z_k) - y)`: no Jacobian and no backpropagation, and every iterate
`f_c(z_k)` is an image. Inversion uses the source prompt as `c`; editing the target prompt with the same `y`. The
first `z` comes from UniInv (UniEdit-Flow) with the source prompt (`uniinv`).

Step size. Near a fixed point the error evolves as `e_{k+1} = (I - eta J) e_k`, `J` the Jacobian of `f_c`. If along
the iterates the symmetric part of `J` is at least `m > 0` and its norm at most `L`, then
`||I - eta J||^2 <= 1 - 2 eta m + eta^2 L^2 < 1` for `0 < eta < 2 m / L^2`: the iteration contracts, and the bound is
best at `eta = m / L^2` (for `J = a I`, `eta = 1 / a` converges in one step).

`step_size="auto"` estimates `L` from the solve itself, by power iteration on finite differences
`(f_c(z + d) - f_c(z)) / |d|`, and starts at `eta = 1 / L`: the right step when `J` is close to `L I`, but above the
bound `2 m / L^2` whenever `m < L / 2`. What it guarantees comes from backtracking, per image: a step whose residual
`|f_c(z_{k+1}) - y|` is larger than the current one is rejected and `eta` halved, so the residual of the accepted
iterates never increases (an image gives up when its step has shrunk 64-fold).

A fixed step size follows the paper's code: every iteration runs and is kept, whether or not it lowers the residual;
an image whose residual rose at some iteration is reported as diverged (`FlowOptResult.diverged`, and the run's
`stopped` is "diverged"). Early stopping happens only when asked for: `tolerance` (an image stops once its residual
per latent element is at most that) and `min_improvement` (an image stops once an iteration lowers its residual by less
than that fraction, or raises it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .checks import check_int, check_number, is_number

Solve = Callable[[torch.Tensor], torch.Tensor]
Velocity = Callable[[torch.Tensor, float], torch.Tensor]

# the defaults of the paper's code (tuned at 1024 px), per family and task
DEFAULTS = {
    ("sd3", "edit"): {"num_inference_steps": 15, "n_max": 12, "iterations": 8, "step_size": 0.01},
    ("flux", "edit"): {"num_inference_steps": 15, "n_max": 13, "iterations": 8, "step_size": 0.0025},
    ("sd3", "invert"): {"num_inference_steps": 10, "n_max": 10, "iterations": 30, "step_size": 0.01},
    ("flux", "invert"): {"num_inference_steps": 10, "n_max": 10, "iterations": 30, "step_size": 0.0025},
}
TARGET_GUIDANCE_SCALE = 3.5  # the paper's target guidance for editing (source: 1)


class FlowOptConfig(ConfigMixin):
    """The settings of a FlowOpt run. `FlowOptConfig.defaults(family, task)` gives the paper's.

    Args:
        num_inference_steps: `T`, the steps of the flow schedule.
        n_max: the steps the solve `f_c` runs, from grid index `T - n_max` (`n_max = T`: from pure noise).
        iterations: FlowOpt iterations (solves after the first; iterate 0 is "invert, then solve").
        step_size: `eta`, a positive number, or "auto" (see the module docstring).
        tolerance: stop an image when the RMS of `f_c(z) - y` per latent element falls to it (0: never).
        probes: power-iteration probes of "auto" (each one solve).
        min_improvement: stop an image when an iteration lowers its residual by less than this fraction of it, or
            raises it (0: never; the paper's code runs every iteration).
    """

    config_name = "flowopt_config.json"

    @register_to_config
    def __init__(
        self,
        num_inference_steps: int = 15,
        n_max: int = 12,
        iterations: int = 8,
        step_size: float | str = 0.01,
        tolerance: float = 0.0,
        probes: int = 2,
        min_improvement: float = 0.0,
    ):
        check_int("num_inference_steps", num_inference_steps, minimum=1)
        check_int("iterations", iterations, minimum=0)
        check_int("probes", probes, minimum=1)
        if isinstance(n_max, bool) or not isinstance(n_max, int) or not 1 <= n_max <= num_inference_steps:
            raise ValueError(
                f"`n_max` must be an int in [1, num_inference_steps={num_inference_steps}], got {n_max!r}"
            )
        if step_size != "auto" and not (is_number(step_size) and step_size > 0):
            raise ValueError(f"`step_size` must be a positive number or 'auto', got {step_size!r}")
        check_number("tolerance", tolerance, minimum=0)
        check_number("min_improvement", min_improvement, minimum=0, maximum=1)

    @classmethod
    def defaults(cls, family: str, task: str, **overrides) -> FlowOptConfig:
        """The paper's settings for `family` ("sd3", "flux") and `task` ("edit", "invert"), some replaced."""
        if (family, task) not in DEFAULTS:
            raise ValueError(f"no FlowOpt defaults for family {family!r} and task {task!r}; known: {sorted(DEFAULTS)}")
        known = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**DEFAULTS[(family, task)], **known})

    @property
    def n_start(self) -> int:
        """The grid index the solves start from."""
        return self.config.num_inference_steps - self.config.n_max


@dataclass
class FlowOptResult:
    """What a FlowOpt run returns; per-image values are lists over the batch."""

    latents: torch.Tensor
    """The optimised `z` (float32)."""
    solution: torch.Tensor
    """`f_c(z)` of the final `z` (float32): the result's latents."""
    residuals: list[list[float]]
    """Per iteration (0 = the first solve) and image: RMS of `f_c(z_k) - y` of the accepted iterate."""
    step_sizes: list[list[float]]
    """Per iteration and image: the `eta` in use."""
    iterates: list[torch.Tensor] = field(default_factory=list)
    """`f_c(z_k)` per accepted iteration, when asked for."""
    solves: int = 0
    """Solves run, probes and rejected steps included."""
    stopped: str = "iterations"
    """Why the run ended: "iterations" (all ran), "converged" (every image stopped early: its tolerance, too small an
    improvement, or "auto" gave up), "diverged" (an image's residual rose at a kept iteration) or "callback"."""
    outcomes: list[str] = field(default_factory=list)
    """Per image: "iterations", "tolerance", "stalled" (less than `min_improvement`), "diverged" (its residual rose;
    with `min_improvement` it stopped there), "gave up" ("auto"'s step shrank 64-fold) or "callback"."""
    diverged: list[bool] = field(default_factory=list)
    """Per image: whether its residual rose at a kept iteration (a fixed step too large for it)."""


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square per row."""
    return x.flatten(1).pow(2).mean(1).sqrt()


def rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.ndim - 1)).to(like.device)


def uniinv(velocity: Velocity, y: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """UniInv (UniEdit-Flow, as FlowOpt's code initialises `z`): clean latents `y` to noise level `sigmas[-1]`
    along ascending `sigmas` (`s_0 = 0 < s_1 < ... < s_n`). With `v = v(y, s_0)`, each step predicts
    `x~ = x + d v`, evaluates `v = v(x~, s_{k+1})` there and moves `x <- x + d v`: n + 1 model evaluations."""
    x = y.float()
    v = velocity(y, sigmas[0]).float()
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = s_next - s
        v = velocity((x + d * v).to(y.dtype), s_next).float()
        x = x + d * v
    return x


def estimate_step_size(
    solve: Solve, z: torch.Tensor, fz: torch.Tensor, probes: int, generator: torch.Generator | None
) -> torch.Tensor:
    """`1 / L` per image, `L` the gain of `f_c` around `z` by power iteration on finite differences (one solve per
    probe); perturbations of RMS 5% of `z`'s (at least 0.05: latents are about unit scale)."""
    u = torch.randn(z.shape, generator=generator, device="cpu").to(z.device)
    size = 0.05 * rms(z).clamp_min(1.0)
    gain = torch.ones(z.shape[0], device=z.device)
    for _ in range(probes):
        d = u * rows(size / rms(u).clamp_min(1e-12), u)
        g = solve(z + d).float() - fz
        gain = rms(g) / size
        u = g
    return 1.0 / gain.clamp_min(1e-6)


def flowopt(
    solve: Solve,
    y: torch.Tensor,
    z: torch.Tensor,
    config: FlowOptConfig,
    callback: Callable[[int, dict], Any] | None = None,
    keep_iterates: bool = False,
    generator: torch.Generator | None = None,
) -> FlowOptResult:
    """Iterate eq. 6, `z <- z - eta (f_c(z) - y)`, from `z` for `config.iterations` iterations (a batch of images,
    each with its own residual, step size and outcome). The update runs in float32 whatever the model's dtype.

    `callback(iteration, {"latents": f_c(z_k), "noise_latents": z_k, "residuals": per image})` after every
    iteration (0 included); returning `{"stop": True}` ends the run there.
    """
    settings = config.config
    target, z = y.float(), z.float()
    fz = solve(z).float()
    solves, residual = 1, rms(fz - target)
    auto = settings.step_size == "auto"
    if auto:
        eta = estimate_step_size(solve, z, fz, settings.probes, generator)
        solves += settings.probes
    else:
        eta = torch.full((z.shape[0],), float(settings.step_size), device=z.device)
    floor = eta / 64  # "auto" gives up on an image whose step had to shrink this far
    outcomes = ["tolerance" if r <= settings.tolerance else "iterations" for r in residual.tolist()]
    active = torch.tensor([o == "iterations" for o in outcomes], device=z.device)
    diverged = torch.zeros_like(active)
    result = FlowOptResult(z, fz, [residual.tolist()], [eta.tolist()], [fz] if keep_iterates else [], solves)
    if _stop_requested(callback, 0, fz, z, residual):
        return _finish(result, z, fz, outcomes, diverged, "callback")
    for iteration in range(1, settings.iterations + 1):
        if not active.any():
            break
        proposal = torch.where(rows(active, z), z - eta.view(-1, *[1] * (z.ndim - 1)) * (fz - target), z)  # eq. 6
        f_proposal = solve(proposal).float()
        result.solves += 1
        r_proposal = rms(f_proposal - target)
        accepted = active & (r_proposal <= residual) if auto else active
        if auto:
            eta = torch.where(active & ~accepted, eta / 2, eta)
        rose = accepted & (r_proposal > residual)
        small = accepted & (r_proposal > residual * (1 - settings.min_improvement)) & ~rose
        z = torch.where(rows(accepted, z), proposal, z)
        fz = torch.where(rows(accepted, fz), f_proposal, fz)
        residual = torch.where(accepted, r_proposal, residual)
        diverged |= rose
        early = settings.min_improvement > 0
        ended = {
            "tolerance": accepted & (residual <= settings.tolerance),
            "diverged": rose if early else torch.zeros_like(rose),
            "stalled": small if early else torch.zeros_like(small),
            "gave up": active & (eta < floor),
        }
        for outcome, mask in ended.items():
            for image in (mask & active).nonzero().flatten().tolist():
                outcomes[image] = outcome
            active = active & ~mask
        result.residuals.append(residual.tolist())
        result.step_sizes.append(eta.tolist())
        if keep_iterates:
            result.iterates.append(fz)
        if _stop_requested(callback, iteration, fz, z, residual):
            outcomes = ["callback" if a else o for o, a in zip(outcomes, active.tolist(), strict=True)]
            return _finish(result, z, fz, outcomes, diverged, "callback")
    return _finish(result, z, fz, outcomes, diverged, None)


def _stop_requested(callback, iteration: int, fz: torch.Tensor, z: torch.Tensor, residual: torch.Tensor) -> bool:
    if callback is None:
        return False
    answer = callback(iteration, {"latents": fz, "noise_latents": z, "residuals": residual.tolist()})
    return bool(answer and answer.get("stop"))


def _finish(result, z, fz, outcomes: list[str], diverged: torch.Tensor, why: str | None) -> FlowOptResult:
    """The result with its final iterate, each image's outcome and the run's: `why`, else what the images say."""
    result.latents, result.solution, result.outcomes, result.diverged = z, fz, outcomes, diverged.tolist()
    if why is None:
        early = {"tolerance", "stalled", "gave up"}
        why = "diverged" if any(result.diverged) else "converged" if set(outcomes) <= early else "iterations"
    result.stopped = why
    return result
