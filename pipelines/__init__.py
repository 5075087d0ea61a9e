"""Guided diffusers pipelines: each family's diffusers pipeline with a `guidance=` argument and public stages
(`prepare`, `denoise`, `decode`, `image_to_latents`) shared through `GuidedPipelineMixin`; the flow families (SD3,
Flux) also edit and invert images (`edit`, `invert`, `flowedit`: `FlowEditingMixin`). The video families (Wan,
CogVideoX) run on the same sampler, frames being one more latent axis.

Two layers sit above this one, in sub-packages of their own: `pipelines.training` (LinearAG calibration, evaluator
distillation, the Self-NPO trainer) and `pipelines.application` (commands, batch runs, manifests, model names, the
demo's logic).
"""

from .cogvideox import GuidedCogVideoXPipeline, GuidedCogVideoXPipelineOutput
from .editing import FlowEditingMixin, FlowEditOutput
from .flux import GuidedFluxPipeline, GuidedFluxPipelineOutput
from .sampler import Conditioning, DenoiseOutput, GuidedInputs, GuidedPipelineMixin
from .stable_diffusion import GuidedStableDiffusionPipeline, GuidedStableDiffusionPipelineOutput
from .stable_diffusion_3 import GuidedStableDiffusion3Pipeline, GuidedStableDiffusion3PipelineOutput
from .stable_diffusion_xl import GuidedStableDiffusionXLPipeline, GuidedStableDiffusionXLPipelineOutput
from .wan import GuidedWanPipeline, GuidedWanPipelineOutput

__all__ = [
    "Conditioning",
    "DenoiseOutput",
    "FlowEditOutput",
    "FlowEditingMixin",
    "GuidedCogVideoXPipeline",
    "GuidedCogVideoXPipelineOutput",
    "GuidedFluxPipeline",
    "GuidedFluxPipelineOutput",
    "GuidedInputs",
    "GuidedPipelineMixin",
    "GuidedStableDiffusion3Pipeline",
    "GuidedStableDiffusion3PipelineOutput",
    "GuidedStableDiffusionPipeline",
    "GuidedStableDiffusionPipelineOutput",
    "GuidedStableDiffusionXLPipeline",
    "GuidedStableDiffusionXLPipelineOutput",
    "GuidedWanPipeline",
    "GuidedWanPipelineOutput",
]
