"""Guided pipelines from the model names the commands and the demo take, parsed here only: a diffusers folder or hub
id of any supported family (read from its `model_index.json`), `shapes:<sd|sd3>` (the shipped shapes-world models) or
`tiny:<family>` (tiny random components, for smoke runs)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from guidance.shapes.assets import SHAPES_SD3_MAX_SEQUENCE_LENGTH, asset_path, rebuild_hint

from ..families import (
    DIFFUSERS_CLASSES,
    FAMILIES,
    FLOW_FAMILIES,
    VIDEO_FAMILIES,
    family_of_class_name,
    guided_class,
)
from ..sampler import check_model_path
from ..schedulers import set_scheduler
from ..testing import tiny_components

EMBEDDED_DEFAULT = "shapes:sd"  # the shapes-world SD model shipped in assets/: the demo's first model
SHAPES_MODELS = {"shapes:sd": "shapes-sd", "shapes:sd3": "shapes-sd3"}
SHAPES_FAMILIES = {"shapes:sd": "sd", "shapes:sd3": "sd3"}


def model_family(model: str, argument: str = "`--model`") -> str:
    """The family a model name stands for (see the module docstring); `argument` names the model in errors. A folder
    or hub id is read from the `_class_name` of its `model_index.json` (offline: from the local cache)."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"{argument} must be a model name, got {model!r}")
    if model.startswith("shapes:"):
        if model not in SHAPES_MODELS:
            raise ValueError(f"{argument} shapes:<model> takes one of {sorted(SHAPES_MODELS)}, got {model!r}")
        return SHAPES_FAMILIES[model]
    if model.startswith("tiny:"):
        if model.removeprefix("tiny:") not in FAMILIES:
            raise ValueError(f"{argument} tiny:<family> takes a family in {list(FAMILIES)}, got {model!r}")
        return model.removeprefix("tiny:")
    from diffusers import DiffusionPipeline

    check_model_path(model)
    try:
        index = DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as error:
        where = "folder" if os.path.isdir(model) else "hub id (reachable, or in the local cache when offline)"
        raise ValueError(f"{argument} {model!r}: no readable model_index.json in this {where}: {error}") from error
    class_name = str(index.get("_class_name", ""))
    family = family_of_class_name(class_name)
    if family in VIDEO_FAMILIES:
        raise ValueError(
            f"{argument} {model!r} is a {class_name}, a video model: the commands and the demo make images; use "
            f"{guided_class(family).__name__} from Python (docs/modular-and-video.md)"
        )
    if family is None:
        raise ValueError(
            f"{argument} {model!r} is a {class_name or 'pipeline of unknown class'}; supported: "
            f"{sorted(DIFFUSERS_CLASSES[family] for family in FAMILIES)}"
        )
    return family


def is_flow_model(model: str, argument: str = "`--model`") -> bool:
    return model_family(model, argument) in FLOW_FAMILIES


def load_shapes_pipeline(name: str, root: str | Path | None = None, **kwargs):
    """A guided pipeline of a shipped shapes-world model ("shapes-sd" or "shapes-sd3"), on the CPU."""
    families = {"shapes-sd": "sd", "shapes-sd3": "sd3"}
    if name not in families:
        raise ValueError(f"`name` must be one of {sorted(families)}, got {name!r}")
    folder = asset_path(name, root)
    try:
        return guided_class(families[name]).from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"asset {str(folder)!r} could not be loaded ({error}); {rebuild_hint(name)}") from error


def load_pipeline(
    model: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    scheduler: str | None = None,
    argument: str = "`--model`",
):
    """(guided pipeline, family) of a model name (see the module docstring), with `scheduler` (a name of
    `pipelines.schedulers.SCHEDULERS`) in place of its own when given."""
    family = model_family(model, argument)
    if model in SHAPES_MODELS:
        pipe = load_shapes_pipeline(SHAPES_MODELS[model], dtype=dtype)
    elif model.startswith("tiny:"):
        pipe = guided_class(family)(**tiny_components(family))
        pipe.to(dtype=dtype)
    else:
        pipe = guided_class(family).from_pretrained(model, dtype=dtype)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    return pipe.to(device), family


def call_defaults(model: str, family: str, max_sequence_length: int | None = None) -> dict:
    """Extra pipeline arguments a model needs: the text length shapes:sd3 was trained with."""
    if family not in FLOW_FAMILIES:
        return {}
    if max_sequence_length is None and model == "shapes:sd3":
        max_sequence_length = SHAPES_SD3_MAX_SEQUENCE_LENGTH
    return {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
