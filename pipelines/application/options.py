"""Guidance schedulers from plain options: what a command line, a manifest row or the demo names (a method and its
parameters) turned into a policy. The options and their defaults are listed once, in `GUIDANCE_OPTIONS`."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guidance import (
    AdaptiveGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    GuidanceScheduler,
    LinearAdaptiveGuidance,
    ScheduledGuidance,
)
from guidance.evaluators import Evaluator
from guidance.unconditional import UnconditionalModel

from .models import SHAPES_MODELS

METHODS = ("cfg", "scheduled", "ag", "linear-ag", "dynamic", "none")
# option -> (default, kind); kinds: "number", "numbers" (a list), "text", "texts" (a text or a list), or choices
GUIDANCE_OPTIONS: dict[str, tuple[Any, Any]] = {
    "guidance": ("cfg", METHODS),
    "guidance_scale": (7.5, "number"),
    "final_guidance_scale": (None, "number"),
    "schedule": ("linear", ("constant", "linear", "cosine")),
    "guidance_rescale": (0.0, "number"),
    "guidance_start": (0.0, "number"),
    "guidance_stop": (1.0, "number"),
    "threshold": (0.995, "number"),
    "compared": ("x0", ("x0", "prediction", "xt_minus_prediction")),
    "candidates": (None, "numbers"),
    "evaluator": (None, "texts"),
    "weighting": ("adaptive", ("adaptive", "fixed")),
    "lookahead": ("auto", ("auto", "x0", "next_latent")),
    "coefficients": (None, "text"),
}
DEFAULT_CANDIDATES = [1.0, 3.0, 7.5, 11.0, 15.0]
_INTERVAL = ("guidance_rescale", "guidance_start", "guidance_stop")
# the options each method reads (besides `guidance`)
METHOD_OPTIONS = {
    "cfg": ("guidance_scale", *_INTERVAL),
    "scheduled": ("guidance_scale", "final_guidance_scale", "schedule", *_INTERVAL),
    "ag": ("guidance_scale", "threshold", "compared", *_INTERVAL),
    "linear-ag": ("guidance_scale", "coefficients", *_INTERVAL),
    "dynamic": ("candidates", "evaluator", "weighting", "lookahead", *_INTERVAL),
    "none": (),
}


def check_option(name: str, value: Any) -> Any:
    """`value` as the kind of guidance option `name` takes (ints become floats, one text a list for "texts"); a
    ValueError naming the option otherwise."""
    if name not in GUIDANCE_OPTIONS:
        raise ValueError(f"unknown guidance parameter {name!r}; known: {sorted(GUIDANCE_OPTIONS)}")
    default, kind = GUIDANCE_OPTIONS[name]
    if value is None:
        return None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if kind == "number" and number(value):
        return float(value)
    if kind == "numbers" and isinstance(value, list) and value and all(number(v) for v in value):
        return [float(v) for v in value]
    if kind == "text" and isinstance(value, str):
        return value
    if kind == "texts" and (
        isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    ):
        return [value] if isinstance(value, str) else list(value)
    if isinstance(kind, tuple) and value in kind:
        return value
    expected = {
        "number": "a number",
        "numbers": "a non-empty list of numbers",
        "text": "a string",
        "texts": "a string or a list of strings",
    }.get(kind, f"one of {list(kind)}")
    raise ValueError(f"`{name}` must be {expected}, got {value!r}")


EVALUATOR_SPECS = (
    "'clip:<open_clip model>@<pretrained tag or .safetensors>' (e.g. 'clip:ViT-L-14@openai'), "
    "'clip:local-dir:<folder>', 'clip:hf-hub:<repo>', 'transformers-clip:<folder or hub id>', "
    "'pickscore[:<model>[@<processor>]]' (folders or hub ids), 'hpsv2:<.safetensors>', 'aesthetic:<.safetensors>', "
    "the folder of a trained evaluator (a fidelity discriminator or a latent head), or for a shapes model 'clip' (the "
    "shapes-world CLIP)"
)


def shipped_coefficients(model: str | None, num_inference_steps: int | None) -> str | None:
    """The LinearAG coefficients shipped for a shapes-world model at this step count, if there are some."""
    if model not in SHAPES_MODELS:
        return None
    from guidance.shapes.assets import ASSETS

    folder = ASSETS / "linear-ag" / f"{SHAPES_MODELS[model]}-{num_inference_steps}"
    return str(folder) if folder.is_dir() else None


def default_evaluators(model: str | None) -> list[str]:
    """The evaluators dynamic guidance uses when none are named: for shapes:sd the shipped latent heads (no decode),
    for shapes:sd3 the shapes-world CLIP; any other model must name its own."""
    if model == "shapes:sd3":
        return ["clip"]
    if model != "shapes:sd":
        raise ValueError(f"dynamic guidance on {model!r} needs evaluators (`evaluator`): {EVALUATOR_SPECS}")
    from guidance.shapes.assets import ASSETS

    heads = [ASSETS / f"shapes-sd-latent-{kind}" for kind in ("clip", "fidelity")]
    missing = [str(head) for head in heads if not (head / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"the latent heads shipped for shapes:sd are missing ({missing}): rebuild them with "
            "guided-train-evaluator, or name evaluators"
        )
    return [str(head) for head in heads]


def evaluator_from_spec(spec: str, model: str | None = None) -> Evaluator:
    """The evaluator a specification names (see `EVALUATOR_SPECS`); "clip" only for the shapes models."""
    from guidance import evaluators
    from guidance.shapes.assets import shapes_clip

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"an evaluator must be one of {EVALUATOR_SPECS}, got {spec!r}")
    kind, _, argument = spec.partition(":")
    if spec == "clip":
        if model not in SHAPES_MODELS:
            raise ValueError(
                f"evaluator 'clip' is the shapes-world CLIP, for the shapes models; for {model!r} use "
                "'clip:<open_clip model>@<pretrained>' or another of the evaluators: " + EVALUATOR_SPECS
            )
        return evaluators.ClipEvaluator(shapes_clip())
    if kind == "pickscore":
        model_name, _, processor = argument.partition("@")
        defaults = inspect.signature(evaluators.PickScoreEvaluator).parameters
        return evaluators.PickScoreEvaluator(
            model_name or defaults["model"].default, processor or defaults["processor"].default
        )
    if kind in ("clip", "transformers-clip", "hpsv2", "aesthetic"):
        if not argument:
            raise ValueError(f"evaluator {spec!r} needs what it loads after the colon: {EVALUATOR_SPECS}")
        if kind == "clip":
            name, pretrained = open_clip_name(argument)
            return evaluators.ClipEvaluator(name, pretrained)
        loader = {
            "transformers-clip": evaluators.TransformersClipEvaluator,
            "hpsv2": evaluators.HPSv2Evaluator,
            "aesthetic": evaluators.AestheticEvaluator,
        }
        return loader[kind](argument)
    config = Path(spec) / "config.json"
    if not config.is_file():
        raise ValueError(f"evaluator {spec!r} is not one of {EVALUATOR_SPECS}")
    if json.loads(config.read_text()).get("evaluator") == "latent":
        return evaluators.LatentEvaluator.from_pretrained(spec, name=Path(spec).name)
    return evaluators.FidelityDiscriminator.from_pretrained(spec, name=Path(spec).name)


def open_clip_name(argument: str) -> tuple[str, str | None]:
    """(model, pretrained) of 'name@pretrained'; a 'local-dir:' or 'hf-hub:' source is taken whole."""
    if argument.startswith(("local-dir:", "hf-hub:")):
        return argument, None
    name, _, pretrained = argument.partition("@")
    return name, pretrained or None


def policy_from_options(
    options: Mapping[str, Any],
    model: str | None = None,
    num_inference_steps: int | None = None,
    unconditional: UnconditionalModel | None = None,
) -> GuidanceScheduler:
    """The guidance scheduler that `options` (names of `GUIDANCE_OPTIONS`; missing ones take their defaults) name;
    `model` and `num_inference_steps` pick the shipped LinearAG coefficients and dynamic evaluators; `unconditional`
    the model of the unconditional branch (e.g. Self-NPO's `NegativeAdapter`)."""

    def get(name: str) -> Any:
        value = options.get(name)
        return GUIDANCE_OPTIONS[name][0] if value is None else value

    method = get("guidance")
    common = dict(
        guidance_rescale=get("guidance_rescale"),
        start=get("guidance_start"),
        stop=get("guidance_stop"),
        unconditional=unconditional,
    )
    if method == "none":
        return ClassifierFreeGuidance(guidance_scale=1.0)
    if method == "ag":
        return AdaptiveGuidance(get("guidance_scale"), threshold=get("threshold"), compared=get("compared"), **common)
    if method == "linear-ag":
        coefficients = get("coefficients") or shipped_coefficients(model, num_inference_steps)
        if not coefficients:
            raise ValueError(
                "guidance 'linear-ag' needs `coefficients`, a folder written by guided-calibrate-linear-ag (shipped "
                "for shapes:sd and shapes:sd3 at 20 steps)"
            )
        return LinearAdaptiveGuidance.from_pretrained(coefficients, guidance_scale=get("guidance_scale"), **common)
    if method == "dynamic":
        return DynamicGuidance(
            candidates=get("candidates") or DEFAULT_CANDIDATES,
            evaluators=[evaluator_from_spec(spec, model) for spec in get("evaluator") or default_evaluators(model)],
            weighting=get("weighting"),
            lookahead=get("lookahead"),
            **common,
        )
    if method == "scheduled":
        return ScheduledGuidance(
            get("guidance_scale"), final_guidance_scale=get("final_guidance_scale"), schedule=get("schedule"), **common
        )
    if method != "cfg":
        raise ValueError(f"`guidance` must be one of {list(METHODS)}, got {method!r}")
    return ClassifierFreeGuidance(guidance_scale=get("guidance_scale"), **common)
