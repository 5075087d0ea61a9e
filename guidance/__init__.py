"""Guidance schedulers: per-step decisions about classifier-free guidance for diffusers pipelines."""

from .cfg import ClassifierFreeGuidance
from .scheduled import ScheduledGuidance
from .scheduler import BRANCH_NAMES, BranchRequest, GuidanceScheduler, GuidanceStep
from .trace import GuidanceTrace

__all__ = [
    "BRANCH_NAMES",
    "BranchRequest",
    "ClassifierFreeGuidance",
    "GuidanceScheduler",
    "GuidanceStep",
    "GuidanceTrace",
    "ScheduledGuidance",
]
