"""Dynamic classifier-free guidance from online feedback ("Dynamic Classifier-Free Diffusion Guidance via Online
Feedback", arXiv 2509.16131): at every step, score a look-ahead of each candidate scale with evaluators and
apply the best one, greedily. The candidates recombine the one conditional and one unconditional prediction,
so no extra model pass runs: the NFEs equal constant CFG's."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Sequence
from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config

from .cfg import ClassifierFreeGuidance
from .denoised import predict_x0
from .evaluators.base import Candidates, Evaluator
from .scheduler import BranchRequest, GuidanceStep

WEIGHTINGS = ("adaptive", "fixed")
LOOKAHEADS = ("auto", "x0", "next_latent")


class DynamicGuidance(ClassifierFreeGuidance):
    """Per step and sample, the candidate scale whose look-ahead the evaluators score best.

    For each candidate `s`: `eps_s = eps_u + s (eps_c - eps_u)`; its look-ahead is scored by every evaluator;
    each evaluator's scores are standardised across the candidates of a sample (so that evaluators of different
    units weigh alike), combined as `e_hat = sum_e alpha_e * z_e`, and the argmax candidate is applied.

    Args:
        candidates: the scales to choose from; the paper's {1, 3, 7.5, 11, 15} by default.
        evaluators: `guidance.evaluators.Evaluator`s (CLIP, discriminator, reward, latent heads); default: the
            shapes-world CLIP (`ClipEvaluator()`).
        weighting: "adaptive" (the paper's `alpha_{e,t} = (e_t - e_{t+1}) / e_{t+1}`) or "fixed" (`weights`).
            Adaptive, as defined here: `e_t` is the evaluator's mean score over the candidates at step t, and
            `e_{t+1}` the same at the previous step (the denominator taken in absolute value, since logit scores
            may be negative); the first step weighs every evaluator 1; an evaluator whose score fell gets
            weight 0 (it is not what this step improves), and when all weights are 0 they are all 1.
        weights: the fixed weights, one per evaluator (default all 1); used by "fixed".
        lookahead: "x0" (the one-step denoised estimate, scored as clean, `timestep` 0), "next_latent" (the
            latent after the pipeline scheduler's step, at the next timestep) or "auto" (default): "next_latent"
            when every evaluator reads latents, else "x0". Pixel evaluators can only judge a clean image (the
            decoded next latent is noise at early steps); timestep-aware latent heads are distilled on noisy
            latents, which the next latent is, while a blurry early x0 estimate is outside what they saw.
        decoder: a VAE decoding x0 latents for pixel evaluators instead of the pipeline's (e.g. AutoencoderTiny).
        guidance_rescale, start, stop: as in `ClassifierFreeGuidance` (outside [start, stop], no CFG at all).

    Per step the trace's extras hold `candidates`, `candidate_scores` (evaluator -> [sample][candidate]),
    `weights` (evaluator -> per sample) and `lookahead`; `trace.scales` holds the chosen scale.
    `guidance.plot.plot_dynamic_trace` draws them.
    """

    ignore_for_config = ["evaluators", "decoder"]

    @register_to_config
    def __init__(
        self,
        candidates: Sequence[float] = (1.0, 3.0, 7.5, 11.0, 15.0),
        evaluators: Sequence[Evaluator] | None = None,
        weighting: Literal["adaptive", "fixed"] = "adaptive",
        weights: Sequence[float] | None = None,
        lookahead: Literal["auto", "x0", "next_latent"] = "auto",
        decoder: torch.nn.Module | None = None,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
    ):
        candidates = check_candidates(candidates)
        super().__init__(guidance_scale=max(candidates), guidance_rescale=guidance_rescale, start=start, stop=stop)
        self.register_to_config(candidates=candidates)
        if evaluators is None:
            from .evaluators.clip import ClipEvaluator

            evaluators = [ClipEvaluator()]
        self.evaluators = check_evaluators(evaluators)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"`weighting` must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        if lookahead not in LOOKAHEADS:
            raise ValueError(f"`lookahead` must be one of {list(LOOKAHEADS)}, got {lookahead!r}")
        self.fixed_weights = check_weights(weights, self.evaluators)
        self.register_to_config(weights=self.fixed_weights.tolist())
        self.decoder = decoder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, evaluators=None, decoder=None, **kwargs):
        """Load the config saved by `save_pretrained`; evaluators and decoder are objects, passed again here."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return cls(**own_config(config), evaluators=evaluators, decoder=decoder)

    def new(self, **overrides) -> DynamicGuidance:
        """A fresh scheduler with this config, some values replaced; keeps the evaluators and decoder."""
        objects = {
            "evaluators": overrides.pop("evaluators", self.evaluators),
            "decoder": overrides.pop("decoder", self.decoder),
        }
        config = own_config(self.config)
        unknown = sorted(set(overrides) - set(config))
        if unknown:
            raise ValueError(f"`DynamicGuidance.new` got unknown config keys {unknown}; valid: {sorted(config)}")
        return type(self)(**{**config, **overrides}, **objects)

    def scale_at(self, step: GuidanceStep) -> float:
        return max(self.config.candidates)

    def reset(self, batch_size: int, num_inference_steps: int) -> None:
        super().reset(batch_size, num_inference_steps)
        self.previous_scores: torch.Tensor | None = None  # (evaluators, batch): mean over candidates, last step

    def combine(self, step: GuidanceStep, request: BranchRequest, predictions: dict[str, torch.Tensor]):
        if not request.uncond.any():
            return predictions["cond"], torch.ones(predictions["cond"].shape[0])
        eps_c, eps_u = predictions["cond"], predictions["uncond"]
        scales = torch.tensor(self.config.candidates, dtype=eps_c.dtype, device=eps_c.device)
        k, b, ones = len(scales), eps_c.shape[0], [1] * (eps_c.ndim - 1)
        # one row per (candidate, sample), candidate-major
        w = scales.repeat_interleave(b).view(-1, *ones)
        guided = self.guide(eps_c.repeat(k, *ones), eps_u.repeat(k, *ones), w)
        candidates = self.lookahead(step, guided, k)
        scores = torch.stack([e.score(candidates).view(k, b) for e in self.evaluators])  # (evaluators, k, b)
        weights = self.evaluator_weights(scores.mean(1))
        spread = scores.std(1, keepdim=True) if k > 1 else torch.ones_like(scores)
        standardized = (scores - scores.mean(1, keepdim=True)) / spread.clamp_min(1e-8)
        choice = (weights[:, None, :] * standardized).sum(0).argmax(0)  # (b,)
        rows = torch.arange(b)
        self.record_extra(
            candidates=self.config.candidates,
            candidate_scores={e.name: scores[i].T.tolist() for i, e in enumerate(self.evaluators)},
            weights={e.name: weights[i].tolist() for i, e in enumerate(self.evaluators)},
            lookahead=self.lookahead_kind,
        )
        chosen = guided.view(k, b, *guided.shape[1:])[choice.to(guided.device), rows.to(guided.device)]
        return chosen, scales.cpu()[choice].float()

    def evaluator_weights(self, current: torch.Tensor) -> torch.Tensor:
        """(evaluators, batch) weights from this step's mean scores `current`, per the configured weighting."""
        if self.config.weighting == "fixed":
            return self.fixed_weights[:, None].expand_as(current)
        previous, self.previous_scores = self.previous_scores, current
        if previous is None:
            return torch.ones_like(current)
        alpha = ((current - previous) / previous.abs().clamp_min(1e-8)).clamp_min(0.0)
        return torch.where((alpha == 0).all(0, keepdim=True), torch.ones_like(alpha), alpha)

    @property
    def lookahead_kind(self) -> Literal["x0", "next_latent"]:
        """The look-ahead scored: the configured one, or for "auto" the one that suits the evaluators."""
        if self.config.lookahead != "auto":
            return self.config.lookahead
        return "next_latent" if all(e.space == "latent" for e in self.evaluators) else "x0"

    def lookahead(self, step: GuidanceStep, guided: torch.Tensor, k: int) -> Candidates:
        """The look-ahead latents of `guided` (k candidates x batch rows) and their noise level."""
        latents = step.latents.repeat(k, *[1] * (step.latents.ndim - 1))
        pipeline = step.pipeline
        if self.lookahead_kind == "x0":
            ahead = predict_x0(dataclasses.replace(step, latents=latents), guided)
            timestep = torch.zeros(len(ahead))
        else:
            scheduler = copy.deepcopy(step.scheduler)  # stepping must not advance the pipeline's own scheduler
            kwargs = {}
            if "generator" in inspect.signature(scheduler.step).parameters:
                kwargs["generator"] = torch.Generator(latents.device).manual_seed(0)  # stochastic samplers
            ahead = scheduler.step(guided, step.timestep, latents, **kwargs, return_dict=False)[0]
            timesteps = step.scheduler.timesteps
            following = timesteps[step.step_index + 1] if step.step_index + 1 < len(timesteps) else 0
            timestep = torch.full((len(ahead),), float(following))
        unpacked = pipeline.unpack_for_guidance(ahead) if pipeline is not None else ahead
        decode = None
        if pipeline is not None and hasattr(pipeline, "decode_for_guidance"):
            decode = lambda x: pipeline.decode_for_guidance(x, self.decoder)  # noqa: E731
        prompts = None if step.prompts is None else list(step.prompts) * k
        return Candidates(latents=unpacked, timestep=timestep, prompts=prompts, decode=decode)


def own_config(config) -> dict:
    """The config values DynamicGuidance's constructor takes (not the parent's derived `guidance_scale`)."""
    names = set(inspect.signature(DynamicGuidance.__init__).parameters) - {"self", "evaluators", "decoder"}
    return {key: value for key, value in config.items() if key in names}


def check_candidates(candidates) -> list[float]:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or len(candidates) == 0:
        raise ValueError(f"`candidates` must be a non-empty list of guidance scales, got {candidates!r}")
    for value in candidates:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"`candidates` must hold finite scales >= 0, got {list(candidates)}")
    return [float(value) for value in candidates]


def check_evaluators(evaluators) -> list[Evaluator]:
    if isinstance(evaluators, Evaluator):
        evaluators = [evaluators]
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
