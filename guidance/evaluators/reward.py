"""Reward-model feedback: any image-text scoring callable, or a CLIP-style preference model (PickScore-like)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .base import Candidates, Evaluator, prepare_images


class RewardEvaluator(Evaluator):
    """Scores decoded candidates with `reward_fn(images, prompts) -> (n,)` (images in [-1, 1]; a pixel evaluator).

    `RewardEvaluator.from_pretrained(folder)` loads a CLIP-style preference model saved with transformers
    (`CLIPModel` + its processor) and scores `logit_scale * cos(image, text)`, PickScore's reward.
    """

    space = "pixel"

    def __init__(self, reward_fn: Callable[[torch.Tensor, list[str] | None], torch.Tensor], name: str = "reward"):
        if not callable(reward_fn):
            raise TypeError(
                f"`reward_fn` must be callable (images, prompts) -> scores, got {type(reward_fn).__name__}"
            )
        super().__init__(name)
        self.reward_fn = reward_fn

    def forward(self, candidates: Candidates) -> torch.Tensor:
        return self.reward_fn(candidates.images, candidates.prompts)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, name: str = "reward") -> RewardEvaluator:
        from transformers import AutoProcessor, CLIPModel

        if not os.path.isdir(folder):
            raise ValueError(f"`folder` must be a local folder with a transformers CLIP model, got {str(folder)!r}")
        try:
            model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False)
            processor = AutoProcessor.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"no CLIP-style preference model could be loaded from {str(folder)!r}: {error}"
            ) from error
        image_processor = processor.image_processor
        crop = getattr(image_processor, "crop_size", None) or image_processor.size
        size = (crop["height"], crop["width"]) if "height" in crop else (crop["shortest_edge"],) * 2

        def preference(images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
            if prompts is None:
                raise ValueError(f"evaluator {name!r} scores image-text preference and needs the prompts")
            model.to(images.device)
            pixels = prepare_images(images, size, image_processor.image_mean, image_processor.image_std)
            text = processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(images.device)
            image_embeds = torch.nn.functional.normalize(
                features(model.get_image_features(pixel_values=pixels)), dim=-1
            )
            text_embeds = torch.nn.functional.normalize(features(model.get_text_features(**text)), dim=-1)
            return model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)

        return cls(preference, name=name)


def features(output) -> torch.Tensor:
    """Projected embeddings from `get_*_features`: a tensor (transformers 4) or an output's pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
