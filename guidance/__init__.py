"""Guidance schedulers: per-step decisions about classifier-free guidance for diffusers pipelines.

A policy is composed of parts: which rows run the unconditional pass (a guidance interval, `AdaptiveSkip`,
`LinearAGSkip`), which scale each guided row gets (a number, `ScheduledScale`, `DynamicScale`, `GuiderScale`) and
which weights compute the unconditional branch (`SeparateModel`, `SwitchedModel`). The classes named after a
method are shorthands for common compositions. `flowopt` and `flowedit` hold the editing algorithms the flow
pipelines' `edit`, `invert` and `flowedit` run.
"""

from .adaptive import AdaptiveGuidance, AdaptiveSkip
from .cfg import ClassifierFreeGuidance, ComposedGuidance, UnconditionalSkip
from .diffusers_guider import GuiderScale
from .dynamic import DynamicGuidance, DynamicScale
from .flowopt import FlowOptConfig, FlowOptResult
from .linear_ag import LinearAdaptiveGuidance, LinearAGCalibration, LinearAGSkip
from .npo import NegativeAdapter, load_npo_adapter
from .scales import ConstantScale, GuidanceScale, ScheduledScale
from .scheduled import ScheduledGuidance
from .scheduler import (
    BRANCH_NAMES,
    BranchRequest,
    GuidancePart,
    GuidanceRun,
    GuidanceScheduler,
    GuidanceStep,
    GuidedPrediction,
    register_part,
)
from .trace import GuidanceTrace
from .unconditional import BaseModel, SeparateModel, SwitchedModel, UnconditionalModel

__all__ = [
    "AdaptiveGuidance",
    "AdaptiveSkip",
    "BRANCH_NAMES",
    "BaseModel",
    "BranchRequest",
    "ClassifierFreeGuidance",
    "ComposedGuidance",
    "ConstantScale",
    "DynamicGuidance",
    "DynamicScale",
    "FlowOptConfig",
    "FlowOptResult",
    "GuidanceRun",
    "GuidancePart",
    "GuidanceScale",
    "GuidanceScheduler",
    "GuidanceStep",
    "GuidanceTrace",
    "GuidedPrediction",
    "GuiderScale",
    "LinearAGCalibration",
    "LinearAGSkip",
    "LinearAdaptiveGuidance",
    "NegativeAdapter",
    "PolicyGuider",
    "ScheduledGuidance",
    "ScheduledScale",
    "SeparateModel",
    "SwitchedModel",
    "UnconditionalModel",
    "UnconditionalSkip",
    "load_npo_adapter",
    "register_part",
]


def __getattr__(name: str):
    """`PolicyGuider` on first use: diffusers' guiders import accelerate, which `import guidance` does not need."""
    if name == "PolicyGuider":
        from .guider import PolicyGuider

        return PolicyGuider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
