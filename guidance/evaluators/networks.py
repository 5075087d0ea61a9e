"""Small convolutional networks behind the trained evaluators, saved as config.json + model.safetensors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class ConvEncoder(nn.Module):
    """(n, in_channels, size, size) -> (n, out_dim): stride-2 convolutions down to 4x4, then an MLP.

    With `timestep_aware`, a sinusoidal embedding of the noise level (timestep / 1000) shifts and scales the
    features of every stage (FiLM), so that one network reads latents at any noise level.
    """

    def __init__(self, in_channels: int, size: int, out_dim: int, width: int = 32, timestep_aware: bool = False):
        super().__init__()
        if size < 4 or size & (size - 1):
            raise ValueError(f"`size` must be a power of two >= 4, got {size}")
        self.config = dict(
            in_channels=in_channels, size=size, out_dim=out_dim, width=width, timestep_aware=timestep_aware
        )
        stages, channels = int(math.log2(size // 4)), [in_channels] + [width * 2 ** min(i, 2) for i in range(10)]
        self.stem = nn.Conv2d(in_channels, channels[1], 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Conv2d(channels[i + 1], channels[i + 2], 3, stride=2, padding=1) for i in range(stages)
        )
        widths = [channels[1]] + [channels[i + 2] for i in range(stages)]
        self.film = nn.ModuleList(nn.Linear(64, 2 * w) for w in widths) if timestep_aware else None
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * 16, 128), nn.GELU(), nn.Linear(128, out_dim))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        embedding = None
        if self.film is not None:
            if timestep is None:
                raise ValueError("this network is timestep-aware: pass the latents' `timestep`")
            frequencies = torch.exp(torch.arange(32, device=x.device) * (-math.log(1000.0) / 32))
            angles = (timestep.to(x.device, torch.float32) / 1000)[:, None] * 1000 * frequencies[None]
            embedding = torch.cat([angles.sin(), angles.cos()], dim=-1).to(x.dtype)
        h = x
        for i, layer in enumerate([self.stem, *self.blocks]):
            h = layer(h)
            if embedding is not None:
                scale, shift = self.film[i](embedding).chunk(2, dim=-1)
                h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
            h = nn.functional.gelu(h)
        return self.head(h)


def save_network(network: ConvEncoder, folder: str | os.PathLike, **extra) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**network.config, **extra}, indent=1))
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, folder / "model.safetensors")


def load_network(folder: str | os.PathLike, what: str, rebuild: str) -> tuple[ConvEncoder, dict]:
    """(network in eval mode, extra config) from `save_network`; errors name the file and how to rebuild it."""
    folder = Path(folder)
    paths = [folder / "config.json", folder / "model.safetensors"]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {str(path)!r} is missing; {rebuild}")
    try:
        config = json.loads(paths[0].read_text())
        keys = ("in_channels", "size", "out_dim", "width", "timestep_aware")
        network = ConvEncoder(**{key: config[key] for key in keys})
        network.load_state_dict(load_file(paths[1]))
    except Exception as error:  # any parse or shape error means the files do not belong together
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"{what} in {str(folder)!r} is corrupt ({reason}); {rebuild}") from error
    return network.eval().requires_grad_(False), {k: v for k, v in config.items() if k not in keys}
