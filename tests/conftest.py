import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import pipelines  # noqa: E402
from pipelines.tiny import tiny_components  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

REFERENCE = {
    "sd": (diffusers.StableDiffusionPipeline, pipelines.GuidedStableDiffusionPipeline, "guidance_scale"),
    "sdxl": (diffusers.StableDiffusionXLPipeline, pipelines.GuidedStableDiffusionXLPipeline, "guidance_scale"),
    "sd3": (diffusers.StableDiffusion3Pipeline, pipelines.GuidedStableDiffusion3Pipeline, "guidance_scale"),
    "flux": (diffusers.FluxPipeline, pipelines.GuidedFluxPipeline, "true_cfg_scale"),
}
CALL_DEFAULTS = {"num_inference_steps": 3, "height": 16, "width": 16, "output_type": "np"}
FAMILY_DEFAULTS = {"sd3": {"max_sequence_length": 16}, "flux": {"max_sequence_length": 16}}


def call_kwargs(family: str, **overrides) -> dict:
    return {**CALL_DEFAULTS, **FAMILY_DEFAULTS.get(family, {}), **overrides}


def size_kwargs(family: str) -> dict:
    """The image size and text length of the tiny models, without step count or output type."""
    return {"height": 16, "width": 16, **FAMILY_DEFAULTS.get(family, {})}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(family: str, guided: bool = True, **component_overrides):
    reference_class, guided_class, _ = REFERENCE[family]
    components = {**tiny_components(family), **component_overrides}
    pipe = (guided_class if guided else reference_class)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd_pipe():
    return build("sd")
