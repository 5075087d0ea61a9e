"""Full-size SD 1.5, SDXL and SD3-medium architectures with random weights, built from config (no download).

For timing at real scale on a GPU: the compute of a random-weight model equals that of the released one.
Tokenizers are the tiny in-memory ones of `pipelines.testing` (tokenisation cost is negligible).
"""

from __future__ import annotations

import torch

from pipelines.testing import tiny_clip_tokenizer


def _clip_text(hidden: int, layers: int, heads: int, projection: int | None, act: str, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=scaling_factor,
    )


def sd15_components() -> dict:
    """SD 1.5: UNet 860M (cross-attention 768), CLIP ViT-L/14 text encoder, the f8 VAE, DDIM 1000 steps."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    return {
        "unet": UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "vae": _vae(0.18215),
        "text_encoder": _clip_text(768, 12, 12, None, "quick_gelu", with_projection=False),
        "tokenizer": tiny_clip_tokenizer(),
        "scheduler": DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
        ),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def sdxl_components() -> dict:
    """SDXL base: UNet 2.6B (transformer depths 1/2/10), CLIP ViT-L + OpenCLIP bigG text encoders, Euler."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return {
        "unet": unet,
        "vae": _vae(0.13025),
        "text_encoder": _clip_text(768, 12, 12, None, "quick_gelu", with_projection=False),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": _clip_text(1280, 32, 20, 1280, "gelu", with_projection=True),
        "tokenizer_2": tiny_clip_tokenizer(),
        "scheduler": EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        "image_encoder": None,
        "feature_extractor": None,
    }


def sd3_components() -> dict:
    """SD3-medium: MMDiT 2B (24 layers, 24 heads of 64), CLIP ViT-L and bigG with projection, the 16-channel VAE,
    FlowMatch Euler (shift 3); without T5 (4.7B parameters, 19 GB in float32), which the pipeline allows."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=16,
        sample_size=1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": _clip_text(768, 12, 12, 768, "quick_gelu", with_projection=True),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": _clip_text(1280, 32, 20, 1280, "gelu", with_projection=True),
        "tokenizer_2": tiny_clip_tokenizer(),
        "text_encoder_3": None,
        "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "image_encoder": None,
        "feature_extractor": None,
    }


def full_size_components(name: str, dtype: torch.dtype, device: str) -> dict:
    builders = {"sd15": sd15_components, "sdxl": sdxl_components, "sd3": sd3_components}
    if name not in builders:
        raise ValueError(f"`name` must be one of {list(builders)}, got {name!r}")
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the target device: much faster on a GPU
        components = builders[name]()
    scheduler = components["scheduler"]  # its tables stay on the CPU, as from_pretrained leaves them
    components["scheduler"] = type(scheduler).from_config(scheduler.config)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.to(dtype=dtype).eval()
    return components
