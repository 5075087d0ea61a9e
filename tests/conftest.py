import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before the demo's page imports gradio

from collections.abc import Mapping  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


class References(Mapping):
    """family -> (the diffusers class, the guided class, diffusers' CFG scale argument), imported on first use, so that
    tests of the guidance package alone never import the pipelines."""

    scale_arguments = {
        "sd": "guidance_scale",
        "sdxl": "guidance_scale",
        "sd3": "guidance_scale",
        "flux": "true_cfg_scale",
    }

    def __getitem__(self, family: str):
        import diffusers

        from pipelines.families import DIFFUSERS_CLASSES, guided_class

        return getattr(diffusers, DIFFUSERS_CLASSES[family]), guided_class(family), self.scale_arguments[family]

    def __iter__(self):
        return iter(self.scale_arguments)

    def __len__(self) -> int:
        return len(self.scale_arguments)


REFERENCE = References()
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
    from pipelines.testing import tiny_components

    reference_class, guided_class, _ = REFERENCE[family]
    components = {**tiny_components(family), **component_overrides}
    pipe = (guided_class if guided else reference_class)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd_pipe():
    return build("sd")


# ----- the demo (tests/app): its policy slots' values, a shapes-world image, the page served once per session


def policy_values(*slots) -> list:
    """The flat values of the demo's Compare policy slots (`demo.PolicyControls`; the rest off)."""
    from pipelines.application.demo import policy_values as flat

    return flat(slots)


def rendered_scene(**attributes: str):
    """A PIL image of a shapes-world scene (a real render, not a model sample)."""
    from guidance.shapes.assets import ASSETS
    from guidance.shapes.world import ShapesWorld

    world = ShapesWorld.from_json(ASSETS / "shapes-world.json")
    return world.render_images([world.scene(**attributes)])[0]


@pytest.fixture(scope="session")
def red_circle_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "red-circle.png"
    rendered_scene(color="red", shape="circle", size="large", position="center", background="white").save(path)
    return path


@pytest.fixture(scope="session")
def demo_url():
    """The demo's page, served on a free local port (Gradio takes the first free one from 7860) for the session."""
    import app

    page, url = app.launch_demo(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    page.close()
