"""Latent-space feedback: timestep-aware heads on noisy latents, distilled from a pixel evaluator, so that
dynamic guidance needs no VAE decode (arXiv 2509.16131, sec. 3.3)."""

from __future__ import annotations

import os
from typing import Literal

import torch

from .base import Candidates, Evaluator
from .embedding import EmbeddingEvaluator
from .networks import ConvEncoder, load_network, save_network
from .teachers import TeacherSpec, load_teacher, resolve_teacher, teacher_spec

REBUILD = "rebuild it with `guided-train-evaluator latent`"
KINDS = ("clip", "score")


class LatentEvaluator(Evaluator):
    """Scores latents at their noise level with a small network (a latent evaluator: no decode).

    kind "score": the network predicts a pixel evaluator's score of the clean image (e.g. the discriminator's
    logit, the aesthetic rating). kind "clip": it predicts the image embedding of the clean image by an image-text
    model (open_clip or transformers CLIP, PickScore, HPSv2), and the score is that model's own
    `scale * cos(prediction, text embedding)` with its text tower, so that prompt-dependent scores need no prompt in
    the network. `teacher` names that model: an open_clip name or "local-dir:<folder>" (a saved relative folder is
    found from the head's own folder, so that a head saved beside its CLIP, as the shipped shapes-world heads are,
    loads from anywhere), or a spec {"type": ..., ...} of `guidance.evaluators.teachers.TEACHERS`.
    `teacher_model` passes the loaded model instead of loading it again (its spec is saved when `teacher` is None).
    """

    space = "latent"

    def __init__(
        self,
        network: ConvEncoder,
        kind: Literal["clip", "score"],
        teacher: TeacherSpec | None = None,
        name: str | None = None,
        *,
        teacher_model: EmbeddingEvaluator | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {list(KINDS)}, got {kind!r}")
        if teacher_model is not None and not isinstance(teacher_model, EmbeddingEvaluator):
            raise TypeError(
                "`teacher_model` must be an EmbeddingEvaluator (an image-text model), got "
                f"{type(teacher_model).__name__}"
            )
        if teacher is None and teacher_model is not None:
            teacher = teacher_spec(teacher_model)
        if kind == "clip" and not teacher:
            raise ValueError("`teacher` (the CLIP whose text tower scores the predicted embedding) is required")
        super().__init__(name or f"latent-{kind}")
        self.network, self.kind, self.teacher = network, kind, teacher
        self.clip = (teacher_model or load_teacher(teacher)) if kind == "clip" else None

    def forward(self, candidates: Candidates) -> torch.Tensor:
        config = self.network.config
        expected = (config["in_channels"], config["size"], config["size"])
        if tuple(candidates.latents.shape[1:]) != expected:
            raise ValueError(
                f"evaluator {self.name!r} reads latents of shape {expected} (the model and image size it was trained "
                f"for), got {tuple(candidates.latents.shape[1:])}"
            )
        output = self.predict(candidates.latents, candidates.timestep)
        if self.kind == "score":
            return output.squeeze(-1)
        return self.clip.similarity(output, candidates.require_prompts(self.name))

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The network's output: the predicted score (n, 1) or image embedding (n, dim), in float32."""
        self.network.to(latents.device)
        latents = latents.to(next(self.network.parameters()).dtype)
        return self.network(latents, timestep.to(latents.device)).float()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        save_network(self.network, folder, kind=self.kind, teacher=self.teacher, evaluator="latent")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, name: str | None = None) -> LatentEvaluator:
        network, extra = load_network(folder, "latent evaluator", REBUILD)
        if extra.get("evaluator") != "latent" or extra.get("kind") not in KINDS:
            raise ValueError(f"latent evaluator in {str(folder)!r} is corrupt (no latent evaluator config); {REBUILD}")
        return cls(network, extra["kind"], resolve_teacher(extra.get("teacher"), folder), name=name).eval()
