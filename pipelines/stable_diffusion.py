"""Guided Stable Diffusion 1.x/2.x: diffusers' `StableDiffusionPipeline` with `guidance=`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from guidance import GuidanceTrace

from .guided_step import Conditioning, GuidedPipelineMixin


@dataclass
class GuidedStableDiffusionPipelineOutput(StableDiffusionPipelineOutput):
    trace: GuidanceTrace | None = None


def unet_prediction(pipe, latents: torch.Tensor, t: torch.Tensor, inputs: dict, shared: dict) -> torch.Tensor:
    """The UNet call of diffusers' SD and SDXL denoising loops, on a batch of rows."""
    if hasattr(pipe.scheduler, "scale_model_input"):
        latents = pipe.scheduler.scale_model_input(latents, t)
    return pipe.unet(latents, t, **inputs, **shared, return_dict=False)[0]


def check_no_guidance_embedding(unet) -> None:
    """Guidance-distilled UNets (LCM, `time_cond_proj_dim`) take the scale as an input, not as CFG."""
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(
            "`guidance` needs a UNet without a guidance embedding; this one has "
            f"time_cond_proj_dim={unet.config.time_cond_proj_dim} (guidance-distilled): use `guidance_scale`"
        )


class GuidedStableDiffusionPipeline(GuidedPipelineMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` whose `__call__` also takes `guidance=<GuidanceScheduler>`."""

    _output_class = GuidedStableDiffusionPipelineOutput
    _guidance_owned_args = ("guidance_scale", "guidance_rescale")
    _unsupported_guided_args = ("ip_adapter_image", "ip_adapter_image_embeds")
    _callback_conditioning = {
        "prompt_embeds": ("cond", "encoder_hidden_states"),
        "negative_prompt_embeds": ("uncond", "encoder_hidden_states"),
    }

    def _predict(self, latents, t, inputs, shared):
        return unet_prediction(self, latents, t, inputs, shared)

    def _guided_call(self, guidance, **a):
        # Mirrors diffusers' StableDiffusionPipeline.__call__, with the guided loop in place of its loop.
        check_no_guidance_embedding(self.unet)
        # 0. Default height and width to unet
        sample_size = self.unet.config.sample_size
        sample_h, sample_w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        height = a["height"] or sample_h * self.vae_scale_factor
        width = a["width"] or sample_w * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            a["prompt"], height, width, None, a["negative_prompt"], a["prompt_embeds"], a["negative_prompt_embeds"]
        )
        self._guidance_scale = guidance.config.get("guidance_scale", 1.0)
        self._guidance_rescale = guidance.config.get("guidance_rescale", 0.0)
        self._clip_skip = a["clip_skip"]
        self._cross_attention_kwargs = a["cross_attention_kwargs"]
        self._interrupt = False

        # 2. Define call parameters
        prompt = a["prompt"]
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(a["prompt_embeds"])
        device = self._execution_device

        # 3. Encode input prompt: the negative prompt is always encoded, since any step may need it
        cross_attention_kwargs = self.cross_attention_kwargs
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            a["num_images_per_prompt"],
            True,
            a["negative_prompt"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )

        # 4. Prepare timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"]
        )

        # 5. Prepare latent variables
        latents = self.prepare_latents(
            batch_size * a["num_images_per_prompt"],
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            a["generator"],
            a["latents"],
        )

        # 6. Prepare extra step kwargs and the denoiser's conditioning
        step_kwargs = self.prepare_extra_step_kwargs(a["generator"], a["eta"])
        conditioning = Conditioning(
            cond={"encoder_hidden_states": prompt_embeds},
            uncond={"encoder_hidden_states": negative_prompt_embeds},
            shared={"timestep_cond": None, "cross_attention_kwargs": cross_attention_kwargs},
        )

        # 7. Guided denoising loop
        latents = self._guided_denoise(
            guidance,
            latents,
            timesteps,
            num_inference_steps,
            conditioning,
            step_kwargs,
            a["callback_on_step_end"],
            a["callback_on_step_end_tensor_inputs"],
        )

        # 8. Decode, safety check, post-process
        has_nsfw_concept = None
        if a["output_type"] == "latent":
            image = latents
        else:
            scaled = latents / self.vae.config.scaling_factor
            image = self.vae.decode(scaled, return_dict=False, generator=a["generator"])[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=a["output_type"], do_denormalize=denormalize)
        return self._guided_output(
            guidance.trace, a["return_dict"], images=image, nsfw_content_detected=has_nsfw_concept
        )
