"""Any guidance policy as a diffusers guider (`diffusers.guiders.BaseGuidance`): the `guider` component of diffusers'
modular pipelines (SDXL, SD3, Wan, Qwen-Image, ...), so every method of this project runs inside them without a
family file. (`guidance.diffusers_guider` is the bridge the other way: a diffusers guider as a scale rule.)

The guider contract, as the modular denoise blocks call it at every step: `set_state(step, num_inference_steps,
timestep)`; `prepare_inputs(data)` (or `prepare_inputs_from_block_state`) returns one batch per condition; for each
batch `prepare_models(denoiser)`, the denoiser's call, `cleanup_models(denoiser)`; then `guider(batches)` gives the
`GuiderOutput`. The adapter answers:

- `prepare_inputs`: at step 0 a run starts (the policy is reset, a new `trace`); the policy's `branches` say which
  rows run which branch, and the unconditional batch is returned only when it runs: on the steps where the policy
  drops the pass it really leaves the batch (`num_conditions` 1).
- A denoise block feeds the latents of every row from its own state, so a batch holds all rows or none: the batch
  rule decides ("any": the unconditional batch runs for every row while any row asks for it; "all": only when every
  row does). "per_row" runs the rows that ask only, where the latents come through the guider's inputs (SD3).
- `prepare_models`/`cleanup_models`: the unconditional model's switch (Self-NPO's adapter) on for the unconditional
  batch only, and a forward pre-hook that reads the latents from the conditional call; the model is left as found.
- `__call__`: the policy's `combine`, recorded in `trace` (scales, branches, NFE), as in the guided pipelines.

What a guider is not given it takes at construction: the pipeline (its live scheduler, for x0 estimates, look-aheads
and LinearAG's checks), and for evaluators that read pixels a `decode` (and `unpack` for packed latents).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from .checks import check_choice
from .denoised import copy_scheduler
from .scheduler import BranchRequest, GuidanceRun, GuidanceScheduler, GuidanceStep
from .trace import GuidanceTrace
from .unconditional import SeparateModel

BATCH_RULES = ("any", "all", "per_row")
LATENT_INPUTS = ("hidden_states", "sample")
"""The denoiser arguments that hold the latents (transformers, UNets)."""
IDENTIFIERS = {"cond": "pred_cond", "uncond": "pred_uncond"}
BRANCH_INDEX = {"cond": 0, "uncond": 1}
"""Which element of an input's (conditional, unconditional) pair a branch's batch takes."""


def field_values(data: Any, field: str | tuple[str, str]) -> Any:
    """What a block-state input field names: one value, or the (conditional, unconditional) pair."""
    if isinstance(field, tuple):
        return tuple(getattr(data, name, None) for name in field)
    return getattr(data, field, None)


def batch_size_of(values: dict[str, Any]) -> int:
    """The batch size of a guider's inputs: the rows of the first tensor among them."""
    for value in values.values():
        first = value[0] if isinstance(value, tuple) else value
        if isinstance(first, torch.Tensor) and first.ndim > 0:
            return first.shape[0]
    raise ValueError(f"PolicyGuider: the guider's inputs {sorted(values)} hold no tensor to read the batch size from")


def policy_config(policy: GuidanceScheduler) -> dict:
    """A policy's config with its class name: what the guider's config holds."""
    return {"_class_name": type(policy).__name__, **{k: v for k, v in policy.config.items() if not k.startswith("_")}}


def policy_class(name: str) -> type[GuidanceScheduler]:
    """A policy class of `guidance` by name."""
    import guidance

    cls = getattr(guidance, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, GuidanceScheduler)):
        classes = {n: getattr(guidance, n) for n in dir(guidance)}
        known = sorted(n for n, c in classes.items() if isinstance(c, type) and issubclass(c, GuidanceScheduler))
        raise ValueError(f"saved guider policy {name!r} is not a policy of `guidance`; known: {known}")
    return cls


def as_policy(policy: Any) -> GuidanceScheduler:
    if isinstance(policy, dict) and "_class_name" in policy:
        return policy_class(policy["_class_name"]).from_config({k: v for k, v in policy.items() if k != "_class_name"})
    if not isinstance(policy, GuidanceScheduler):
        raise TypeError(
            f"`policy` must be a GuidanceScheduler (guidance.ClassifierFreeGuidance, AdaptiveGuidance, ...), got "
            f"{type(policy).__name__}"
        )
    return policy


def requirements(policy: GuidanceScheduler) -> dict[str, str]:
    """What the policy reads beyond predictions and the step -> why: "scheduler", "latents", "decode"."""
    from .adaptive import AdaptiveSkip
    from .dynamic import DynamicScale
    from .linear_ag import LinearAGSkip

    needs = {}
    for part in getattr(policy, "parts", []):
        if isinstance(part, AdaptiveSkip) and part.config.compared != "prediction":
            needs["latents"] = f"AG compares {part.config.compared!r}, computed from the latents"
            if part.config.compared == "x0":
                needs["scheduler"] = "AG compares x0 estimates, which need the scheduler's noise level"
        if isinstance(part, LinearAGSkip):
            needs["scheduler"] = "LinearAG checks the run's scheduler and timesteps against its fit"
        if isinstance(part, DynamicScale):
            needs["latents"] = needs["scheduler"] = "dynamic CFG looks ahead from the latents with the scheduler"
            pixel = [e.name for e in part.evaluators if e.space == "pixel"]
            if pixel:
                needs["decode"] = f"dynamic CFG's evaluators {pixel} score decoded images"
    return needs


def expected_shape(policy: GuidanceScheduler) -> tuple[int, ...]:
    """The latent shape a policy was fitted for (a LinearAG calibration's), else ()."""
    fits = [getattr(part, "calibration", None) for part in getattr(policy, "parts", [])]
    shapes = [fit.latent_shape for fit in fits if getattr(fit, "latent_shape", None) is not None]
    return tuple(shapes[0]) if shapes else ()


def model_latents(scheduler: Any, model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The latents from the denoiser's input: undoes the scheduler's `scale_model_input` (Euler's `1/sqrt(1 +
    sigma^2)`; 1 for most schedulers), computed on a copy of it."""
    if scheduler is None or not hasattr(scheduler, "scale_model_input"):
        return model_input
    factor = float(copy_scheduler(scheduler).scale_model_input(torch.ones(()), t))
    return model_input if factor == 1.0 else model_input / factor


def scattered(chunk: torch.Tensor, rows: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """`chunk` at batch rows `rows` of a full batch, NaN elsewhere (all rows: `chunk` itself)."""
    if rows is None:
        return chunk
    full = chunk.new_full((batch_size, *chunk.shape[1:]), float("nan"))
    full[rows.to(chunk.device)] = chunk
    return full


class PolicyGuider(BaseGuidance):
    """A guidance policy as a diffusers guider: `pipe.update_components(guider=PolicyGuider(policy, pipeline=pipe))`.

    Args:
        policy: any `GuidanceScheduler` (or its saved config).
        batch_rule: how a policy's per-row request becomes batches: "any" (the unconditional batch runs, for every row,
            while any row asks for it; every row is then guided), "all" (only when every row asks; otherwise no row is
            guided) or "per_row" (only the rows that ask: needs the latents among the guider's inputs, as SD3's denoise
            step passes them).
        enabled: as diffusers' guiders (`disable()`, `enable()`): disabled, only the conditional batch runs.
        pipeline: the modular pipeline: its live `scheduler` (read, copied, never stepped) and its name in errors.
        decode: `decode(latents, decoder=None) -> images in [-1, 1]` for evaluators that read pixels.
        unpack: denoiser latents -> the VAE's layout, for evaluators (packed latents: Flux 2, Qwen-Image).

    After a run, `trace` is its `GuidanceTrace`.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]
    ignore_for_config = ["pipeline", "decode", "unpack"]

    @register_to_config
    def __init__(
        self,
        policy: GuidanceScheduler | dict | None = None,
        batch_rule: Literal["any", "all", "per_row"] = "any",
        enabled: bool = True,
        *,
        pipeline: Any = None,
        decode: Callable[..., torch.Tensor] | None = None,
        unpack: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(0.0, 1.0, enabled)
        self.policy = as_policy(policy)
        self.batch_rule = check_choice("batch_rule", batch_rule, BATCH_RULES)
        self.pipeline, self.decode, self.unpack = pipeline, decode, unpack
        self.register_to_config(policy=policy_config(self.policy))
        self.trace: GuidanceTrace | None = None
        self._plan: list[tuple[str, torch.Tensor | None]] | None = None
        self._models = contextlib.ExitStack()
        self._seen: torch.Tensor | None = None
        self._check_construction()

    # ----- what the pipeline must give

    @property
    def pipeline_name(self) -> str:
        return type(self.pipeline).__name__ if self.pipeline is not None else "the modular pipeline"

    def _check_construction(self) -> None:
        name = type(self.policy).__name__
        if isinstance(self.policy.unconditional, SeparateModel):
            raise ValueError(
                f"PolicyGuider: {name}'s unconditional model {self.policy.unconditional!r} is another denoiser, and "
                f"{self.pipeline_name}'s denoise step calls its own: switch weights for the unconditional batch "
                "instead (NegativeAdapter, SwitchedModel), or use a guided pipeline of `pipelines`"
            )
        needs = requirements(self.policy)
        if "scheduler" in needs and getattr(self.pipeline, "scheduler", None) is None:
            raise ValueError(
                f"PolicyGuider: {needs['scheduler']}, and a diffusers guider is not given the scheduler: pass "
                f"`pipeline=` (the modular pipeline whose `scheduler` steps the latents), got {self.pipeline!r}"
            )
        if "decode" in needs and self.decode is None:
            raise ValueError(
                f"PolicyGuider: {needs['decode']}, and {self.pipeline_name} gives a guider no decoder: pass `decode=` "
                "(latents, decoder=None -> images in [-1, 1], e.g. with guidance.vae.decode(pipe.vae, latents)), or "
                "use latent evaluators"
            )

    def _check_denoiser(self, denoiser: torch.nn.Module) -> None:
        """Self-NPO switches a LoRA adapter on for the unconditional batch: the denoiser must hold it."""
        from .lora import adapter_names, lora_layers
        from .npo import NegativeAdapter

        model = self.policy.unconditional
        if not isinstance(model, NegativeAdapter):
            return
        names = sorted(adapter_names(lora_layers(denoiser)))
        if model.adapter_name not in names:
            raise ValueError(
                f"PolicyGuider: Self-NPO's NegativeAdapter({model.adapter_name!r}) switches a LoRA adapter on for the "
                f"unconditional batch, but {self.pipeline_name}'s {type(denoiser).__name__} has no LoRA adapter "
                f"{model.adapter_name!r} (it has {names}): load it with guidance.load_npo_adapter(pipe, folder) or "
                f"pipe.load_lora_weights(folder, adapter_name={model.adapter_name!r})"
            )

    # ----- the guider contract

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._models.close()  # what a failed model call left entered (its hooks, an adapter switched on)
        self._plan = None

    @property
    def num_conditions(self) -> int:
        """The batches of this step: 1 when no row runs the unconditional pass; 2 outside a prepared step (encoders
        read it before the loop to decide whether to encode the negative prompt)."""
        if not self._enabled:
            return 1
        return 2 if self._plan is None else len(self._plan)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def prepare_inputs(self, data: dict[str, Any]) -> list:
        self._begin_step(dict(data))
        return [self._rows(self._prepare_batch(data, BRANCH_INDEX[b], IDENTIFIERS[b]), r) for b, r in self._plan]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        values = {key: field_values(data, field) for key, field in input_fields.items()}
        self._begin_step(values)
        return [
            self._rows(self._prepare_batch_from_block_state(input_fields, data, BRANCH_INDEX[b], IDENTIFIERS[b]), r)
            for b, r in self._plan
        ]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        branch, rows = self._plan[self._count_prepared - 1]
        if int(self._step) == 0 and branch == "cond":
            self._check_denoiser(denoiser)
        model, size = self.policy.unconditional, self.batch_size if rows is None else len(rows)
        if branch == "cond":
            self._models.enter_context(self._latents_hook(denoiser))
        if model.shares_pass:
            self._models.enter_context(model.rows_context(denoiser, [branch] * size))
        elif branch == "uncond":
            self._models.enter_context(model.context(denoiser))

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._models.close()

    def __call__(self, data: list) -> GuiderOutput:
        rows = dict(self._plan)
        predictions = {}
        for batch in data:
            branch = "cond" if getattr(batch, self._identifier_key) == IDENTIFIERS["cond"] else "uncond"
            predictions[branch] = scattered(batch.noise_pred, rows[branch], self.batch_size)
        if set(predictions) != set(rows):
            raise ValueError(
                f"PolicyGuider prepared the batches {sorted(IDENTIFIERS[b] for b in rows)} at step "
                f"{int(self._step)}, got predictions of {sorted(IDENTIFIERS[b] for b in predictions)}"
            )
        output = self.forward(**{IDENTIFIERS[b]: p for b, p in predictions.items()})
        self._plan = None  # the step is done: the next run's encoders must not read this step's batches
        return output

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        """The policy's combination of this step's predictions (full batch, NaN in rows that did not run)."""
        predictions = {"cond": pred_cond, **({"uncond": pred_uncond} if pred_uncond is not None else {})}
        step = self._combine_step()
        if not self._enabled:
            guided_prediction, scales, extras = pred_cond, torch.ones(self.batch_size), {}
        else:
            guided = self.policy.combine(step, self._request, predictions)
            guided_prediction, scales, extras = guided.prediction, guided.scales, guided.extras
        self.trace.record(scales, self._request.as_lists(), **extras)
        return GuiderOutput(pred=guided_prediction, pred_cond=pred_cond, pred_uncond=pred_uncond)

    # ----- one step

    def _begin_step(self, values: dict[str, Any]) -> None:
        """Batch size and latents from the inputs; at step 0 a new run; the policy's request, after the batch rule."""
        if self._step is None:
            raise ValueError("PolicyGuider: call `set_state(step, num_inference_steps, timestep)` before the inputs")
        self._seen = None
        self.batch_size = batch_size_of(values)
        latents = values.get(next((k for k in LATENT_INPUTS if k in values), None))
        self._latents = latents[0] if isinstance(latents, tuple) else latents
        if int(self._step) == 0 or self.trace is None:
            self._start_run()
        self._current = self._guidance_step(self._latents)
        if not self._enabled:
            self._request = BranchRequest.full(self.batch_size, uncond=False)
        else:
            self._request = self._batch_level(self.policy.branches(self._current), values)
        branches = [name for name in ("cond", "uncond") if self._request.coverage(name) != "none"]
        self._plan = [(name, self._row_index(name)) for name in branches]
        missing = [
            key for key, value in values.items() if isinstance(value, tuple) and value[1] is None is not value[0]
        ]
        if any(name == "uncond" for name, _ in self._plan) and missing:
            raise ValueError(
                f"PolicyGuider: {type(self.policy).__name__} asks for the unconditional batch at step "
                f"{int(self._step)}, but {self.pipeline_name} gave no unconditional inputs for {missing}: give it a "
                "negative prompt (or negative embeddings)"
            )

    def _start_run(self) -> None:
        self.trace = GuidanceTrace(self.batch_size)
        self._provisional = self._latents is None
        self._reset(self._latents)

    def _reset(self, latents: torch.Tensor | None) -> None:
        """The policy reset for a run. Before the latents are seen (the denoise block feeds them to the model after
        `prepare_inputs`), with the shape the policy expects, if it says (a LinearAG fit's); the reset before the first
        combination checks the real one."""
        scheduler = self.scheduler
        num_timesteps = len(scheduler.timesteps) if scheduler is not None else self._num_inference_steps
        shape = tuple(latents.shape[1:]) if latents is not None else expected_shape(self.policy)
        self.policy.reset(GuidanceRun(self.batch_size, num_timesteps, self._num_inference_steps, scheduler, shape))

    @property
    def scheduler(self) -> Any:
        return getattr(self.pipeline, "scheduler", None)

    def _guidance_step(self, latents: torch.Tensor | None) -> GuidanceStep:
        scheduler = self.scheduler
        num_timesteps = len(scheduler.timesteps) if scheduler is not None else self._num_inference_steps
        if latents is None:  # not seen yet: the denoise block feeds them to the model after `prepare_inputs`
            latents = torch.empty((self.batch_size, 0))
        return GuidanceStep(
            step_index=int(self._step),
            num_timesteps=num_timesteps,
            timestep=self._timestep,
            latents=latents,
            scheduler=scheduler,
            num_inference_steps=self._num_inference_steps,
            unpack=self.unpack,
            decode=self.decode,
        )

    def _combine_step(self) -> GuidanceStep:
        """The step for `combine`, with the latents the denoiser saw; a run whose latents the guider first sees here
        is reset again with their shape (LinearAG checks it) before its first combination."""
        if self._latents is None and self._seen is not None:
            self._latents = model_latents(self.scheduler, self._seen, self._timestep)
        needs = requirements(self.policy)
        if self._latents is None and "latents" in needs:
            raise ValueError(
                f"PolicyGuider: {needs['latents']}, but {self.pipeline_name}'s denoiser got neither of "
                f"{list(LATENT_INPUTS)} nor a first positional argument"
            )
        if self._provisional and self._latents is not None:
            self._reset(self._latents)
            self._provisional = False
        return self._guidance_step(self._latents)

    def _batch_level(self, request: BranchRequest, values: dict[str, Any]) -> BranchRequest:
        """The request as batches can run it: every row or none per branch, unless the rule is "per_row"."""
        if self.batch_rule == "per_row":
            if not isinstance(values.get(next((k for k in LATENT_INPUTS if k in values), ""), None), tuple):
                raise ValueError(
                    f"PolicyGuider(batch_rule='per_row'): a batch of some rows needs the latents among the guider's "
                    f"inputs, and {self.pipeline_name}'s denoise step passes {sorted(values)} (its denoiser reads the "
                    "latents of every row from its own state): use batch_rule='any' or 'all', or a guided pipeline "
                    "of `pipelines` for per-row skipping"
                )
            return request
        if request.coverage("uncond") != "some" and request.coverage("cond") == "all":
            return request
        runs = request.coverage("uncond") == "all" or (
            self.batch_rule == "any" and request.coverage("uncond") != "none"
        )
        return BranchRequest.full(self.batch_size, uncond=runs)

    def _row_index(self, branch: str) -> torch.Tensor | None:
        return None if self._request.coverage(branch) == "all" else getattr(self._request, branch).nonzero().squeeze(1)

    def _rows(self, batch, rows: torch.Tensor | None):
        """A batch holding rows `rows` of every per-row tensor (all rows: the batch as it is)."""
        if rows is None:
            return batch
        for key, value in batch.as_dict().items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == self.batch_size:
                setattr(batch, key, value.index_select(0, rows.to(value.device)))
        return batch

    @contextlib.contextmanager
    def _latents_hook(self, denoiser: torch.nn.Module):
        """Reads the latents the denoiser is called with (kept when the guider's inputs held them)."""
        self._seen = None

        def read(module, args, kwargs):
            given = next((kwargs[k] for k in LATENT_INPUTS if k in kwargs), args[0] if args else None)
            self._seen = given if isinstance(given, torch.Tensor) else None

        handle = denoiser.register_forward_pre_hook(read, with_kwargs=True) if self._latents is None else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    # ----- configuration

    def new(self, **kwargs) -> PolicyGuider:
        """A fresh guider of the same policy (`policy.new()`), rule and runtime objects, `kwargs` replacing some."""
        runtime = dict(pipeline=self.pipeline, decode=self.decode, unpack=self.unpack)
        arguments = dict(policy=self.policy.new(), batch_rule=self.batch_rule, enabled=self._enabled, **runtime)
        return type(self)(**{**arguments, **kwargs})

    @classmethod
    def from_config(cls, config: dict | None = None, return_unused_kwargs: bool = False, **kwargs) -> PolicyGuider:
        saved = {k: v for k, v in dict(config or {}).items() if k in ("policy", "batch_rule", "enabled")}
        return cls(**{**saved, **kwargs})

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """The guider's config (`guider_config.json`) and the policy with the objects it holds (its
        `save_pretrained`) in `save_directory`."""
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        self.policy.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        *,
        pipeline: Any = None,
        decode: Callable[..., torch.Tensor] | None = None,
        unpack: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **policy_kwargs,
    ) -> PolicyGuider:
        """A guider saved with `save_pretrained`; `policy_kwargs` go to the policy's `from_pretrained` (runtime objects
        a config cannot hold: `evaluators=`, `unconditional=`, ...)."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        saved = config.get("policy")
        if not isinstance(saved, dict) or "_class_name" not in saved:
            raise ValueError(f"{str(pretrained_model_name_or_path)!r} holds no PolicyGuider config (no saved policy)")
        policy = policy_class(saved["_class_name"]).from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **policy_kwargs
        )
        rule, enabled = config.get("batch_rule", "any"), config.get("enabled", True)
        return cls(policy, rule, enabled, pipeline=pipeline, decode=decode, unpack=unpack)
