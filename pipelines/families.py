"""The pipeline families, named once: their guided classes, the diffusers classes they extend, which of them are flow
models."""

from __future__ import annotations

from typing import Literal

Family = Literal["sd", "sdxl", "sd3", "flux", "wan", "cogvideox"]
FAMILIES: tuple[str, ...] = ("sd", "sdxl", "sd3", "flux")
"""The image families."""
VIDEO_FAMILIES: tuple[str, ...] = ("wan", "cogvideox")
"""The video families: their latents have a frame axis and their outputs are `frames`."""
FLOW_FAMILIES: tuple[str, ...] = ("sd3", "flux")
"""The flow-matching image families: they edit (FlowOpt, FlowEdit) and take the FlowMatch schedulers (Wan is a flow
model too, without editing: docs/modular-and-video.md says why)."""
DIFFUSERS_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "wan": "WanPipeline",
    "cogvideox": "CogVideoXPipeline",
}


def guided_class(family: str) -> type:
    """The guided pipeline class of a family."""
    from . import (
        GuidedCogVideoXPipeline,
        GuidedFluxPipeline,
        GuidedStableDiffusion3Pipeline,
        GuidedStableDiffusionPipeline,
        GuidedStableDiffusionXLPipeline,
        GuidedWanPipeline,
    )

    classes = {
        "sd": GuidedStableDiffusionPipeline,
        "sdxl": GuidedStableDiffusionXLPipeline,
        "sd3": GuidedStableDiffusion3Pipeline,
        "flux": GuidedFluxPipeline,
        "wan": GuidedWanPipeline,
        "cogvideox": GuidedCogVideoXPipeline,
    }
    if family not in classes:
        raise ValueError(f"`family` must be one of {list(FAMILIES + VIDEO_FAMILIES)}, got {family!r}")
    return classes[family]


def family_of(pipe) -> str:
    """The family of a pipeline (a guided one or its diffusers parent), by its class."""
    import diffusers

    for family, name in DIFFUSERS_CLASSES.items():
        if isinstance(pipe, getattr(diffusers, name)):
            return family
    raise ValueError(
        f"{type(pipe).__name__} is none of the families {list(FAMILIES + VIDEO_FAMILIES)} "
        f"({list(DIFFUSERS_CLASSES.values())})"
    )


def family_of_class_name(class_name: str) -> str | None:
    """The family a `model_index.json` `_class_name` names (a diffusers class or its guided one), else None."""
    name = class_name.removeprefix("Guided")
    return next((family for family, diffusers_name in DIFFUSERS_CLASSES.items() if diffusers_name == name), None)
