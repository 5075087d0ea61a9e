"""Tiny, randomly initialised components of every supported family, built from config offline.

For tests, benchmarks and smoke runs: the architectures and tokenizers are the real classes at toy sizes
(after diffusers' own test fixtures), so nothing is downloaded. Tokenizers are built in memory: a byte-level
CLIP BPE vocabulary without merges, and a character-level T5 unigram vocabulary.
"""

from __future__ import annotations

import string

import torch

from guidance.shapes.tokenizer import clip_byte_vocabulary

from .families import FAMILIES, Family


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=clip_byte_vocabulary(), merges=[], model_max_length=77)


def tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    words = [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=specials + chars + words, extra_ids=0)


def clip_text_config(**overrides):
    """A tiny CLIP text-encoder config over the byte vocabulary; `overrides` replace any field."""
    from transformers import CLIPTextConfig

    base = dict(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=514,
        hidden_act="gelu",
        projection_dim=32,
    )
    return CLIPTextConfig(**{**base, **overrides})


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=128, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4)
    config.relative_attention_num_buckets = 8
    return T5EncoderModel(config)


def tiny_components(family: Family, seed: int = 0) -> dict:
    """The components of a tiny `family` pipeline ("sd", "sdxl", "sd3", "flux"), in eval mode, from `seed`."""
    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {list(FAMILIES)}, got {family!r}")
    torch.manual_seed(seed)
    components = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}[family]()
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def _sd() -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _vae(latent_channels=4),
        "text_encoder": CLIPTextModel(clip_text_config()),
        "tokenizer": tiny_clip_tokenizer(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def _sdxl() -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled projection 32
        cross_attention_dim=64,
        norm_num_groups=4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _vae(latent_channels=4),
        "text_encoder": CLIPTextModel(clip_text_config()),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": CLIPTextModelWithProjection(clip_text_config()),
        "tokenizer_2": tiny_clip_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _sd3() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
        "text_encoder": CLIPTextModelWithProjection(clip_text_config()),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": CLIPTextModelWithProjection(clip_text_config()),
        "tokenizer_2": tiny_clip_tokenizer(),
        "text_encoder_3": _t5_encoder(),
        "tokenizer_3": tiny_t5_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _flux() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=False,
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": _vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
        "text_encoder": CLIPTextModel(clip_text_config()),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": _t5_encoder(),
        "tokenizer_2": tiny_t5_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _vae(latent_channels: int, **config):
    """A two-level AutoencoderKL (spatial scale factor 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **config,
    )


def tiny_image_encoder(projection_dim: int = 32, seed: int = 0) -> dict:
    """A tiny CLIP vision encoder with projection (from `seed`) and its image processor: the components an
    IP-Adapter reads (`image_encoder`, `feature_extractor`)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=projection_dim,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(config).eval()
    return {"image_encoder": encoder, "feature_extractor": CLIPImageProcessor(crop_size=32, size=32)}


def save_tiny_ip_adapter(unet, folder, image_embed_dim: int = 32, seed: int = 0) -> str:
    """Random weights of a basic IP-Adapter (an image projection to 4 tokens, and key/value projections for every
    cross-attention of `unet`) in the file layout `pipe.load_ip_adapter(folder, subfolder="", weight_name=...)`
    reads; returns the weight file's name."""
    from pathlib import Path

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    cross = config.cross_attention_dim

    def weight(*shape):
        return torch.randn(shape, generator=generator) * 0.2

    tensors = {
        "image_proj.proj.weight": weight(4 * cross, image_embed_dim),
        "image_proj.proj.bias": weight(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    index = 1  # diffusers numbers the cross-attention processors 1, 3, 5, ... in their order
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        channels = list(config.block_out_channels)
        hidden = channels[-1] if block is None else (channels[::-1] if name.startswith("up") else channels)[block]
        tensors[f"ip_adapter.{index}.to_k_ip.weight"] = weight(hidden, cross)
        tensors[f"ip_adapter.{index}.to_v_ip.weight"] = weight(hidden, cross)
        index += 2
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(tensors, Path(folder) / "ip_adapter.safetensors")
    return "ip_adapter.safetensors"
