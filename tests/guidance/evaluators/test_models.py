"""The evaluators people use, on tiny random copies of the real architectures built from config (offline): each
scores as its reference model does, with that model's own preprocessing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from guidance.evaluators import (
    AestheticEvaluator,
    Candidates,
    ClipEvaluator,
    HPSv2Evaluator,
    LatentEvaluator,
    PickScoreEvaluator,
    TransformersClipEvaluator,
)
from guidance.evaluators.networks import ConvEncoder
from guidance.evaluators.testing import (
    register_tiny_open_clip,
    save_open_clip_weights,
    tiny_aesthetic_weights,
    tiny_open_clip,
    tiny_transformers_clip,
)
from pipelines.testing import tiny_clip_tokenizer

PROMPTS = ["a red circle", "a blue square on white", "two green triangles"]
ARCHITECTURES = [("ViT-L-14", "openai"), ("ViT-H-14", "laion2b_s32b_b79k"), ("ViT-bigG-14", "laion2b_s39b_b160k")]


def photos(count=3, size=(300, 200), seed=0):
    """Random smooth non-square RGB images (coarse noise blown up, as photos are smooth at their pixel scale), as
    PIL images and as tensors in [-1, 1]."""
    rng = np.random.default_rng(seed)
    coarse = [Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)) for _ in range(count)]
    arrays = [np.array(image.resize(size, Image.BILINEAR)) for image in coarse]
    tensors = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays])
    return [Image.fromarray(a) for a in arrays], tensors


def cosine_scores(image_embeddings, text_embeddings, scale=100.0):
    return scale * F.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)


@pytest.mark.parametrize("architecture, tag", ARCHITECTURES)
def test_open_clip_models_score_with_their_own_preprocessing(tmp_path, architecture, tag):
    import open_clip

    source = tiny_open_clip(tmp_path / architecture, architecture, tag)
    evaluator = ClipEvaluator(source)
    model, _, transform = open_clip.create_model_and_transforms(source)
    pil, images = photos()
    theirs = torch.stack([transform(image) for image in pil])
    ours = evaluator.preprocess(images)
    assert ours.shape == theirs.shape == (3, 3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.01 and (ours - theirs).abs().max() < 0.1  # PIL's uint8 rounding
    with torch.no_grad():
        expected = cosine_scores(model.encode_image(ours), model.encode_text(open_clip.get_tokenizer(source)(PROMPTS)))
    scores = evaluator.score(Candidates(torch.zeros(3, 4, 2, 2), torch.zeros(3), PROMPTS, decode=lambda _: images))
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert scores.std() > 0  # the random towers tell the images apart


def test_an_open_clip_name_needs_its_weights_and_refuses_pickles(tmp_path):
    with pytest.raises(ValueError, match=r"'ViT-L-14' needs `pretrained` \(random weights are not an evaluator\)"):
        ClipEvaluator("ViT-L-14")
    with pytest.raises(ValueError, match=r"pretrained 'nope' is neither a known tag \["):
        ClipEvaluator("ViT-L-14", pretrained="nope")
    folder = tmp_path / "pickled"
    tiny_open_clip(folder, "ViT-L-14", "openai")
    (folder / "open_clip_model.safetensors").rename(folder / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickled weights \['open_clip_pytorch_model.bin'\]: this project"):
        ClipEvaluator(f"local-dir:{folder}")


@pytest.fixture(scope="module")
def transformers_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformers-clip")
    return tiny_transformers_clip(folder, tiny_clip_tokenizer(), image_size=224, patch_size=14)


def processor_scores(model, processor, pil, prompts, scale):
    inputs = processor(text=prompts, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return cosine_scores(out.image_embeds, out.text_embeds, scale), inputs["pixel_values"]


def test_transformers_clip_scores_as_clip_model_with_its_processor(transformers_clip):
    from transformers import CLIPModel, CLIPProcessor

    evaluator = TransformersClipEvaluator(transformers_clip)
    model, processor = (
        CLIPModel.from_pretrained(transformers_clip).eval(),
        CLIPProcessor.from_pretrained(transformers_clip),
    )
    pil, images = photos()
    expected, pixel_values = processor_scores(model, processor, pil, PROMPTS, 100.0)
    assert (evaluator.preprocess(images) - pixel_values).abs().mean() < 0.01
    torch.testing.assert_close(evaluator.scores(images, PROMPTS), expected, atol=0.05, rtol=0)
    assert evaluator.spec == {"type": "transformers-clip", "model": str(transformers_clip), "processor": None}


def test_pickscore_is_logit_scale_times_cosine_with_its_separate_processor(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    model_folder, processor_folder = tmp_path / "pickscore", tmp_path / "processor"
    tiny_transformers_clip(model_folder, tiny_clip_tokenizer(), processor_folder=processor_folder)
    evaluator = PickScoreEvaluator(model_folder, processor_folder)
    model = CLIPModel.from_pretrained(model_folder).eval()
    assert evaluator.scale == pytest.approx(model.logit_scale.exp().item())
    pil, images = photos()
    with torch.no_grad():
        out = model(
            **CLIPProcessor.from_pretrained(processor_folder)(
                text=PROMPTS, images=pil, return_tensors="pt", padding=True
            )
        )
    torch.testing.assert_close(evaluator.scores(images, PROMPTS), out.logits_per_image.diagonal(), atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="no transformers CLIPModel \\(safetensors weights\\) could be loaded from"):
        PickScoreEvaluator(tmp_path / "missing", processor_folder)
    with pytest.raises(ValueError, match="evaluator 'pickscore' scores image-text alignment and needs the prompts"):
        evaluator.score(Candidates.from_images(images))


def test_hpsv2_is_open_clip_vit_h_14_with_its_converted_checkpoint(tmp_path):
    import open_clip

    architecture = register_tiny_open_clip(tmp_path / "configs", "ViT-H-14")
    checkpoint = save_open_clip_weights(architecture, tmp_path / "hpsv2.safetensors", seed=3)
    evaluator = HPSv2Evaluator(checkpoint, architecture=architecture)
    reference = open_clip.create_model(architecture, pretrained=checkpoint).eval()
    _, images = photos()
    pixels = evaluator.preprocess(images)
    assert pixels.shape[-2:] == (224, 224) and evaluator.preprocess.resize_mode == "shortest"
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(architecture)(PROMPTS)
        expected = cosine_scores(reference.encode_image(pixels), reference.encode_text(tokens))
    torch.testing.assert_close(evaluator.scores(images, PROMPTS), expected, atol=1e-4, rtol=1e-4)
    assert evaluator.spec == {"type": "hpsv2", "checkpoint": checkpoint, "architecture": architecture}
    with pytest.raises(ValueError, match=r"`checkpoint` must be a .safetensors file of the HPSv2 state dict, got"):
        HPSv2Evaluator(tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match=r"`checkpoint` '.*missing.safetensors' does not exist"):
        HPSv2Evaluator(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match=r"`checkpoint` must be the path of a .safetensors file, got int"):
        HPSv2Evaluator(3)


def test_the_aesthetic_predictor_rates_the_unit_clip_image_embedding(tmp_path):
    clip = tiny_open_clip(tmp_path / "clip", "ViT-L-14", "openai")
    weights = tiny_aesthetic_weights(tmp_path / "aesthetic.safetensors", input_size=16, seed=1)
    evaluator = AestheticEvaluator(weights, clip=clip)
    _, images = photos()
    embeddings = F.normalize(evaluator.embedder.clip.encode_image(evaluator.embedder.preprocess(images)), dim=-1)
    with torch.no_grad():
        expected = evaluator.mlp(embeddings).squeeze(-1)
    ratings = evaluator.score(Candidates.from_images(images))  # no prompt needed
    torch.testing.assert_close(ratings, expected, atol=1e-5, rtol=1e-5)
    assert set(evaluator.mlp.state_dict()) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    with pytest.raises(
        ValueError, match=r"`weights` must be an existing .safetensors file of the aesthetic predictor"
    ):
        AestheticEvaluator(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", clip=clip)
    wrong = tiny_aesthetic_weights(tmp_path / "wrong.safetensors", input_size=768)
    with pytest.raises(ValueError, match=r"is not an aesthetic predictor for 16-dim CLIP embeddings"):
        AestheticEvaluator(wrong, clip=clip)


@pytest.mark.parametrize("teacher_kind", ["open_clip", "transformers-clip", "hpsv2"])
def test_a_latent_head_of_any_image_text_teacher_saves_and_scores_with_its_text_tower(
    tmp_path, teacher_kind, transformers_clip
):
    if teacher_kind == "open_clip":
        teacher = ClipEvaluator(tiny_open_clip(tmp_path / "clip", "ViT-L-14", "openai"))
    elif teacher_kind == "transformers-clip":
        teacher = TransformersClipEvaluator(transformers_clip)
    else:
        architecture = register_tiny_open_clip(tmp_path / "configs", "ViT-H-14")
        teacher = HPSv2Evaluator(save_open_clip_weights(architecture, tmp_path / "h.safetensors"), architecture)
    head = LatentEvaluator(ConvEncoder(4, 8, 16, width=8, timestep_aware=True), "clip", teacher_model=teacher)
    head.save_pretrained(tmp_path / "head")
    loaded = LatentEvaluator.from_pretrained(tmp_path / "head")
    assert type(loaded.clip) is type(teacher) and loaded.teacher == head.teacher
    candidates = Candidates(torch.randn(3, 4, 8, 8), torch.tensor([0.0, 10.0, 500.0]), PROMPTS)
    scores = loaded.score(candidates)
    predicted = head.predict(candidates.latents, candidates.timestep)
    expected = teacher.scale * F.cosine_similarity(predicted, teacher.text_features(PROMPTS, torch.device("cpu")))
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match=r"`teacher_model` must be an EmbeddingEvaluator \(an image-text model\)"):
        LatentEvaluator(ConvEncoder(4, 8, 16), "clip", teacher_model=torch.nn.Linear(2, 2))
