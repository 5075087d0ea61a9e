"""The shapes world: a generated text-to-image world and the tiny models trained on it (the embedded default)."""

from .world import Scene, ShapesWorld

__all__ = ["Scene", "ShapesWorld"]
