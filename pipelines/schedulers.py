"""The diffusers schedulers people use, by short name: `set_scheduler(pipe, "dpm++2m-karras")` swaps the pipeline's
scheduler for one built from its config (`Scheduler.from_config(pipe.scheduler.config, **overrides)`), as diffusers'
documentation does. Every shipped policy works with each (tests/pipelines/test_schedulers.py)."""

from __future__ import annotations

import diffusers

from guidance.denoised import is_flow_matching

# name: (diffusers class, config overrides, model kind: "diffusion" (SD 1.x/2.x, SDXL) or "flow" (SD3, Flux))
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "diffusion"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "diffusion"),  # Stable Diffusion 1.5's default
    "pndm-prk": ("PNDMScheduler", {"skip_prk_steps": False}, "diffusion"),  # with its Runge-Kutta warm-up
    "dpm++2m": ("DPMSolverMultistepScheduler", {}, "diffusion"),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "diffusion"),
    "dpm-sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}, "diffusion"),  # needs torchsde
    "euler": ("EulerDiscreteScheduler", {}, "diffusion"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "diffusion"),
    "heun": ("HeunDiscreteScheduler", {}, "diffusion"),
    "lms": ("LMSDiscreteScheduler", {}, "diffusion"),  # needs scipy
    "unipc": ("UniPCMultistepScheduler", {}, "diffusion"),
    "deis": ("DEISMultistepScheduler", {}, "diffusion"),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}, "flow"),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}, "flow"),
}


def set_scheduler(pipe, name: str):
    """`pipe` with its scheduler replaced by scheduler `name` (see `SCHEDULERS`), built from its current config."""
    if name not in SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {sorted(SCHEDULERS)}, got {name!r}")
    class_name, overrides, kind = SCHEDULERS[name]
    flow = is_flow_matching(pipe.scheduler)
    if (kind == "flow") != flow:
        wanted = "flow-matching (SD3, Flux)" if kind == "flow" else "diffusion (SD 1.x/2.x, SDXL)"
        raise ValueError(
            f"`scheduler` {name!r} is for {wanted} models; this pipeline uses {type(pipe.scheduler).__name__}: choose "
            f"one of {sorted(n for n, (_, _, k) in SCHEDULERS.items() if (k == 'flow') == flow)}"
        )
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    return pipe
