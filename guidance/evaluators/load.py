"""Evaluators from short specifications, as the command line and the demo name them."""

from __future__ import annotations

import json
from pathlib import Path

from .base import Evaluator


def load_evaluator(spec: str) -> Evaluator:
    """ "clip" (the shapes-world CLIP), "clip:<open_clip model or local-dir:folder>", or the folder of a trained
    evaluator (a fidelity discriminator or a latent evaluator, told apart by its config.json)."""
    from .clip import ClipEvaluator
    from .discriminator import FidelityDiscriminator
    from .latent import LatentEvaluator

    if spec == "clip":
        return ClipEvaluator()
    if spec.startswith("clip:"):
        return ClipEvaluator(spec.removeprefix("clip:"))
    config = Path(spec) / "config.json"
    if not config.is_file():
        raise ValueError(
            f"evaluator {spec!r} is neither 'clip', 'clip:<model>' nor a folder with a trained evaluator's config.json"
        )
    if json.loads(config.read_text()).get("evaluator") == "latent":
        return LatentEvaluator.from_pretrained(spec, name=Path(spec).name)
    return FidelityDiscriminator.from_pretrained(spec, name=Path(spec).name)
