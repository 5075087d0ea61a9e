"""Every refusal of the evaluators' loaders names what was expected and what was given."""

import pytest
import torch

from guidance.evaluators import Candidates, ClipEvaluator, TransformersClipEvaluator
from guidance.evaluators.base import Preprocess
from guidance.evaluators.clip import open_clip_preprocess
from guidance.evaluators.teachers import load_teacher
from guidance.evaluators.testing import tiny_open_clip, tiny_open_clip_config, tiny_transformers_clip
from guidance.evaluators.transformers_clip import processor_preprocess
from pipelines.testing import tiny_clip_tokenizer


def test_preprocessing_and_candidates_refuse_what_they_cannot_do():
    mean = std = (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"`resize_mode` must be one of \['shortest', 'longest', 'squash'\], got 'x'"):
        Preprocess((8, 8), mean, std, resize_mode="x")
    with pytest.raises(ValueError, match=r"`interpolation` must be 'bicubic' or 'bilinear', got 'nearest'"):
        Preprocess((8, 8), mean, std, interpolation="nearest")
    with pytest.raises(ValueError, match=r"these candidates have no decoder, so a pixel evaluator cannot score them"):
        _ = Candidates(torch.zeros(1, 4, 2, 2), torch.zeros(1)).images


def test_open_clip_sources_are_checked_before_loading(tmp_path):
    folder = tiny_open_clip(tmp_path / "clip", "ViT-L-14", "openai")
    with pytest.raises(ValueError, match=r"`pretrained` is only for open_clip architecture names; 'local-dir:.*' has"):
        ClipEvaluator(folder, pretrained="openai")
    pickle = tmp_path / "weights.bin"
    pickle.write_bytes(b"0")
    with pytest.raises(ValueError, match=r"the weights '.*weights.bin' are not .safetensors; this project loads"):
        ClipEvaluator("ViT-B-32", pretrained=str(pickle))
    with pytest.raises(
        ValueError, match=r"open_clip model 'no-such' not found: it is not one of open_clip's built-in"
    ):
        open_clip_preprocess("no-such")
    with pytest.raises(ValueError, match=r"`architecture` must be an open_clip built-in architecture, got 'no-such'"):
        tiny_open_clip_config("no-such")


def test_teacher_specs_name_the_types_they_take():
    with pytest.raises(ValueError, match=r"teacher spec must be an open_clip model name or have a type of \["):
        load_teacher({"type": "imagereward"})
    with pytest.raises(ValueError, match=r"have a type of \['open_clip', .*\], got 3"):
        load_teacher(3)


def test_transformers_clip_refusals(tmp_path):
    from transformers import CLIPImageProcessor

    with pytest.raises(TypeError, match=r"`model` must be a folder or a hub id of a transformers CLIPModel, got 3"):
        TransformersClipEvaluator(3)
    folder = tiny_transformers_clip(tmp_path / "clip", tiny_clip_tokenizer(), image_size=32, patch_size=8)
    with pytest.raises(ValueError, match=r"no CLIP processor could be loaded from '.*missing'"):
        TransformersClipEvaluator(folder, processor=tmp_path / "missing")
    processor = CLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 16, "width": 16})
    with pytest.raises(ValueError, match=r"resizes to \(32, 32\) and crops to .*: only one of the two is supported"):
        processor_preprocess(processor)
