"""Guidance schedulers: per-step decisions about classifier-free guidance for diffusers pipelines."""

from .adaptive import AdaptiveGuidance
from .cfg import ClassifierFreeGuidance
from .dynamic import DynamicGuidance
from .linear_ag import LinearAdaptiveGuidance
from .scheduled import ScheduledGuidance
from .scheduler import BRANCH_NAMES, BranchRequest, GuidanceScheduler, GuidanceStep
from .trace import GuidanceTrace

__all__ = [
    "AdaptiveGuidance",
    "BRANCH_NAMES",
    "BranchRequest",
    "ClassifierFreeGuidance",
    "DynamicGuidance",
    "GuidanceScheduler",
    "GuidanceStep",
    "GuidanceTrace",
    "LinearAdaptiveGuidance",
    "ScheduledGuidance",
]
