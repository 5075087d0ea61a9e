"""Fidelity feedback: a real-vs-generated discriminator (arXiv 2509.16131, sec. 3: score `-log(p / (1 - p))` with
p the probability of "generated", i.e. the logit of "real")."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .base import Candidates, Evaluator
from .networks import ConvEncoder, load_network, save_network

REBUILD = "rebuild it with `guided-train-evaluator discriminator`"


class FidelityDiscriminator(Evaluator):
    """Scores decoded candidates by how real they look: the logit `log(p_real / (1 - p_real))` (a pixel evaluator).

    Images are resized to `image_size` (bilinear, antialiased) before the network.
    """

    space = "pixel"

    def __init__(self, image_size: int = 32, width: int = 32, name: str = "fidelity"):
        super().__init__(name)
        self.image_size = image_size
        self.network = ConvEncoder(3, image_size, 1, width=width)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logit of "real" for images in [-1, 1], shape (n,)."""
        self.network.to(images.device)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.network(images.to(next(self.network.parameters()).dtype)).squeeze(-1).float()

    def forward(self, candidates: Candidates) -> torch.Tensor:
        return self.logits(candidates.images)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        save_network(self.network, folder, kind="fidelity-discriminator")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, name: str = "fidelity") -> FidelityDiscriminator:
        network, _ = load_network(folder, "fidelity discriminator", REBUILD)
        evaluator = cls(network.config["size"], network.config["width"], name=name)
        evaluator.network = network
        return evaluator.eval()
