"""Gradio demo: compare guidance policies side by side on the same seeds, and edit or invert images with FlowOpt,
iterate by iterate.

The page only: widgets and their wiring. Each event calls the demo's logic in `pipelines.application.demo` (tested
without Gradio) with the page's values; the functions here give the events the parameter names that `gradio_client`
shows and turn every error into a readable message in the page. Run `python app.py` (needs the `demo` extra:
`pip install -e ".[demo]"`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
import torch

from pipelines.application import demo
from pipelines.application.models import EMBEDDED_DEFAULT, SHAPES_MODELS
from pipelines.application.sessions import device_and_dtype, request_compare_stop, request_stop

CONCURRENCY = 2  # calls of one event in progress at once; calls on one model still take turns (its lock)
METHOD_CHOICES = [
    ("off (slot unused)", "off"),
    ("CFG", "cfg"),
    ("scheduled CFG", "scheduled"),
    ("AG", "ag"),
    ("LinearAG", "linear-ag"),
    ("dynamic", "dynamic"),
    ("none (no guidance)", "none"),
]
SLOT_NAMES = [f"policy{k + 1}_{name}" for k in range(demo.MAX_POLICIES) for name in demo.POLICY_FIELDS]
EDIT_SETTINGS = ("steps", "n_max", "iterations", "step_size", "guidance_scale")  # the values `mode_settings` loads
FIRST_METHODS = ("cfg", "ag", demo.OFF, demo.OFF)  # the slots' methods when the page opens
SCHEDULES = ["constant", "linear", "cosine"]
PROGRESS = gr.Progress()  # a streaming event's default `progress`: Gradio passes the run's progress bar in its place
# small images (the shapes world's 32 px) drawn large and sharp
CSS = """
#source-image img, #edit-result img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#iterates img, [id^="images-"] img { image-rendering: pixelated; }
"""


# --------------------------------------------------------------------------------------------------- events


def readable(error: Exception) -> gr.Error:
    """The message the page shows for an error, never a traceback: bad input (ValueError, TypeError) as its message,
    unexpected errors with their type (and logged)."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, (ValueError, TypeError)):
        return gr.Error(str(error), print_exception=False)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return gr.Error("out of GPU memory: try fewer images, fewer steps or a smaller image")
    if isinstance(error, ImportError):
        return gr.Error(f"{error}: install the demo's extra, pip install -e '.[demo]'")
    return gr.Error(f"{type(error).__name__}: {error}")


def shown_in_page(function: Callable) -> Callable:
    """`function` (a generator function, or a plain one) with every error raised as its `readable` message."""
    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def stream(*args, **kwargs):
            try:
                yield from function(*args, **kwargs)
            except Exception as error:
                raise readable(error) from error

        return stream

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise readable(error) from error

    return call


# Every parameter of the streaming events defaults to None, what an empty box sends; the API's defaults are the
# widgets' first values. A run first clears the last one's results, so that an error never stands beside results that
# are not its own (in one event, so a second click while it runs is not taken: Gradio's trigger mode "once").


@shown_in_page
def compare(
    prompt: str | None = None,
    negative_prompt: str | None = None,
    model: str | None = None,
    num_inference_steps: float | None = None,
    num_images: float | None = None,
    seed: float | None = None,
    npo_adapter: str | None = None,
    session: dict | None = None,
    progress: gr.Progress = PROGRESS,
    **policies: Any,
) -> Iterator[tuple]:
    """The Compare tab (`demo.compare`); the slots' values come by name (`SLOT_NAMES`: policy1_method, ...)."""
    yield (None, None, "") * demo.MAX_POLICIES + ("", [])
    values = [policies[name] for name in SLOT_NAMES]
    request = demo.CompareRequest.from_page(
        prompt, negative_prompt, model, num_inference_steps, num_images, seed, npo_adapter, values
    )
    yield from demo.compare(request, session, progress)


@shown_in_page
def edit(
    model: str | None = None,
    image: Any = None,
    source_prompt: str | None = None,
    target_prompt: str | None = None,
    mode: str | None = None,
    num_inference_steps: float | None = None,
    n_max: float | None = None,
    iterations: float | None = None,
    step_size: str | None = None,
    guidance_scale: float | None = None,
    seed: float | None = None,
    session: dict | None = None,
    progress: gr.Progress = PROGRESS,
) -> Iterator[tuple]:
    """The Edit tab (`demo.edit`)."""
    yield [], None, None, ""
    request = demo.EditRequest.from_page(
        model,
        image,
        source_prompt,
        target_prompt,
        mode,
        num_inference_steps,
        n_max,
        iterations,
        step_size,
        guidance_scale,
        seed,
    )
    yield from demo.edit(request, session, progress)


@shown_in_page
def method_controls(method: str) -> list:
    """A slot's controls shown or hidden for its method."""
    return [gr.update(visible=visible) for visible in demo.method_controls(method)]


@shown_in_page
def mode_settings(mode: str, model: str) -> list:
    """The Edit tab's settings for a mode and model, and the target prompt shown or hidden."""
    values, shown = demo.mode_settings(mode, model)
    visible = dict(zip(demo.EDIT_CONTROLS, shown, strict=True))
    settings = [
        gr.update(value=value, visible=visible.get(name, True))
        for name, value in zip(EDIT_SETTINGS, values, strict=True)
    ]
    return [*settings, gr.update(visible=visible["target_prompt"])]


def choices_of(kept: list | None) -> Any:
    """The Edit tab's picker of Compare images, after a comparison."""
    return gr.update(choices=[item[0] for item in kept or []], value=kept[0][0] if kept else None)


# --------------------------------------------------------------------------------------------------- widgets


@dataclass
class CompareTab:
    preset: Any
    apply: Any
    prompt: Any
    model: Any
    steps: Any
    values: list  # what `compare` takes before the session: prompt, negative prompt, model, steps, images, ...
    slots: list[list]  # per slot, its widgets in `demo.POLICY_FIELDS` order
    run: Any
    stop: Any
    stopping: Any
    summary: Any
    results: list  # per slot: images, plot, cost

    @property
    def slot_widgets(self) -> list:
        return [widget for slot in self.slots for widget in slot]


@dataclass
class EditTab:
    model: Any
    mode: Any
    file: Any
    pick: Any
    take: Any
    source: Any
    source_prompt: Any
    values: list  # what `edit` takes before the session
    settings: list  # what `mode_settings` sets: EDIT_SETTINGS, then the target prompt
    run: Any
    stop: Any
    stopping: Any
    outputs: list  # iterates, kept image, residual plot, status


def policy_slot(k: int, default: demo.PolicyControls) -> list:
    """The widgets of policy slot `k`, in `demo.POLICY_FIELDS` order; those its method does not read are hidden."""
    shown = set(demo.SHOWN[default.method])

    def number(name: str, label: str) -> gr.Number:
        return gr.Number(getattr(default, name), label=label, visible=name in shown, precision=None)

    coefficients = "LinearAG coefficients folder (empty: shipped)"
    return [
        gr.Dropdown(METHOD_CHOICES, value=default.method, label=f"policy {k + 1}: method"),
        number("guidance_scale", "guidance scale"),
        number("final_guidance_scale", "final guidance scale"),
        gr.Dropdown(SCHEDULES, value=default.schedule, label="schedule", visible="schedule" in shown),
        number("threshold", "AG threshold"),
        gr.Textbox(default.coefficients, label=coefficients, visible="coefficients" in shown),
        gr.Textbox(default.candidates, label="candidate scales", visible="candidates" in shown),
        gr.CheckboxGroup(
            demo.evaluator_choices(),
            value=list(default.evaluators),
            visible="evaluators" in shown,
            label="evaluators (none: the model's default)",
        ),
        number("guidance_start", "guidance from (0-1)"),
        number("guidance_stop", "guidance until (0-1)"),
        gr.Checkbox(default.npo, label="Self-NPO in the unconditional branch", visible="npo" in shown),
    ]


def result_widgets(k: int) -> list:
    """Policy slot `k`'s results: its images, its per-step guidance plot, its cost."""
    return [
        gr.Gallery(label=f"policy {k + 1}", columns=2, height=220, format="png", elem_id=f"images-{k + 1}"),
        gr.Plot(label=f"policy {k + 1}: per-step guidance", show_label=False, elem_id=f"plot-{k + 1}"),
        gr.Markdown(elem_id=f"cost-{k + 1}"),
    ]


def compare_tab() -> CompareTab:
    with gr.Row():
        preset = gr.Dropdown(list(demo.PRESETS), value=None, label="preset (the docs' comparisons)", scale=3)
        apply = gr.Button("Load preset", scale=1)
    with gr.Row():
        prompt = gr.Textbox(label="prompt", value="a large red circle at the center on white", scale=3)
        negative = gr.Textbox(label="negative prompt", scale=2)
    with gr.Row():
        label = "model (a shapes model, or a local diffusers folder)"
        model = gr.Dropdown(list(SHAPES_MODELS), value=EMBEDDED_DEFAULT, allow_custom_value=True, label=label)
        steps = gr.Number(20, label="steps", precision=None)
        images = gr.Number(2, label="images per policy", precision=None)
        seed = gr.Number(0, label="seed (image k uses seed + k)", precision=None)
        adapter = gr.Textbox(label="Self-NPO adapter folder (empty: the shipped one)")
    slots = []
    with gr.Row():
        for k, method in enumerate(FIRST_METHODS):
            with gr.Column(elem_id=f"policy-{k + 1}", min_width=220):
                slots.append(policy_slot(k, demo.PolicyControls(method)))
    with gr.Row():
        run = gr.Button("Compare", variant="primary", elem_id="compare-button", scale=3)
        stop = gr.Button("Stop (keep the policies done)", elem_id="compare-stop-button", scale=1)
        stopping = gr.Markdown(elem_id="compare-stopping")
    waiting = "*Results arrive below, policy by policy; here: the costs and the cheapest policy.*"
    summary = gr.Markdown(waiting, elem_id="compare-summary", min_height=70)
    results = []
    with gr.Row():
        for k in range(demo.MAX_POLICIES):
            with gr.Column(min_width=220):
                results += result_widgets(k)
    values = [prompt, negative, model, steps, images, seed, adapter]
    return CompareTab(preset, apply, prompt, model, steps, values, slots, run, stop, stopping, summary, results)


def edit_tab(prompt: str) -> EditTab:
    """The Edit tab's widgets; its settings start as `demo.mode_settings` loads them for its first mode and model."""
    steps, n_max, iterations, step_size, scale = demo.mode_settings(demo.EDIT_MODES[0], demo.EDIT_MODEL)[0]
    with gr.Row():
        with gr.Column():
            with gr.Row():
                label = "flow model (shapes:sd3 or a local SD3/Flux folder)"
                model = gr.Dropdown([demo.EDIT_MODEL], value=demo.EDIT_MODEL, allow_custom_value=True, label=label)
                mode = gr.Radio(list(demo.EDIT_MODES), value=demo.EDIT_MODES[0], label="mode")
            file = gr.File(label="upload an image", type="filepath", elem_id="upload")
            with gr.Row():
                pick = gr.Dropdown([], label="or take an image of the Compare tab", scale=3, allow_custom_value=True)
                take = gr.Button("Take it", scale=1)
            source = gr.Image(
                type="pil", label="source image", interactive=False, height=200, elem_id="source-image", format="png"
            )
            source_prompt = gr.Textbox(label="source prompt", value=prompt)
            target = "a large blue circle at the center on white"
            target_prompt = gr.Textbox(label="target prompt (not used by Invert)", value=target)
            with gr.Row():
                settings = [
                    gr.Number(steps, label="steps T", precision=None),
                    gr.Number(n_max, label="n_max", precision=None),
                    gr.Number(iterations, label="iterations", precision=None),
                ]
            with gr.Row():
                settings += [
                    gr.Textbox(step_size, label="step size (a number or auto)"),
                    gr.Number(scale, label="target guidance scale", precision=None),
                ]
                seed = gr.Number(0, label="seed", precision=None)
        with gr.Column():
            run, stop, stopping, outputs = edit_results()
    values = [model, source, source_prompt, target_prompt, mode, *settings, seed]
    return EditTab(
        model,
        mode,
        file,
        pick,
        take,
        source,
        source_prompt,
        values,
        [*settings, target_prompt],
        run,
        stop,
        stopping,
        outputs,
    )


def edit_results() -> tuple[Any, Any, Any, list]:
    """The Edit tab's buttons and results: Run, Stop, the Stop note, and (iterates, kept image, residuals, status)."""
    with gr.Row():  # at the top: in sight on a laptop screen, beside the settings
        run = gr.Button("Run", variant="primary", elem_id="edit-button")
        stop = gr.Button("Stop (keep the best so far)", elem_id="stop-button")
        stopping = gr.Markdown(elem_id="edit-stopping")
    kept = gr.Image(label="result (the iterate kept)", elem_id="edit-result", height=256, format="png")
    waiting = "*Upload an image or take one from Compare, then Run.*"
    status = gr.Markdown(waiting, elem_id="edit-status", min_height=70)
    iterates = gr.Gallery(label="iterates, as they arrive", columns=6, height=160, format="png", elem_id="iterates")
    residuals = gr.Plot(label="residual per iteration", show_label=False, elem_id="residuals")
    return run, stop, stopping, [iterates, kept, residuals, status]


# --------------------------------------------------------------------------------------------------- wiring


def wire_compare(tab: CompareTab, session: gr.State, kept: gr.State) -> None:
    slots = dict(zip(SLOT_NAMES, tab.slot_widgets, strict=True))
    tab.run.click(lambda: "", None, tab.stopping, queue=False, api_name=False)  # the last run's Stop note
    tab.run.click(
        compare,
        [*tab.values, session],
        [*tab.results, tab.summary, kept],
        inputs_kwargs=slots,
        api_name="compare",
        concurrency_limit=CONCURRENCY,
        show_progress_on=[tab.summary],
    )
    stop = shown_in_page(request_compare_stop)
    tab.stop.click(stop, session, tab.stopping, api_name="stop_compare", concurrency_limit=None)
    preset_outputs = [tab.model, tab.steps, *tab.slot_widgets]
    tab.apply.click(shown_in_page(demo.apply_preset), tab.preset, preset_outputs, api_name="apply_preset")
    for k, slot in enumerate(tab.slots):
        slot[0].change(method_controls, slot[0], slot[1:], api_name=f"method_controls_{k + 1}")


def wire_edit(tab: EditTab, session: gr.State, kept: gr.State) -> None:
    kept.change(choices_of, kept, tab.pick, api_name=False)
    tab.mode.change(mode_settings, [tab.mode, tab.model], tab.settings, api_name="mode_settings")
    tab.model.change(mode_settings, [tab.mode, tab.model], tab.settings, api_name=False)
    # a refused upload empties the file box, so that another file can be dropped at once
    uploaded = tab.file.upload(shown_in_page(demo.upload), tab.file, tab.source, api_name="upload")
    uploaded.failure(lambda: None, None, tab.file, queue=False, api_name=False)
    taken = [tab.source, tab.source_prompt]
    tab.take.click(shown_in_page(demo.take_from_compare), [kept, tab.pick], taken, api_name="take_from_compare")
    tab.run.click(lambda: "", None, tab.stopping, queue=False, api_name=False)
    status = tab.outputs[-1]
    tab.run.click(
        edit,
        [*tab.values, session],
        tab.outputs,
        api_name="edit",
        concurrency_limit=CONCURRENCY,
        show_progress_on=[status],
    )
    tab.stop.click(shown_in_page(request_stop), session, tab.stopping, api_name="stop", concurrency_limit=None)


def build_demo() -> gr.Blocks:
    """The page: the Compare and Edit tabs and their events."""
    with gr.Blocks(title="Guidance schedulers") as page:
        gr.Markdown(
            "## Guidance schedulers\n**Compare** guidance policies on the same prompt and seeds (images, the scale "
            "applied at every step, NFEs and time); **Edit** an image with FlowOpt and watch its iterates arrive. "
            f"Running on **{device_and_dtype('sd')[0]}**."
        )
        kept, session = gr.State([]), gr.State({})
        with gr.Tab("Compare"):
            compare_widgets = compare_tab()
        with gr.Tab("Edit"):
            edit_widgets = edit_tab(compare_widgets.prompt.value)
        wire_compare(compare_widgets, session, kept)
        wire_edit(edit_widgets, session, kept)
    page.queue(default_concurrency_limit=CONCURRENCY)
    return page


def launch_demo(**kwargs: Any) -> tuple[gr.Blocks, str]:
    """Build the page and serve it (`kwargs`: Gradio's `launch` arguments); (the Blocks, its local URL)."""
    page = build_demo()
    _, url, _ = page.launch(css=CSS, **kwargs)
    return page, url


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The guidance schedulers demo (Gradio).")
    parser.add_argument("--server-name", default=None, help="address to listen on (Gradio's default: 127.0.0.1)")
    parser.add_argument("--server-port", type=int, default=None, help="port (Gradio's default: 7860)")
    arguments = parser.parse_args()
    launch_demo(server_name=arguments.server_name, server_port=arguments.server_port)
