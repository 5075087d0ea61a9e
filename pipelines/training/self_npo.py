"""Self-NPO training (arXiv 2505.11777): a negative-preference LoRA adapter learnt without preference data, by
truncated diffusion fine-tuning, for SD 1.x/2.x and SDXL (epsilon or v prediction) and SD3 (flow matching: the same
steps with `a = 1 - sigma`, `s = sigma`, x0 from the velocity).

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
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from guidance.denoised import ForwardProcess
from guidance.lora import adapter_state_dict, add_lora, lora_layers, set_active_adapters

STUDENT, TEACHER = "npo", "npo_ema"


@dataclass
class SelfNPOConfig:
    """Training settings; defaults follow the public code where it applies to a LoRA (its full fine-tune uses lr
    1e-6; a LoRA needs a larger one)."""

    steps: int = 400  # optimisation steps (each of gradient_accumulation_steps micro-batches)
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 1e-3
    rank: int = 8
    lora_alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    ema_decay: float = 0.999
    teacher_weight: float = -1.0
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
        for name in ("steps", "batch_size", "rank", "grid_steps", "rollout_steps", "pool_size", "pool_steps",
                     "gradient_accumulation_steps", "checkpoint_every"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        for name in ("learning_rate", "lora_alpha", "huber_c", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{name}` must be a number > 0, got {value!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"`mixed_precision` must be one of ['no', 'fp16', 'bf16'], got {self.mixed_precision!r}")
        if not self.target_modules or not all(isinstance(m, str) for m in self.target_modules):
            raise ValueError(f"`target_modules` must be a non-empty list of module names, got {self.target_modules!r}")


def pseudo_huber(x: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    return (torch.sqrt((x.float() - target.float()) ** 2 + c**2) - c).mean()


def check_prediction(process: ForwardProcess) -> None:
    if process.prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise ValueError(f"Self-NPO trains epsilon- or v-prediction UNets and flow models, got {process.prediction_type!r}")


class SelfNPOTrainer:
    """Trains the adapter on `pipe`'s UNet (guided SD or SDXL pipeline) from `prompts`; see the module docstring."""

    def __init__(self, pipe, prompts: list[str], config: SelfNPOConfig, images: list | None = None,
                 prepare_kwargs: dict | None = None):  # fmt: skip
        from accelerate import Accelerator

        if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline)):
            raise ValueError(f"Self-NPO training takes SD 1.x/2.x, SDXL or SD3 pipelines, got {type(pipe).__name__}")
        if not prompts:
            raise ValueError("`prompts` must hold at least one prompt")
        self.pipe, self.prompts, self.config = pipe, list(prompts), config
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                       gradient_accumulation_steps=config.gradient_accumulation_steps)  # fmt: skip
        if config.batch_size % self.accelerator.num_processes:
            processes = self.accelerator.num_processes
            raise ValueError(f"`batch_size` {config.batch_size} must be a multiple of the {processes} processes "
                             "(each takes an equal share)")  # fmt: skip
        self.diffusion = ForwardProcess(pipe.scheduler)
        check_prediction(self.diffusion)
        flow = self.diffusion.flow
        self.prepare_kwargs = dict(prepare_kwargs or {})
        unet = pipe.denoiser
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
        self.optimizer = torch.optim.AdamW(self.student.values(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)  # fmt: skip
        self.unet, self.optimizer = self.accelerator.prepare(unet, self.optimizer)
        self.step = 0
        self.pool, self.pool_prompts = self._pool(images)
        # the unconditional branch as the public code: "" (SD), zero embeddings (SDXL: diffusers' default for none)
        negative = None if isinstance(pipe, StableDiffusionXLPipeline) else [""] * len(self.prompts)
        inputs = pipe.prepare(prompt=self.prompts, negative_prompt=negative, num_inference_steps=1,
                              **self.prepare_kwargs)  # fmt: skip
        self.conditioning = inputs.conditioning
        width = 1000 // config.grid_steps  # VP: 39, 79, ..., 999; flow: sigma 0.04, 0.08, ..., 1
        self.grid = [(k + 1) * width - (0 if flow else 1) for k in range(config.grid_steps)]

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
        out = self.pipe(prompts, num_inference_steps=c.pool_steps, output_type="latent",
                        guidance=ClassifierFreeGuidance(c.pool_guidance_scale), generator=generators,
                        **self.prepare_kwargs)  # fmt: skip
        return out.images, torch.arange(c.pool_size) % len(self.prompts)

    def _eps(self, x, t, rows, branches=("cond",), model=None):
        """x0 and eps of `model` (default: the prepared, possibly distributed, student; the teacher's no-grad passes
        use the bare module) for the rows of each branch in turn, in one batched pass."""
        model = self.unet if model is None else model
        inputs = self.conditioning.rows(list(branches), dict.fromkeys(branches, rows))
        x, t = torch.cat([x] * len(branches)), torch.cat([t] * len(branches))
        if self.diffusion.flow:  # the transformer takes sigma * 1000
            out = self.pipe.denoiser_prediction(model, None, x, t.float(), inputs, self.conditioning.shared)
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
        share = slice(*[c.batch_size * k // self.accelerator.num_processes
                        for k in (self.accelerator.process_index, self.accelerator.process_index + 1)])  # fmt: skip
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
        (temporary / "trainer.json").write_text(json.dumps({"step": self.step, "optimizer": scalars, "scaler": scaler,
                                                            "config": asdict(self.config)}))  # fmt: skip
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

    def load_checkpoint(self, folder: Path) -> None:
        saved = json.loads((folder / "trainer.json").read_text())
        if saved["config"] != asdict(self.config):
            changed = sorted(k for k in saved["config"] if saved["config"][k] != asdict(self.config).get(k))
            raise ValueError(f"checkpoint {str(folder)!r} was written with other settings ({changed}): use the same "
                             "settings to resume, or another output folder")  # fmt: skip
        with torch.no_grad():
            for tensors, parameters in ((load_file(folder / "student.safetensors"), self.student),
                                        (load_file(folder / "ema.safetensors"), self.teacher)):  # fmt: skip
                for name, parameter in parameters.items():
                    parameter.copy_(tensors[name])
        tensors = load_file(folder / "optimizer.safetensors")
        state = {"param_groups": saved["optimizer"]["param_groups"], "state": {}}
        for key, value in tensors.items():
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
                unet.save_pretrained(folder / ("transformer" if self.diffusion.flow else "unet"))
            return folder
        layers = adapter_state_dict(unet, STUDENT)
        if self.accelerator.is_main_process:
            key = "transformer_lora_layers" if self.diffusion.flow else "unet_lora_layers"
            type(self.pipe).save_lora_weights(folder, **{key: layers}, safe_serialization=True)
        return folder


def train_self_npo(pipe, prompts, output_dir, config: SelfNPOConfig | None = None, images=None, stop_after=None,
                   progress: bool = True, **prepare_kwargs) -> list[float]:  # fmt: skip
    """Train into `output_dir` (the LoRA folder; `checkpoint/` beside the weights while training), resuming a
    checkpoint there; `stop_after` stops after that many steps (an interrupted run). Returns this call's losses."""
    config = config or SelfNPOConfig()
    output_dir = Path(output_dir)
    trainer = SelfNPOTrainer(pipe, prompts, config, images, prepare_kwargs)
    checkpoint = output_dir / "checkpoint"
    for candidate in (checkpoint, checkpoint.with_name("checkpoint.old")):  # `.old`: killed during the swap
        if (candidate / "trainer.json").is_file():
            trainer.load_checkpoint(candidate)
            break
    losses, bar = [], tqdm(total=config.steps, initial=trainer.step, desc="Self-NPO", disable=not progress)
    log = output_dir / "losses.jsonl"
    output_dir.mkdir(parents=True, exist_ok=True)
    if log.is_file() and trainer.accelerator.is_main_process:  # steps after the checkpoint are done again
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= trainer.step]
        log.write_text("".join(line + "\n" for line in kept))
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
        trainer.save_lora(output_dir)
    trainer.close()
    return losses
