"""Guided Wan: diffusers' `WanPipeline` (Wan 2.1 and 2.2 text-to-video) with `guidance=` and the sampler's stages.

A video is one more latent axis: the latents are (batch, channels, frames, height, width), the VAE's own layout, so
guidance, the trace and every policy work on them unchanged; only decoding differs from the image families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_module_execution_device

from guidance import GuidanceTrace
from guidance.denoised import copy_scheduler
from guidance.vae import latent_statistics

from .callbacks import CallbackTensor
from .sampler import Conditioning, GuidedInputs, GuidedPipelineMixin, guided_call, guided_inputs
from .stable_diffusion import batch_size_of

logger = logging.get_logger(__name__)


@dataclass
class GuidedWanPipelineOutput(WanPipelineOutput):
    trace: GuidanceTrace | None = None


def wan_to_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """Denoised latents -> what `AutoencoderKLWan.decode` takes: `z * std + mean` per channel (diffusers'
    `latents / (1 / std) + mean`)."""
    mean, std = latent_statistics(vae, latents)
    return latents / (1.0 / std) + mean


class GuidedWanPipeline(GuidedPipelineMixin, WanPipeline):
    """`WanPipeline` whose `__call__` also takes `guidance=<GuidanceScheduler>`.

    The unconditional branch is the negative prompt ("" when none is given), as in diffusers, whose loop runs it as a
    second pass; here both branches share one batched pass when the same weights compute them. With Wan 2.2's two
    experts (`transformer_2`, `boundary_ratio`), the expert of each timestep computes both branches; the policy
    decides the scale of both stages (diffusers' `guidance_scale_2` is the policy's too).
    """

    __call__ = guided_call(WanPipeline)
    _output_class = GuidedWanPipelineOutput
    _guidance_owned_args = ("guidance_scale", "guidance_scale_2")
    _callback_tensors = {
        "prompt_embeds": CallbackTensor("cond", ("encoder_hidden_states",)),
        "negative_prompt_embeds": CallbackTensor("uncond", ("encoder_hidden_states",)),
    }

    @property
    def denoiser(self) -> torch.nn.Module:
        """The expert of the current timestep: `transformer`, or with Wan 2.2's `boundary_ratio` `transformer_2` below
        the boundary timestep (diffusers' `WanPipeline.__call__` switches the same way)."""
        boundary = self.config.boundary_ratio
        t = self._current_timestep
        if boundary is None or t is None or t >= boundary * self.scheduler.config.num_train_timesteps:
            return self.transformer if self.transformer is not None else self.transformer_2
        return self.transformer_2

    def denoiser_prediction(self, denoiser, scheduler, latents, t, inputs, shared):
        # Mirrors the model call of diffusers' WanPipeline.__call__ (Wan 2.2 TI2V: one timestep per latent token).
        latent_model_input = latents.to(denoiser.dtype)
        if self.config.expand_timesteps:
            mask = torch.ones(latents.shape[2:], dtype=torch.float32, device=latents.device)
            timestep = (mask[:, ::2, ::2] * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)
        else:
            timestep = t.expand(latents.shape[0])
        return denoiser(hidden_states=latent_model_input, timestep=timestep, **inputs, **shared, return_dict=False)[0]

    def _prepare(
        self,
        *,
        prompt,
        negative_prompt,
        height,
        width,
        num_frames,
        num_inference_steps,
        num_videos_per_prompt,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        attention_kwargs,
        max_sequence_length,
        scheduler=None,
        **_,
    ) -> GuidedInputs:
        # Mirrors diffusers' WanPipeline.__call__ up to its loop, on a copy of the scheduler.
        # 1. Check inputs
        self.check_inputs(prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds, None, None)
        if num_frames % self.vae_scale_factor_temporal != 1:
            logger.warning(
                f"`num_frames - 1` has to be divisible by {self.vae_scale_factor_temporal}. Rounding to the nearest "
                "number."
            )
            num_frames = num_frames // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1
        num_frames = max(num_frames, 1)
        expert = self.transformer if self.transformer is not None else self.transformer_2
        patch_size = expert.config.patch_size
        h_multiple_of = self.vae_scale_factor_spatial * patch_size[1]
        w_multiple_of = self.vae_scale_factor_spatial * patch_size[2]
        calc_height, calc_width = height // h_multiple_of * h_multiple_of, width // w_multiple_of * w_multiple_of
        if height != calc_height or width != calc_width:
            logger.warning(
                f"`height` and `width` must be multiples of ({h_multiple_of}, {w_multiple_of}) for proper "
                f"patchification. Adjusting ({height}, {width}) -> ({calc_height}, {calc_width})."
            )
            height, width = calc_height, calc_width
        device = self._execution_device

        # 2. Define call parameters
        batch_size = batch_size_of(prompt, prompt_embeds)

        # 3. Encode the prompt and the negative prompt ("" when none is given: any step may need it)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=True,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        prompt_embeds, negative_prompt_embeds = prompt_embeds.to(expert.dtype), negative_prompt_embeds.to(expert.dtype)

        # 4. Prepare timesteps
        scheduler = copy_scheduler(scheduler or self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)

        # 5. Prepare latent variables (float32, as diffusers keeps them; the model input is cast per call)
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt,
            expert.config.in_channels,
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            latents,
        )
        conditioning = Conditioning(
            cond={"encoder_hidden_states": prompt_embeds},
            uncond={"encoder_hidden_states": negative_prompt_embeds},
            shared={"attention_kwargs": attention_kwargs},
        )
        return guided_inputs(
            prompt,
            num_videos_per_prompt,
            generator,
            latents,
            scheduler.timesteps,
            num_inference_steps,
            scheduler,
            conditioning,
            height,
            width,
        )

    def _decode(self, latents, inputs, output_type):
        # Decode and post-process (diffusers' WanPipeline.__call__)
        if output_type == "latent":
            return self._output_class(frames=latents)
        video = self.vae.decode(self._vae_input(latents), return_dict=False)[0]
        return self._output_class(frames=self.video_processor.postprocess_video(video, output_type=output_type))

    def _vae_input(self, latents: torch.Tensor, vae=None) -> torch.Tensor:
        vae = vae if vae is not None else self.vae
        return wan_to_vae(vae, latents.to(get_module_execution_device(vae), dtype=vae.dtype))

    def decode_for_guidance(self, latents: torch.Tensor, decoder=None) -> torch.Tensor:
        """Videos in [-1, 1] (float32), laid out (batch, 3, frames, height, width), for evaluators that read pixels;
        `decoder` replaces the pipeline's VAE (another `AutoencoderKLWan`)."""
        vae = decoder if decoder is not None else self.vae
        return vae.decode(self._vae_input(latents, vae), return_dict=False)[0].float().clamp(-1, 1)

    def image_to_latents(self, *args, **kwargs):
        raise NotImplementedError(
            "GuidedWanPipeline denoises videos and does not edit images (FlowOpt and FlowEdit run on SD3 and Flux)"
        )
