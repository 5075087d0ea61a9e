"""Evaluator specifications (`--evaluator`, `--teacher`, the demo's evaluator field) load the evaluators people use."""

import pytest

from guidance.evaluators import (
    AestheticEvaluator,
    ClipEvaluator,
    HPSv2Evaluator,
    PickScoreEvaluator,
    TransformersClipEvaluator,
)
from guidance.evaluators.testing import (
    register_tiny_open_clip,
    save_open_clip_weights,
    tiny_aesthetic_weights,
    tiny_open_clip,
    tiny_transformers_clip,
)
from pipelines.application.options import evaluator_from_spec, open_clip_name
from pipelines.testing import tiny_clip_tokenizer


def test_every_evaluator_kind_loads_from_its_spec(tmp_path):
    clip = tiny_open_clip(tmp_path / "clip", "ViT-L-14", "openai")
    assert isinstance(evaluator_from_spec(f"clip:{clip}", "tiny:sdxl"), ClipEvaluator)
    folder = tiny_transformers_clip(tmp_path / "transformers", tiny_clip_tokenizer())
    assert type(evaluator_from_spec(f"transformers-clip:{folder}", "tiny:sdxl")) is TransformersClipEvaluator
    pickscore = evaluator_from_spec(f"pickscore:{folder}@{folder}", "tiny:sdxl")
    assert type(pickscore) is PickScoreEvaluator and pickscore.model_name == str(folder)
    architecture = register_tiny_open_clip(tmp_path / "configs", "ViT-H-14")
    weights = save_open_clip_weights(architecture, tmp_path / "hps.safetensors")
    assert HPSv2Evaluator.__init__.__defaults__[0] == "ViT-H-14"
    with pytest.raises(
        ValueError, match=r"tried open_clip architecture 'ViT-H-14' with pretrained='.*hps.safetensors'"
    ):
        evaluator_from_spec(f"hpsv2:{weights}")  # the spec loads HPSv2's own architecture: a tiny file does not fit
    aesthetic = tiny_aesthetic_weights(tmp_path / "aesthetic.safetensors", input_size=768)
    with pytest.raises(ValueError, match=r"open_clip (weights|model 'ViT-L-14') could not be loaded: tried"):
        evaluator_from_spec(f"aesthetic:{aesthetic}")  # reads OpenAI's ViT-L/14: offline, not in the cache here
    assert AestheticEvaluator.__init__.__defaults__[:2] == ("ViT-L-14", "openai")


def test_open_clip_names_take_their_pretrained_tag_after_an_at():
    assert open_clip_name("ViT-L-14@openai") == ("ViT-L-14", "openai")
    assert open_clip_name("ViT-H-14@/w/hps@2.safetensors") == ("ViT-H-14", "/w/hps@2.safetensors")
    assert open_clip_name("local-dir:/a@b") == ("local-dir:/a@b", None)
    assert open_clip_name("ViT-bigG-14") == ("ViT-bigG-14", None)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("clip:ViT-L-14", r"'ViT-L-14' needs `pretrained` \(random weights are not an evaluator\)"),
        ("clip:", r"evaluator 'clip:' needs what it loads after the colon"),
        ("aesthetic:/no/such.pth", r"`weights` must be an existing .safetensors file of the aesthetic predictor"),
        ("judge", r"evaluator 'judge' is not one of 'clip:<open_clip model>@<pretrained tag or .safetensors>'"),
        ("clip", r"evaluator 'clip' is the shapes-world CLIP, for the shapes models; for 'tiny:sd' use"),
        ("", r"an evaluator must be one of 'clip:"),
    ],
)
def test_bad_specs_name_what_was_expected(spec, message):
    with pytest.raises(ValueError, match=message):
        evaluator_from_spec(spec, "tiny:sd")
