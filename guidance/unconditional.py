"""Which weights compute the unconditional branch of CFG: the base model, another model, or the base model with
its weights switched for that pass only (an adapter such as Self-NPO's negative-preference LoRA, arXiv 2505.11777).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch


class UnconditionalModel:
    """The model of the unconditional branch. `shares_pass`: its rows join the conditional rows in one batched
    forward pass of the base denoiser (only when they are the same weights)."""

    shares_pass: bool = True

    def denoiser(self, base: torch.nn.Module) -> torch.nn.Module:
        """The module that computes the unconditional rows, given the pipeline's denoiser."""
        return base

    def context(self, denoiser: torch.nn.Module) -> ContextManager:
        """Entered around the unconditional forward pass; must leave the model as it found it on exit."""
        return contextlib.nullcontext()

    def rows_context(self, denoiser: torch.nn.Module, branches: list[str]) -> ContextManager:
        """Entered around a forward pass shared by several branches (`shares_pass`); `branches[i]` names the branch
        of batch row i ("uncond", "cond"). A model that treats rows differently in one pass (an adapter applied to
        the unconditional rows only) hooks in here; must leave the model as it found it on exit."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BaseModel(UnconditionalModel):
    """The pipeline's own denoiser: the unconditional rows are batched with the conditional ones, as in diffusers."""


BASE_MODEL = BaseModel()


class SeparateModel(UnconditionalModel):
    """Another denoiser of the same family and input layout (a fine-tune, a negative-preference copy) computes
    the unconditional rows, in a forward pass of its own."""

    shares_pass = False

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module (a denoiser), got {type(model).__name__}")
        self.model = model

    def denoiser(self, base: torch.nn.Module) -> torch.nn.Module:
        mine, theirs = next(self.model.parameters()), next(base.parameters())
        if (mine.device, mine.dtype) != (theirs.device, theirs.dtype):
            raise ValueError(
                f"the unconditional model is on {mine.device} in {mine.dtype}, the pipeline's denoiser on "
                f"{theirs.device} in {theirs.dtype}: move it with `.to(...)`"
            )
        return self.model

    def __repr__(self) -> str:
        return f"SeparateModel({type(self.model).__name__})"


class SwitchedModel(UnconditionalModel):
    """The base denoiser with its weights switched for the unconditional pass only, by `switch(denoiser)`: a
    context manager that changes the weights on entry and restores them on exit (e.g. enables a LoRA adapter)."""

    shares_pass = False

    def __init__(self, switch: Callable[[torch.nn.Module], ContextManager]):
        if not callable(switch):
            raise TypeError(f"`switch` must be a callable returning a context manager, got {type(switch).__name__}")
        self.switch = switch

    def context(self, denoiser: torch.nn.Module) -> ContextManager:
        return self.switch(denoiser)

    def __repr__(self) -> str:
        return f"SwitchedModel({getattr(self.switch, '__name__', type(self.switch).__name__)})"
