"""Where the shipped shapes-world models live, checked before use: a missing or corrupt file is named with the
command that rebuilds it.

The assets folder is found, in order: the environment variable `GUIDANCE_ASSETS`; the `guidance_assets` package
that `pip install` (editable or not) installs from the repository's `assets/`; the `assets/` folder of a source
checkout. `ASSETS` (this module's attribute) is that folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .world import WORLD_FILE, ShapesWorld

ASSETS_ENV = "GUIDANCE_ASSETS"
SHAPES_SD3_MAX_SEQUENCE_LENGTH = 16  # shapes-sd3 was trained with 16 text positions (zero "T5" tokens appended)
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


def assets_root() -> Path:
    """The assets folder (see the module docstring), or an error naming `GUIDANCE_ASSETS`."""
    configured = os.environ.get(ASSETS_ENV)
    if configured:
        if not (Path(configured) / WORLD_FILE).is_file():
            raise FileNotFoundError(
                f"${ASSETS_ENV}={configured!r} is not a shapes-world assets folder (it has no {WORLD_FILE})"
            )
        return Path(configured)
    spec = importlib.util.find_spec("guidance_assets")
    candidates = [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []
    candidates.append(Path(__file__).resolve().parents[2] / "assets")
    for folder in candidates:
        if (folder / WORLD_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"the shapes-world assets were not found (looked in {[str(c) for c in candidates]}): install the package "
        f"with `pip install .` from the repository, or set {ASSETS_ENV}=<the repository's assets folder>"
    )


def __getattr__(name: str):
    if name == "ASSETS":
        return assets_root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rebuild_hint(name: str) -> str:
    return f"rebuild it with `python -m pipelines.application.commands.train_shapes {TRAIN_COMMAND[name]}`"


def asset_path(name: str, root: str | Path | None = None) -> Path:
    """The folder of asset `name` ("shapes-sd", "shapes-sd3", "shapes-clip", "shapes-scorer"), all files present."""
    if name not in REQUIRED_FILES:
        raise ValueError(f"unknown asset {name!r}; valid: {sorted(REQUIRED_FILES)}")
    folder = Path(root if root is not None else assets_root()) / name
    for relative in REQUIRED_FILES[name]:
        if not (folder / relative).is_file():
            raise FileNotFoundError(f"asset file {str(folder / relative)!r} is missing; {rebuild_hint(name)}")
    return folder


def load_scorer(root: str | Path | None = None):
    from .scorer import AttributeScorer

    return AttributeScorer.from_pretrained(asset_path("shapes-scorer", root))


def load_world(root: str | Path | None = None) -> ShapesWorld:
    return ShapesWorld.from_json(Path(root if root is not None else assets_root()) / WORLD_FILE)


def shapes_clip() -> str:
    """The shapes-world CLIP as an open_clip model name ("local-dir:<folder>")."""
    return "local-dir:" + str(assets_root() / "shapes-clip")
