"""Guided diffusers pipelines: each family's diffusers pipeline with a `guidance=` argument."""

from .flux import GuidedFluxPipeline, GuidedFluxPipelineOutput
from .guided_step import Conditioning, GuidedPipelineMixin
from .stable_diffusion import GuidedStableDiffusionPipeline, GuidedStableDiffusionPipelineOutput
from .stable_diffusion_3 import GuidedStableDiffusion3Pipeline, GuidedStableDiffusion3PipelineOutput
from .stable_diffusion_xl import GuidedStableDiffusionXLPipeline, GuidedStableDiffusionXLPipelineOutput

__all__ = [
    "Conditioning",
    "GuidedFluxPipeline",
    "GuidedFluxPipelineOutput",
    "GuidedPipelineMixin",
    "GuidedStableDiffusion3Pipeline",
    "GuidedStableDiffusion3PipelineOutput",
    "GuidedStableDiffusionPipeline",
    "GuidedStableDiffusionPipelineOutput",
    "GuidedStableDiffusionXLPipeline",
    "GuidedStableDiffusionXLPipelineOutput",
]
