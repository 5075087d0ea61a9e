import pytest
import torch
from conftest import call_kwargs

from guidance import DynamicGuidance
from guidance.evaluators import Candidates, RewardEvaluator
from pipelines.testing import clip_text_config, tiny_clip_tokenizer


@pytest.fixture(scope="module")
def preference_model(tmp_path_factory):
    """A tiny CLIP-style preference model saved with transformers (model, tokenizer, image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    config = CLIPConfig(text_config=clip_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tiny_clip_tokenizer(),
    )
    folder = tmp_path_factory.mktemp("preference")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model


def test_preference_model_scores_like_clip(preference_model):
    folder, model = preference_model
    evaluator = RewardEvaluator.from_pretrained(folder, name="pick")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    prompts = ["a red circle", "a blue square", "a"]
    scores = evaluator.score(Candidates(torch.zeros(3, 4, 2, 2), torch.zeros(3), prompts, decode=lambda _: images))
    pixels = torch.nn.functional.interpolate((images + 1) / 2, size=(32, 32), mode="bicubic", antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(
            input_ids=tiny_clip_tokenizer()(prompts, padding=True, return_tensors="pt").input_ids,
            pixel_values=(pixels.clamp(0, 1) - mean) / std,
        )
    torch.testing.assert_close(scores, out.logits_per_image.diagonal(), atol=1e-4, rtol=1e-4)


def test_any_callable_drives_dynamic_guidance(sd_pipe):
    brightness = RewardEvaluator(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    policy = DynamicGuidance(candidates=[0.0, 4.0, 8.0], evaluators=[brightness])
    result = sd_pipe(**call_kwargs("sd", prompt=["a", "b"]), guidance=policy)
    chosen = result.trace.scales
    for step, extras in zip(chosen, result.trace.extras, strict=True):
        best = [
            [0.0, 4.0, 8.0][max(range(3), key=row.__getitem__)] for row in extras["candidate_scores"]["brightness"]
        ]
        assert step == best


def test_bad_reward_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"`reward_fn` must be callable \(images, prompts\) -> scores, got int"):
        RewardEvaluator(3)
    with pytest.raises(ValueError, match=r"`folder` must be a local folder with a transformers CLIP model, got"):
        RewardEvaluator.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no CLIP-style preference model could be loaded from"):
        RewardEvaluator.from_pretrained(tmp_path)


def test_preference_model_needs_prompts(preference_model):
    evaluator = RewardEvaluator.from_pretrained(preference_model[0], name="pick")
    candidates = Candidates(torch.zeros(1, 4, 2, 2), torch.zeros(1), None, decode=lambda _: torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"evaluator 'pick' scores image-text alignment and needs the prompts"):
        evaluator.score(candidates)
