"""Guided diffusers pipelines: each family's diffusers pipeline with a `guidance=` argument and public stages
(`prepare`, `denoise`, `decode`, `encode_image`) shared through `GuidedPipelineMixin`."""

from .flux import GuidedFluxPipeline, GuidedFluxPipelineOutput
from .sampler import Conditioning, DenoiseOutput, GuidedInputs, GuidedPipelineMixin
from .stable_diffusion import GuidedStableDiffusionPipeline, GuidedStableDiffusionPipelineOutput
from .stable_diffusion_3 import GuidedStableDiffusion3Pipeline, GuidedStableDiffusion3PipelineOutput
from .stable_diffusion_xl import GuidedStableDiffusionXLPipeline, GuidedStableDiffusionXLPipelineOutput

__all__ = [
    "Conditioning",
    "DenoiseOutput",
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
]
