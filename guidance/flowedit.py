"""FlowEdit (Kulikov et al., "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models",
arXiv 2412.08629), the inversion-free baseline FlowOpt is compared with.

From `z = x_src` (the source image's latents), at each step `t_i` of the flow schedule from grid index
`T - n_max`: draw fresh noise `eps`, form `z_src = (1 - t_i) x_src + t_i eps` and `z_tar = z + z_src - x_src`,
and move `z <- z + (t_{i+1} - t_i) (v_tar(z_tar) - v_src(z_src))`, the velocity difference averaged over `n_avg`
draws (Algorithm 1). The result is `z` at sigma 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# the defaults of FlowEdit's code, per family: T, n_max, and the source and target guidance (CFG for SD3, the
# guidance embedding for Flux)
DEFAULTS = {
    "sd3": {"num_inference_steps": 50, "n_max": 33, "source_guidance_scale": 3.5, "target_guidance_scale": 13.5},
    "flux": {"num_inference_steps": 28, "n_max": 24, "source_guidance_scale": 1.5, "target_guidance_scale": 5.5},
}
StepVelocity = Callable[[torch.Tensor, int], torch.Tensor]


def flowedit(
    v_source: StepVelocity,
    v_target: StepVelocity,
    x_source: torch.Tensor,
    sigmas: list[float],
    n_start: int,
    n_avg: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FlowEdit's Algorithm 1 in float32: `v_source(x, i)` and `v_target(x, i)` are the guided velocities at
    grid index `i`, `sigmas` the schedule (with its final 0); returns the edited latents."""
    x_src = x_source.float()
    z = x_src.clone()
    for i in range(n_start, len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        change = torch.zeros_like(z)
        for _ in range(n_avg):
            eps = torch.randn(z.shape, generator=generator, device="cpu").to(z.device)
            z_src = (1 - t) * x_src + t * eps
            z_tar = z + z_src - x_src
            v_src = v_source(z_src.to(x_source.dtype), i).float()
            v_tar = v_target(z_tar.to(x_source.dtype), i).float()
            change += (v_tar - v_src) / n_avg
        z = z + (t_next - t) * change
    return z
