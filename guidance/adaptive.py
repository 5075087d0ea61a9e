"""Adaptive Guidance (Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion
Models", arXiv 2312.12487, sec. 4): once the conditional and unconditional predictions of a sample agree, CFG
has nothing left to do for it, so its unconditional pass stops for the remaining steps."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config

from .cfg import ClassifierFreeGuidance
from .denoised import predict_x0
from .scheduler import BranchRequest, GuidanceStep

COMPARED = ("x0", "prediction", "xt_minus_prediction")


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two batches, flattened (the paper's gamma_t)."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


class AdaptiveGuidance(ClassifierFreeGuidance):
    """Full CFG while `gamma_t = cos(q_c, q_u) <= threshold`; from the first step where a sample's gamma_t exceeds
    it, that sample runs the conditional pass only (its unconditional row leaves the batch).

    Args:
        guidance_scale: CFG scale `w` while guiding.
        threshold: `gamma_bar` in (0, 1]. Default 0.995: on the shapes-world SD3-layout model at 20 steps and
            scale 3 it ends CFG after about half the steps (NFE 30.3 instead of 40) with the same attribute
            accuracy as CFG and 43 dB PSNR to CFG's images; 0.998 gave NFE 33.8 and 48 dB.
        compared: which `q` is compared: "x0" (the denoised estimates; default), "prediction" (raw eps or
            velocity), or "xt_minus_prediction" (`x_t - eps`, as in a co-author's SD 1.4 replication).
            Measured on that model (median over 8 held-out prompts), x0 similarity rises monotonically from
            0.81 to 1.0000, so a threshold maps to a point of the noise schedule whatever the step count;
            the velocity similarity plateaus at 0.98-0.99 and falls again in the last steps, and `x_t - v`
            plateaus at 0.995, so their crossing points are fragile.
        guidance_rescale, start, stop: as in `ClassifierFreeGuidance`.

    Per step the trace's extras hold `similarity` (gamma_t per sample, None where the unconditional pass did
    not run).
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        threshold: float = 0.995,
        compared: Literal["x0", "prediction", "xt_minus_prediction"] = "x0",
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
    ):
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, start=start, stop=stop)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"`threshold` must be a number in (0, 1], got {threshold!r}")
        if compared not in COMPARED:
            raise ValueError(f"`compared` must be one of {list(COMPARED)}, got {compared!r}")

    def reset(self, batch_size: int, num_inference_steps: int) -> None:
        super().reset(batch_size, num_inference_steps)
        self.converged = torch.zeros(batch_size, dtype=torch.bool)

    def branches(self, step: GuidanceStep) -> BranchRequest:
        return BranchRequest.full(step.latents.shape[0], uncond=self.guided_at(step) & ~self.converged)

    def similarity(self, step: GuidanceStep, pred_cond: torch.Tensor, pred_uncond: torch.Tensor) -> torch.Tensor:
        """gamma_t per sample for the configured quantity."""
        if self.config.compared == "x0":
            return cosine_similarity(predict_x0(step, pred_cond), predict_x0(step, pred_uncond))
        if self.config.compared == "xt_minus_prediction":
            return cosine_similarity(step.latents - pred_cond, step.latents - pred_uncond)
        return cosine_similarity(pred_cond, pred_uncond)

    def combine(self, step, request, predictions):
        guided, scales = super().combine(step, request, predictions)
        gamma = [None] * guided.shape[0]
        if request.uncond.any():
            similarity = self.similarity(step, predictions["cond"], predictions["uncond"]).cpu()
            self.converged |= request.uncond & (similarity > self.config.threshold)
            gamma = [
                float(g) if ran else None for g, ran in zip(similarity.tolist(), request.uncond.tolist(), strict=True)
            ]
        self.record_extra(similarity=gamma)
        return guided, scales
