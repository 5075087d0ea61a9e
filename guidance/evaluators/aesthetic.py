"""Aesthetic feedback: the LAION aesthetic predictor (github christophschuhmann/improved-aesthetic-predictor), a
linear MLP on the unit CLIP ViT-L/14 image embedding, trained on SAC + LAION-Logos + AVA ratings (1-10)."""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import Candidates, Evaluator
from .clip import ClipEvaluator

HIDDEN = (1024, 128, 64, 16)  # the released "linearMSE" predictors: no activations, dropout 0.2, 0.2, 0.1


class AestheticMLP(nn.Module):
    """embedding (n, dim) -> rating (n, 1): the released predictor's layers, with its module names (`layers.0`,
    `layers.2`, `layers.4`, `layers.6`, `layers.7`) so that its state dict loads as it is."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        a, b, c, d = HIDDEN
        self.layers = nn.Sequential(
            nn.Linear(input_size, a),
            nn.Dropout(0.2),
            nn.Linear(a, b),
            nn.Dropout(0.2),
            nn.Linear(b, c),
            nn.Dropout(0.1),
            nn.Linear(c, d),
            nn.Linear(d, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class AestheticEvaluator(Evaluator):
    """The predicted aesthetic rating of each decoded candidate (about 5.5-6.2 for SD 1.5 and SDXL images; needs
    no prompt).

    The predictor reads the L2-normalised image embedding of OpenAI's CLIP ViT-L/14 (`clip.load("ViT-L/14")`, which
    is open_clip's "ViT-L-14" with the "openai" tag: shortest side 224 bicubic, center crop 224, OpenAI mean and
    std). The released weights (`sac+logos+ava1-l14-linearMSE.pth`) are a pickle, which this project never loads;
    convert them once, on your side::

        import torch
        from safetensors.torch import save_file

        save_file(torch.load("sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True),
                  "aesthetic.safetensors")

    Args:
        weights: the .safetensors file of the predictor's state dict.
        clip: the open_clip model whose embedding it reads (default "ViT-L-14"), or "local-dir:<folder>".
        pretrained: its pretrained tag or .safetensors file (default "openai").
    """

    space = "pixel"

    def __init__(
        self,
        weights: str | os.PathLike,
        clip: str = "ViT-L-14",
        pretrained: str | None = "openai",
        name: str = "aesthetic",
    ):
        super().__init__(name)
        weights = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else weights
        if not isinstance(weights, str) or not weights.endswith(".safetensors") or not os.path.isfile(weights):
            raise ValueError(
                f"`weights` must be an existing .safetensors file of the aesthetic predictor, got {weights!r}: "
                "convert the released .pth once with safetensors.torch.save_file (see AestheticEvaluator's docstring)"
            )
        self.embedder = ClipEvaluator(clip, None if clip.startswith(("local-dir:", "hf-hub:")) else pretrained)
        self.mlp = load_mlp(weights, self.embedder.clip.visual.output_dim)

    def ratings(self, images: torch.Tensor) -> torch.Tensor:
        """The predicted rating of images in [-1, 1], (n,)."""
        embeddings = self.embedder.image_features(images)
        self.mlp.to(embeddings.device)
        return self.mlp(embeddings).squeeze(-1)

    def forward(self, candidates: Candidates) -> torch.Tensor:
        return self.ratings(candidates.images)


def load_mlp(weights: str, input_size: int) -> AestheticMLP:
    from safetensors.torch import load_file

    mlp = AestheticMLP(input_size)
    try:
        mlp.load_state_dict(load_file(weights))
    except (RuntimeError, OSError) as error:  # wrong keys or shapes, or not a safetensors file
        reason = str(error).strip().splitlines()[0]
        raise ValueError(
            f"`weights` {weights!r} is not an aesthetic predictor for {input_size}-dim CLIP embeddings ({reason})"
        ) from error
    return mlp.eval().requires_grad_(False)
