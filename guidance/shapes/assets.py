"""The shipped shapes-world models in `assets/`, checked before use: a missing or corrupt file is named with
the command that rebuilds it."""

from __future__ import annotations

from pathlib import Path

from .world import WORLD_FILE, ShapesWorld

ASSETS = Path(__file__).resolve().parents[2] / "assets"
REQUIRED_FILES = {
    "shapes-sd": [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ],
    "shapes-sd3": [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ],
    "shapes-clip": ["open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json"],
    "shapes-scorer": ["config.json", "model.safetensors"],
}
TRAIN_COMMAND = {"shapes-sd": "sd", "shapes-sd3": "sd3", "shapes-clip": "clip", "shapes-scorer": "scorer"}


def rebuild_hint(name: str) -> str:
    return f"rebuild it with `python -m guidance.shapes.train {TRAIN_COMMAND[name]}`"


def asset_path(name: str, root: str | Path = ASSETS) -> Path:
    """The folder of asset `name` ("shapes-sd", "shapes-sd3", "shapes-clip", "shapes-scorer"), all files present."""
    if name not in REQUIRED_FILES:
        raise ValueError(f"unknown asset {name!r}; valid: {sorted(REQUIRED_FILES)}")
    folder = Path(root) / name
    for relative in REQUIRED_FILES[name]:
        if not (folder / relative).is_file():
            raise FileNotFoundError(f"asset file {str(folder / relative)!r} is missing; {rebuild_hint(name)}")
    return folder


def load_pipeline(name: str, root: str | Path = ASSETS, **kwargs):
    """A guided pipeline of a shipped model ("shapes-sd" or "shapes-sd3"), in eval mode on the CPU."""
    from pipelines import GuidedStableDiffusion3Pipeline, GuidedStableDiffusionPipeline

    classes = {"shapes-sd": GuidedStableDiffusionPipeline, "shapes-sd3": GuidedStableDiffusion3Pipeline}
    if name not in classes:
        raise ValueError(f"`name` must be one of {sorted(classes)}, got {name!r}")
    folder = asset_path(name, root)
    try:
        return classes[name].from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"asset {str(folder)!r} could not be loaded ({error}); {rebuild_hint(name)}") from error


def load_scorer(root: str | Path = ASSETS):
    from .scorer import AttributeScorer

    return AttributeScorer.from_pretrained(asset_path("shapes-scorer", root))


def load_world(root: str | Path = ASSETS) -> ShapesWorld:
    return ShapesWorld.from_json(Path(root) / WORLD_FILE)
