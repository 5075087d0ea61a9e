"""Guided Stable Diffusion XL: diffusers' `StableDiffusionXLPipeline` with `guidance=` and the sampler's stages."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

from guidance import GuidanceTrace
from guidance import vae as vae_latents
from guidance.denoised import copy_scheduler

from .callbacks import CallbackTensor
from .sampler import Conditioning, GuidedInputs, GuidedPipelineMixin, guided_call, guided_inputs, noise_latents
from .stable_diffusion import batch_size_of, check_no_guidance_embedding, ip_adapter_embeds, unet_prediction


@dataclass
class GuidedStableDiffusionXLPipelineOutput(StableDiffusionXLPipelineOutput):
    trace: GuidanceTrace | None = None


class GuidedStableDiffusionXLPipeline(GuidedPipelineMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` whose `__call__` also takes `guidance=<GuidanceScheduler>`."""

    __call__ = guided_call(StableDiffusionXLPipeline)
    _output_class = GuidedStableDiffusionXLPipelineOutput
    _guidance_owned_args = ("guidance_scale", "guidance_rescale")
    _callback_tensors = {
        "prompt_embeds": CallbackTensor("joined", ("encoder_hidden_states",)),
        "add_text_embeds": CallbackTensor("joined", ("added_cond_kwargs", "text_embeds")),
        "add_time_ids": CallbackTensor("joined", ("added_cond_kwargs", "time_ids")),
        "negative_prompt_embeds": CallbackTensor("uncond", ("encoder_hidden_states",)),
        "negative_pooled_prompt_embeds": CallbackTensor("uncond", ("added_cond_kwargs", "text_embeds")),
        "negative_add_time_ids": CallbackTensor("uncond", ("added_cond_kwargs", "time_ids")),
    }

    def denoiser_prediction(self, denoiser, scheduler, latents, t, inputs, shared):
        return unet_prediction(denoiser, scheduler, latents, t, inputs, shared)

    def _prepare(
        self,
        *,
        prompt,
        prompt_2,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        denoising_end,
        negative_prompt,
        negative_prompt_2,
        num_images_per_prompt,
        eta,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
        ip_adapter_image,
        ip_adapter_image_embeds,
        cross_attention_kwargs,
        original_size,
        crops_coords_top_left,
        target_size,
        negative_original_size,
        negative_crops_coords_top_left,
        negative_target_size,
        clip_skip,
        scheduler=None,
        **_,
    ) -> GuidedInputs:
        # Mirrors diffusers' StableDiffusionXLPipeline.__call__ up to its loop, on a copy of the scheduler.
        check_no_guidance_embedding(self.unet)
        # 0. Default height and width to unet
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)

        # 1. Check inputs
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            None,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
        )

        # 2. Define call parameters
        num_images = batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device

        # 3. Encode input prompt: the negative prompt is always encoded, since any step may need it
        cross_attention_kwargs = cross_attention_kwargs
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=True,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
        )

        image_embeds, negative_image_embeds = ip_adapter_embeds(
            self, ip_adapter_image, ip_adapter_image_embeds, device, num_images
        )

        # 4. Prepare timesteps
        scheduler = copy_scheduler(scheduler or self.scheduler)
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)

        # 5. Prepare latent variables
        latent_shape = (
            num_images,
            self.unet.config.in_channels,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )
        latents = noise_latents(
            latent_shape, generator, device, prompt_embeds.dtype, latents, scheduler.init_noise_sigma
        )

        # 7. Prepare added time ids & embeddings, one row per image and branch
        if self.text_encoder_2 is None:
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=projection_dim,
            )
        conditioning = Conditioning(
            cond={
                "encoder_hidden_states": prompt_embeds.to(device),
                "added_cond_kwargs": {
                    "text_embeds": pooled_prompt_embeds.to(device),
                    "time_ids": add_time_ids.to(device).repeat(num_images, 1),
                }
                | ({"image_embeds": image_embeds} if image_embeds is not None else {}),
            },
            uncond={
                "encoder_hidden_states": negative_prompt_embeds.to(device),
                "added_cond_kwargs": {
                    "text_embeds": negative_pooled_prompt_embeds.to(device),
                    "time_ids": negative_add_time_ids.to(device).repeat(num_images, 1),
                }
                | ({"image_embeds": negative_image_embeds} if image_embeds is not None else {}),
            },
            shared={"timestep_cond": None, "cross_attention_kwargs": cross_attention_kwargs},
        )

        # 8.1 Apply denoising_end
        denoising_end = denoising_end
        if isinstance(denoising_end, float) and 0 < denoising_end < 1:
            num_train_timesteps = scheduler.config.num_train_timesteps
            cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
            num_inference_steps = len([t for t in timesteps if t >= cutoff])
            timesteps = timesteps[:num_inference_steps]

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
        # 9. Decode (float16 VAEs with force_upcast in float32, latents_mean/std), watermark, post-process
        if output_type == "latent":
            return self._output_class(images=latents)
        image = vae_latents.decode(self.vae, latents)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self._output_class(images=self.image_processor.postprocess(image, output_type=output_type))
