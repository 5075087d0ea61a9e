"""Tiny, randomly initialised copies of the evaluators' real architectures, built from config offline (for tests and
smoke runs): the same classes, patch and image sizes and preprocessing as the released models, with towers of
width 32 and one or two layers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .aesthetic import AestheticMLP
from .clip import import_open_clip, open_clip_preprocess_cfg

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_open_clip_config(architecture: str) -> dict[str, Any]:
    """open_clip's config of `architecture` with its towers shrunk (width 32, one layer, two heads, embeddings of 16);
    image size, patch size, MLP ratio, context length and vocabulary kept."""
    config = import_open_clip().get_model_config(architecture)
    if config is None:
        raise ValueError(f"`architecture` must be an open_clip built-in architecture, got {architecture!r}")
    config["embed_dim"] = 16
    config["vision_cfg"].update(width=32, layers=1, head_width=16)
    config["text_cfg"].update(width=32, layers=1, heads=2)
    return config


def tiny_open_clip(
    folder: str | os.PathLike, architecture: str = "ViT-L-14", pretrained: str | None = None, seed: int = 0
) -> str:
    """A tiny `architecture` in `folder` (open_clip_config.json with the preprocessing that `architecture` and the
    `pretrained` tag resolve to, open_clip_model.safetensors), as "local-dir:<folder>"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = open_clip_preprocess_cfg(architecture, pretrained)
    config = {"model_cfg": tiny_open_clip_config(architecture), "preprocess_cfg": cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    save_state(random_open_clip(config["model_cfg"], seed), folder / "open_clip_model.safetensors")
    return f"local-dir:{folder}"


def register_tiny_open_clip(folder: str | os.PathLike, architecture: str = "ViT-H-14") -> str:
    """Registers a tiny `architecture` as an open_clip built-in name ("tiny-<architecture>", its config written to
    `folder`), so that it takes a `pretrained` weights file as the full-size one does; returns the name."""
    name = f"tiny-{architecture}"
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tiny_open_clip_config(architecture), indent=1))
    import_open_clip().add_model_config(path)
    return name


def save_open_clip_weights(model: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Random weights of the open_clip built-in `model` saved to a .safetensors file (e.g. a stand-in for a
    converted HPSv2 checkpoint of a tiny ViT-H-14); returns the path."""
    save_state(random_open_clip(import_open_clip().get_model_config(model), seed), path)
    return os.fspath(path)


def random_open_clip(model_cfg: dict[str, Any], seed: int) -> torch.nn.Module:
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**model_cfg)
        torch.nn.init.normal_(model.text_projection, std=0.5)  # open_clip starts it near zero
    return model.eval()


def tiny_transformers_clip(
    folder: str | os.PathLike,
    tokenizer,
    seed: int = 0,
    image_size: int = 224,
    patch_size: int = 14,
    mean: tuple[float, ...] = OPENAI_MEAN,
    std: tuple[float, ...] = OPENAI_STD,
    processor_folder: str | os.PathLike | None = None,
) -> Path:
    """A tiny transformers `CLIPModel` (safetensors) and its `CLIPProcessor` (`tokenizer` + a `CLIPImageProcessor`:
    shortest edge `image_size` bicubic, center crop, `mean`/`std`) in `folder` (the processor in `processor_folder`
    when given, as PickScore keeps its processor apart); returns `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=16,
        hidden_act="gelu",
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=1,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
        hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
    )
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(processor_folder or folder)
    return Path(folder)


def tiny_aesthetic_weights(path: str | os.PathLike, input_size: int = 16, seed: int = 0) -> str:
    """Random aesthetic-predictor weights for `input_size`-dim embeddings, saved as .safetensors; returns the path."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        save_state(AestheticMLP(input_size), path)
    return os.fspath(path)


def save_state(module: torch.nn.Module, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, os.fspath(path))
