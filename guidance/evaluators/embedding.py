"""Image-text embedding models as evaluators: a score `scale * cos(image embedding, prompt embedding)`.

CLIP score (`scale` 100, arXiv 2104.08718), PickScore (`scale` = the model's own `logit_scale`, arXiv 2305.01569) and
HPSv2 (100, arXiv 2306.09341) are all of this form, so one latent head kind serves them: a network that predicts the
image embedding from noisy latents and is scored with the model's text tower (`LatentEvaluator`, kind "clip").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import Candidates, Evaluator, Preprocess


class EmbeddingEvaluator(Evaluator):
    """Scores decoded candidates by `scale * cos(image, prompt)` (a pixel evaluator).

    Subclasses set `preprocess` (the model's own image preprocessing) and `scale`, and implement `encode_images`
    (preprocessed pixels -> embeddings), `encode_texts` (prompts -> embeddings) and `spec` (the JSON-able
    arguments that load the same model again, with a "type" key of `guidance.evaluators.teachers.TEACHERS`).
    """

    space = "pixel"
    preprocess: Preprocess
    scale: float

    def __init__(self, name: str):
        super().__init__(name)
        self._text_features: dict[str, torch.Tensor] = {}

    @property
    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_texts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings of images in [-1, 1], (n, dim)."""
        self.to(images.device)
        return F.normalize(self.encode_images(self.preprocess(images)).float(), dim=-1)

    def text_features(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """Unit text embeddings of `prompts`, (n, dim); each prompt is encoded once and kept."""
        self.to(device)
        missing = sorted(set(prompts) - set(self._text_features))
        if missing:
            features = F.normalize(self.encode_texts(missing, device).float(), dim=-1)
            self._text_features.update(zip(missing, features, strict=True))
        return torch.stack([self._text_features[p].to(device) for p in prompts])

    def similarity(self, image_features: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """`scale * cos` of image embeddings (any norm) with the prompts' embeddings, (n,)."""
        text = self.text_features(prompts, image_features.device)
        return self.scale * (F.normalize(image_features.float(), dim=-1) * text).sum(-1)

    def scores(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """`scale * cos` of images in [-1, 1] with their prompts, (n,)."""
        prompts = Candidates.from_images(images, prompts).require_prompts(self.name)
        return self.similarity(self.image_features(images), prompts)

    def forward(self, candidates: Candidates) -> torch.Tensor:
        return self.similarity(self.image_features(candidates.images), candidates.require_prompts(self.name))
