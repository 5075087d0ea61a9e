"""Self-NPO training (arXiv 2505.11777): a negative-preference LoRA adapter learnt without preference data, by
truncated diffusion fine-tuning, for SD 1.x/2.x and SDXL (epsilon or v prediction) and SD3 (flow matching: the same
steps with `a = 1 - sigma`, `s = sigma`, x0 from the velocity), and the video families: CogVideoX (v prediction, the
paper's video case) and Wan (flow matching), whose latents carry a frame axis.

One step, per sample (the public code's recipe, PAPERS.md section 3):
1. a start latent `x0` from the model's own samples (data-free: a pool generated from pure noise with prompts from a
   prompts file) or from encoded images; a start point `t_s` on a 25-step DDIM grid (39, 79, ..., 999),
   `x_ts = sqrt(abar) x0 + sqrt(1 - abar) eps`;
2. the teacher (the base model with an EMA copy of the adapter, decay 0.999) runs K = 5 DDIM steps of 40 timesteps
   with `x0_hat = x0_c + w (x0_c - x0_u)`, `eps_hat = eps_c + w (eps_c - eps_u)` (w = -1: the unconditional model;
   -5 for SDXL) to `t_e = t_s - 200`; its x0 estimate there is the target;
3. `x_te` re-noised to `t' ~ U{t_e + 1, ..., 999}`: `x_t' = a_t' (x_te / a_te + sqrt((s_t'/a_t')^2 - (s_te/a_te)^2)
   eps')`, `a = sqrt(abar)`, `s = sqrt(1 - abar)`;
4. the student's x0 from `x_t'` with the caption, pulled to the target by the pseudo-Huber loss
   `sqrt((x0_theta - x0_hat)^2 + c^2) - c`, c = 0.001.

Every random draw of step k comes from a generator seeded by (seed, k), so a run resumed from a checkpoint (the
adapter, its EMA, the optimiser, the step: nothing else) continues exactly as the uninterrupted one. Runs through
accelerate (mixed precision, gradient accumulation, several processes: each takes its slice of the step's batch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from guidance.checks import check_choice, check_int, check_number, check_seed
from guidance.denoised import ForwardProcess
from guidance.lora import adapter_state_dict, add_lora, lora_layers, set_active_adapters

from ..families import VIDEO_FAMILIES, family_of

STUDENT, TEACHER = "npo", "npo_ema"


def public_defaults(family: str, full: bool) -> dict[str, float]:
    """The public Diffusion-NPO code's settings for what a `SelfNPOConfig` leaves None: learning rate 1e-6 for a full
    fine-tune and 1e-4 for a LoRA (which needs a larger one); for SDXL teacher weight -5 and no weight decay, else -1
    and 1e-3."""
    sdxl = family == "sdxl"
    return {
        "learning_rate": 1e-6 if full else 1e-4,
        "weight_decay": 0.0 if sdxl else 1e-3,
        "teacher_weight": -5.0 if sdxl else -1.0,
    }


@dataclass
class SelfNPOConfig:
    """Training settings. `learning_rate`, `weight_decay` and `teacher_weight` left None take the public code's values
    for the model's family and the form trained (`public_defaults`; `resolved`)."""

    steps: int = 400  # optimisation steps (each of gradient_accumulation_steps micro-batches)
    batch_size: int = 8
    learning_rate: float | None = None
    weight_decay: float | None = None
    rank: int = 8
    lora_alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    ema_decay: float = 0.999
    teacher_weight: float | None = None
    grid_steps: int = 25
    rollout_steps: int = 5
    huber_c: float = 0.001
    grad_clip: float = 1.0
    pool_size: int = 64
    pool_guidance_scale: float = 7.5
    pool_steps: int = 25
    seed: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    checkpoint_every: int = 50
    full: bool = False

    def __post_init__(self):
        counts = (
            "steps",
            "batch_size",
            "rank",
            "grid_steps",
            "rollout_steps",
            "pool_size",
            "pool_steps",
            "gradient_accumulation_steps",
            "checkpoint_every",
        )
        for name in counts:
            check_int(name, getattr(self, name), minimum=1)
        for name in ("learning_rate", "lora_alpha", "huber_c", "grad_clip"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), above=0)
        for name in ("weight_decay", "pool_guidance_scale"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), minimum=0)
        if self.teacher_weight is not None:
            check_number("teacher_weight", self.teacher_weight)
        check_number("ema_decay", self.ema_decay, minimum=0)
        if not self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}")
        check_seed("seed", self.seed)
        check_choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        if not self.target_modules or not all(isinstance(m, str) for m in self.target_modules):
            raise ValueError(f"`target_modules` must be a non-empty list of module names, got {self.target_modules!r}")

    def resolved(self, family: str) -> SelfNPOConfig:
        """The settings with those left None set to the public code's for `family` ("sd", "sdxl", "sd3")."""
        defaults = public_defaults(family, self.full)
        return replace(self, **{name: value for name, value in defaults.items() if getattr(self, name) is None})


def pseudo_huber(x: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    return (torch.sqrt((x.float() - target.float()) ** 2 + c**2) - c).mean()


def check_prediction(process: ForwardProcess) -> None:
    if process.prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise ValueError(
            f"Self-NPO trains epsilon- or v-prediction UNets and flow models, got {process.prediction_type!r}"
        )


def content_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def denoiser_identity(denoiser) -> str:
    """The denoiser's class and a hash of its architecture (its config, without diffusers' bookkeeping keys)."""
    config = {key: value for key, value in dict(denoiser.config).items() if not key.startswith("_")}
    return f"{type(denoiser).__name__} {content_hash(config)[:16]}"


def images_hash(images: list | None) -> str | None:
    """What the pool depends on in the training images: their pixels."""
    if images is None:
        return None
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """`key: value there, value now` for every key whose value differs (hashes shortened)."""

    def shown(value: Any) -> str:
        return repr(value[:12] + "...") if isinstance(value, str) and len(value) == 64 else repr(value)

    keys = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    return "; ".join(f"{key}: {shown(saved.get(key))} there, {shown(now.get(key))} now" for key in keys)


class CheckpointMismatch(ValueError):
    """The checkpoint in an output folder belongs to another run (other settings, model, prompts or images), is
    damaged, or the folder holds trained weights without a checkpoint: `folder` and `found` say which."""

    def __init__(self, folder: Path, found: str, resumable: bool = True):
        self.folder, self.found, self.resumable = folder, found, resumable
        resume = "resume with the same settings, model and prompts, " if resumable else ""
        super().__init__(
            f"output folder {str(folder)!r} {found}: {resume}start over with overwrite=True, or use another output "
            "folder"
        )


@dataclass
class Checkpoint:
    """A checkpoint read and checked against the trainer (nothing applied yet)."""

    folder: Path
    saved: dict
    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]


TRAINED_FAMILIES = ("sd", "sdxl", "sd3", "wan", "cogvideox")


def check_training_inputs(pipe, prompts, images) -> str:
    """The pipeline's family, once the pipeline, prompts and images are ones Self-NPO trains on."""
    try:
        family = family_of(pipe)
    except ValueError:
        family = None
    if family not in TRAINED_FAMILIES:
        raise ValueError(
            f"Self-NPO training takes SD 1.x/2.x, SDXL, SD3, Wan or CogVideoX pipelines, got {type(pipe).__name__}"
        )
    if family in VIDEO_FAMILIES and images is not None:
        raise ValueError("`images` (captioned images) are for image models; a video model trains data-free")
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"`prompts` must be a non-empty list of prompts, got {prompts!r}")
    if images is not None and len(images) == 0:
        raise ValueError("`images` must hold at least one image, or be None (data-free)")
    return family


class SelfNPOTrainer:
    """Trains the adapter on `pipe`'s denoiser (a guided pipeline of `TRAINED_FAMILIES`) from `prompts`; see the
    module docstring.
    `run` adds what the run depends on beyond the settings, prompts, images and the denoiser's architecture (e.g. the
    model's name): a checkpoint resumes only when all of it is the same. `start()` makes the pool of start latents."""

    def __init__(
        self,
        pipe,
        prompts: list[str],
        config: SelfNPOConfig,
        images: list | None = None,
        prepare_kwargs: dict | None = None,
        run: Mapping[str, Any] | None = None,
    ):
        from accelerate import Accelerator

        family = check_training_inputs(pipe, prompts, images)
        config = config.resolved(family)
        self.pipe, self.prompts, self.config, self.images = pipe, list(prompts), config, images
        self.video = family in VIDEO_FAMILIES
        self.denoiser_name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        self.identity = {
            **asdict(config),
            "prompts": content_hash(self.prompts),
            "images": images_hash(images),
            "denoiser": denoiser_identity(pipe.denoiser),
            **dict(run or {}),
        }
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
        )
        if config.batch_size % self.accelerator.num_processes:
            processes = self.accelerator.num_processes
            raise ValueError(
                f"`batch_size` {config.batch_size} must be a multiple of the {processes} processes "
                "(each takes an equal share)"
            )
        self.diffusion = ForwardProcess(pipe.scheduler)
        check_prediction(self.diffusion)
        flow = self.diffusion.flow
        self.prepare_kwargs = dict(prepare_kwargs or {})
        unet = pipe.denoiser
        self._trainable_weights(unet)
        self.optimizer = torch.optim.AdamW(
            self.student.values(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.unet, self.optimizer = self.accelerator.prepare(unet, self.optimizer)
        self.step = 0
        self.pool = self.pool_prompts = None
        # the unconditional branch as the public code: "" (SD), zero embeddings (SDXL: diffusers' default for none)
        negative = None if isinstance(pipe, StableDiffusionXLPipeline) else [""] * len(self.prompts)
        inputs = pipe.prepare(
            prompt=self.prompts, negative_prompt=negative, num_inference_steps=1, **self.prepare_kwargs
        )
        self.conditioning = inputs.conditioning
        width = 1000 // config.grid_steps  # VP: 39, 79, ..., 999; flow: sigma 0.04, 0.08, ..., 1
        self.grid = [(k + 1) * width - (0 if flow else 1) for k in range(config.grid_steps)]

    def _trainable_weights(self, unet) -> None:
        """The student (the LoRA `npo`, or with `full` the whole denoiser) and its EMA teacher, equal at the start."""
        config = self.config
        unet.requires_grad_(False)
        self.teacher_model = None
        if config.full:  # the public code's form: the whole denoiser, the teacher a frozen EMA copy of it
            self.teacher_model = copy.deepcopy(unet)
            unet.requires_grad_(True)
            self.layers = []
            self.student = dict(unet.named_parameters())
            self.teacher = dict(self.teacher_model.named_parameters())
        else:
            with torch.random.fork_rng(devices=[]):  # the adapter's initial A from the seed too
                torch.manual_seed(config.seed)
                for name in (STUDENT, TEACHER):
                    add_lora(unet, name, config.rank, config.lora_alpha, config.target_modules)
            self.layers = lora_layers(unet)
            named = dict(unet.named_parameters())
            self.student = {n: p for n, p in named.items() if f".{STUDENT}." in n}
            self.teacher = {n: named[n.replace(f".{STUDENT}.", f".{TEACHER}.")] for n in self.student}
        for name, parameter in self.student.items():  # peft makes every added adapter trainable: only the student is
            parameter.requires_grad_(True)
            self.teacher[name].requires_grad_(False)
            self.teacher[name].data.copy_(parameter.data)

    def start(self, checkpoint: Checkpoint | None = None) -> None:
        """Make the pool of start latents, then put the checkpoint's state in place (in this order: with `full`, the
        pool comes from the base model, as in the run that wrote the checkpoint)."""
        self.pool, self.pool_prompts = self._pool(self.images)
        if checkpoint is not None:
            self.restore(checkpoint)

    @torch.no_grad()
    def _pool(self, images):
        """x0 latents: encoded images (with their captions) or the model's own samples, deterministic by seed."""
        c = self.config
        if images is not None:
            latents = self.pipe.image_to_latents(images)
            return latents, torch.arange(len(latents)) % len(self.prompts)
        from guidance import ClassifierFreeGuidance

        set_active_adapters(self.layers, [])
        prompts = [self.prompts[k % len(self.prompts)] for k in range(c.pool_size)]
        generators = [torch.Generator().manual_seed(c.seed * 100003 + k) for k in range(c.pool_size)]
        out = self.pipe(
            prompts,
            num_inference_steps=c.pool_steps,
            output_type="latent",
            guidance=ClassifierFreeGuidance(c.pool_guidance_scale),
            generator=generators,
            **self.prepare_kwargs,
        )
        latents = out.frames if self.video else out.images
        return latents, torch.arange(c.pool_size) % len(self.prompts)

    def _eps(self, x, t, rows, branches=("cond",), model=None):
        """x0 and eps of `model` (default: the prepared, possibly distributed, student; the teacher's no-grad passes
        use the bare module) for the rows of each branch in turn, in one batched pass."""
        model = self.unet if model is None else model
        inputs = self.conditioning.rows(list(branches), dict.fromkeys(branches, rows))
        x, t = torch.cat([x] * len(branches)), torch.cat([t] * len(branches))
        if self.diffusion.flow or self.video:  # as the family calls its transformer (flow: it takes sigma * 1000)
            t = t.float() if self.diffusion.flow else t
            out = self.pipe.denoiser_prediction(model, None, x, t, inputs, self.conditioning.shared)
        else:  # the VP x_t as it is (no scheduler input scaling)
            out = model(x, t, **inputs, **self.conditioning.shared, return_dict=False)[0]
        return self.diffusion.x0_and_eps(out, x, t)

    def _draws(self, step: int, micro: int = 0):
        """Everything random of a micro-batch of a step, from (seed, step, micro): sample indices, start points,
        noises, re-noise times."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + step + micro * 1_000_000_007)
        index = torch.randint(len(self.pool), (c.batch_size,), generator=generator)
        start = torch.tensor(self.grid)[torch.randint(len(self.grid), (c.batch_size,), generator=generator)]
        shape = (c.batch_size, *self.pool.shape[1:])
        noise, renoise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        end = (start - c.rollout_steps * (1000 // c.grid_steps)).clamp_min(0)
        last = self.diffusion.last
        later = (end + 1 + (torch.rand(c.batch_size, generator=generator) * (last - end)).long()).clamp_max(last)
        share = slice(
            *[
                c.batch_size * k // self.accelerator.num_processes
                for k in (self.accelerator.process_index, self.accelerator.process_index + 1)
            ]
        )
        return index[share], start[share], noise[share], renoise[share], end[share], later[share]

    def train_step(self) -> float:
        """One optimisation step: `gradient_accumulation_steps` micro-batches of `batch_size`, then the update and the
        EMA. Returns the mean loss."""
        losses = [self._micro_step(micro) for micro in range(self.config.gradient_accumulation_steps)]
        with torch.no_grad():
            for name, parameter in self.student.items():
                self.teacher[name].lerp_(parameter.detach(), 1 - self.config.ema_decay)
        self.step += 1
        return sum(losses) / len(losses)

    def _micro_step(self, micro: int) -> float:
        c, device = self.config, self.accelerator.device
        index, start, noise, renoise, end, later = (x.to(device) for x in self._draws(self.step, micro))
        rows = self.pool_prompts.to(device)[index]
        x0, width = self.pool.to(device)[index].float(), 1000 // c.grid_steps
        a, s = self.diffusion.coefficients(start, x0)
        x, t = a * x0 + s * noise, start
        bare = self.teacher_model if self.teacher_model is not None else self.accelerator.unwrap_model(self.unet)
        with torch.no_grad():  # the teacher's K DDIM steps with the CFG-combined estimates
            set_active_adapters(self.layers, [TEACHER])
            for _ in range(c.rollout_steps + 1):
                x0, eps = self._eps(x, t, rows, ("uncond", "cond"), bare)  # one pass, as CFG batches them
                (x0_u, x0_c), (eps_u, eps_c) = x0.chunk(2), eps.chunk(2)
                x0_hat = x0_c + c.teacher_weight * (x0_c - x0_u)
                eps_hat = eps_c + c.teacher_weight * (eps_c - eps_u)
                moving = t > end
                if not bool(moving.any()):
                    break
                t_prev = torch.maximum(t - width, end)
                a_prev, s_prev = self.diffusion.coefficients(t_prev, x)
                step = a_prev * x0_hat + s_prev * eps_hat
                x = torch.where(moving.view(-1, *[1] * (x.dim() - 1)), step, x)
                t = torch.where(moving, t_prev, t)
            target = x0_hat
            a_e, s_e = self.diffusion.coefficients(end, x)
            a_l, s_l = self.diffusion.coefficients(later, x)
            # x_t' = a_t' x_te / a_te + sqrt(s_t'^2 - (a_t' s_te / a_te)^2) eps'
            x_later = a_l / a_e * x + (s_l**2 - (a_l * s_e / a_e) ** 2).clamp_min(0).sqrt() * renoise
        set_active_adapters(self.layers, [STUDENT])
        with self.accelerator.accumulate(self.unet):
            x0_student, _ = self._eps(x_later, later, rows)
            loss = pseudo_huber(x0_student, target, c.huber_c)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(list(self.student.values()), c.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad()
        return self.accelerator.reduce(loss.detach(), reduction="mean").item()

    # checkpoints: the trainable state only, as safetensors + JSON

    def save_checkpoint(self, folder: Path) -> None:
        if not self.accelerator.is_main_process:
            return
        temporary = folder.with_name(folder.name + ".partial")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in self.student.items()}, temporary / "student.safetensors"
        )
        save_file({n: p.detach().cpu().contiguous() for n, p in self.teacher.items()}, temporary / "ema.safetensors")
        state = self.optimizer.state_dict()
        tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
        for key, values in state["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{key}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars["state"].setdefault(str(key), {})[name] = value
        save_file(tensors, temporary / "optimizer.safetensors")
        scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None  # fp16
        (temporary / "trainer.json").write_text(
            json.dumps(
                {
                    "step": self.step,
                    "optimizer": scalars,
                    "scaler": scaler,
                    "config": asdict(self.config),
                    "run": self.identity,
                }
            )
        )
        for path in temporary.iterdir():  # on disk before the swap
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        # the swap: the previous checkpoint stays whole (as `.old`) until the new one is in place
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(temporary, folder)
        shutil.rmtree(old, ignore_errors=True)

    def read_checkpoint(self, output_dir: Path) -> Checkpoint | None:
        """The checkpoint in `output_dir` (`checkpoint/`, or `checkpoint.old/` when killed during a swap), read whole
        and checked to be this run's and this model's; None when there is none. A `CheckpointMismatch` otherwise, and
        for trained weights there without a checkpoint."""
        for folder in (output_dir / "checkpoint", output_dir / "checkpoint.old"):
            if (folder / "trainer.json").is_file():
                return self._read(folder, output_dir)
        weights = [
            name
            for name in ("pytorch_lora_weights.safetensors", "unet", "transformer")
            if (output_dir / name).exists()
        ]
        if weights:
            raise CheckpointMismatch(output_dir, f"holds trained weights ({weights[0]}) but no checkpoint", False)
        return None

    def _read(self, folder: Path, output_dir: Path) -> Checkpoint:
        try:
            saved = json.loads((folder / "trainer.json").read_text())
            if "run" not in saved:
                raise CheckpointMismatch(output_dir, "holds a checkpoint without a run record (an earlier version's)")
            changed = differences(saved["run"], self.identity)
            if changed:
                raise CheckpointMismatch(output_dir, f"holds a checkpoint of another run ({changed})")
            tensors = [load_file(folder / f"{name}.safetensors") for name in ("student", "ema", "optimizer")]
        except (OSError, json.JSONDecodeError, SafetensorError, KeyError, TypeError) as error:
            raise CheckpointMismatch(
                output_dir, f"holds a damaged checkpoint ({type(error).__name__}: {error})", resumable=False
            ) from None
        checkpoint = Checkpoint(folder, saved, *tensors)
        for found, parameters in ((checkpoint.student, self.student), (checkpoint.teacher, self.teacher)):
            wrong = [n for n, p in parameters.items() if n not in found or found[n].shape != p.shape]
            if wrong or len(found) != len(parameters):
                raise CheckpointMismatch(
                    output_dir, f"holds a checkpoint of another model (e.g. {wrong[:1] or sorted(found)[:1]})"
                )
        return checkpoint

    @torch.no_grad()
    def restore(self, checkpoint: Checkpoint) -> None:
        """Put a checked checkpoint's adapter, EMA, optimiser and step in place."""
        for found, parameters in ((checkpoint.student, self.student), (checkpoint.teacher, self.teacher)):
            for name, parameter in parameters.items():
                parameter.copy_(found[name])
        saved = checkpoint.saved
        state = {"param_groups": saved["optimizer"]["param_groups"], "state": {}}
        for key, value in checkpoint.optimizer.items():
            index, name = key.split(".", 1)
            state["state"].setdefault(int(index), {})[name] = value
        for index, values in saved["optimizer"]["state"].items():
            state["state"].setdefault(int(index), {}).update(values)
        self.optimizer.load_state_dict(state)
        if saved.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        self.step = saved["step"]

    def close(self) -> None:
        """Leave the pipeline usable: the training adapters removed (LoRA) and accelerate's wrappers undone; with
        `full` its denoiser stays the trained student."""
        unet = self.accelerator.unwrap_model(self.unet, keep_fp32_wrapper=False)
        if not self.config.full:
            unet.delete_adapters([STUDENT, TEACHER])
        unet.requires_grad_(False)

    def save_lora(self, folder: Path) -> Path:
        """The student: a diffusers-format LoRA folder (`pipe.load_lora_weights(folder, adapter_name="npo")`), or with
        `full` the whole denoiser in `folder/unet` (`folder/transformer`), a model for `SeparateModel`."""
        unet = self.accelerator.unwrap_model(self.unet)
        if self.config.full:
            if self.accelerator.is_main_process:
                unet.save_pretrained(folder / self.denoiser_name)
            return folder
        layers = adapter_state_dict(unet, STUDENT)
        if self.accelerator.is_main_process:
            key = f"{self.denoiser_name}_lora_layers"
            type(self.pipe).save_lora_weights(folder, **{key: layers}, safe_serialization=True)
        return folder


TRAINING_FILES = (
    "checkpoint",
    "checkpoint.old",
    "checkpoint.partial",
    "losses.jsonl",
    "pytorch_lora_weights.safetensors",
    "unet",
    "transformer",
)


@dataclass
class SelfNPORun:
    """A checked training run: the trainer, its output folder, the checkpoint it resumes (if any), and whether the
    folder's earlier run is removed first."""

    trainer: SelfNPOTrainer
    output_dir: Path
    checkpoint: Checkpoint | None
    overwrite: bool

    def saved_step(self) -> int:
        """The step of the checkpoint on disk now (0 when there is none)."""
        for name in ("checkpoint", "checkpoint.old"):
            try:
                return json.loads((self.output_dir / name / "trainer.json").read_text())["step"]
            except (OSError, json.JSONDecodeError, KeyError):
                continue
        return 0

    def clear(self) -> None:
        """Remove what an earlier run wrote to the output folder (its checkpoint, losses and weights), nothing else."""
        if self.trainer.accelerator.is_main_process:
            for name in TRAINING_FILES:
                path = self.output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.trainer.accelerator.wait_for_everyone()

    def train(self, stop_after: int | None = None, progress: bool = True) -> list[float]:
        """Train to the end (`stop_after`: that many steps at most, an interrupted run), checkpointing; the adapter is
        written at the end. Returns this call's losses."""
        trainer, config = self.trainer, self.trainer.config
        if self.overwrite:
            self.clear()
        trainer.start(self.checkpoint)
        checkpoint, log = self.output_dir / "checkpoint", self.output_dir / "losses.jsonl"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.accelerator.is_main_process:
            keep_logged_steps(log, trainer.step)
        losses, bar = [], tqdm(total=config.steps, initial=trainer.step, desc="Self-NPO", disable=not progress)
        while trainer.step < config.steps and (stop_after is None or len(losses) < stop_after):
            loss = trainer.train_step()
            losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            if trainer.accelerator.is_main_process:
                with open(log, "a") as handle:
                    handle.write(json.dumps({"step": trainer.step, "loss": loss}) + "\n")
            if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
                trainer.save_checkpoint(checkpoint)
        bar.close()
        if trainer.step == config.steps:
            trainer.save_lora(self.output_dir)
        trainer.close()
        return losses


def keep_logged_steps(log: Path, step: int) -> None:
    """Keep the loss lines up to `step` (the checkpoint's: later steps are done again; a line cut short is dropped)."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    log.write_text("".join(line + "\n" for line in kept))


def prepare_self_npo(
    pipe,
    prompts,
    output_dir,
    config: SelfNPOConfig | None = None,
    images=None,
    *,
    run: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    **prepare_kwargs,
) -> SelfNPORun:
    """Check everything before the pool is generated or anything written: the pipeline, the settings, and that a
    checkpoint in `output_dir` is this run's (`run`: see `SelfNPOTrainer`), whole and of this model; with `overwrite`
    the earlier run there is removed when training starts."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output folder {str(output_dir)!r} is a file, expected a folder")
    trainer = SelfNPOTrainer(pipe, prompts, config or SelfNPOConfig(), images, prepare_kwargs, run)
    checkpoint = None if overwrite else trainer.read_checkpoint(output_dir)
    return SelfNPORun(trainer, output_dir, checkpoint, overwrite)


def train_self_npo(
    pipe,
    prompts,
    output_dir,
    config: SelfNPOConfig | None = None,
    images=None,
    stop_after=None,
    progress: bool = True,
    *,
    run: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    **prepare_kwargs,
) -> list[float]:
    """Train into `output_dir` (the LoRA folder; `checkpoint/` beside the weights while training), resuming a
    checkpoint of the same run there (`prepare_self_npo`); `stop_after` stops after that many steps (an interrupted
    run). Returns this call's losses."""
    prepared = prepare_self_npo(
        pipe, prompts, output_dir, config, images, run=run, overwrite=overwrite, **prepare_kwargs
    )
    return prepared.train(stop_after, progress)
