"""FlowOpt's iteration, step-size rule and settings, and UniInv and FlowEdit, on solves whose answers are known."""

import pytest
import torch

from guidance.flowedit import flowedit
from guidance.flowopt import FlowOptConfig, estimate_step_size, flowopt, rms, uniinv


def linear_solve(gains: torch.Tensor, offset: float = 0.3):
    """f(z) = gains * z + offset per row: a solve with Jacobian `diag(gains)`, so the contraction condition of
    the module docstring reads 0 < eta < 2 / gain."""
    calls = []

    def solve(z: torch.Tensor) -> torch.Tensor:
        calls.append(z.dtype)
        return gains.view(-1, *[1] * (z.ndim - 1)) * z + offset

    return solve, calls


def config(**settings) -> FlowOptConfig:
    return FlowOptConfig(**{"num_inference_steps": 4, "n_max": 3, **settings})


def decreasing(values: list[float]) -> bool:
    return all(b <= a for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(("step_size", "converges"), [(0.3, True), (0.9, True), (1.1, False)])
def test_a_fixed_step_converges_exactly_below_two_over_the_gain(step_size, converges):
    solve, _ = linear_solve(torch.tensor([2.0]))
    y, z = torch.ones(1, 4, 3, 3), torch.zeros(1, 4, 3, 3)
    result = flowopt(solve, y, z, config(iterations=20, step_size=step_size))
    first, last = result.residuals[0][0], result.residuals[-1][0]
    # the error contracts by |1 - eta * gain| per iteration: 0.4, 0.8, then 1.2 (diverges)
    assert (last < first * 1e-1) is converges and (last > first) is not converges
    if converges:
        expected = first * abs(1 - step_size * 2.0) ** 20
        assert last == pytest.approx(expected, rel=1e-3, abs=1e-6)
        torch.testing.assert_close(solve(result.latents), y, atol=1e-2, rtol=0)


def test_auto_finds_the_step_per_image_and_the_residual_never_increases():
    gains = torch.tensor([0.5, 8.0])  # a fixed eta of 0.3 diverges on the second image (0.3 > 2 / 8)
    solve, _ = linear_solve(gains)
    y, z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 4, 3, 3)
    result = flowopt(solve, y, z, config(iterations=6, step_size="auto"), generator=torch.Generator().manual_seed(1))
    assert result.step_sizes[0] == pytest.approx([2.0, 0.125], rel=1e-4)  # 1 / gain, read off the solve
    for image in range(2):
        residuals = [step[image] for step in result.residuals]
        assert decreasing(residuals) and residuals[-1] < 1e-4 * residuals[0]
    fixed = flowopt(solve, y, z, config(iterations=6, step_size=0.3))
    assert fixed.residuals[-1][1] > fixed.residuals[0][1]  # what auto avoids


def test_auto_backtracks_where_the_solve_amplifies_more_than_the_probe_saw():
    def solve(z):  # gain 1 for |z| < 1, 10 further out: the probe at 0 sees 1, so eta = 1 overshoots
        return torch.where(z.abs() < 1, z, 10 * z - 9 * torch.sign(z))

    y, z = torch.full((1, 8), 2.5), torch.zeros(1, 8)
    result = flowopt(solve, y, z, config(iterations=12, step_size="auto"), generator=torch.Generator().manual_seed(0))
    assert result.step_sizes[0][0] == pytest.approx(1.0, rel=1e-4)
    residuals = [step[0] for step in result.residuals]
    assert decreasing(residuals) and residuals[-1] < 0.01 * residuals[0]
    assert min(step[0] for step in result.step_sizes) < result.step_sizes[0][0]  # it halved at least once
    assert result.solves > len(residuals) + 1  # rejected steps cost solves too


def test_the_step_size_estimate_is_one_over_the_gain():
    solve, _ = linear_solve(torch.tensor([4.0, 0.25]))
    z = torch.randn(2, 16)
    eta = estimate_step_size(solve, z, solve(z), probes=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eta, torch.tensor([0.25, 4.0]), rtol=1e-4, atol=0)


def test_the_tolerance_stops_an_image_and_the_run_when_all_are_done():
    solve, _ = linear_solve(torch.tensor([1.0, 1.0]))
    y, z = torch.ones(2, 4), torch.zeros(2, 4)
    z[1] = 0.69  # the second image starts at the tolerance: it never moves
    result = flowopt(solve, y, z, config(iterations=10, step_size=0.5, tolerance=0.02))
    assert result.stopped == "converged" and len(result.residuals) < 11
    assert result.residuals[-1][0] <= 0.02
    assert result.residuals[-1][1] == pytest.approx(0.01, abs=1e-6)
    torch.testing.assert_close(result.latents[1], z[1])


def test_an_image_stops_improving_only_where_early_stopping_is_asked_for():
    def solve(z):  # a floor: no z brings the residual below 1
        return z.clamp(max=2.0)

    y, z = torch.full((1, 4), 3.0), torch.zeros(1, 4)
    every = flowopt(solve, y, z, config(iterations=20, step_size=0.5))  # the paper's code: a fixed N, no early stop
    assert every.stopped == "iterations" and len(every.residuals) == 21 and every.outcomes == ["iterations"]
    early = flowopt(solve, y, z, config(iterations=20, step_size=0.5, min_improvement=1e-3))
    assert early.stopped == "converged" and early.outcomes == ["stalled"] and len(early.residuals) < 21


def test_a_fixed_step_that_raises_the_residual_is_reported_as_diverged():
    """Failure 3 of the real-models issue: eta 3.0 raised the residual, the run stopped and said "converged"."""
    solve, _ = linear_solve(torch.tensor([1.0, 1.0]))
    y, z = torch.ones(2, 4), torch.zeros(2, 4)
    result = flowopt(solve, y, z, config(iterations=5, step_size=3.0))  # |1 - 3| = 2: the error doubles
    first, second = result.residuals[0][0], result.residuals[1][0]
    assert second > first and len(result.residuals) == 6  # kept, as the paper's code keeps it, and it goes on
    assert result.stopped == "diverged" and result.diverged == [True, True] and result.outcomes == ["iterations"] * 2
    early = flowopt(solve, y, z, config(iterations=5, step_size=3.0, min_improvement=1e-3))
    assert early.stopped == "diverged" and early.outcomes == ["diverged"] * 2 and len(early.residuals) == 2
    fine = flowopt(solve, y, z, config(iterations=5, step_size=0.5))
    assert fine.stopped == "iterations" and fine.diverged == [False, False]


def test_the_papers_settings_run_every_iteration():
    """Failure 3 too: at the paper's settings the loop stopped after iteration 5 of 8 ("converged" when an iteration
    improved the residual by less than 0.1%)."""
    solve, _ = linear_solve(torch.tensor([1.0]))
    paper = FlowOptConfig.defaults("sd3", "edit")
    assert (paper.config.iterations, paper.config.step_size, paper.config.min_improvement) == (8, 0.01, 0.0)
    result = flowopt(solve, torch.ones(1, 4), torch.zeros(1, 4), paper)
    assert len(result.residuals) == 9 and result.stopped == "iterations"  # a tiny eta: 0.1% a step, never stops


def test_the_callback_sees_every_iterate_and_can_stop_the_run():
    solve, _ = linear_solve(torch.tensor([1.0]))
    seen = []

    def callback(iteration, tensors):
        seen.append((iteration, sorted(tensors), tensors["residuals"]))
        return {"stop": True} if iteration == 2 else None

    y, z = torch.ones(1, 4), torch.zeros(1, 4)
    result = flowopt(solve, y, z, config(iterations=8, step_size=0.5), callback=callback, keep_iterates=True)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == ["latents", "noise_latents", "residuals"]
    assert result.stopped == "callback" and len(result.residuals) == 3 and len(result.iterates) == 3
    torch.testing.assert_close(result.solution, result.iterates[-1])
    assert [s[2] for s in seen] == result.residuals


def test_the_update_runs_in_float32_whatever_the_models_dtype():
    solve, calls = linear_solve(torch.tensor([1.0]))
    y = torch.ones(1, 4, dtype=torch.bfloat16)
    result = flowopt(solve, y, torch.zeros(1, 4, dtype=torch.bfloat16), config(iterations=2, step_size=0.5))
    assert result.latents.dtype == torch.float32 and result.solution.dtype == torch.float32
    assert set(calls) == {torch.float32}  # the caller casts to the model's dtype inside `solve`


def test_uniinv_is_exact_on_a_straight_flow_and_costs_n_plus_one_evaluations():
    calls = []
    direction = torch.randn(2, 4, 3, 3)

    def velocity(x, sigma):  # the flow of x_s = x_0 + s * direction
        calls.append(sigma)
        return direction.clone()

    y = torch.randn(2, 4, 3, 3)
    sigmas = [0.0, 0.2, 0.5, 0.9]
    torch.testing.assert_close(uniinv(velocity, y, sigmas), y + 0.9 * direction)
    assert calls == sigmas


def test_flowedit_with_equal_velocities_keeps_the_source_and_otherwise_moves_by_their_difference():
    x = torch.randn(1, 4, 3, 3)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]

    def velocity(z, i):
        return z * 2 + i

    torch.testing.assert_close(flowedit(velocity, velocity, x, sigmas, n_start=1), x)
    shifted = flowedit(lambda z, i: torch.full_like(z, i), lambda z, i: torch.full_like(z, i + 1.0), x, sigmas, 1)
    torch.testing.assert_close(shifted, x - 0.75)  # the sum of (t_next - t) * 1 from sigma 0.75 down to 0


def test_rms_is_per_row():
    torch.testing.assert_close(rms(torch.tensor([[3.0, 4.0], [1.0, 1.0]])), torch.tensor([12.5**0.5, 1.0]))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_max": 5}, r"`n_max` must be an int in \[1, num_inference_steps=4\], got 5"),
        ({"n_max": 0}, r"`n_max` must be an int in \[1, num_inference_steps=4\], got 0"),
        ({"iterations": -1}, "`iterations` must be an int >= 0, got -1"),
        ({"step_size": 0.0}, "`step_size` must be a positive number or 'auto', got 0.0"),
        ({"step_size": -0.1}, "`step_size` must be a positive number or 'auto', got -0.1"),
        ({"step_size": "fast"}, "`step_size` must be a positive number or 'auto', got 'fast'"),
        ({"step_size": True}, "`step_size` must be a positive number or 'auto', got True"),
        ({"tolerance": -1.0}, "`tolerance` must be a number >= 0, got -1.0"),
        ({"min_improvement": 2.0}, r"`min_improvement` must be a number in \[0, 1\], got 2.0"),
        ({"num_inference_steps": 0, "n_max": 0}, "`num_inference_steps` must be an int >= 1, got 0"),
        ({"probes": 0}, "`probes` must be an int >= 1, got 0"),
    ],
)
def test_bad_settings_are_rejected_with_the_argument_named(settings, message):
    with pytest.raises(ValueError, match=message):
        config(**settings)


def test_the_papers_defaults_per_family_and_task():
    sd3 = FlowOptConfig.defaults("sd3", "edit", iterations=3, step_size=None)
    settings = ("num_inference_steps", "n_max", "iterations", "step_size")
    assert [sd3.config[name] for name in settings] == [15, 12, 3, 0.01]
    assert sd3.n_start == 3
    flux = FlowOptConfig.defaults("flux", "edit")
    assert (flux.config.n_max, flux.config.step_size) == (13, 0.0025)
    inversion = FlowOptConfig.defaults("flux", "invert")
    assert (inversion.config.num_inference_steps, inversion.config.n_max, inversion.config.iterations) == (10, 10, 30)
    with pytest.raises(ValueError, match="no FlowOpt defaults for family 'sd' and task 'edit'"):
        FlowOptConfig.defaults("sd", "edit")
