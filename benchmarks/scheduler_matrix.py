"""Every shipped policy with every diffusers scheduler people use, on tiny real components of each family, in one run.

Per (family, scheduler, policy), on a batch of 2 prompts with negative prompts and `num_images_per_prompt=2`
(4 rows): whether it runs, whether the images are finite, the trace's NFE per image against the rows the denoiser
really saw (a forward hook counts them), and the model evaluations per row (the run's timesteps: more than the steps
for PNDM and Heun). Per (family, scheduler): the largest difference to diffusers' own pipeline with the same
scheduler at constant CFG. Writes `scheduler-matrix.md/.json`; tests/pipelines/test_schedulers.py asserts every cell.

    python -m benchmarks.scheduler_matrix [--steps 4]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.results import write_results
from guidance import (
    AdaptiveGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    ScheduledGuidance,
)
from guidance.evaluators import RewardEvaluator
from guidance.evaluators.latent import LatentEvaluator
from guidance.evaluators.networks import ConvEncoder
from pipelines.families import FLOW_FAMILIES, guided_class
from pipelines.schedulers import SCHEDULERS, set_scheduler
from pipelines.testing import tiny_components
from pipelines.training.linear_ag import calibrate

STEPS = 4  # PNDM with its Runge-Kutta warm-up needs 4
SCALE = 4.0
ROWS = {"prompt": ["a red circle", "a small blue square"], "negative_prompt": ["green", "a yellow triangle"]}
CALIBRATION = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
POLICIES = [
    "cfg",
    "scheduled",
    "interval",
    "ag",
    "linear-ag",
    "dynamic-x0-pixel",
    "dynamic-x0-latent",
    "dynamic-next-pixel",
    "dynamic-next-latent",
]
CASES = [("sd", name) for name, (_, _, kind) in SCHEDULERS.items() if kind == "diffusion"]
CASES += [(family, name) for family in FLOW_FAMILIES for name, (_, _, kind) in SCHEDULERS.items() if kind == "flow"]
CASES += [("sdxl", name) for name in ("euler", "dpm++2m-karras", "heun", "unipc")]
NO_REFERENCE = {("flux", "flow-heun"): "diffusers' FluxPipeline refuses FlowMatchHeun (it takes no custom sigmas)"}


def call_kwargs(family: str, steps: int) -> dict:
    text = {"max_sequence_length": 16} if family in FLOW_FAMILIES else {}
    return dict(
        height=16, width=16, output_type="np", num_inference_steps=steps, num_images_per_prompt=2, **ROWS, **text
    )


def tiny_pipeline(family: str, scheduler: str, guided: bool = True):
    import diffusers

    reference = {
        "sd": "StableDiffusionPipeline",
        "sdxl": "StableDiffusionXLPipeline",
        "sd3": "StableDiffusion3Pipeline",
        "flux": "FluxPipeline",
    }[family]
    pipeline = guided_class(family) if guided else getattr(diffusers, reference)
    pipe = pipeline(**tiny_components(family))
    pipe.set_progress_bar_config(disable=True)
    return set_scheduler(pipe, scheduler)


def make_policy(name: str, pipe, family: str, steps: int = STEPS):
    if name == "cfg":
        return ClassifierFreeGuidance(SCALE)
    if name == "scheduled":
        return ScheduledGuidance(2.0, final_guidance_scale=6.0, schedule="cosine")
    if name == "interval":
        return ClassifierFreeGuidance(SCALE, start=0.3, stop=0.8)
    if name == "ag":
        return AdaptiveGuidance(SCALE, threshold=0.9)
    if name == "linear-ag":
        text = {"max_sequence_length": 16} if family in FLOW_FAMILIES else {}
        policy, _ = calibrate(pipe, CALIBRATION, steps, SCALE, batch_size=4, height=16, width=16, **text)
        return policy
    _, lookahead, space = name.split("-")
    if space == "pixel":
        evaluator = RewardEvaluator(lambda images, prompts: -images.mean(dim=(1, 2, 3)), name="pixel")
    else:
        torch.manual_seed(0)
        evaluator = LatentEvaluator(ConvEncoder(4, 8, 1, width=4, timestep_aware=True).eval(), "score", name="latent")
    lookahead = "next_latent" if lookahead == "next" else lookahead
    return DynamicGuidance(candidates=[1.0, 4.0, 7.0], evaluators=[evaluator], lookahead=lookahead)


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(k) for k in range(4)]


def counted_call(pipe, policy, family: str, steps: int = STEPS):
    """(output, NFE per image counted by a forward hook on the denoiser, denoiser calls)."""
    rows = []
    handle = pipe.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(args[0] if args else kwargs["hidden_states"])), with_kwargs=True
    )
    try:
        out = pipe(**call_kwargs(family, steps), generator=generators(), guidance=policy)
    finally:
        handle.remove()
    return out, sum(rows) / 4, len(rows)


def run_case(family: str, scheduler: str, steps: int = STEPS) -> dict:
    """Every policy with this family and scheduler: one cell per policy, and the parity with diffusers."""
    pipe = tiny_pipeline(family, scheduler)
    timesteps = pipe.prepare(**{**call_kwargs(family, steps), "output_type": None}).num_timesteps
    cells = {}
    for name in POLICIES:
        try:
            out, counted, _ = counted_call(pipe, make_policy(name, pipe, family, steps), family, steps)
        except Exception as error:  # the matrix reports it; the test fails on it
            cells[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        cells[name] = {
            "error": None,
            "finite": bool(np.isfinite(out.images).all()),
            "nfe": out.trace.nfe,
            "counted_nfe": counted,
            "evaluations": out.trace.num_steps,
            "scales": sorted({s for row in out.trace.scales for s in row}),
        }
    parity = None
    if (family, scheduler) not in NO_REFERENCE:
        reference = tiny_pipeline(family, scheduler, guided=False)
        scale_argument = "true_cfg_scale" if family == "flux" else "guidance_scale"
        expected = reference(**call_kwargs(family, steps), generator=generators(), **{scale_argument: SCALE}).images
        guided = pipe(**call_kwargs(family, steps), generator=generators(), guidance=ClassifierFreeGuidance(SCALE))
        parity = float(np.abs(guided.images - expected).max())
    return {"family": family, "scheduler": scheduler, "timesteps": timesteps, "cells": cells, "parity": parity}


def cell_text(cell: dict, timesteps: int) -> str:
    if cell["error"]:
        return f"error: {cell['error'][:60]}"
    ok = cell["finite"] and cell["nfe"] == cell["counted_nfe"] and cell["evaluations"] == timesteps
    return f"{'pass' if ok else 'FAIL'} ({cell['nfe']:g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS, help="inference steps of every run (PNDM-PRK needs 4)")
    parser.add_argument(
        "--only", action="append", default=None, help="a case family:scheduler (repeatable; default: every case)"
    )
    parser.add_argument("--out", default=None, help="folder for the results files (default: benchmarks/results)")
    args = parser.parse_args()
    chosen = CASES if args.only is None else [tuple(case.split(":")) for case in args.only]
    unknown = [case for case in chosen if case not in CASES]
    if unknown:
        parser.error(f"`--only` {unknown} are not cases; valid: {[f'{f}:{s}' for f, s in CASES]}")
    cases = [run_case(family, scheduler, args.steps) for family, scheduler in chosen]
    lines = [
        f"Tiny random components, {args.steps} steps, 2 prompts x 2 images with negative prompts. A cell: pass when "
        "it "
        "runs, the images are finite, the trace's NFE per image (in brackets) equals the rows the denoiser saw and "
        "there is one trace entry per model evaluation. Parity: largest absolute difference to diffusers' own "
        "pipeline with the same scheduler at constant CFG (images in [0, 1]).",
        "",
        "| family | scheduler | evaluations per row | " + " | ".join(POLICIES) + " | parity with diffusers |",
        "| --- " * (len(POLICIES) + 4) + "|",
    ]
    for case in cases:
        cells = " | ".join(cell_text(case["cells"][name], case["timesteps"]) for name in POLICIES)
        parity = "-" if case["parity"] is None else f"{case['parity']:.1e}"
        lines.append(f"| {case['family']} | {case['scheduler']} | {case['timesteps']} | {cells} | {parity} |")
    notes = [f"- {family} + {scheduler}: {why}" for (family, scheduler), why in NO_REFERENCE.items()]
    table = "\n".join(lines + [""] + notes)
    print(table)
    write_results("scheduler-matrix", table, cases, args.out)


if __name__ == "__main__":
    main()
