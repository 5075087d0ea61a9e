import pytest
import torch

from guidance.evaluators import Candidates, ClipEvaluator
from guidance.shapes.assets import load_world, shapes_clip


def test_shapes_clip_prefers_the_true_caption_of_real_images():
    world = load_world()
    scenes = world.heldout_scenes()
    images = world.render(scenes, torch.Generator().manual_seed(0))
    true = [world.caption(s) for s in scenes]
    other = true[1:] + true[:1]
    evaluator = ClipEvaluator(shapes_clip())
    assert shapes_clip().endswith("assets/shapes-clip")

    def score(prompts):
        n = len(prompts)
        return evaluator.score(Candidates(torch.zeros(n, 4, 2, 2), torch.zeros(n), prompts, decode=lambda _: images))

    matching, mismatched = score(true), score(other)
    assert matching.shape == (48,) and (matching > mismatched).float().mean() >= 0.9
    assert matching.abs().max() <= 100


@pytest.mark.parametrize(
    ("model", "pretrained", "message"),
    [
        (
            "no-such-model",
            None,
            r"open_clip model 'no-such-model' not found: tried open_clip's built-in architectures",
        ),
        ("local-dir:/no/such/folder", None, r"tried the local folder '/no/such/folder' .* no open_clip_config.json"),
        ("ViT-B-32", "no-such-tag", r"pretrained 'no-such-tag' is neither a known tag \['openai'"),
        (
            "ViT-B-32",
            "openai",
            r"could not be loaded: tried open_clip architecture 'ViT-B-32' with pretrained='openai'",
        ),
    ],
)
def test_models_that_cannot_be_found_say_what_was_tried(model, pretrained, message):
    with pytest.raises(ValueError, match=message):
        ClipEvaluator(model, pretrained=pretrained)


def test_model_must_be_a_name_and_open_clip_must_be_installed(monkeypatch):
    import sys

    with pytest.raises(TypeError, match=r"`model` must be an open_clip model name or 'local-dir:<folder>', got 3"):
        ClipEvaluator(3)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"ClipEvaluator needs open_clip: pip install open_clip_torch"):
        ClipEvaluator("ViT-B-32")
