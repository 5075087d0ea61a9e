"""Reward-model feedback: any image-text scoring callable (e.g. ImageReward), or a CLIP-style preference model."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .base import Candidates, Evaluator


class RewardEvaluator(Evaluator):
    """Scores decoded candidates with `reward_fn(images, prompts) -> (n,)` (images in [-1, 1], float, (n, 3, h, w);
    prompts one per image, or None when the pipeline was called with embeddings; a pixel evaluator).

    The route for reward models with their own package, such as ImageReward (arXiv 2304.05977; its PyPI package
    `image-reward`, last released 2023, pins old dependencies, so it is not a dependency here). Wrapping a model you
    have installed and loaded yourself::

        import ImageReward
        from PIL import Image

        model = ImageReward.load("ImageReward-v1.0")  # its own loader and checkpoint: your call

        def image_reward(images, prompts):
            pixels = ((images + 1) * 127.5).clamp(0, 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            with torch.no_grad():
                return torch.tensor([model.score(prompt, Image.fromarray(p)) for prompt, p in zip(prompts, pixels)])

        evaluator = RewardEvaluator(image_reward, name="imagereward")

    `RewardEvaluator.from_pretrained(folder)` loads a CLIP-style preference model saved with transformers
    (`CLIPModel` + its processor, in one folder) and scores `logit_scale * cos(image, text)`, PickScore's reward
    (`PickScoreEvaluator` takes hub ids and a separate processor).
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
        from .pickscore import PickScoreEvaluator

        if not os.path.isdir(folder):
            raise ValueError(f"`folder` must be a local folder with a transformers CLIP model, got {str(folder)!r}")
        try:
            preference = PickScoreEvaluator(folder, processor=None, name=name)
        except ValueError as error:
            raise ValueError(
                f"no CLIP-style preference model could be loaded from {str(folder)!r}: {error}"
            ) from error
        return cls(preference.scores, name=name)
