"""CLIP alignment feedback (CLIP score, Hessel et al. 2021, arXiv 2104.08718) with any open_clip model."""

from __future__ import annotations

import os

import torch

from .base import Candidates, Evaluator, prepare_images


def load_open_clip(model: str, pretrained: str | None = None):
    """(model, tokenizer) of an open_clip model name (with `pretrained` weights) or "local-dir:<folder>".

    Raises ValueError saying what was tried when nothing loads.
    """
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("ClipEvaluator needs open_clip: pip install open_clip_torch") from error
    if not isinstance(model, str) or not model:
        raise TypeError(f"`model` must be an open_clip model name or 'local-dir:<folder>', got {model!r}")
    if model.startswith("local-dir:"):
        folder = model.removeprefix("local-dir:")
        tried = f"the local folder {folder!r} (open_clip_config.json and open_clip_model.safetensors)"
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise ValueError(f"open_clip model {model!r} not found: tried {tried}; it has no open_clip_config.json")
    elif model.startswith("hf-hub:"):
        tried = f"the Hugging Face hub repository {model.removeprefix('hf-hub:')!r} (needs network or the cache)"
    else:
        known = open_clip.list_models()
        if model not in known:
            raise ValueError(
                f"open_clip model {model!r} not found: tried open_clip's built-in architectures ({len(known)}, "
                f"e.g. {known[:3]}) and it is none; for a folder use 'local-dir:<folder>'"
            )
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained is not None and pretrained not in tags and not os.path.isfile(pretrained):
            raise ValueError(
                f"open_clip model {model!r}: pretrained {pretrained!r} is neither a known tag {tags} nor a file"
            )
        tried = f"open_clip architecture {model!r} with pretrained={pretrained!r}"
    try:
        clip, _, _ = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as error:  # open_clip raises many kinds (RuntimeError, OSError, hub errors)
        raise ValueError(f"open_clip model {model!r} could not be loaded: tried {tried}; {error}") from error
    return clip.eval().requires_grad_(False), tokenizer


class ClipEvaluator(Evaluator):
    """`100 * cos(image, text)` of each decoded candidate with its prompt (a pixel evaluator).

    Args:
        model: an open_clip model name (with `pretrained`) or "local-dir:<folder>" (e.g. the shapes-world CLIP,
            `guidance.shapes.assets.shapes_clip()`).
        pretrained: open_clip pretrained tag or weights file, for named models.
    """

    space = "pixel"

    def __init__(self, model: str, pretrained: str | None = None, name: str = "clip"):
        super().__init__(name)
        self.model_name = model
        self.clip, self.tokenizer = load_open_clip(model, pretrained)
        config = self.clip.visual.preprocess_cfg
        self.image_size, self.mean, self.std = tuple(config["size"]), config["mean"], config["std"]
        self._text_features: dict[str, torch.Tensor] = {}

    def text_features(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        missing = sorted(set(prompts) - set(self._text_features))
        if missing:
            features = self.clip.encode_text(self.tokenizer(missing).to(device), normalize=True)
            self._text_features.update(zip(missing, features, strict=True))
        return torch.stack([self._text_features[p].to(device) for p in prompts])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(prepare_images(images, self.image_size, self.mean, self.std), normalize=True)

    def forward(self, candidates: Candidates) -> torch.Tensor:
        prompts = candidates.require_prompts(self.name)
        images = candidates.images
        self.clip.to(images.device)
        return 100 * (self.image_features(images) * self.text_features(prompts, images.device)).sum(-1)
