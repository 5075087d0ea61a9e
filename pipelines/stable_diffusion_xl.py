"""Guided Stable Diffusion XL: diffusers' `StableDiffusionXLPipeline` with `guidance=`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils.torch_utils import get_module_execution_device

from guidance import GuidanceTrace

from .guided_step import Conditioning, GuidedPipelineMixin
from .stable_diffusion import check_no_guidance_embedding, unet_prediction


@dataclass
class GuidedStableDiffusionXLPipelineOutput(StableDiffusionXLPipelineOutput):
    trace: GuidanceTrace | None = None


class GuidedStableDiffusionXLPipeline(GuidedPipelineMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` whose `__call__` also takes `guidance=<GuidanceScheduler>`."""

    _output_class = GuidedStableDiffusionXLPipelineOutput
    _guidance_owned_args = ("guidance_scale", "guidance_rescale")
    _unsupported_guided_args = ("ip_adapter_image", "ip_adapter_image_embeds")
    _callback_conditioning = {
        "prompt_embeds": ("cond", "encoder_hidden_states"),
        "negative_prompt_embeds": ("uncond", "encoder_hidden_states"),
    }

    def _predict(self, latents, t, inputs, shared):
        return unet_prediction(self, latents, t, inputs, shared)

    def _guided_call(self, guidance, **a):
        # Mirrors diffusers' StableDiffusionXLPipeline.__call__, with the guided loop in place of its loop.
        check_no_guidance_embedding(self.unet)
        # 0. Default height and width to unet
        height = a["height"] or self.default_sample_size * self.vae_scale_factor
        width = a["width"] or self.default_sample_size * self.vae_scale_factor
        original_size = a["original_size"] or (height, width)
        target_size = a["target_size"] or (height, width)

        # 1. Check inputs
        self.check_inputs(
            a["prompt"],
            a["prompt_2"],
            height,
            width,
            None,
            a["negative_prompt"],
            a["negative_prompt_2"],
            a["prompt_embeds"],
            a["negative_prompt_embeds"],
            a["pooled_prompt_embeds"],
            a["negative_pooled_prompt_embeds"],
        )
        self._guidance_scale = guidance.config.get("guidance_scale", 1.0)
        self._guidance_rescale = guidance.config.get("guidance_rescale", 0.0)
        self._clip_skip = a["clip_skip"]
        self._cross_attention_kwargs = a["cross_attention_kwargs"]
        self._denoising_end = a["denoising_end"]
        self._interrupt = False

        # 2. Define call parameters
        prompt = a["prompt"]
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(a["prompt_embeds"])
        num_images = batch_size * a["num_images_per_prompt"]
        device = self._execution_device

        # 3. Encode input prompt: the negative prompt is always encoded, since any step may need it
        cross_attention_kwargs = self.cross_attention_kwargs
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt,
                prompt_2=a["prompt_2"],
                device=device,
                num_images_per_prompt=a["num_images_per_prompt"],
                do_classifier_free_guidance=True,
                negative_prompt=a["negative_prompt"],
                negative_prompt_2=a["negative_prompt_2"],
                prompt_embeds=a["prompt_embeds"],
                negative_prompt_embeds=a["negative_prompt_embeds"],
                pooled_prompt_embeds=a["pooled_prompt_embeds"],
                negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
                lora_scale=lora_scale,
                clip_skip=self.clip_skip,
            )
        )

        # 4. Prepare timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"]
        )

        # 5. Prepare latent variables
        latents = self.prepare_latents(
            num_images,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            a["generator"],
            a["latents"],
        )

        # 6. Prepare extra step kwargs
        step_kwargs = self.prepare_extra_step_kwargs(a["generator"], a["eta"])

        # 7. Prepare added time ids & embeddings, one row per image and branch
        if self.text_encoder_2 is None:
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size,
            a["crops_coords_top_left"],
            target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        negative_add_time_ids = add_time_ids
        if a["negative_original_size"] is not None and a["negative_target_size"] is not None:
            negative_add_time_ids = self._get_add_time_ids(
                a["negative_original_size"],
                a["negative_crops_coords_top_left"],
                a["negative_target_size"],
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=projection_dim,
            )
        conditioning = Conditioning(
            cond={
                "encoder_hidden_states": prompt_embeds.to(device),
                "added_cond_kwargs": {
                    "text_embeds": pooled_prompt_embeds.to(device),
                    "time_ids": add_time_ids.to(device).repeat(num_images, 1),
                },
            },
            uncond={
                "encoder_hidden_states": negative_prompt_embeds.to(device),
                "added_cond_kwargs": {
                    "text_embeds": negative_pooled_prompt_embeds.to(device),
                    "time_ids": negative_add_time_ids.to(device).repeat(num_images, 1),
                },
            },
            shared={"timestep_cond": None, "cross_attention_kwargs": cross_attention_kwargs},
        )

        # 8.1 Apply denoising_end
        denoising_end = self.denoising_end
        if isinstance(denoising_end, float) and 0 < denoising_end < 1:
            num_train_timesteps = self.scheduler.config.num_train_timesteps
            cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
            num_inference_steps = len([t for t in timesteps if t >= cutoff])
            timesteps = timesteps[:num_inference_steps]

        # 8. Guided denoising loop
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
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

        # 9. Decode (upcasting a float16 VAE as diffusers does), watermark, post-process
        if a["output_type"] == "latent":
            return self._guided_output(guidance.trace, a["return_dict"], images=latents)
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        latents_mean = getattr(self.vae.config, "latents_mean", None)
        latents_std = getattr(self.vae.config, "latents_std", None)
        if latents_mean is not None and latents_std is not None:
            mean = torch.tensor(latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        image = self.image_processor.postprocess(image, output_type=a["output_type"])
        return self._guided_output(guidance.trace, a["return_dict"], images=image)
