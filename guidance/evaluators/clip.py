"""CLIP alignment feedback (CLIP score, Hessel et al. 2021, arXiv 2104.08718) with any open_clip model."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .base import Preprocess
from .embedding import EmbeddingEvaluator

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NO_PICKLES = "this project loads safetensors only; convert the weights once with safetensors.torch.save_file"


def import_open_clip():
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("ClipEvaluator needs open_clip: pip install open_clip_torch") from error
    return open_clip


def load_open_clip(model: str, pretrained: str | None = None):
    """(model, tokenizer) of an open_clip model: a built-in architecture name with `pretrained` (a tag, or a
    .safetensors file), "hf-hub:<repo>" (the hub or its offline cache) or "local-dir:<folder>".

    Raises ValueError saying what was tried when nothing loads, and for weights that are not safetensors.
    """
    open_clip = import_open_clip()
    if not isinstance(model, str) or not model:
        raise TypeError(f"`model` must be an open_clip model name or 'local-dir:<folder>', got {model!r}")
    tried = check_open_clip_source(open_clip, model, pretrained)
    try:
        clip = open_clip.create_model(model, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as error:  # open_clip raises many kinds (RuntimeError, OSError, hub errors)
        raise ValueError(f"open_clip model {model!r} could not be loaded: tried {tried}; {error}") from error
    return clip.eval().requires_grad_(False), tokenizer


def check_open_clip_source(open_clip, model: str, pretrained: str | None) -> str:
    """What loading `model` will try, checked beforehand: the folder or name exists, the weights are safetensors."""
    if model.startswith(("local-dir:", "hf-hub:")) and pretrained is not None:
        raise ValueError(f"`pretrained` is only for open_clip architecture names; {model!r} has its own weights")
    if model.startswith("local-dir:"):
        return check_local_dir(model.removeprefix("local-dir:"), model)
    if model.startswith("hf-hub:"):
        repo = model.removeprefix("hf-hub:")
        tried = f"the Hugging Face hub repository {repo!r} (needs network or the cache)"
        check_safetensors(weights_file(tried, lambda: open_clip.pretrained.download_pretrained_from_hf(repo)), model)
        return tried
    known = open_clip.list_models()
    if model not in known:
        raise ValueError(
            f"open_clip model {model!r} not found: tried open_clip's built-in architectures ({len(known)}, "
            f"e.g. {known[:3]}) and it is none; for a folder use 'local-dir:<folder>'"
        )
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained is None:
        raise ValueError(
            f"open_clip model {model!r} needs `pretrained` (random weights are not an evaluator): a known tag {tags} "
            "or a .safetensors file"
        )
    if pretrained not in tags and not os.path.isfile(pretrained):
        raise ValueError(
            f"open_clip model {model!r}: pretrained {pretrained!r} is neither a known tag {tags} nor a file"
        )
    tried = f"open_clip architecture {model!r} with pretrained={pretrained!r}"
    if pretrained in tags:
        cfg = open_clip.get_pretrained_cfg(model, pretrained)
        check_safetensors(weights_file(tried, lambda: open_clip.download_pretrained(cfg)), model)
    else:
        check_safetensors(pretrained, model)
    return tried


def check_local_dir(folder: str, model: str) -> str:
    tried = f"the local folder {folder!r} (open_clip_config.json and open_clip_model.safetensors)"
    if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
        raise ValueError(f"open_clip model {model!r} not found: tried {tried}; it has no open_clip_config.json")
    files = sorted(Path(folder).iterdir())
    if not any(path.suffix == ".safetensors" for path in files):
        pickles = [path.name for path in files if path.suffix in PICKLE_SUFFIXES]
        found = f"only pickled weights {pickles}: {NO_PICKLES}" if pickles else "no weights (random ones would score)"
        raise ValueError(f"open_clip model {model!r}: tried {tried}; the folder has {found}")
    return tried


def weights_file(tried: str, download) -> str:
    try:
        return str(download())
    except Exception as error:  # hub errors of every kind: offline without a cache, missing repository
        raise ValueError(f"open_clip weights could not be loaded: tried {tried}; {error}") from error


def check_safetensors(path: str, model: str) -> None:
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"open_clip model {model!r}: the weights {str(path)!r} are not .safetensors; {NO_PICKLES}")


def open_clip_preprocess(model: str, pretrained: str | None = None) -> Preprocess:
    """The preprocessing open_clip gives `model` (with a pretrained tag), resolved from its configs without building
    it: the image size of its vision tower; mean, std, interpolation and resize mode of the tag or the folder's
    `preprocess_cfg`, over open_clip's defaults (OpenAI's mean and std, bicubic, shortest side + center crop)."""
    return preprocess_of(open_clip_preprocess_cfg(model, pretrained))


def open_clip_preprocess_cfg(model: str, pretrained: str | None = None) -> dict[str, Any]:
    """`open_clip_preprocess` as open_clip's own preprocess config (size, mean, std, interpolation, resize_mode,
    fill_color)."""
    open_clip = import_open_clip()
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    config = open_clip_config(open_clip, model)
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), config.get("preprocess_cfg", {}))
    if pretrained is not None and not model.startswith(("local-dir:", "hf-hub:")):
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(model, pretrained) or {})
    return cfg | {"size": config["model_cfg"]["vision_cfg"]["image_size"]}


def open_clip_config(open_clip, model: str) -> dict[str, Any]:
    """{"model_cfg": ..., "preprocess_cfg": ...} of a built-in name, "local-dir:<folder>" or "hf-hub:<repo>"."""
    if model.startswith(("local-dir:", "hf-hub:")):
        path = (
            Path(model.removeprefix("local-dir:")) / "open_clip_config.json"
            if model.startswith("local-dir:")
            else open_clip.pretrained.download_pretrained_from_hf(
                model.removeprefix("hf-hub:"), filename="open_clip_config.json"
            )
        )
        return json.loads(Path(path).read_text())
    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None:
        raise ValueError(f"open_clip model {model!r} not found: it is not one of open_clip's built-in architectures")
    return {"model_cfg": model_cfg}


def preprocess_of(cfg: dict[str, Any]) -> Preprocess:
    """A `Preprocess` from an open_clip preprocess config (its "random" interpolation is bicubic at inference)."""
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    return Preprocess(
        size,
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        cfg.get("resize_mode") or "shortest",
        interpolation=interpolation,
        fill=cfg.get("fill_color") or 0,
    )


class ClipEvaluator(EmbeddingEvaluator):
    """`100 * cos(image, text)` of each decoded candidate with its prompt, with an open_clip model.

    Args:
        model: an open_clip architecture name (with `pretrained`), "hf-hub:<repo>" or "local-dir:<folder>" (e.g.
            the shapes-world CLIP, `guidance.shapes.assets.shapes_clip()`). E.g. "ViT-L-14" with "openai",
            "ViT-H-14" with "laion2b_s32b_b79k", "ViT-bigG-14" with "laion2b_s39b_b160k".
        pretrained: for a name: an open_clip pretrained tag (fetched from the hub or its cache; `HF_HUB_OFFLINE=1`
            reads the cache only) or a .safetensors file of the weights.

    Images are preprocessed as open_clip's eval transform for that model and tag (`preprocess`: size, mean, std,
    interpolation, resize mode).
    """

    scale = 100.0

    def __init__(self, model: str, pretrained: str | None = None, name: str = "clip"):
        super().__init__(name)
        self.model_name, self.pretrained = model, pretrained
        self.clip, self.tokenizer = load_open_clip(model, pretrained)
        self.preprocess = preprocess_of(self.clip.visual.preprocess_cfg)

    @property
    def spec(self) -> dict[str, Any]:
        return {"type": "open_clip", "model": self.model_name, "pretrained": self.pretrained}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)

    def encode_texts(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        return self.clip.encode_text(self.tokenizer(prompts).to(device))
