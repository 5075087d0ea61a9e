"""Gradio demo: generate with a chosen guidance method and see what it did at every step.

A thin shell: widgets, validation and plots; the pipelines and guidance schedulers do the work.
Run `python app.py` (needs the `demo` extra: `pip install -e ".[demo]"`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from guidance.npo import NegativeAdapter, load_npo_adapter
from guidance.plot import plot_trace
from pipelines.loading import DEFAULT_MODEL, call_defaults, load_pipeline
from pipelines.policies import METHODS, policy_from_options


@lru_cache(maxsize=2)
def cached_pipeline(model: str, npo: str = ""):
    """The pipeline of `model`, with the Self-NPO adapter folder `npo` loaded (kept off but for NPO's rows)."""
    pipe, family = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    if npo:
        load_npo_adapter(pipe, npo)
    return pipe, family


def generate(
    prompt: str,
    negative_prompt: str = "",
    method: str = "cfg",
    guidance_scale: float = 7.5,
    final_guidance_scale: float | None = None,
    schedule: str = "linear",
    start: float = 0.0,
    stop: float = 1.0,
    num_inference_steps: int = 20,
    num_images: int = 4,
    seed: int = 0,
    model: str = DEFAULT_MODEL,
    threshold: float = 0.995,
    coefficients: str = "",
    npo: str = "",
):
    """Images, a figure of the per-step scales and a one-line summary; ValueError on bad input."""
    if not prompt.strip():
        raise ValueError("`prompt` must not be empty")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}")
    if int(num_inference_steps) < 1 or int(num_images) < 1:
        raise ValueError(f"steps and images must be >= 1, got {num_inference_steps} and {num_images}")
    npo = (npo or "").strip()
    if npo and not (Path(npo).is_dir() and any(Path(npo).glob("*.safetensors"))):
        raise ValueError(f"the Self-NPO adapter must be a folder holding a LoRA .safetensors file, got {npo!r}")
    options = dict(
        guidance=method,
        guidance_scale=float(guidance_scale),
        final_guidance_scale=None if final_guidance_scale in (None, "") else float(final_guidance_scale),
        schedule=schedule,
        guidance_rescale=0.0,
        guidance_start=float(start),
        guidance_stop=float(stop),
        threshold=float(threshold),
        compared="x0",
        coefficients=coefficients or None,
    )
    unconditional = NegativeAdapter("npo") if npo else None
    guidance = policy_from_options(options, model, int(num_inference_steps), unconditional)
    pipe, family = cached_pipeline(model, npo)
    extra = call_defaults(model, family)
    result = pipe(
        prompt,
        negative_prompt=negative_prompt or None,
        num_images_per_prompt=int(num_images),
        num_inference_steps=int(num_inference_steps),
        generator=[torch.Generator().manual_seed(int(seed) + k) for k in range(int(num_images))],
        guidance=guidance,
        **extra,
    )
    summary = f"{guidance!r}: {result.trace.nfe:g} model evaluations per image over {num_inference_steps} steps"
    return result.images, plot_trace(result.trace), summary


def build_demo():
    import gradio as gr

    def run(*values):
        try:
            return generate(*values)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from error

    with gr.Blocks(title="Guidance schedulers") as demo:
        gr.Markdown("## Guidance schedulers\nPick a guidance method; the plot shows the scale applied at each step.")
        with gr.Row():
            with gr.Column():
                inputs = [
                    gr.Textbox(label="prompt", value="a large red circle at the center on white"),
                    gr.Textbox(label="negative prompt"),
                    gr.Dropdown(list(METHODS), value="cfg", label="guidance method"),
                    gr.Slider(0.0, 15.0, value=7.5, step=0.5, label="guidance scale (first step if scheduled)"),
                    gr.Number(value=None, label="final guidance scale (scheduled)"),
                    gr.Dropdown(["constant", "linear", "cosine"], value="linear", label="schedule (scheduled)"),
                    gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="guidance interval start"),
                    gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="guidance interval stop"),
                    gr.Slider(1, 50, value=20, step=1, label="steps"),
                    gr.Slider(1, 8, value=4, step=1, label="images"),
                    gr.Number(value=0, precision=0, label="seed"),
                    gr.Textbox(
                        value=DEFAULT_MODEL, label="model (shapes:sd, shapes:sd3, a diffusers folder, tiny:<family>)"
                    ),
                    gr.Number(value=0.995, label="AG threshold (ag)"),
                    gr.Textbox(value="", label="LinearAG coefficients folder (linear-ag; empty: the shipped ones)"),
                    gr.Textbox(
                        value="",
                        label="Self-NPO adapter folder in the unconditional branch (empty: off; assets/shapes-sd-npo "
                        "for shapes:sd)",
                    ),
                ]
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                outputs = [gr.Gallery(label="images", columns=4), gr.Plot(label="per-step guidance"), gr.Markdown()]
        button.click(run, inputs=inputs, outputs=outputs)
    return demo


if __name__ == "__main__":
    build_demo().launch()
