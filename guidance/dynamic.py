"""Dynamic classifier-free guidance from online feedback ("Dynamic Classifier-Free Diffusion Guidance via Online
Feedback", arXiv 2509.16131): at every step, score a look-ahead of each candidate scale with evaluators and
apply the best one, greedily. The candidates recombine the one conditional and one unconditional prediction,
so no extra model pass runs: the NFEs equal constant CFG's."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config

from .cfg import ComposedGuidance, UnconditionalSkip
from .checks import check_choice, is_number
from .denoised import copy_scheduler, predict_x0
from .evaluators.base import Candidates, Evaluator
from .scales import GuidanceScale
from .scheduler import GuidanceRun, GuidanceStep
from .unconditional import UnconditionalModel

WEIGHTINGS = ("adaptive", "fixed")
LOOKAHEADS = ("auto", "x0", "next_latent")


class DynamicScale(GuidanceScale):
    """Per step and guided row, the candidate scale whose look-ahead the evaluators score best (the paper's greedy
    choice, sec. 3). Arguments as in `DynamicGuidance`; usable as any policy's `guidance_scale`."""

    ignore_for_config = ["evaluators", "decoder"]

    @register_to_config
    def __init__(
        self,
        candidates: Sequence[float] = (1.0, 3.0, 7.5, 11.0, 15.0),
        weighting: Literal["adaptive", "fixed"] = "adaptive",
        weights: Sequence[float] | None = None,
        lookahead: Literal["auto", "x0", "next_latent"] = "auto",
        *,
        evaluators: Sequence[Evaluator] | None = None,
        decoder: torch.nn.Module | None = None,
    ):
        self.register_to_config(candidates=check_candidates(candidates))
        self.evaluators = check_evaluators(evaluators)
        self.register_to_config(evaluators=[e.name for e in self.evaluators])  # their names: what a config can hold
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("lookahead", lookahead, LOOKAHEADS)
        self.fixed_weights = check_weights(weights, self.evaluators)
        self.register_to_config(weights=self.fixed_weights.tolist())
        self.decoder = decoder

    @property
    def lookahead_kind(self) -> Literal["x0", "next_latent"]:
        """The look-ahead scored: the configured one, or for "auto" the one that suits the evaluators."""
        if self.config.lookahead != "auto":
            return self.config.lookahead
        return "next_latent" if all(e.space == "latent" for e in self.evaluators) else "x0"

    def reset(self, run: GuidanceRun) -> None:
        # (evaluators, batch): each row's mean score over the candidates at the last step it was scored
        self.previous_scores = torch.full((len(self.evaluators), run.batch_size), math.nan)

    def apply(self, step, cond, uncond, rows, combine):
        rows = torch.ones(step.batch_size, dtype=torch.bool) if rows is None else rows
        scales = self.config.candidates
        view = (-1, *[1] * (cond.ndim - 1))
        mask = rows.to(cond.device).view(view)
        # eps_s = eps_u + s (eps_c - eps_u) for every candidate s; rows outside `rows` keep eps_c
        guided = torch.stack([torch.where(mask, combine(cond, uncond, s), cond) for s in scales])
        index = rows.nonzero().squeeze(1)
        ahead, timestep = self.look_ahead(step, guided)
        k, g = len(scales), len(index)
        latents = ahead[:, index.to(ahead.device)].flatten(0, 1)  # candidate-major rows
        unpacked = step.unpack(latents) if step.unpack is not None else latents
        prompts = None if step.prompts is None else [step.prompts[i] for i in index.tolist()] * k
        decode = None if step.decode is None else (lambda x: step.decode(x, self.decoder))
        candidates = Candidates(unpacked, torch.full((k * g,), float(timestep)), prompts, decode)
        scores = torch.stack([e.score(candidates).view(k, g) for e in self.evaluators])  # (evaluators, k, g)
        weights = self.evaluator_weights(scores.mean(1), index)
        spread = scores.std(1, keepdim=True) if k > 1 else torch.ones_like(scores)
        standardized = (scores - scores.mean(1, keepdim=True)) / spread.clamp_min(1e-8)
        choice = (weights[:, None, :] * standardized).sum(0).argmax(0)  # (g,)
        prediction = cond.clone()
        prediction[index.to(cond.device)] = guided[choice.to(cond.device), index.to(cond.device)]
        applied = torch.ones(step.batch_size)
        applied[index] = torch.tensor(scales)[choice]
        return prediction, applied, self.trace_extras(step.batch_size, index, scores, weights)

    def trace_extras(self, batch_size: int, index: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor) -> dict:
        """Per evaluator and row: the candidates' scores and the weight (None for rows not guided this step)."""
        per_row_scores = {e.name: [None] * batch_size for e in self.evaluators}
        per_row_weights = {e.name: [None] * batch_size for e in self.evaluators}
        for j, row in enumerate(index.tolist()):
            for i, e in enumerate(self.evaluators):
                per_row_scores[e.name][row] = scores[i, :, j].tolist()
                per_row_weights[e.name][row] = float(weights[i, j])
        return {
            "candidates": self.config.candidates,
            "candidate_scores": per_row_scores,
            "weights": per_row_weights,
            "lookahead": self.lookahead_kind,
        }

    def evaluator_weights(self, current: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(evaluators, len(rows)) weights from this step's mean scores `current` of batch rows `rows`."""
        if self.config.weighting == "fixed":
            return self.fixed_weights[:, None].expand_as(current)
        previous = self.previous_scores[:, rows]
        self.previous_scores[:, rows] = current
        alpha = ((current - previous) / previous.abs().clamp_min(1e-8)).clamp_min(0.0)
        uninformative = (alpha == 0).all(0, keepdim=True) | previous.isnan().any(0, keepdim=True)
        return torch.where(uninformative, torch.ones_like(alpha), alpha)

    def look_ahead(self, step: GuidanceStep, guided: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(look-ahead latents of every candidate's guided prediction, shape (k, batch, ...), their timestep)."""
        if self.lookahead_kind == "x0":
            return torch.stack([predict_x0(step, prediction) for prediction in guided]), 0.0
        ahead = []
        for prediction in guided:  # the full batch on a copy per candidate: multistep history has `batch` rows
            scheduler = copy_scheduler(step.scheduler)
            kwargs = {}
            if "generator" in inspect.signature(scheduler.step).parameters:  # stochastic samplers: fixed noise
                kwargs["generator"] = torch.Generator(step.latents.device).manual_seed(0)
            ahead.append(scheduler.step(prediction, step.timestep, step.latents, **kwargs, return_dict=False)[0])
        timesteps = step.scheduler.timesteps
        following = timesteps[step.step_index + 1] if step.step_index + 1 < len(timesteps) else 0
        return torch.stack(ahead), float(following)


class DynamicGuidance(ComposedGuidance):
    """Per step and sample, the candidate scale whose look-ahead the evaluators score best.

    For each candidate `s`: `eps_s = eps_u + s (eps_c - eps_u)`; its look-ahead is scored by every evaluator;
    each evaluator's scores are standardised across the candidates of a sample (so that evaluators of different
    units weigh alike), combined as `e_hat = sum_e alpha_e * z_e`, and the argmax candidate is applied.
    Shorthand for `ClassifierFreeGuidance(DynamicScale(...), ...)`.

    Args:
        candidates: the scales to choose from; the paper's {1, 3, 7.5, 11, 15} by default.
        evaluators: `guidance.evaluators.Evaluator`s (CLIP, discriminator, reward, latent heads); required.
        weighting: "adaptive" (the paper's `alpha_{e,t} = (e_t - e_{t+1}) / e_{t+1}`) or "fixed" (`weights`).
            Adaptive, as defined here: `e_t` is the evaluator's mean score over the candidates at step t, and
            `e_{t+1}` the same at the previous step (the denominator taken in absolute value, since logit scores
            may be negative); the first step weighs every evaluator 1; an evaluator whose score fell gets
            weight 0 (it is not what this step improves), and when all weights are 0 they are all 1.
        weights: the fixed weights, one per evaluator (default all 1); used by "fixed".
        lookahead: "x0" (the one-step denoised estimate, scored as clean, `timestep` 0), "next_latent" (the
            latent after the run scheduler's step, at the next timestep) or "auto" (default): "next_latent"
            when every evaluator reads latents, else "x0". Pixel evaluators can only judge a clean image (the
            decoded next latent is noise at early steps); timestep-aware latent heads are distilled on noisy
            latents, which the next latent is, while a blurry early x0 estimate is outside what they saw.
        decoder: a VAE decoding x0 latents for pixel evaluators instead of the pipeline's (e.g. AutoencoderTiny).
        guidance_rescale, start, stop, skip, unconditional: as in `ClassifierFreeGuidance` (outside [start, stop],
            no CFG at all; with `skip=AdaptiveSkip(...)` converged rows stop being guided).

    Per step the trace's extras hold `candidates`, `candidate_scores` (evaluator -> [sample][candidate]),
    `weights` (evaluator -> per sample) and `lookahead`; `trace.scales` holds the chosen scale.
    `guidance.plot.plot_dynamic_trace` draws them.
    """

    ignore_for_config = ["evaluators", "decoder", "unconditional"]

    @register_to_config
    def __init__(
        self,
        candidates: Sequence[float] = (1.0, 3.0, 7.5, 11.0, 15.0),
        weighting: Literal["adaptive", "fixed"] = "adaptive",
        weights: Sequence[float] | None = None,
        lookahead: Literal["auto", "x0", "next_latent"] = "auto",
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        skip: UnconditionalSkip | None = None,
        *,
        evaluators: Sequence[Evaluator] | None = None,
        decoder: torch.nn.Module | None = None,
        unconditional: UnconditionalModel | None = None,
    ):
        scale = DynamicScale(candidates, weighting, weights, lookahead, evaluators=evaluators, decoder=decoder)
        self.register_to_config(**{key: scale.config[key] for key in ("candidates", "weights", "evaluators")})
        self._compose(scale, guidance_rescale, start, stop, skip, unconditional)

    @property
    def evaluators(self) -> list[Evaluator]:
        return self.scale.evaluators

    @property
    def decoder(self) -> torch.nn.Module | None:
        return self.scale.decoder

    @property
    def lookahead_kind(self) -> Literal["x0", "next_latent"]:
        return self.scale.lookahead_kind


def check_candidates(candidates) -> list[float]:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or len(candidates) == 0:
        raise ValueError(f"`candidates` must be a non-empty list of guidance scales, got {candidates!r}")
    for value in candidates:
        if not is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"`candidates` must hold finite scales >= 0, got {list(candidates)}")
    return [float(value) for value in candidates]


def check_evaluators(evaluators) -> list[Evaluator]:
    if evaluators is None:
        raise ValueError(
            "`evaluators` is required: a list of guidance.evaluators.Evaluator (ClipEvaluator, FidelityDiscriminator, "
            "RewardEvaluator, LatentEvaluator)"
        )
    if isinstance(evaluators, Evaluator):
        evaluators = [evaluators]
    if isinstance(evaluators, Sequence) and evaluators and all(isinstance(e, str) for e in evaluators):
        raise ValueError(
            f"this dynamic guidance was saved with the evaluators {list(evaluators)}, which a config cannot hold: "
            "pass them again as `evaluators=` (to from_pretrained; for a DynamicScale inside another policy, give the "
            "part: `guidance_scale=DynamicScale.from_config(saved['guidance_scale'], evaluators=...)`)"
        )
    if not isinstance(evaluators, Sequence) or len(evaluators) == 0:
        raise ValueError(f"`evaluators` must be a non-empty list of Evaluator, got {evaluators!r}")
    for evaluator in evaluators:
        if not isinstance(evaluator, Evaluator):
            raise TypeError(f"`evaluators` must hold guidance.evaluators.Evaluator, got {type(evaluator).__name__}")
    names = [e.name for e in evaluators]
    if len(set(names)) != len(names):
        raise ValueError(f"`evaluators` must have distinct names (the trace is keyed by name), got {names}")
    return list(evaluators)


def check_weights(weights, evaluators: list[Evaluator]) -> torch.Tensor:
    if weights is None:
        return torch.ones(len(evaluators))
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(evaluators):
        raise ValueError(
            f"`weights` must have one weight per evaluator ({len(evaluators)}: {[e.name for e in evaluators]}), "
            f"got {weights!r}"
        )
    values = torch.tensor([float(w) for w in weights])
    if not torch.isfinite(values).all() or (values < 0).any() or not (values > 0).any():
        raise ValueError(f"`weights` must be finite, >= 0 and not all 0, got {list(weights)}")
    return values
