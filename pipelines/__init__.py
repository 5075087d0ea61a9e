"""Guided diffusers pipelines: each family's diffusers pipeline with a `guidance=` argument and public stages
(`prepare`, `denoise`, `decode`, `encode_image`) shared through `GuidedPipelineMixin`; the flow families (SD3, Flux)
also edit and invert images (`edit`, `invert`, `flowedit`: `FlowEditingMixin`). `generate_batch` runs a manifest into
a folder that resumes, on one device or several through accelerate."""

from .batch import BatchResult, generate_batch
from .editing import FlowEditingMixin, FlowEditOutput
from .flux import GuidedFluxPipeline, GuidedFluxPipelineOutput
from .sampler import Conditioning, DenoiseOutput, GuidedInputs, GuidedPipelineMixin
from .stable_diffusion import GuidedStableDiffusionPipeline, GuidedStableDiffusionPipelineOutput
from .stable_diffusion_3 import GuidedStableDiffusion3Pipeline, GuidedStableDiffusion3PipelineOutput
from .stable_diffusion_xl import GuidedStableDiffusionXLPipeline, GuidedStableDiffusionXLPipelineOutput

__all__ = [
    "BatchResult",
    "Conditioning",
    "DenoiseOutput",
    "FlowEditOutput",
    "FlowEditingMixin",
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
    "generate_batch",
]
