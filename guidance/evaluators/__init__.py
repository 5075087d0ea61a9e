"""Evaluators: the online feedback of dynamic guidance, one interface (batched, one score per sample).

Pixel evaluators (decoded candidates): `ClipEvaluator` (open_clip), `TransformersClipEvaluator`,
`PickScoreEvaluator`, `HPSv2Evaluator`, `AestheticEvaluator`, `RewardEvaluator` (any callable, e.g. ImageReward),
`FidelityDiscriminator`. Latent evaluators (no decode): `LatentEvaluator`, heads distilled from any of them.
The model libraries (open_clip, transformers) are imported when a model is loaded.
"""

from .aesthetic import AestheticEvaluator
from .base import Candidates, Evaluator, Preprocess
from .clip import ClipEvaluator
from .discriminator import FidelityDiscriminator
from .embedding import EmbeddingEvaluator
from .hpsv2 import HPSv2Evaluator
from .latent import LatentEvaluator
from .pickscore import PickScoreEvaluator
from .reward import RewardEvaluator
from .transformers_clip import TransformersClipEvaluator

__all__ = [
    "AestheticEvaluator",
    "Candidates",
    "ClipEvaluator",
    "EmbeddingEvaluator",
    "Evaluator",
    "FidelityDiscriminator",
    "HPSv2Evaluator",
    "LatentEvaluator",
    "PickScoreEvaluator",
    "Preprocess",
    "RewardEvaluator",
    "TransformersClipEvaluator",
]
