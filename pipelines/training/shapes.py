"""The shapes world's own models, trained from the generator alone (a development fixture: the embedded default and
the test bed; `python -m pipelines.application.commands.train_shapes all` rebuilds them).

Each model is resumable from its checkpoint and reproducible from the seed:
  vae     AutoencoderKL, 32x32 RGB <-> 4x16x16 latents (shared by the SD and SD3 models)
  sd      UNet2DConditionModel (epsilon) + CLIPTextModel, trained jointly -> assets/shapes-sd
  sd3     SD3Transformer2DModel (flow matching) + two CLIP text encoders -> assets/shapes-sd3
  clip    open_clip model, contrastive -> assets/shapes-clip
  scorer  attribute classifier -> assets/shapes-scorer
Captions are replaced by the empty prompt for 10% of the samples (20% for sd3), so that CFG has an unconditional
model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from guidance import vae as vae_latents
from guidance.denoised import add_noise
from guidance.shapes.assets import SHAPES_SD3_MAX_SEQUENCE_LENGTH
from guidance.shapes.scorer import AttributeScorer
from guidance.shapes.tokenizer import MAX_LENGTH, world_tokenizer
from guidance.shapes.world import ATTRIBUTES, ShapesWorld

from ..testing import clip_text_config
from .trainer import Trainer, step_generator

CAPTION_DROPOUT = 0.1
# The flow model learns colour within ~1000 steps and then follows captions closely at scale 1; a larger dropout
# (measured: shape accuracy +14 points from scale 1 to 3 with 0.2, +9 with 0.1) keeps guidance meaningful.
SD3_CAPTION_DROPOUT = 0.2
DEFAULT_STEPS = {"vae": 800, "sd": 3000, "sd3": 4000, "clip": 1200, "scorer": 800}
BATCH = {"vae": 32, "sd": 64, "sd3": 64, "clip": 128, "scorer": 128}


@dataclass
class ShapesTraining:
    """Where and how the shapes-world models are trained: `assets` receives the models, `checkpoints` the resumable
    state; `steps` replaces every model's default (`DEFAULT_STEPS`); `device` runs sd and sd3 (data and noise are
    drawn on the CPU, so the same on any device)."""

    assets: Path
    checkpoints: Path
    steps: int | None = None
    seed: int = 0
    device: str = "cpu"

    def steps_of(self, model: str) -> int:
        return self.steps or DEFAULT_STEPS[model]


def training_batch(world: ShapesWorld, generator: torch.Generator, batch: int, dropout: float = CAPTION_DROPOUT):
    scenes = world.sample(batch, generator)
    images = world.render(scenes, generator)
    keep = torch.rand(batch, generator=generator) >= dropout
    captions = [world.caption(scene) if k else "" for scene, k in zip(scenes, keep.tolist(), strict=True)]
    return scenes, images, captions


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def world_text_config(tokenizer, projection: bool):
    """The shapes-world CLIP text encoder: the tiny config, wider, over the world tokenizer."""
    return clip_text_config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64 if projection else 512,
    )


def train_vae(settings: ShapesTraining, world: ShapesWorld) -> None:
    torch.manual_seed(settings.seed)
    vae = build_vae()

    def loss_fn(generator, step):
        _, images, _ = training_batch(world, generator, BATCH["vae"])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        return F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()

    vae = Trainer("vae", vae, settings.checkpoints, settings.steps_of("vae"), 1e-3, settings.seed).run(loss_fn)
    with torch.no_grad():  # latent statistics set the VAE's shift and scaling factors (SD's 0.18215)
        _, images, _ = training_batch(world, step_generator(settings.seed, 10**7), 1024)
        latents = vae.encode(images).latent_dist.mean
    stats = {"mean": latents.mean().item(), "std": latents.std().item()}
    Path(settings.checkpoints).mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(Path(settings.checkpoints) / "vae")
    (Path(settings.checkpoints) / "vae" / "latent_stats.json").write_text(json.dumps(stats))
    print(f"vae latent mean {stats['mean']:.4f} std {stats['std']:.4f}")


def trained_vae(settings: ShapesTraining, shift: bool):
    from diffusers import AutoencoderKL

    folder = Path(settings.checkpoints) / "vae"
    if not (folder / "latent_stats.json").is_file():
        raise FileNotFoundError(f"{folder} has no trained VAE; train the vae first")
    stats = json.loads((folder / "latent_stats.json").read_text())
    vae = AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=1.0 / stats["std"], shift_factor=stats["mean"] if shift else None)
    return vae


def train_sd(settings: ShapesTraining, world: ShapesWorld) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(settings.seed)
    tokenizer = world_tokenizer(world)
    text_encoder = CLIPTextModel(world_text_config(tokenizer, projection=False))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
        addition_embed_type="text",  # pooled text added to the time embedding: global attributes in every block
        addition_embed_type_num_heads=4,
    )
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    noise_schedule = DDPMScheduler(**betas)
    pipe = StableDiffusionPipeline(
        vae=trained_vae(settings, shift=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    device = torch.device(settings.device)
    pipe.to(device)

    def loss_fn(generator, step):  # every random draw on the CPU generator: the same data on any device
        _, images, captions = training_batch(world, generator, BATCH["sd"])
        latents = vae_latents.encode(pipe.vae, images.to(device))  # frozen VAE: no graph
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, 1000, (len(captions),), generator=generator).to(device)
        embeds, _ = pipe.encode_prompt(captions, device, 1, False)  # the pipeline's own text path, with grads
        prediction = unet(noise_schedule.add_noise(latents, noise, t), t, encoder_hidden_states=embeds).sample
        return F.mse_loss(prediction, noise)

    Trainer("sd", model, settings.checkpoints, settings.steps_of("sd"), 1e-3, settings.seed).run(loss_fn)
    save_pipeline(pipe, Path(settings.assets) / "shapes-sd")


def train_sd3(settings: ShapesTraining, world: ShapesWorld) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(settings.seed)
    tokenizer = world_tokenizer(world)
    text_encoder = CLIPTextModelWithProjection(world_text_config(tokenizer, projection=True))
    text_encoder_2 = CLIPTextModelWithProjection(world_text_config(tokenizer, projection=True))
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,  # the two CLIP hidden states side by side
        caption_projection_dim=128,
        pooled_projection_dim=128,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=trained_vae(settings, shift=True),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    model = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder, "text_2": text_encoder_2})
    device = torch.device(settings.device)
    pipe.to(device)

    def loss_fn(generator, step):  # every random draw on the CPU generator: the same data on any device
        _, images, captions = training_batch(world, generator, BATCH["sd3"], SD3_CAPTION_DROPOUT)
        x0 = vae_latents.encode(pipe.vae, images.to(device))  # frozen VAE: no graph
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigma = torch.sigmoid(torch.randn(len(captions), generator=generator)).view(-1, 1, 1, 1).to(device)
        embeds, _, pooled, _ = pipe.encode_prompt(  # logit-normal sigma above
            captions,
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=SHAPES_SD3_MAX_SEQUENCE_LENGTH,
        )
        timesteps = sigma.flatten() * 1000
        velocity = transformer(
            hidden_states=add_noise(pipe.scheduler, x0, noise, timesteps),
            timestep=timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
        ).sample
        return F.mse_loss(velocity, noise - x0)

    Trainer("sd3", model, settings.checkpoints, settings.steps_of("sd3"), 5e-4, settings.seed).run(loss_fn)
    save_pipeline(pipe, Path(settings.assets) / "shapes-sd3")


def clip_config(tokenizer) -> dict:
    return {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 96, "layers": 4, "head_width": 24},
            "text_cfg": {
                "context_length": MAX_LENGTH,
                "vocab_size": len(tokenizer),
                "width": 64,
                "heads": 4,
                "layers": 3,
                "hf_tokenizer_name": "shapes-world",  # open_clip then reads the tokenizer files of the folder
            },
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "size": 32, "interpolation": "bicubic"},
    }


def train_clip(settings: ShapesTraining, world: ShapesWorld) -> None:
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("training shapes-clip needs open_clip: pip install open_clip_torch") from error
    from safetensors.torch import save_file

    torch.manual_seed(settings.seed)
    tokenizer = world_tokenizer(world)
    folder = Path(settings.assets) / "shapes-clip"
    staging = Path(settings.checkpoints) / "clip-config"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "open_clip_config.json").write_text(json.dumps(clip_config(tokenizer), indent=1))
    tokenizer.save_pretrained(staging)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{staging}")
    tokenize = open_clip.get_tokenizer(f"local-dir:{staging}")

    def loss_fn(generator, step):
        _, images, captions = training_batch(world, generator, BATCH["clip"], dropout=0.0)
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokenize(captions), normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(-1, keepdim=True)  # duplicates of a caption are all positives
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    model = Trainer("clip", model, settings.checkpoints, settings.steps_of("clip"), 1e-3, settings.seed).run(loss_fn)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(staging, folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    print(f"saved {folder}")


def train_scorer(settings: ShapesTraining, world: ShapesWorld) -> None:
    torch.manual_seed(settings.seed)
    scorer = AttributeScorer({name: len(world.values[name]) for name in ATTRIBUTES})
    scenes_pool = world.all_scenes()  # the instrument sees every combination, held-out ones included

    def loss_fn(generator, step):
        indices = torch.randint(len(scenes_pool), (BATCH["scorer"],), generator=generator).tolist()
        scenes = [scenes_pool[i] for i in indices]
        images = world.render(scenes, generator)
        blur = torch.rand(len(scenes), 1, 1, 1, generator=generator) < 0.3  # robust to soft generated edges
        images = torch.where(blur, F.avg_pool2d(images, 3, 1, 1, count_include_pad=False), images)
        noise = torch.rand(len(scenes), 1, 1, 1, generator=generator) * 0.15
        images = images + noise * torch.randn(images.shape, generator=generator)
        logits, labels = scorer(images), world.labels(scenes)
        return sum(F.cross_entropy(logits[name], labels[name]) for name in ATTRIBUTES)

    steps = settings.steps_of("scorer")
    scorer = Trainer("scorer", scorer, settings.checkpoints, steps, 2e-3, settings.seed).run(loss_fn)
    scorer.save_pretrained(Path(settings.assets) / "shapes-scorer")
    scenes = world.heldout_scenes()
    accuracy = scorer.accuracy(world.render(scenes, step_generator(settings.seed, 10**8)), scenes, world)
    print("scorer accuracy on held-out scenes:", {k: round(v, 3) for k, v in accuracy.items()})


def save_pipeline(pipe, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    pipe.to("cpu")
    pipe.save_pretrained(folder, safe_serialization=True)
    print(f"saved {folder}")


MODELS = {"vae": train_vae, "sd": train_sd, "sd3": train_sd3, "clip": train_clip, "scorer": train_scorer}
"""Every model, in dependency order (sd and sd3 need the vae)."""
