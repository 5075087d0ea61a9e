"""Models written by the training commands load with plain diffusers and open_clip, and bad assets are named.

The models are trained for two steps into a temporary folder: this checks formats and loading, not quality
(that is the benchmark's job, benchmarks/shapes_quality.py).
"""

import shutil

import numpy as np
import pytest
import torch
from conftest import seeded

from guidance import ClassifierFreeGuidance
from guidance.shapes.assets import asset_path, load_scorer, load_world
from pipelines.application.commands.train_shapes import main
from pipelines.application.models import load_shapes_pipeline


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("assets")
    assert main(["all", "--steps", "2", "--assets", str(folder), "--checkpoints", str(folder / "checkpoints")]) == 0
    return folder


def test_shapes_sd_loads_with_diffusers_and_matches_the_guided_pipeline(root):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(asset_path("shapes-sd", root))
    guided = load_shapes_pipeline("shapes-sd", root)
    assert reference.unet.config.addition_embed_type == "text" and reference.tokenizer.model_max_length == 16
    for pipe in (reference, guided):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a large red circle at the center on white"] * 2, num_inference_steps=3, output_type="np")
    expected = reference(**kwargs, generator=seeded(), guidance_scale=5.0).images
    result = guided(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(5.0))
    assert result.images.shape == (2, 32, 32, 3)
    assert np.abs(result.images - expected).max() <= 1e-4


def test_shapes_sd3_loads_with_diffusers_without_t5(root):
    from diffusers import StableDiffusion3Pipeline

    folder = asset_path("shapes-sd3", root)
    reference = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    guided = load_shapes_pipeline("shapes-sd3", root)  # fills in the absent T5 by itself
    assert guided.text_encoder_3 is None and guided.transformer.config.patch_size == 2
    assert guided.vae.config.shift_factor is not None
    for pipe in (reference, guided):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a small blue square at the left on gray", num_inference_steps=3, output_type="np")
    expected = reference(**kwargs, generator=seeded(), guidance_scale=4.0, max_sequence_length=16).images
    result = guided(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(4.0), max_sequence_length=16)
    assert np.abs(result.images - expected).max() <= 1e-4


def test_shapes_clip_loads_with_open_clip(root):
    import open_clip

    folder = asset_path("shapes-clip", root)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    world = load_world(root)
    scenes = world.heldout_scenes()[:3]
    tokens = tokenizer([world.caption(s) for s in scenes])
    assert tokens.shape == (3, 16)
    with torch.no_grad():
        images = model.encode_image(world.render(scenes), normalize=True)
        texts = model.encode_text(tokens, normalize=True)
    assert images.shape == texts.shape == (3, 64)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))


def test_scorer_loads_and_scores_every_attribute(root):
    world = load_world(root)
    scenes = world.heldout_scenes()[:6]
    accuracy = load_scorer(root).accuracy(world.render(scenes), scenes, world)
    assert set(accuracy) == {"color", "shape", "size", "position", "background"}
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())


@pytest.mark.parametrize(
    ("name", "relative", "command"),
    [
        ("shapes-sd", "unet/diffusion_pytorch_model.safetensors", "sd"),
        ("shapes-sd3", "transformer/config.json", "sd3"),
        ("shapes-clip", "open_clip_model.safetensors", "clip"),
        ("shapes-scorer", "model.safetensors", "scorer"),
    ],
)
def test_missing_asset_file_names_it_and_the_rebuild_command(root, tmp_path, name, relative, command):
    shutil.copytree(asset_path(name, root), tmp_path / name)
    (tmp_path / name / relative).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=rf"{relative}' is missing; .*`python -m pipelines.application.commands.train_shapes {command}`",
    ):
        asset_path(name, tmp_path)


def test_corrupt_assets_name_the_rebuild_command(root, tmp_path):
    shutil.copytree(asset_path("shapes-sd", root), tmp_path / "shapes-sd")
    (tmp_path / "shapes-sd" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(
        ValueError, match=r"could not be loaded .*`python -m pipelines.application.commands.train_shapes sd`"
    ):
        load_shapes_pipeline("shapes-sd", tmp_path)
    shutil.copytree(asset_path("shapes-scorer", root), tmp_path / "shapes-scorer")
    (tmp_path / "shapes-scorer" / "config.json").write_text('{"classes": {"color": 9}, "width": 32}')
    with pytest.raises(
        ValueError, match=r"is corrupt .*`python -m pipelines.application.commands.train_shapes scorer`"
    ):
        load_scorer(tmp_path)
    with pytest.raises(ValueError, match=r"unknown asset 'shapes-xl'"):
        asset_path("shapes-xl")
