"""A deterministic text-to-image world: one coloured shape on a plain background, 32x32 RGB, with captions.

Every image is rendered from its attributes (shape, colour, size, position, background), so captions are exact
and an attribute classifier can judge whether a generated image follows its prompt.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

IMAGE_SIZE = 32
ATTRIBUTES = ("color", "shape", "size", "position", "background")
DEFAULT_WORLD = {
    "palette": {
        "red": [220, 50, 50],
        "green": [40, 170, 70],
        "blue": [50, 90, 225],
        "yellow": [235, 205, 40],
        "white": [245, 245, 245],
        "gray": [128, 128, 128],
        "black": [20, 20, 20],
    },
    "colors": ["red", "green", "blue", "yellow"],
    "shapes": ["circle", "square", "triangle"],
    "sizes": ["small", "large"],
    "positions": ["left", "right", "top", "bottom", "center"],
    "backgrounds": ["white", "gray", "black"],
    "template": "a {size} {color} {shape} at the {position} on {background}",
    "heldout": [
        {"color": "red", "shape": "triangle", "position": "left"},
        {"color": "green", "shape": "circle", "position": "top"},
        {"color": "blue", "shape": "square", "position": "center"},
        {"color": "yellow", "shape": "triangle", "position": "bottom"},
        {"color": "red", "shape": "square", "position": "right"},
        {"color": "green", "shape": "triangle", "position": "center"},
        {"color": "blue", "shape": "circle", "position": "bottom"},
        {"color": "yellow", "shape": "circle", "position": "left"},
    ],
}
# Geometry in pixels of the 32x32 image: shape centres and half-sizes.
CENTERS = {
    "left": (9.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
    "center": (16.0, 16.0),
}
HALF_SIZES = {"small": 4.5, "large": 7.5}
JITTER = 1.5
SUPERSAMPLE = 4
WORLD_FILE = "shapes-world.json"
REBUILD_HINT = "rebuild it with `python -m pipelines.application.commands.train_shapes world`"


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    position: str
    background: str


class ShapesWorld:
    """The world's vocabulary (from `assets/shapes-world.json` or the built-in default) and its renderer."""

    def __init__(self, spec: dict | None = None):
        self.spec = spec or DEFAULT_WORLD
        self.values = {
            "color": self.spec["colors"],
            "shape": self.spec["shapes"],
            "size": self.spec["sizes"],
            "position": self.spec["positions"],
            "background": self.spec["backgrounds"],
        }

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ShapesWorld:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"shapes-world description {str(path)!r} is missing; {REBUILD_HINT}")
        try:
            spec = json.loads(path.read_text())
            missing = [key for key in DEFAULT_WORLD if key not in spec]
            if missing:
                raise ValueError(f"keys {missing} are missing")
        except (ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"shapes-world description {str(path)!r} is corrupt ({error}); {REBUILD_HINT}") from error
        return cls(spec)

    def write_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.spec, indent=1) + "\n")

    def training_captions(self, count: int, seed: int = 0) -> list[str]:
        """`count` distinct training captions in a random order drawn from `seed` (calibration prompts)."""
        scenes = self.training_scenes()
        order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed))[:count]
        return [self.caption(scenes[i]) for i in order.tolist()]

    def scene(self, **attributes: str) -> Scene:
        """A scene from attribute values; unknown values are rejected with the list of valid ones."""
        for name in ATTRIBUTES:
            if name not in attributes:
                raise ValueError(f"missing attribute `{name}`; valid values: {self.values[name]}")
            if attributes[name] not in self.values[name]:
                raise ValueError(f"unknown {name} {attributes[name]!r}; valid: {self.values[name]}")
        unknown = sorted(set(attributes) - set(ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown attributes {unknown}; valid: {list(ATTRIBUTES)}")
        return Scene(**attributes)

    def caption(self, scene: Scene) -> str:
        return self.spec["template"].format(**asdict(scene))

    def is_heldout(self, scene: Scene) -> bool:
        values = asdict(scene)
        return any(all(values[key] == value for key, value in combo.items()) for combo in self.spec["heldout"])

    def all_scenes(self) -> list[Scene]:
        return [Scene(*values) for values in itertools.product(*(self.values[name] for name in ATTRIBUTES))]

    def heldout_scenes(self) -> list[Scene]:
        return [scene for scene in self.all_scenes() if self.is_heldout(scene)]

    def training_scenes(self) -> list[Scene]:
        return [scene for scene in self.all_scenes() if not self.is_heldout(scene)]

    def sample(self, n: int, generator: torch.Generator, heldout: bool = False) -> list[Scene]:
        """`n` scenes drawn uniformly from the training scenes (or from the held-out ones)."""
        pool = self.heldout_scenes() if heldout else self.training_scenes()
        indices = torch.randint(len(pool), (n,), generator=generator).tolist()
        return [pool[i] for i in indices]

    def render(self, scenes: list[Scene], generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (n, 3, 32, 32) in [-1, 1]; with a generator the centre and size jitter a little."""
        n = len(scenes)
        jitter = torch.zeros(n, 3) if generator is None else (torch.rand(n, 3, generator=generator) * 2 - 1) * JITTER
        cx = torch.tensor([CENTERS[s.position][0] for s in scenes]) + jitter[:, 0]
        cy = torch.tensor([CENTERS[s.position][1] for s in scenes]) + jitter[:, 1]
        r = torch.tensor([HALF_SIZES[s.size] for s in scenes]) + jitter[:, 2] / 3
        grid = (torch.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
        dx = grid.view(1, 1, -1) - cx.view(-1, 1, 1)
        dy = grid.view(1, -1, 1) - cy.view(-1, 1, 1)
        r = r.view(-1, 1, 1)
        inside = {
            "circle": dx**2 + dy**2 <= r**2,
            "square": (dx.abs() <= 0.88 * r) & (dy.abs() <= 0.88 * r),  # about the circle's area
            "triangle": (dy <= 0.75 * r) & (dx.abs() <= (dy + r) / 1.75),  # apex up
        }
        mask = torch.zeros_like(dx * dy)
        for name, shape_mask in inside.items():
            selected = torch.tensor([s.shape == name for s in scenes]).view(-1, 1, 1)
            mask = torch.where(selected & shape_mask, 1.0, mask)
        alpha = torch.nn.functional.avg_pool2d(mask.unsqueeze(1), SUPERSAMPLE)
        palette = self.spec["palette"]
        fg = torch.tensor([palette[s.color] for s in scenes], dtype=torch.float32).view(n, 3, 1, 1) / 255
        bg = torch.tensor([palette[s.background] for s in scenes], dtype=torch.float32).view(n, 3, 1, 1) / 255
        return (bg * (1 - alpha) + fg * alpha) * 2 - 1

    def random_images(self, n: int, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
        """`n` newly drawn training scenes, rendered with jitter, in [-1, 1] at `size` x `size` (resized if needed)."""
        images = self.render(self.sample(n, generator), generator)
        if size != IMAGE_SIZE:
            images = torch.nn.functional.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        return images

    def render_images(self, scenes: list[Scene]) -> list:
        """The scenes as RGB PIL images (`render` without jitter, rounded to 8 bits)."""
        from PIL import Image

        pixels = ((self.render(scenes).permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        return [Image.fromarray(array) for array in pixels]

    def labels(self, scenes: list[Scene]) -> dict[str, torch.Tensor]:
        """Class indices of every attribute, for the attribute scorer."""
        return {name: torch.tensor([self.values[name].index(getattr(s, name)) for s in scenes]) for name in ATTRIBUTES}

    def words(self) -> list[str]:
        """Every word a caption can contain."""
        template_words = self.spec["template"].replace("{", " ").replace("}", " ").split()
        fixed = [w for w in template_words if w not in ATTRIBUTES]
        values = [v for name in ATTRIBUTES for v in self.values[name]]
        return sorted(set(fixed + values))
