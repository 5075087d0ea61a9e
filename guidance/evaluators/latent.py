"""Latent-space feedback: timestep-aware heads on noisy latents, distilled from a pixel evaluator, so that
dynamic guidance needs no VAE decode (arXiv 2509.16131, sec. 3.3)."""

from __future__ import annotations

import os
from typing import Literal

import torch

from .base import Candidates, Evaluator
from .clip import ClipEvaluator
from .networks import ConvEncoder, load_network, save_network

REBUILD = "rebuild it with `guided-train-evaluator latent`"
KINDS = ("clip", "score")


class LatentEvaluator(Evaluator):
    """Scores latents at their noise level with a small network (a latent evaluator: no decode).

    kind "score": the network predicts a pixel evaluator's score of the clean image (e.g. the discriminator's
    logit). kind "clip": it predicts the CLIP image embedding of the clean image, and the score is
    `100 * cos(prediction, text embedding)` with the teacher CLIP's text tower (`teacher`, an open_clip model
    name or "local-dir:<folder>"; a saved relative folder is found from the head's own folder, so that a head saved
    beside its CLIP, as the shipped shapes-world heads are, loads from anywhere).
    """

    space = "latent"

    def __init__(
        self,
        network: ConvEncoder,
        kind: Literal["clip", "score"],
        teacher: str | None = None,
        name: str | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {list(KINDS)}, got {kind!r}")
        if kind == "clip" and not teacher:
            raise ValueError("`teacher` (the CLIP whose text tower scores the predicted embedding) is required")
        super().__init__(name or f"latent-{kind}")
        self.network, self.kind, self.teacher = network, kind, teacher
        self.clip = ClipEvaluator(teacher) if kind == "clip" else None

    def forward(self, candidates: Candidates) -> torch.Tensor:
        config = self.network.config
        expected = (config["in_channels"], config["size"], config["size"])
        if tuple(candidates.latents.shape[1:]) != expected:
            raise ValueError(
                f"evaluator {self.name!r} reads latents of shape {expected} (the model and image size it was trained "
                f"for), got {tuple(candidates.latents.shape[1:])}"
            )
        self.network.to(candidates.latents.device)
        latents = candidates.latents.to(next(self.network.parameters()).dtype)
        output = self.network(latents, candidates.timestep.to(latents.device))
        if self.kind == "score":
            return output.squeeze(-1)
        prompts = candidates.require_prompts(self.name)
        self.clip.to(latents.device)
        text = self.clip.text_features(prompts, latents.device)
        return 100 * (torch.nn.functional.normalize(output, dim=-1) * text).sum(-1)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        save_network(self.network, folder, kind=self.kind, teacher=self.teacher, evaluator="latent")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, name: str | None = None) -> LatentEvaluator:
        network, extra = load_network(folder, "latent evaluator", REBUILD)
        if extra.get("evaluator") != "latent" or extra.get("kind") not in KINDS:
            raise ValueError(f"latent evaluator in {str(folder)!r} is corrupt (no latent evaluator config); {REBUILD}")
        return cls(network, extra["kind"], resolve_teacher(extra.get("teacher"), folder), name=name).eval()


def resolve_teacher(teacher: str | None, folder: str | os.PathLike) -> str | None:
    """A saved "local-dir:<relative folder>" made absolute from the head's folder; any other name as it is."""
    if teacher is None or not teacher.startswith("local-dir:") or os.path.isabs(teacher.removeprefix("local-dir:")):
        return teacher
    return "local-dir:" + os.path.normpath(os.path.join(os.fspath(folder), teacher.removeprefix("local-dir:")))
