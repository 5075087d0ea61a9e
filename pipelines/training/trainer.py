"""A resumable, reproducible training loop (the shapes-world models, the evaluators of dynamic guidance).

Every step draws its data and noise from a generator seeded by (seed, step), so a run killed and resumed
from its last checkpoint continues exactly as if it had never stopped. Checkpoints are safetensors files
(weights, EMA weights, AdamW moments; the step and optimizer settings in the metadata): no pickles.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Trainer:
    """AdamW with linear warm-up, gradient clipping and an EMA of the weights; checkpoints every `save_every`."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        checkpoint_dir: str | os.PathLike,
        steps: int,
        lr: float,
        seed: int = 0,
        ema_decay: float = 0.995,
        warmup: int = 100,
        save_every: int = 200,
        weight_decay: float = 0.0,
    ):
        self.name, self.model, self.steps, self.seed = name, model, steps, seed
        self.ema_decay, self.warmup, self.save_every, self.lr = ema_decay, warmup, save_every, lr
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.checkpoint = Path(checkpoint_dir) / f"{name}.safetensors"
        self.step = 0
        if self.checkpoint.is_file():
            self._load()

    def run(self, loss_fn: Callable[[torch.Generator, int], torch.Tensor]) -> torch.nn.Module:
        """Train until `steps`; `loss_fn(generator, step)` returns the loss of one batch. Returns the EMA model."""
        torch.manual_seed(self.seed)
        self.model.train()
        interval = 0.1 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s, not a flood
        bar = tqdm(total=self.steps, initial=self.step, desc=f"train {self.name}", mininterval=interval)
        while self.step < self.steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * min(1.0, (self.step + 1) / self.warmup)
            loss = loss_fn(step_generator(self.seed, self.step), self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self._update_ema()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.step % self.save_every == 0 or self.step == self.steps:
                self._save()
        bar.close()
        self.model.load_state_dict(self.ema)
        self.model.eval()
        return self.model

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        for key, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                self.ema[key].lerp_(value.detach(), 1 - decay)
            else:
                self.ema[key].copy_(value)

    def _save(self) -> None:
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.contiguous().cpu() for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v.contiguous().cpu() for k, v in self.ema.items()})
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                for key, value in self.optimizer.state.get(parameter, {}).items():
                    tensors[f"optim.{names[id(parameter)]}.{key}"] = value.contiguous().cpu()
        metadata = {"step": str(self.step), "seed": str(self.seed), "steps": str(self.steps)}
        partial = self.checkpoint.with_suffix(".partial")
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, self.checkpoint)  # a kill mid-write never leaves a broken checkpoint

    def _load(self) -> None:
        from safetensors import safe_open

        with safe_open(self.checkpoint, "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(self.checkpoint, device=str(next(self.model.parameters()).device))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        by_name = dict(self.model.named_parameters())
        for key, value in tensors.items():
            if key.startswith("optim."):
                name, state_key = key[6:].rsplit(".", 1)
                self.optimizer.state[by_name[name]][state_key] = value
        self.step = int(metadata["step"])
        print(f"resumed {self.name} from {self.checkpoint} at step {self.step}: {json.dumps(metadata)}")
