"""Guided Flux: diffusers' `FluxPipeline` with `guidance=` driving true CFG with the negative prompt."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device

from guidance import GuidanceTrace

from .guided_step import Conditioning, GuidedPipelineMixin


@dataclass
class GuidedFluxPipelineOutput(FluxPipelineOutput):
    trace: GuidanceTrace | None = None


class GuidedFluxPipeline(GuidedPipelineMixin, FluxPipeline):
    """`FluxPipeline` whose `__call__` also takes `guidance=<GuidanceScheduler>`.

    The unconditional branch is diffusers' "true CFG" branch: the negative prompt (the empty prompt when none is
    given). A guidance-distilled model's guidance embedding (`guidance_scale`) passes through unchanged.
    """

    _output_class = GuidedFluxPipelineOutput
    _guidance_owned_args = ("true_cfg_scale",)
    _unsupported_guided_args = (
        "ip_adapter_image",
        "ip_adapter_image_embeds",
        "negative_ip_adapter_image",
        "negative_ip_adapter_image_embeds",
    )
    _callback_conditioning = {"prompt_embeds": ("cond", "encoder_hidden_states")}

    def unpack_for_guidance(self, latents):
        height, width = self._guidance_image_size
        return self._unpack_latents(latents, height, width, self.vae_scale_factor)

    def _predict(self, latents, t, inputs, shared):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return self.transformer(
            hidden_states=latents, timestep=timestep / 1000, **inputs, **shared, return_dict=False
        )[0]

    def _guided_call(self, guidance, **a):
        # Mirrors diffusers' FluxPipeline.__call__, with the guided loop in place of its loop.
        height = a["height"] or self.default_sample_size * self.vae_scale_factor
        width = a["width"] or self.default_sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            a["prompt"],
            a["prompt_2"],
            height,
            width,
            negative_prompt=a["negative_prompt"],
            negative_prompt_2=a["negative_prompt_2"],
            prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
            max_sequence_length=a["max_sequence_length"],
        )
        self._guidance_scale = a["guidance_scale"]
        self._joint_attention_kwargs = a["joint_attention_kwargs"] or {}
        self._current_timestep = None
        self._interrupt = False

        # 2. Define call parameters
        prompt = a["prompt"]
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(a["prompt_embeds"])
        device = self._execution_device

        # 3. Encode the prompt and the negative prompt ("" when none is given: any step may need it)
        lora_scale = self.joint_attention_kwargs.get("scale", None)
        encode = dict(
            device=device,
            num_images_per_prompt=a["num_images_per_prompt"],
            max_sequence_length=a["max_sequence_length"],
            lora_scale=lora_scale,
        )
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=a["prompt_2"],
            prompt_embeds=a["prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"],
            **encode,
        )
        negative_prompt = a["negative_prompt"]
        if negative_prompt is None and a["negative_prompt_embeds"] is None:
            negative_prompt = "" if prompt is None or isinstance(prompt, str) else [""] * len(prompt)
        negative_prompt_embeds, negative_pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=negative_prompt,
            prompt_2=a["negative_prompt_2"],
            prompt_embeds=a["negative_prompt_embeds"],
            pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
            **encode,
        )
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                "`prompt_embeds` and `negative_prompt_embeds` must have the same shape, got "
                f"{tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)}"
            )

        # 4. Prepare latent variables (packed 2x2 patches)
        latents, latent_image_ids = self.prepare_latents(
            batch_size * a["num_images_per_prompt"],
            self.transformer.config.in_channels // 4,
            height,
            width,
            prompt_embeds.dtype,
            device,
            a["generator"],
            a["latents"],
        )

        # 5. Prepare timesteps
        num_steps = a["num_inference_steps"]
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if a["sigmas"] is None else a["sigmas"]
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_steps, device, sigmas=sigmas, mu=mu)

        # 6. The distilled guidance embedding, identical for every branch
        embedded_guidance = None
        if self.transformer.config.guidance_embeds:
            embedded_guidance = torch.full([latents.shape[0]], a["guidance_scale"], device=device, dtype=torch.float32)
        conditioning = Conditioning(
            cond={
                "encoder_hidden_states": prompt_embeds,
                "pooled_projections": pooled_prompt_embeds,
                "guidance": embedded_guidance,
            },
            uncond={
                "encoder_hidden_states": negative_prompt_embeds,
                "pooled_projections": negative_pooled_prompt_embeds,
                "guidance": embedded_guidance,
            },
            shared={
                "txt_ids": text_ids,
                "img_ids": latent_image_ids,
                "joint_attention_kwargs": self.joint_attention_kwargs,
            },
        )

        # 7. Guided denoising loop
        self._guidance_image_size = (height, width)  # for unpack_for_guidance
        self.scheduler.set_begin_index(0)
        latents = self._guided_denoise(
            guidance,
            latents,
            timesteps,
            num_inference_steps,
            conditioning,
            {},
            a["callback_on_step_end"],
            a["callback_on_step_end_tensor_inputs"],
        )

        # 8. Unpack, decode and post-process
        if a["output_type"] == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=a["output_type"])
        return self._guided_output(guidance.trace, a["return_dict"], images=image)
