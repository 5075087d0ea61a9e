"""Editing with flow models (SD3, Flux) from the sampler's stages: FlowOpt's `invert` and `edit`, and the FlowEdit
baseline (`flowedit`). Every solve runs the shared guided loop (`denoise` from a later index, or a `GuidedRun`) on a
FlowMatch Euler schedule, so any guidance policy works inside it; nothing is stored on the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput, logging

from guidance import ClassifierFreeGuidance, GuidanceScheduler
from guidance import flowedit as flowedit_method
from guidance.checks import check_int
from guidance.flowopt import TARGET_GUIDANCE_SCALE, FlowOptConfig, flowopt, rms, uniinv

logger = logging.get_logger(__name__)


@dataclass
class FlowEditOutput(BaseOutput):
    """An edit or an inversion. `images`: the result per source image; `iterates`: the images of every accepted
    FlowOpt iteration (iterate 0, "invert then solve", first) when asked for; `residuals[k][b]`: RMS of `f(z_k) - y`
    per latent element for image `b`; `nfe`: model evaluations per image, everything included; `latents`: the
    optimised (inverted) noise latents `z`; `size`: the (height, width) worked on, after any crop; `step_sizes[k][b]`:
    the `eta` in use at iteration k (what "auto" chose); `stopped`: why the iterations ended ("iterations",
    "converged": every image stopped early, "diverged": a residual rose at a kept iteration, or "callback");
    `outcomes` and `diverged`: the same per image (`guidance.flowopt.FlowOptResult`)."""

    images: Any
    iterates: list | None = None
    residuals: list[list[float]] = field(default_factory=list)
    nfe: float = 0.0
    latents: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    step_sizes: list[list[float]] | None = None
    stopped: str | None = None
    outcomes: list[str] | None = None
    diverged: list[bool] | None = None


@dataclass
class EditRequest:
    """One FlowOpt or FlowEdit call, checked: the source images (in [-1, 1], cropped to the model's multiple) and their
    size, a source and a target prompt per image, the policy of the target solves and what the solves also take."""

    pixels: torch.Tensor
    size: tuple[int, int]
    sources: list[str]
    targets: list[str]
    guidance: GuidanceScheduler | None = None
    negative_prompt: str | None = None
    embedded_guidance: float = 1.0
    """Flux's guidance embedding in the target solves (guidance-distilled models); the inversion embeds 1."""
    callback_on_step_end: Any = None
    callback_on_step_end_tensor_inputs: list[str] | None = None
    prepare_kwargs: dict = field(default_factory=dict)


def check_prompts(prompt: Any, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"`{name}` must be a non-empty prompt or a list of them, got {prompt!r}")
    return prompts


def is_image(image: Any) -> bool:
    if isinstance(image, PIL.Image.Image):
        return True
    return isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim >= 3


def image_size(image: PIL.Image.Image | np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(height, width) of a PIL image, an array laid out (..., H, W, C) as diffusers takes them, or a tensor
    (..., C, H, W)."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    return tuple(image.shape[-3:-1]) if isinstance(image, np.ndarray) else tuple(image.shape[-2:])


def crop_top_left(image, height: int, width: int):
    if isinstance(image, PIL.Image.Image):
        return image.crop((0, 0, width, height))
    return image[..., :height, :width, :] if isinstance(image, np.ndarray) else image[..., :height, :width]


class FlowEditingMixin:
    """`invert`, `edit` and `flowedit`: what the flow-matching pipelines (SD3, Flux) add to the sampler's stages."""

    flowopt_family: str
    """"sd3" or "flux": which of the papers' defaults apply."""

    def pixel_multiple(self) -> int:
        """What an image's height and width must be multiples of: the VAE's factor times the 2x2 patches."""
        return self.vae_scale_factor * 2

    def largest_side(self) -> int | None:
        """The largest image height or width the denoiser takes, in pixels (None: no limit)."""
        return None

    def _source_images(self, image: Any, prompts: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images in [-1, 1], cropped at the bottom and right to multiples of `pixel_multiple` as FlowOpt's code
        crops them (never resized), and their size; one image per prompt, or one for all."""
        images = image if isinstance(image, list) else [image]
        if not images or not all(is_image(i) for i in images):
            names = sorted({f"{type(i).__name__}{list(getattr(i, 'shape', []))}" for i in images}) or ["an empty list"]
            raise ValueError(
                "`image` must be a PIL image, an array (H, W, C) or a tensor (C, H, W) (or batches of them), or a "
                f"list of them; got {names}"
            )
        sizes = sorted({image_size(i) for i in images})
        if len(sizes) > 1:
            raise ValueError(f"the images of one call must share a size (they run as one batch), got sizes {sizes}")
        size, multiple = sizes[0], self.pixel_multiple()
        height, width = size[0] - size[0] % multiple, size[1] - size[1] % multiple
        if height == 0 or width == 0:
            raise ValueError(f"`image` of size {size} is smaller than {multiple} pixels, the model's multiple")
        largest = self.largest_side()
        if largest is not None and max(height, width) > largest:
            raise ValueError(
                f"`image` of size {size} is larger than this model takes: at most {largest} pixels a "
                "side (its transformer's position embedding)"
            )
        if (height, width) != size:
            logger.warning(
                f"cropped the image from {size} to {(height, width)}, multiples of {multiple} (FlowOpt's "
                "code crops the same way)"
            )
        cropped = [crop_top_left(i, height, width) for i in images]
        pixels = self.image_processor.preprocess(cropped if len(cropped) > 1 else cropped[0], height, width)
        if len(pixels) not in (1, prompts) and prompts > 1:
            raise ValueError(f"`image` holds {len(pixels)} images for {prompts} prompts: give one image per prompt")
        return (pixels.expand(prompts, -1, -1, -1) if len(pixels) == 1 else pixels), (height, width)

    def _euler_scheduler(self):
        """The solves are first-order Euler: the pipeline's scheduler if it is FlowMatch Euler, else one built from
        its config."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            return self.scheduler
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)

    def _editing_inputs(self, request: EditRequest, prompts: list[str], y, steps: int, embedded: float):
        """Prepared inputs of `prompts` at the image's size, with `y` as their latents (nothing is drawn)."""
        embedding = {"guidance_scale": embedded} if self.flowopt_family == "flux" else {}
        height, width = request.size
        return self.prepare(
            prompt=prompts,
            negative_prompt=[request.negative_prompt or ""] * len(prompts),
            height=height,
            width=width,
            latents=y,
            num_inference_steps=steps,
            scheduler=self._euler_scheduler(),
            **embedding,
            **request.prepare_kwargs,
        )

    def _velocity(self, inputs):
        """v(x, sigma): one conditional model evaluation (guidance 1) with `inputs`' prompts."""
        denoiser, conditioning = self.denoiser, inputs.conditioning
        cond = conditioning.rows(["cond"], {"cond": None})

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = torch.tensor(sigma * 1000.0, device=x.device)
            return self.denoiser_prediction(denoiser, inputs.scheduler, x, t, cond, conditioning.shared)

        return velocity

    def _edit_request(self, image, source_prompt, target_prompt, **settings) -> EditRequest:
        """The checked request: prompts, images (one per prompt, or one for all) cropped to the model's multiple."""
        sources, targets = check_prompts(source_prompt, "source_prompt"), check_prompts(target_prompt, "target_prompt")
        if len(targets) != len(sources):
            raise ValueError(
                f"`target_prompt` must have one prompt per source prompt ({len(sources)}), got {len(targets)}"
            )
        count = len(image) if isinstance(image, list) and len(sources) == 1 else len(sources)
        pixels, size = self._source_images(image, count)
        if len(sources) == 1:
            sources, targets = sources * len(pixels), targets * len(pixels)
        return EditRequest(pixels, size, sources, targets, **settings)

    @torch.no_grad()
    def invert(
        self,
        image: Any,
        prompt: str | list[str],
        *,
        num_inference_steps: int | None = None,
        n_max: int | None = None,
        iterations: int | None = None,
        step_size: float | str | None = None,
        tolerance: float = 0.0,
        min_improvement: float = 0.0,
        probes: int = 2,
        guidance: GuidanceScheduler | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_iterates: bool = False,
        callback_on_iteration: Any = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **prepare_kwargs,
    ) -> FlowEditOutput:
        """FlowOpt inversion: noise latents `z` whose solve with `prompt` reproduces the image (`latents`; the paper's
        defaults: T 10, n_max 10, 30 iterations). Arguments as in `edit`; `guidance` defaults to none (scale 1)."""
        settings = dict(
            num_inference_steps=num_inference_steps,
            n_max=n_max,
            iterations=iterations,
            step_size=step_size,
            tolerance=tolerance,
            min_improvement=min_improvement,
            probes=probes,
        )
        config = FlowOptConfig.defaults(self.flowopt_family, "invert", **settings)
        request = self._edit_request(
            image,
            prompt,
            prompt,
            guidance=guidance or ClassifierFreeGuidance(1.0),
            embedded_guidance=guidance_scale,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            prepare_kwargs=prepare_kwargs,
        )
        return self._flowopt(config, request, generator, output_type, return_iterates, callback_on_iteration)

    @torch.no_grad()
    def edit(
        self,
        image: Any,
        source_prompt: str | list[str],
        target_prompt: str | list[str],
        *,
        num_inference_steps: int | None = None,
        n_max: int | None = None,
        iterations: int | None = None,
        step_size: float | str | None = None,
        tolerance: float = 0.0,
        min_improvement: float = 0.0,
        probes: int = 2,
        guidance: GuidanceScheduler | None = None,
        negative_prompt: str | None = None,
        guidance_scale: float = TARGET_GUIDANCE_SCALE,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_iterates: bool = False,
        callback_on_iteration: Any = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **prepare_kwargs,
    ) -> FlowEditOutput:
        """FlowOpt editing (arXiv 2510.22010): invert the image with `source_prompt` (UniInv, guidance 1), then
        iterate `z <- z - eta (f(z) - y)`, `f` the solve with `target_prompt` under `guidance`.

        Args:
            image: a PIL image, array or tensor, or a list of them (one per prompt; edited as one batch). Its size sets
                height and width: cropped at the bottom and right to `pixel_multiple()` (a warning says so), never
                resized.
            source_prompt, target_prompt: a prompt, or one per image.
            num_inference_steps, n_max, iterations, step_size, tolerance, min_improvement, probes: FlowOpt's
                settings (`FlowOptConfig`; None: the paper's defaults for the family: SD3 15, 12, 8, 0.01; Flux 15,
                13, 8, 0.0025); `step_size="auto"` estimates the step from `probes` solves and backtracks; every
                iteration runs unless `tolerance` or `min_improvement` asks for early stopping.
            guidance: the policy inside the target solves (any `GuidanceScheduler`: AG, a schedule, ...); default
                CFG at 3.5 for SD3, and for Flux none (its guidance embedding carries the scale).
            negative_prompt: the unconditional prompt of the target solves ("" by default, as the paper).
            guidance_scale: Flux's embedded guidance for the target solves (guidance-distilled models); the
                inversion embeds 1. Ignored by SD3.
            generator: for "auto"'s random probes.
            return_iterates: also decode `f(z_k)` of every iteration (`iterates`).
            callback_on_iteration: `callback(pipe, iteration, {"latents", "noise_latents", "residuals"})` after every
                iteration (0 included); return `{"stop": True}` to stop there and keep that result.
            callback_on_step_end, callback_on_step_end_tensor_inputs: passed to every solve, as in `__call__`.
            prepare_kwargs: further call arguments for the prompts (`max_sequence_length`, ...).
        """
        settings = dict(
            num_inference_steps=num_inference_steps,
            n_max=n_max,
            iterations=iterations,
            step_size=step_size,
            tolerance=tolerance,
            min_improvement=min_improvement,
            probes=probes,
        )
        config = FlowOptConfig.defaults(self.flowopt_family, "edit", **settings)
        if guidance is None:
            guidance = ClassifierFreeGuidance(1.0 if self.flowopt_family == "flux" else TARGET_GUIDANCE_SCALE)
        request = self._edit_request(
            image,
            source_prompt,
            target_prompt,
            guidance=guidance,
            negative_prompt=negative_prompt,
            embedded_guidance=guidance_scale,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            prepare_kwargs=prepare_kwargs,
        )
        return self._flowopt(config, request, generator, output_type, return_iterates, callback_on_iteration)

    def _flowopt(
        self,
        config: FlowOptConfig,
        request: EditRequest,
        generator: torch.Generator | None,
        output_type: str,
        return_iterates: bool,
        callback_on_iteration: Any,
    ) -> FlowEditOutput:
        """UniInv from the source prompts, then FlowOpt's iterations on the target solves (`guidance.flowopt`)."""
        steps, n_start = config.config.num_inference_steps, config.n_start
        y = self.pixels_to_latents(request.pixels)
        source = self._editing_inputs(request, request.sources, y, steps, 1.0)
        same = request.targets == request.sources and request.embedded_guidance == 1.0
        target = (
            source if same else self._editing_inputs(request, request.targets, y, steps, request.embedded_guidance)
        )
        sigmas = [0.0] + [float(s) for s in source.scheduler.sigmas[n_start:-1].flip(0)]
        z = uniinv(self._velocity(source), y, sigmas)  # the first z: n_max + 1 evaluations per image
        nfe = [float(len(sigmas))]

        def solve(latents: torch.Tensor) -> torch.Tensor:
            out = self.denoise(
                target,
                request.guidance,
                latents=latents,
                start_index=n_start,
                show_progress=False,
                callback_on_step_end=request.callback_on_step_end,
                callback_on_step_end_tensor_inputs=request.callback_on_step_end_tensor_inputs,
            )
            nfe[0] += out.trace.nfe
            return out.latents

        with self.progress_bar(total=config.config.iterations + 1) as progress:

            def on_iteration(iteration: int, tensors: dict):
                progress.update()
                return None if callback_on_iteration is None else callback_on_iteration(self, iteration, tensors)

            result = flowopt(solve, y, z, config, on_iteration, return_iterates, generator)

        def decode(latents: torch.Tensor):
            return self.decode(latents.to(y.dtype), target, output_type).images

        return FlowEditOutput(
            images=decode(result.solution),
            iterates=[decode(x) for x in result.iterates] if return_iterates else None,
            residuals=result.residuals,
            nfe=nfe[0],
            latents=result.latents,
            size=request.size,
            step_sizes=result.step_sizes,
            stopped=result.stopped,
            outcomes=result.outcomes,
            diverged=result.diverged,
        )

    @torch.no_grad()
    def flowedit(
        self,
        image: Any,
        source_prompt: str | list[str],
        target_prompt: str | list[str],
        *,
        num_inference_steps: int | None = None,
        n_max: int | None = None,
        source_guidance: GuidanceScheduler | None = None,
        target_guidance: GuidanceScheduler | None = None,
        source_guidance_scale: float | None = None,
        guidance_scale: float | None = None,
        n_avg: int = 1,
        negative_prompt: str | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        **prepare_kwargs,
    ) -> FlowEditOutput:
        """FlowEdit (arXiv 2412.08629), the inversion-free baseline: see `guidance.flowedit`. None takes the
        defaults of its code (SD3: T 50, n_max 33, CFG 3.5 source and 13.5 target; Flux: T 28, n_max 24, embedded
        guidance 1.5 and 5.5). `source_guidance`/`target_guidance` are the policies of the two velocities;
        `source_guidance_scale`/`guidance_scale` Flux's embedded guidance."""
        defaults = flowedit_method.DEFAULTS[self.flowopt_family]
        steps = num_inference_steps or defaults["num_inference_steps"]
        n_max = n_max or defaults["n_max"]
        FlowOptConfig(num_inference_steps=steps, n_max=n_max)  # the same checks of T and n_max
        check_int("n_avg", n_avg, minimum=1)
        request = self._edit_request(
            image, source_prompt, target_prompt, negative_prompt=negative_prompt, prepare_kwargs=prepare_kwargs
        )
        flux = self.flowopt_family == "flux"
        if source_guidance is None:
            source_guidance = ClassifierFreeGuidance(1.0 if flux else defaults["source_guidance_scale"])
        if target_guidance is None:
            target_guidance = ClassifierFreeGuidance(1.0 if flux else defaults["target_guidance_scale"])
        y = self.pixels_to_latents(request.pixels)
        source_embedded = source_guidance_scale or defaults["source_guidance_scale"]
        source = self._editing_inputs(request, request.sources, y, steps, source_embedded)
        target_embedded = guidance_scale or defaults["target_guidance_scale"]
        target = self._editing_inputs(request, request.targets, y, steps, target_embedded)
        n_start = steps - n_max
        source_run = self.start_run(source, source_guidance, len(y), n_start)
        target_run = self.start_run(target, target_guidance, len(y), n_start)
        sigmas = [float(s) for s in source.scheduler.sigmas]
        with self.progress_bar(total=n_max * n_avg) as progress:

            def source_velocity(x: torch.Tensor, i: int) -> torch.Tensor:
                return source_run.predict(x, i).prediction

            def target_velocity(x: torch.Tensor, i: int) -> torch.Tensor:
                progress.update()
                return target_run.predict(x, i).prediction

            edited = flowedit_method.flowedit(source_velocity, target_velocity, y, sigmas, n_start, n_avg, generator)
        return FlowEditOutput(
            images=self.decode(edited.to(y.dtype), target, output_type).images,
            residuals=[rms(edited - y.float()).tolist()],
            nfe=source_run.trace.nfe + target_run.trace.nfe,
            size=request.size,
        )
