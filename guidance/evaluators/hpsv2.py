"""Human-preference feedback: HPSv2 / HPSv2.1 (Wu et al. 2023, arXiv 2306.09341), OpenCLIP ViT-H/14 fine-tuned on
HPDv2, scoring `100 * cos(image, text)` as its benchmark reports it (github tgxs002/HPSv2: `evaluation.py`
multiplies the cosine of the unit embeddings by 100; `img_score.score` returns the cosine itself)."""

from __future__ import annotations

import os
from typing import Any

from .clip import ClipEvaluator

HPS_ARCHITECTURE = "ViT-H-14"


class HPSv2Evaluator(ClipEvaluator):
    """HPSv2 of each decoded candidate with its prompt: `100 * cos(image, text)` (about 27-28 for SD 1.5 and SDXL
    images; v2.0 and v2.1 scores are not comparable with each other).

    The released checkpoints (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt` on the hub repository xswu/HPSv2)
    are pickles, which this project never loads. Convert one once, on your side, to a safetensors file of the same
    state dict (it is open_clip's ViT-H-14 state dict)::

        import torch
        from safetensors.torch import save_file

        state = torch.load("HPS_v2.1_compressed.pt", map_location="cpu", weights_only=True)["state_dict"]
        save_file({k: v.contiguous() for k, v in state.items()}, "hpsv2.1.safetensors")

    Args:
        checkpoint: the .safetensors file of the HPSv2 state dict.
        architecture: the open_clip architecture it fits (HPSv2 is "ViT-H-14"; another name only for tests of the
            same family at a small size).

    Images are preprocessed as HPSv2 does: shortest side to 224 (bicubic), center crop 224, OpenAI mean and std
    (open_clip's defaults for ViT-H-14, which HPSv2's `laion2B-s32B-b79K` preprocessing equals).
    """

    def __init__(self, checkpoint: str | os.PathLike, architecture: str = HPS_ARCHITECTURE, name: str = "hpsv2"):
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"`checkpoint` must be the path of a .safetensors file, got {type(checkpoint).__name__}")
        checkpoint = os.fspath(checkpoint)
        if not checkpoint.endswith(".safetensors"):
            raise ValueError(
                f"`checkpoint` must be a .safetensors file of the HPSv2 state dict, got {checkpoint!r}: convert the "
                "released .pt once with safetensors.torch.save_file (see HPSv2Evaluator's docstring)"
            )
        if not os.path.isfile(checkpoint):
            raise ValueError(f"`checkpoint` {checkpoint!r} does not exist")
        super().__init__(architecture, pretrained=checkpoint, name=name)

    @property
    def spec(self) -> dict[str, Any]:
        return {"type": "hpsv2", "checkpoint": self.pretrained, "architecture": self.model_name}
