"""Guided CogVideoX: diffusers' `CogVideoXPipeline` (text-to-video) with `guidance=` and the sampler's stages.

CogVideoX keeps its latents as (batch, frames, channels, height, width); `unpack_latents` gives evaluators the VAE's
(batch, channels, frames, height, width). Its DPM scheduler steps with the previous x0 estimate and the previous
timestep (`CogVideoXDPMScheduler.step`); the sampler steps every scheduler alike, so the run's copy is a
`CogVideoXDPMStep`, which keeps them itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps
from diffusers.pipelines.cogvideo.pipeline_output import CogVideoXPipelineOutput
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from guidance import GuidanceTrace
from guidance.denoised import copy_scheduler

from .callbacks import CallbackTensor
from .sampler import Conditioning, GuidedInputs, GuidedPipelineMixin, guided_call, guided_inputs
from .stable_diffusion import batch_size_of


@dataclass
class GuidedCogVideoXPipelineOutput(CogVideoXPipelineOutput):
    trace: GuidanceTrace | None = None


@dataclass
class CogVideoXInputs(GuidedInputs):
    padding_frames: int = 0
    """Latent frames added in front for CogVideoX 1.5's temporal patches, dropped before decoding."""


class CogVideoXDPMStep(CogVideoXDPMScheduler):
    """`CogVideoXDPMScheduler` with the common `step(model_output, timestep, sample)`: it keeps the previous x0
    estimate and finds the previous timestep, which diffusers' CogVideoX loop passes by hand."""

    def step(self, model_output, timestep, sample, eta=0.0, generator=None, return_dict=True, **kwargs):
        index = int((self.timesteps == timestep).nonzero()[0])
        back = self.timesteps[index - 1] if index > 0 else None
        previous = self.__dict__.get("previous_x0")
        prev_sample, x0 = super().step(
            model_output, previous, timestep, back, sample, eta=eta, generator=generator, return_dict=False, **kwargs
        )
        self.previous_x0 = x0  # on this copy only: the sampler steps a fresh copy per run
        return DDIMSchedulerOutput(prev_sample, x0) if return_dict else (prev_sample, x0)


# diffusers' name: what LinearAG fits record and check, and what a saved config names
CogVideoXDPMStep.__name__ = CogVideoXDPMStep.__qualname__ = CogVideoXDPMScheduler.__name__


def steppable(scheduler):
    """The run's copy of `scheduler`: a `CogVideoXDPMStep` for the CogVideoX DPM scheduler, else a plain copy."""
    if type(scheduler) is CogVideoXDPMScheduler:
        return CogVideoXDPMStep.from_config(scheduler.config)
    return copy_scheduler(scheduler)


class GuidedCogVideoXPipeline(GuidedPipelineMixin, CogVideoXPipeline):
    """`CogVideoXPipeline` whose `__call__` also takes `guidance=<GuidanceScheduler>`.

    The unconditional branch is the negative prompt ("" when none is given); as in diffusers, both branches run in one
    batched pass, the unconditional rows first. `use_dynamic_cfg` (CogVideoX's own cosine ramp of the scale) belongs to
    the policy under `guidance` (e.g. `ScheduledGuidance(..., schedule="cosine")`).
    """

    __call__ = guided_call(CogVideoXPipeline)
    _output_class = GuidedCogVideoXPipelineOutput
    _guidance_owned_args = ("guidance_scale", "use_dynamic_cfg")
    _callback_tensors = {
        "prompt_embeds": CallbackTensor("joined", ("encoder_hidden_states",)),
        "negative_prompt_embeds": CallbackTensor("uncond", ("encoder_hidden_states",)),
    }

    def unpack_latents(self, latents, height, width):
        return latents.permute(0, 2, 1, 3, 4)

    def pack_latents(self, latents):
        return latents.permute(0, 2, 1, 3, 4)

    def denoiser_prediction(self, denoiser, scheduler, latents, t, inputs, shared):
        # Mirrors the model call of diffusers' CogVideoXPipeline.__call__ (the prediction in float32).
        model_input = latents if scheduler is None else scheduler.scale_model_input(latents, t)
        timestep = t.expand(model_input.shape[0])
        model_input = model_input.to(denoiser.dtype)
        output = denoiser(hidden_states=model_input, timestep=timestep, **inputs, **shared, return_dict=False)[0]
        return output.float()

    def _prepare(
        self,
        *,
        prompt,
        negative_prompt,
        height,
        width,
        num_frames,
        num_inference_steps,
        timesteps,
        num_videos_per_prompt,
        eta,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        attention_kwargs,
        max_sequence_length,
        scheduler=None,
        **_,
    ) -> GuidedInputs:
        # Mirrors diffusers' CogVideoXPipeline.__call__ up to its loop, on a copy of the scheduler.
        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        num_frames = num_frames or self.transformer.config.sample_frames

        # 1. Check inputs
        self.check_inputs(prompt, height, width, negative_prompt, None, prompt_embeds, negative_prompt_embeds)

        # 2. Default call parameters
        batch_size = batch_size_of(prompt, prompt_embeds)
        device = self._execution_device

        # 3. Encode the prompt and the negative prompt ("" when none is given: any step may need it)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            True,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )

        # 4. Prepare timesteps
        scheduler = steppable(scheduler or self.scheduler)
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps)

        # 5. Prepare latents (CogVideoX 1.5 pads the latent frames to a multiple of its temporal patch)
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        patch_size_t = self.transformer.config.patch_size_t
        padding_frames = 0
        if patch_size_t is not None and latent_frames % patch_size_t != 0:
            padding_frames = patch_size_t - latent_frames % patch_size_t
            num_frames += padding_frames * self.vae_scale_factor_temporal
        latents = self._initial_latents(
            batch_size * num_videos_per_prompt, num_frames, height, width, prompt_embeds.dtype, generator, latents
        )
        latents = latents * scheduler.init_noise_sigma

        # 6. Extra step kwargs (eta, generator) and 7. rotary embeddings, shared by every row
        step_kwargs = self._step_kwargs(scheduler, generator, eta)
        image_rotary_emb = (
            self._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)
            if self.transformer.config.use_rotary_positional_embeddings
            else None
        )
        conditioning = Conditioning(
            cond={"encoder_hidden_states": prompt_embeds},
            uncond={"encoder_hidden_states": negative_prompt_embeds},
            shared={"image_rotary_emb": image_rotary_emb, "attention_kwargs": attention_kwargs},
        )
        inputs = guided_inputs(
            prompt,
            num_videos_per_prompt,
            generator,
            latents,
            timesteps,
            num_inference_steps,
            scheduler,
            conditioning,
            height,
            width,
            step_kwargs,
        )
        fields = {field.name: getattr(inputs, field.name) for field in dataclasses.fields(inputs)}
        return CogVideoXInputs(**fields, padding_frames=padding_frames)

    def _initial_latents(self, rows, num_frames, height, width, dtype, generator, latents) -> torch.Tensor:
        """Diffusers' `prepare_latents` without its scaling by the pipeline's own scheduler (the run's copy scales)."""
        channels = self.transformer.config.in_channels
        init_noise_sigma = self.scheduler.init_noise_sigma
        latents = self.prepare_latents(
            rows, channels, num_frames, height, width, dtype, self._execution_device, generator, latents
        )
        return latents / init_noise_sigma if not math.isclose(init_noise_sigma, 1.0) else latents

    def _step_kwargs(self, scheduler, generator, eta) -> dict:
        """`eta` and `generator` where the run's scheduler takes them (diffusers' `prepare_extra_step_kwargs`)."""
        accepted = inspect.signature(scheduler.step).parameters
        return {key: value for key, value in (("eta", eta), ("generator", generator)) if key in accepted}

    def _decode(self, latents, inputs, output_type):
        # Drop the padding frames, decode and post-process (diffusers' CogVideoXPipeline.__call__)
        if output_type == "latent":
            return self._output_class(frames=latents)
        video = self.decode_latents(latents[:, getattr(inputs, "padding_frames", 0) :])
        return self._output_class(frames=self.video_processor.postprocess_video(video=video, output_type=output_type))

    def decode_for_guidance(self, latents: torch.Tensor, decoder=None) -> torch.Tensor:
        """Videos in [-1, 1] (float32), laid out (batch, 3, frames, height, width), from latents in the VAE's layout
        (`unpack_latents`), for evaluators that read pixels; `decoder` replaces the pipeline's VAE."""
        vae = decoder if decoder is not None else self.vae
        frames = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return frames.float().clamp(-1, 1)

    def image_to_latents(self, *args, **kwargs):
        raise NotImplementedError(
            "GuidedCogVideoXPipeline denoises videos and does not edit images (FlowOpt and FlowEdit run on SD3 and "
            "Flux)"
        )
