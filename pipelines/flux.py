"""Guided Flux: diffusers' `FluxPipeline` with `guidance=` driving true CFG with the negative prompt."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import logging

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

logger = logging.get_logger(__name__)


@dataclass
class GuidedFluxPipelineOutput(FluxPipelineOutput):
    trace: GuidanceTrace | None = None


def own_schedule(scheduler, num_steps: int, device, sigmas) -> tuple[torch.Tensor, int]:
    """Timesteps of a flow scheduler that cannot take Flux's resolution-dependent sigmas (FlowMatchHeun, which
    diffusers' FluxPipeline refuses): its own schedule, with a warning; custom `sigmas` are an error."""
    name = type(scheduler).__name__
    if sigmas is not None:
        raise ValueError(f"`sigmas`: {name}.set_timesteps takes no custom sigmas; leave `sigmas` unset, got {sigmas}")
    logger.warning(
        f"{name} cannot take Flux's resolution-dependent sigmas: using its own schedule "
        f"(shift={scheduler.config.get('shift')})"
    )
    return retrieve_timesteps(scheduler, num_steps, device)


class GuidedFluxPipeline(FlowEditingMixin, GuidedPipelineMixin, FluxPipeline):
    """`FluxPipeline` whose `__call__` also takes `guidance=<GuidanceScheduler>`.

    The unconditional branch is diffusers' "true CFG" branch: the negative prompt (the empty prompt when none is
    given). A guidance-distilled model's guidance embedding (`guidance_scale`) passes through unchanged.
    """

    __call__ = guided_call(FluxPipeline)
    _output_class = GuidedFluxPipelineOutput
    flowopt_family = "flux"
    _guidance_owned_args = ("true_cfg_scale",)
    _unsupported_guided_args = {
        "ip_adapter_image": IP_ADAPTER_WITHOUT_GUIDANCE,
        "ip_adapter_image_embeds": IP_ADAPTER_WITHOUT_GUIDANCE,
        "negative_ip_adapter_image": IP_ADAPTER_WITHOUT_GUIDANCE,
        "negative_ip_adapter_image_embeds": IP_ADAPTER_WITHOUT_GUIDANCE,
    }
    _callback_tensors = {
        "prompt_embeds": CallbackTensor("cond", ("encoder_hidden_states",)),  # diffusers' true CFG: positive only
        "negative_prompt_embeds": CallbackTensor("uncond", ("encoder_hidden_states",)),
    }

    def unpack_latents(self, latents, height, width):
        return self._unpack_latents(latents, height, width, self.vae_scale_factor)

    def pack_latents(self, latents):
        batch_size, channels, height, width = latents.shape
        return self._pack_latents(latents, batch_size, channels, height, width)

    def denoiser_prediction(self, denoiser, scheduler, latents, t, inputs, shared):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return denoiser(hidden_states=latents, timestep=timestep / 1000, **inputs, **shared, return_dict=False)[0]

    def _prepare(
        self,
        *,
        prompt,
        prompt_2,
        negative_prompt,
        negative_prompt_2,
        height,
        width,
        num_inference_steps,
        sigmas,
        guidance_scale,
        num_images_per_prompt,
        generator,
        latents,
        prompt_embeds,
        pooled_prompt_embeds,
        negative_prompt_embeds,
        negative_pooled_prompt_embeds,
        joint_attention_kwargs,
        max_sequence_length,
        scheduler=None,
        **_,
    ) -> GuidedInputs:
        # Mirrors diffusers' FluxPipeline.__call__ up to its loop, on a copy of the scheduler.
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )

        # 2. Define call parameters
        batch_size = batch_size_of(prompt, prompt_embeds)
        device = self._execution_device
        joint_attention_kwargs = joint_attention_kwargs or {}

        # 3. Encode the prompt and the negative prompt ("" when none is given: any step may need it)
        encode = dict(
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=joint_attention_kwargs.get("scale", None),
        )
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            **encode,
        )
        if negative_prompt is None and negative_prompt_embeds is None:
            if self.text_encoder is None or self.text_encoder_2 is None:
                raise ValueError(
                    "`guidance` needs the unconditional branch's embeddings: give `negative_prompt_embeds` and "
                    "`negative_pooled_prompt_embeds` (this pipeline has no text encoders to encode the empty prompt)"
                )
            negative_prompt = ""
        if isinstance(negative_prompt, str) and isinstance(prompt, list):  # one negative prompt for every row
            negative_prompt = [negative_prompt] * len(prompt)
        negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids = self.encode_prompt(
            prompt=negative_prompt,
            prompt_2=negative_prompt_2,
            prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=negative_pooled_prompt_embeds,
            **encode,
        )

        # 4. Prepare latent variables (packed 2x2 patches)
        latents, latent_image_ids = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.transformer.config.in_channels // 4,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 5. Prepare timesteps
        scheduler = copy_scheduler(scheduler or self.scheduler)
        num_steps = num_inference_steps
        if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
            timesteps, num_inference_steps = own_schedule(scheduler, num_steps, device, sigmas)
        else:
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if sigmas is None else sigmas
            if getattr(scheduler.config, "use_flow_sigmas", False):
                sigmas = None
            mu = calculate_shift(
                latents.shape[1],
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.15),
            )
            timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)

        # 6. The distilled guidance embedding, identical for every branch
        embedded_guidance = None
        if self.transformer.config.guidance_embeds:
            embedded_guidance = torch.full([latents.shape[0]], guidance_scale, device=device, dtype=torch.float32)
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
            shared={"img_ids": latent_image_ids, "joint_attention_kwargs": joint_attention_kwargs},
            # each branch's own text positions: embeddings of different lengths run as separate passes, as diffusers'
            branch_shared={"cond": {"txt_ids": text_ids}, "uncond": {"txt_ids": negative_text_ids}},
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
        # 8. Unpack, decode and post-process (diffusers' FluxPipeline.__call__)
        if output_type == "latent":
            return self._output_class(images=latents)
        image = vae_latents.decode(self.vae, self.unpack_latents(latents, inputs.height, inputs.width))
        return self._output_class(images=self.image_processor.postprocess(image, output_type=output_type))
