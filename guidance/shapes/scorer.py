"""The attribute scorer: a small CNN that reads colour, shape, size, position and background off an image.

The objective metric of the benchmarks (does the image follow its prompt?), deliberately separate from the
CLIP model used as feedback by guidance methods.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .world import ATTRIBUTES, Scene, ShapesWorld

REBUILD_HINT = "rebuild it with `python -m pipelines.application.commands.train_shapes scorer`"


class AttributeScorer(nn.Module):
    """Images (n, 3, 32, 32) in [-1, 1] -> one logit vector per attribute."""

    def __init__(self, classes: dict[str, int], width: int = 32):
        super().__init__()
        self.classes = dict(classes)
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # 16x16
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),  # 8x8
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),  # 4x4: keeps where the shape is
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 128),
            nn.GELU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, count) for name, count in self.classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: logits.argmax(-1) for name, logits in self(images).items()}

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, scenes: list[Scene], world: ShapesWorld) -> dict[str, float]:
        """Fraction of images whose predicted attribute equals the scene's, per attribute."""
        predicted, truth = self.predict(images), world.labels(scenes)
        return {name: (predicted[name] == truth[name]).float().mean().item() for name in ATTRIBUTES}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"classes": self.classes, "width": self.width}, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> AttributeScorer:
        folder = Path(folder)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"attribute scorer file {str(path)!r} is missing; {REBUILD_HINT}")
        try:
            config = json.loads(config_path.read_text())
            scorer = cls(config["classes"], config["width"])
            scorer.load_state_dict(load_file(weights_path))
        except Exception as error:  # any parse or shape error means the files do not belong together
            reason = str(error).strip().splitlines()[0]
            raise ValueError(f"attribute scorer in {str(folder)!r} is corrupt ({reason}); {REBUILD_HINT}") from error
        return scorer.eval()
