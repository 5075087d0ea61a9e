"""Human-preference feedback: PickScore (Kirstain et al. 2023, arXiv 2305.01569), a CLIP ViT-H/14 fine-tuned on
Pick-a-Pic, scoring `logit_scale * cos(image, text)` as its reference code does."""

from __future__ import annotations

import os

from .transformers_clip import TransformersClipEvaluator

PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreEvaluator(TransformersClipEvaluator):
    """PickScore of each decoded candidate with its prompt: `exp(logit_scale) * cos(image, text)` (about 21-22
    for SD 1.5 and SDXL images on Pick-a-Pic prompts).

    Args:
        model: a folder or hub id of the PickScore `CLIPModel` (safetensors weights); default the released one.
        processor: its processor; default the one PickScore was trained with (OpenCLIP ViT-H/14's: shortest side
            224 bicubic, center crop 224, OpenAI mean and std); None: `model`'s own folder.
    """

    kind = "pickscore"

    def __init__(
        self,
        model: str | os.PathLike = PICKSCORE,
        processor: str | os.PathLike | None = PICKSCORE_PROCESSOR,
        name: str = "pickscore",
    ):
        super().__init__(model, processor, name=name)
        self.scale = float(self.clip.logit_scale.exp())
