"""The pipeline families, named once: their guided classes, the diffusers classes they extend, which of them are flow
models."""

from __future__ import annotations

from typing import Literal

Family = Literal["sd", "sdxl", "sd3", "flux"]
FAMILIES: tuple[str, ...] = ("sd", "sdxl", "sd3", "flux")
FLOW_FAMILIES: tuple[str, ...] = ("sd3", "flux")
"""The flow-matching families: they edit (FlowOpt, FlowEdit) and take the FlowMatch schedulers."""
DIFFUSERS_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


def guided_class(family: str) -> type:
    """The guided pipeline class of a family."""
    from . import (
        GuidedFluxPipeline,
        GuidedStableDiffusion3Pipeline,
        GuidedStableDiffusionPipeline,
        GuidedStableDiffusionXLPipeline,
    )

    classes = {
        "sd": GuidedStableDiffusionPipeline,
        "sdxl": GuidedStableDiffusionXLPipeline,
        "sd3": GuidedStableDiffusion3Pipeline,
        "flux": GuidedFluxPipeline,
    }
    if family not in classes:
        raise ValueError(f"`family` must be one of {list(FAMILIES)}, got {family!r}")
    return classes[family]


def family_of(pipe) -> str:
    """The family of a pipeline (a guided one or its diffusers parent), by its class."""
    import diffusers

    for family, name in DIFFUSERS_CLASSES.items():
        if isinstance(pipe, getattr(diffusers, name)):
            return family
    raise ValueError(
        f"{type(pipe).__name__} is none of the families {list(FAMILIES)} ({list(DIFFUSERS_CLASSES.values())})"
    )


def family_of_class_name(class_name: str) -> str | None:
    """The family a `model_index.json` `_class_name` names (a diffusers class or its guided one), else None."""
    name = class_name.removeprefix("Guided")
    return next((family for family, diffusers_name in DIFFUSERS_CLASSES.items() if diffusers_name == name), None)
