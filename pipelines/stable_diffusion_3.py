"""Guided Stable Diffusion 3: diffusers' `StableDiffusion3Pipeline` with `guidance=` and the sampler's stages."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from guidance import GuidanceTrace
from guidance import vae as vae_latents
from guidance.denoised import copy_scheduler

from .callbacks import CallbackTensor
from .editing import FlowEditingMixin
from .sampler import (
    IP_ADAPTER_WITHOUT_GUIDANCE,
    Conditioning,
    GuidedInputs,
    GuidedPipelineMixin,
    guided_call,
    guided_inputs,
)
from .stable_diffusion import batch_size_of


@dataclass
class GuidedStableDiffusion3PipelineOutput(StableDiffusion3PipelineOutput):
    trace: GuidanceTrace | None = None


class GuidedStableDiffusion3Pipeline(FlowEditingMixin, GuidedPipelineMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` whose `__call__` also takes `guidance=<GuidanceScheduler>`.

    The flow model predicts a velocity; guidance combines velocities exactly as diffusers' CFG does.
    """

    __call__ = guided_call(StableDiffusion3Pipeline)
    _output_class = GuidedStableDiffusion3PipelineOutput
    flowopt_family = "sd3"
    _guidance_owned_args = ("guidance_scale",)
    _unsupported_guided_args = {
        "ip_adapter_image": IP_ADAPTER_WITHOUT_GUIDANCE,
        "ip_adapter_image_embeds": IP_ADAPTER_WITHOUT_GUIDANCE,
        "skip_guidance_layers": "call without `guidance` for diffusers' skip-layer guidance (a third pass with layers "
        "skipped, which a guidance policy does not run)",
    }
    _callback_tensors = {
        "prompt_embeds": CallbackTensor("joined", ("encoder_hidden_states",)),
        "pooled_prompt_embeds": CallbackTensor("joined", ("pooled_projections",)),
        "negative_prompt_embeds": CallbackTensor("uncond", ("encoder_hidden_states",)),
        "negative_pooled_prompt_embeds": CallbackTensor("uncond", ("pooled_projections",)),
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As diffusers', and a folder saved without T5 (`text_encoder_3` null) loads without extra arguments."""
        index = Path(os.fspath(pretrained_model_name_or_path)) / "model_index.json"
        if index.is_file():
            entries = json.loads(index.read_text())
            for name in ("text_encoder_3", "tokenizer_3"):
                if entries.get(name) == [None, None]:
                    kwargs.setdefault(name, None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def pixel_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size

    def largest_side(self) -> int | None:
        size = self.transformer.config.pos_embed_max_size
        return None if size is None else size * self.pixel_multiple()

    def denoiser_prediction(self, denoiser, scheduler, latents, t, inputs, shared):
        timestep = t.expand(latents.shape[0])
        return denoiser(hidden_states=latents, timestep=timestep, **inputs, **shared, return_dict=False)[0]

    def _prepare(
        self,
        *,
        prompt,
        prompt_2,
        prompt_3,
        height,
        width,
        num_inference_steps,
        sigmas,
        negative_prompt,
        negative_prompt_2,
        negative_prompt_3,
        num_images_per_prompt,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
        joint_attention_kwargs,
        clip_skip,
        max_sequence_length,
        mu,
        scheduler=None,
        **_,
    ) -> GuidedInputs:
        # Mirrors diffusers' StableDiffusion3Pipeline.__call__ up to its loop, on a copy of the scheduler.
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )

        # 2. Define call parameters
        batch_size = batch_size_of(prompt, prompt_embeds)
        device = self._execution_device

        # 3. Encode input prompt: the negative prompt is always encoded, since any step may need it
        joint_attention_kwargs = joint_attention_kwargs
        lora_scale = joint_attention_kwargs.get("scale", None) if joint_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                prompt_3=prompt_3,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                negative_prompt_3=negative_prompt_3,
                do_classifier_free_guidance=True,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                device=device,
                clip_skip=clip_skip,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
        )

        # 4. Prepare latent variables
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.transformer.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 5. Prepare timesteps (resolution-dependent shift when the scheduler asks for it)
        scheduler = copy_scheduler(scheduler or self.scheduler)
        mu = mu
        if scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            patch_size = self.transformer.config.patch_size
            image_seq_len = (latents.shape[2] // patch_size) * (latents.shape[3] // patch_size)
            mu = calculate_shift(
                image_seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler_kwargs = {} if mu is None else {"mu": mu}
        timesteps, num_inference_steps = retrieve_timesteps(
            scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs
        )
        conditioning = Conditioning(
            cond={"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds},
            uncond={
                "encoder_hidden_states": negative_prompt_embeds,
                "pooled_projections": negative_pooled_prompt_embeds,
            },
            shared={"joint_attention_kwargs": joint_attention_kwargs},
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
        )

    def _decode(self, latents, inputs, output_type):
        # 8. Decode and post-process (diffusers' StableDiffusion3Pipeline.__call__)
        if output_type == "latent":
            return self._output_class(images=latents)
        image = vae_latents.decode(self.vae, latents)
        return self._output_class(images=self.image_processor.postprocess(image, output_type=output_type))
