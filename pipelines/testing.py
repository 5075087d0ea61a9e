"""Tiny, randomly initialised components of every supported family, built from config offline.

For tests, benchmarks and smoke runs: the architectures and tokenizers are the real classes at toy sizes
(after diffusers' own test fixtures), so nothing is downloaded. Tokenizers are built in memory: a byte-level
CLIP BPE vocabulary without merges, and a character-level T5 unigram vocabulary.
"""

from __future__ import annotations

import string

import torch

from guidance.shapes.tokenizer import clip_byte_vocabulary

from .families import FAMILIES, VIDEO_FAMILIES, Family


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
    """The components of a tiny `family` pipeline ("sd", "sdxl", "sd3", "flux", "wan", "cogvideox"), in eval mode,
    from `seed`."""
    known = FAMILIES + VIDEO_FAMILIES
    if family not in known:
        raise ValueError(f"`family` must be one of {list(known)}, got {family!r}")
    torch.manual_seed(seed)
    builders = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "wan": _wan, "cogvideox": _cogvideox}
    components = builders[family]()
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


def _wan() -> dict:
    """Wan 2.1's layout: a 3D causal VAE (4x in time, 8x in space), T5 text, and Wan 2.1's flow UniPC sampler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": _t5_encoder(),
        "tokenizer": tiny_t5_tokenizer(),
        "transformer_2": None,
    }


def _cogvideox() -> dict:
    """CogVideoX-2b's layout: frames before channels in the latents, a 3D VAE (4x in time, 8x in space), T5 text of
    16 tokens, and CogVideoX's v-prediction DDIM with its SNR shift."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        snr_shift_scale=3.0,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": _t5_encoder(),
        "tokenizer": tiny_t5_tokenizer(),
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


MODULAR_BLOCKS = {
    "sdxl": "StableDiffusionXLAutoBlocks",
    "sd3": "StableDiffusion3AutoBlocks",
    "wan": "WanBlocks",
    "qwenimage": "QwenImageAutoBlocks",
}
"""The diffusers modular pipelines built here from tiny components, by the blocks they run."""


def tiny_modular(family: str, seed: int = 0):
    """A diffusers modular pipeline of `family` ("sdxl", "sd3", "wan", "qwenimage") on tiny components from `seed`,
    with diffusers' default guider. Qwen-Image has no text encoder here (its Qwen2.5-VL tokenizer has no offline
    tiny form): call it with prompt embeddings (`tiny_qwenimage_embeddings`)."""
    import diffusers

    if family not in MODULAR_BLOCKS:
        raise ValueError(f"`family` must be one of {list(MODULAR_BLOCKS)}, got {family!r}")
    components = _qwenimage(seed) if family == "qwenimage" else tiny_components(family, seed)
    pipe = getattr(diffusers, MODULAR_BLOCKS[family])().init_pipeline()
    pipe.update_components(**{k: v for k, v in components.items() if k in pipe.component_names and v is not None})
    disable_progress_bars(pipe.blocks)
    return pipe


def disable_progress_bars(blocks) -> None:
    """No progress bar in any loop of a modular pipeline's blocks (`set_progress_bar_config` reaches the top level
    only, and the denoise loops sit deeper)."""
    if hasattr(blocks, "set_progress_bar_config"):
        blocks.set_progress_bar_config(disable=True)
    for block in getattr(blocks, "sub_blocks", {}).values():
        disable_progress_bars(block)


def _qwenimage(seed: int) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    for module in (transformer, vae):
        module.eval()
    return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler()}


def tiny_qwenimage_embeddings(batch_size: int, length: int = 8, seed: int = 0) -> dict:
    """Random prompt and negative embeddings (with masks) in the tiny Qwen-Image transformer's text width."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn((2, batch_size, length, 16), generator=generator)
    mask = torch.ones((batch_size, length), dtype=torch.long)
    return {
        "prompt_embeds": embeddings[0],
        "prompt_embeds_mask": mask,
        "negative_prompt_embeds": embeddings[1],
        "negative_prompt_embeds_mask": mask,
    }
