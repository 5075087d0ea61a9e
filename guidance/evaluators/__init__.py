"""Evaluators: the online feedback of dynamic guidance, one interface (batched, one score per sample)."""

from .base import Candidates, Evaluator
from .clip import ClipEvaluator
from .reward import RewardEvaluator

__all__ = ["Candidates", "ClipEvaluator", "Evaluator", "RewardEvaluator"]
