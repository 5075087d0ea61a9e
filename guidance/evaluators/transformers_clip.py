"""CLIP score (arXiv 2104.08718) with a transformers `CLIPModel`: a local folder or a hub id."""

from __future__ import annotations

import os
from typing import Any

import torch

from .base import Preprocess
from .embedding import EmbeddingEvaluator

BICUBIC, BILINEAR = 3, 2  # PIL's resampling filters, as transformers' image processors name them


def load_transformers_clip(model: str | os.PathLike, processor: str | os.PathLike | None = None):
    """(CLIPModel in eval mode, its processor) from folders or hub ids (`HF_HUB_OFFLINE=1`: the cache only); the
    processor from `processor`, or `model` when None. Weights are read from safetensors only."""
    from transformers import AutoProcessor, CLIPModel

    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise TypeError(f"`model` must be a folder or a hub id of a transformers CLIPModel, got {model!r}")
    source = model if processor is None else processor
    try:
        clip = CLIPModel.from_pretrained(model, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"no transformers CLIPModel (safetensors weights) could be loaded from {str(model)!r}: {error}"
        ) from error
    try:
        loaded = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"no CLIP processor could be loaded from {str(source)!r}: {error}") from error
    return clip.eval().requires_grad_(False), loaded


def processor_preprocess(image_processor) -> Preprocess:
    """The `Preprocess` of a transformers `CLIPImageProcessor`: resize (the shortest edge, or to height x width),
    center crop to `crop_size`, rescale to [0, 1], normalise by `image_mean` and `image_std`."""
    config = image_processor.to_dict()
    size, crop = config.get("size") or {}, config.get("crop_size") or {}
    mean, std = tuple(config["image_mean"]), tuple(config["image_std"])
    interpolation = "bilinear" if config.get("resample") == BILINEAR else "bicubic"
    cropped = bool(config.get("do_center_crop", True) and crop)
    if size.get("shortest_edge"):
        side = size["shortest_edge"]
        target = (crop["height"], crop["width"]) if cropped else (side, side)
        return Preprocess(target, mean, std, "shortest", resize=side, interpolation=interpolation)
    target = (size["height"], size["width"])
    if cropped and (crop["height"], crop["width"]) != target:
        raise ValueError(f"image processor resizes to {target} and crops to {crop}: only one of the two is supported")
    return Preprocess(target, mean, std, "squash", interpolation=interpolation)


def features(output) -> torch.Tensor:
    """Projected embeddings from `get_*_features`: a tensor (transformers 4) or an output's pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class TransformersClipEvaluator(EmbeddingEvaluator):
    """`100 * cos(image, text)` of each decoded candidate with its prompt, with a transformers `CLIPModel`.

    Args:
        model: a folder or a hub id holding a `CLIPModel` (config.json + model.safetensors), e.g.
            "openai/clip-vit-large-patch14".
        processor: where its processor (tokenizer + `CLIPImageProcessor`) is; None: `model`.

    Images are preprocessed as the model's `CLIPImageProcessor` says (`preprocess`); prompts are truncated to the
    tokenizer's length.
    """

    scale = 100.0
    kind = "transformers-clip"

    def __init__(self, model: str | os.PathLike, processor: str | os.PathLike | None = None, name: str = "clip"):
        super().__init__(name)
        self.model_name = os.fspath(model) if isinstance(model, os.PathLike) else model
        self.processor_name = os.fspath(processor) if isinstance(processor, os.PathLike) else processor
        self.clip, self.processor = load_transformers_clip(model, processor)
        self.preprocess = processor_preprocess(self.processor.image_processor)

    @property
    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "model": self.model_name, "processor": self.processor_name}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return features(self.clip.get_image_features(pixel_values=pixels.to(self.clip.dtype)))

    def encode_texts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        text = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        return features(self.clip.get_text_features(**text))
