"""Guided Stable Diffusion 1.x/2.x: diffusers' `StableDiffusionPipeline` with `guidance=` and the sampler's stages."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from guidance import GuidanceTrace
from guidance import vae as vae_latents
from guidance.denoised import copy_scheduler

from .callbacks import CallbackTensor
from .sampler import Conditioning, GuidedInputs, GuidedPipelineMixin, guided_call, guided_inputs, noise_latents


@dataclass
class GuidedStableDiffusionPipelineOutput(StableDiffusionPipelineOutput):
    trace: GuidanceTrace | None = None


def unet_prediction(unet, scheduler, latents: torch.Tensor, t: torch.Tensor, inputs: dict, shared: dict):
    """The UNet call of diffusers' SD and SDXL denoising loops, on a batch of rows."""
    if hasattr(scheduler, "scale_model_input"):
        latents = scheduler.scale_model_input(latents, t)
    return unet(latents, t, **inputs, **shared, return_dict=False)[0]


def check_no_guidance_embedding(unet) -> None:
    """Guidance-distilled UNets (LCM, `time_cond_proj_dim`) take the scale as an input, not as CFG."""
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(
            "`guidance` needs a UNet without a guidance embedding; this one has "
            f"time_cond_proj_dim={unet.config.time_cond_proj_dim} (guidance-distilled): use `guidance_scale`"
        )


def ip_adapter_embeds(pipe, image, embeds, device, num_images: int) -> tuple[list | None, list | None]:
    """(conditional, unconditional) IP-Adapter image embeddings, one tensor per adapter, as diffusers'
    `prepare_ip_adapter_image_embeds` makes them under CFG (the unconditional branch gets the negative image
    embeddings); (None, None) without an IP-Adapter input."""
    if image is None and embeds is None:
        return None, None
    pairs = [
        joined.chunk(2) for joined in pipe.prepare_ip_adapter_image_embeds(image, embeds, device, num_images, True)
    ]
    return [positive for _, positive in pairs], [negative for negative, _ in pairs]


def batch_size_of(prompt, prompt_embeds) -> int:
    return 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(prompt_embeds)


class GuidedStableDiffusionPipeline(GuidedPipelineMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` whose `__call__` also takes `guidance=<GuidanceScheduler>`."""

    __call__ = guided_call(StableDiffusionPipeline)
    _output_class = GuidedStableDiffusionPipelineOutput
    _guidance_owned_args = ("guidance_scale", "guidance_rescale")
    _callback_tensors = {
        "prompt_embeds": CallbackTensor("joined", ("encoder_hidden_states",)),
        "negative_prompt_embeds": CallbackTensor("uncond", ("encoder_hidden_states",)),
    }

    def denoiser_prediction(self, denoiser, scheduler, latents, t, inputs, shared):
        return unet_prediction(denoiser, scheduler, latents, t, inputs, shared)

    def _prepare(
        self,
        *,
        prompt,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        negative_prompt,
        num_images_per_prompt,
        eta,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        ip_adapter_image,
        ip_adapter_image_embeds,
        cross_attention_kwargs,
        clip_skip,
        scheduler=None,
        **_,
    ) -> GuidedInputs:
        # Mirrors diffusers' StableDiffusionPipeline.__call__ up to its loop, on a copy of the scheduler.
        check_no_guidance_embedding(self.unet)
        # 0. Default height and width to unet
        sample_size = self.unet.config.sample_size
        sample_h, sample_w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        height = height or sample_h * self.vae_scale_factor
        width = width or sample_w * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
        )

        # 2. Define call parameters
        batch_size = batch_size_of(prompt, prompt_embeds)
        device = self._execution_device

        # 3. Encode input prompt: the negative prompt is always encoded, since any step may need it
        cross_attention_kwargs = cross_attention_kwargs
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            True,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

        image_embeds, negative_image_embeds = ip_adapter_embeds(
            self, ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt
        )

        # 4. Prepare timesteps
        scheduler = copy_scheduler(scheduler or self.scheduler)
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)

        # 5. Prepare latent variables
        latent_shape = (
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )
        latents = noise_latents(
            latent_shape, generator, device, prompt_embeds.dtype, latents, scheduler.init_noise_sigma
        )

        # 6. Prepare extra step kwargs and the denoiser's conditioning
        ip_adapter = image_embeds is not None
        conditioning = Conditioning(
            cond={"encoder_hidden_states": prompt_embeds}
            | ({"added_cond_kwargs": {"image_embeds": image_embeds}} if ip_adapter else {}),
            uncond={"encoder_hidden_states": negative_prompt_embeds}
            | ({"added_cond_kwargs": {"image_embeds": negative_image_embeds}} if ip_adapter else {}),
            shared={"timestep_cond": None, "cross_attention_kwargs": cross_attention_kwargs},
        )
        return guided_inputs(
            prompt,
            num_images_per_prompt,
            generator,
            latents,
            timesteps,
            num_inference_steps,
            scheduler,
            conditioning,
            height,
            width,
            self.prepare_extra_step_kwargs(generator, eta),
        )

    def _decode(self, latents, inputs, output_type):
        # 8. Decode, safety check, post-process (diffusers' StableDiffusionPipeline.__call__)
        has_nsfw_concept = None
        if output_type == "latent":
            image = latents
        else:
            image = vae_latents.decode(self.vae, latents, inputs.generator)
            image, has_nsfw_concept = self.run_safety_checker(image, latents.device, latents.dtype)
        denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        return self._output_class(images=image, nsfw_content_detected=has_nsfw_concept)
