"""The demo's logic without Gradio: the Compare and Edit tabs' results, streaming, both Stops, and every bad-input
message."""

import json
import re
import threading
import time

import pytest
import torch
from conftest import policy_values, rendered_scene, seeded
from PIL import Image

from guidance import AdaptiveGuidance, ClassifierFreeGuidance
from guidance.shapes.assets import ASSETS
from pipelines.application import demo, sessions
from pipelines.application.demo import CompareRequest, EditRequest
from pipelines.application.models import call_defaults

PROMPT = "a large red circle at the center on white"
CFG, AG = demo.PolicyControls("cfg", 5.0), demo.PolicyControls("ag", 7.5)


def compare(*page_values, session=None, progress=None):
    """`demo.compare` on the Compare tab's flat values: prompt, negative prompt, model, steps, images per policy, seed,
    Self-NPO adapter, then the slots' values."""
    return demo.compare(CompareRequest.from_page(*page_values[:7], page_values[7:]), session, progress)


def tiny_sd(steps: int) -> tuple:
    """The Compare tab's values before the slots, for tiny:sd at `steps` steps: one image, seed 0."""
    return PROMPT, "", "tiny:sd", steps, 1, 0, ""


def run_compare(*slots, model="tiny:sd", steps=4, images=2, seed=0, prompt=PROMPT, negative="", adapter=""):
    return list(compare(prompt, negative, model, steps, images, seed, adapter, *policy_values(*slots)))


def pixels(image) -> torch.Tensor:
    return torch.tensor(list(image.getdata()), dtype=torch.float32)


def test_compare_streams_one_result_per_policy_on_the_same_seeds():
    interval = demo.PolicyControls("cfg", 5.0, guidance_start=0.5)
    first, last = run_compare(interval, CFG)
    assert first[3:6] == (None, None, "") and first[12] == "running... (1 done)"  # policy 2 not done yet
    images, figure, cost = last[0:3]
    assert len(images) == 2 and images[0].size == (32, 32)
    assert list(figure.axes[0].lines[0].get_ydata()) == [1.0, 1.0, 5.0, 5.0]
    assert cost.startswith("**CFG 5, interval [0.5, 1]**: 6 NFEs per image")
    assert [pixels(a).tolist() for a in last[3]] != [pixels(a).tolist() for a in images]  # the interval changed them
    assert last[6:12] == (None, None, "", None, None, "")  # slots 3 and 4 are off
    assert "| 1 | CFG 5, interval [0.5, 1] | 6 |" in last[12] and "| 2 | CFG 5 | 8 |" in last[12]
    assert "**Cheapest: policy 1, CFG 5, interval [0.5, 1]**: 6 model evaluations per image (0.75 of" in last[12]
    assert [label for label, _, _ in last[13]] == [
        "policy 1 (CFG 5, interval [0.5, 1]), image 1",
        "policy 1 (CFG 5, interval [0.5, 1]), image 2",
        "policy 2 (CFG 5), image 1",
        "policy 2 (CFG 5), image 2",
    ]
    again = run_compare(demo.PolicyControls(demo.OFF), CFG)[-1]  # slot 1 off: slot 2 alone, on the same seeds
    assert again[0] is None and [pixels(a).tolist() for a in again[3]] == [pixels(a).tolist() for a in last[3]]


def test_a_compare_request_reads_only_what_each_slot_s_method_reads():
    slots = policy_values(
        demo.PolicyControls(demo.OFF, guidance_scale="not read"),
        demo.PolicyControls("cfg", "9", threshold="not read", npo=True),
        demo.PolicyControls("scheduled", final_guidance_scale="not read", schedule="constant"),
    )
    request = CompareRequest.from_page(" a red circle ", None, "shapes:sd", 20.0, "2", 7, "", slots)
    shared = (request.prompt, request.negative_prompt, request.num_inference_steps, request.num_images, request.seed)
    assert shared == ("a red circle", "", 20, 2, 7)
    interval = {"guidance_start": 0.0, "guidance_stop": 1.0}
    constant = {"schedule": "constant", "final_guidance_scale": None}
    assert request.options == {
        1: {"guidance": "cfg", "guidance_scale": 9.0, **interval},
        2: {"guidance": "scheduled", "guidance_scale": 7.5, **constant, **interval},
    }
    assert request.adapters == {1: str(ASSETS / "shapes-sd-npo"), 2: None}  # the adapter shipped for shapes:sd


def test_the_ag_preset_reproduces_the_readme_headline_costs():
    model, steps, *values = demo.apply_preset("AG and LinearAG against CFG (docs: Adaptive Guidance)")
    assert (model, steps, len(values)) == ("shapes:sd", 20, demo.MAX_POLICIES * len(demo.POLICY_FIELDS))
    last = list(compare(PROMPT, "", model, steps, 1, 0, "", *values))[-1]
    nfes = [float(re.search(r"\*\*: ([\d.]+) NFEs", last[2 + 3 * k]).group(1)) for k in range(4)]
    assert nfes[0] == 40 and nfes[3] == 24 and nfes[1] < nfes[2] < 40  # CFG, AG 0.995 < AG 0.999, LinearAG
    assert "**Cheapest: policy 4, LinearAG 7.5**" in last[12]


@pytest.mark.parametrize("name", list(demo.PRESETS))
def test_every_preset_runs(name):
    model, steps, *values = demo.apply_preset(name)
    last = list(compare(PROMPT, "", model, steps, 1, 0, "", *values))[-1]
    assert all(last[3 * k] is not None for k in range(demo.MAX_POLICIES)) and "Cheapest" in last[12]


def test_dynamic_plots_its_candidate_scores_and_npo_changes_the_images_at_the_same_cost():
    heads = [spec for _, spec in demo.evaluator_choices()[:2]]
    dynamic = demo.PolicyControls("dynamic", candidates="3, 7.5, 15", evaluators=heads)
    last = run_compare(
        dynamic,
        demo.PolicyControls("cfg", 7.5),
        demo.PolicyControls("cfg", 7.5, npo=True),
        model="shapes:sd",
        images=1,
    )[-1]
    figure = last[1]
    labels = ["chosen scale", "shapes-sd-latent-clip score", "shapes-sd-latent-fidelity score", "weights (image 0)"]
    assert [axis.get_ylabel() for axis in figure.axes] == labels
    assert set(figure.axes[0].lines[0].get_ydata()) <= {3.0, 7.5, 15.0}
    assert last[2].startswith("**dynamic (candidates 3 7.5 15; shapes-sd-latent-clip, shapes-sd-latent-fidelity)**")
    assert last[8].startswith("**CFG 7.5 + Self-NPO**: 8 NFEs") and last[5].startswith("**CFG 7.5**: 8 NFEs")
    assert pixels(last[3][0]).tolist() != pixels(last[6][0]).tolist()


def stop_at(session: dict, when: str, seen: list) -> callable:
    """A `gr.Progress` stand-in that records every progress text and presses the Compare tab's Stop at `when`."""

    def progress(value, desc=None, **kwargs):
        seen.append(desc)
        if desc == when:
            assert sessions.request_compare_stop(session) == "stopping after the current step..."

    return progress


def test_stop_ends_a_comparison_after_the_current_step_keeping_the_policies_done():
    session, seen = {}, []
    slots = policy_values(CFG, AG, demo.PolicyControls("cfg", 9.0))
    run = compare(*tiny_sd(6), *slots, session=session, progress=stop_at(session, "policy 2: step 2/6", seen))
    first = next(run)
    assert [run.name for run in session["compare"]] == ["the comparison"] and first[12] == "running... (1 done)"
    *_, last = run
    assert seen[-1] == "policy 2: step 2/6"  # interrupted right after the step Stop came in; policy 3 never ran
    assert last[0] == first[0] and last[3] is None and last[6] is None
    assert last[12].startswith("| policy | method |") and "| 1 | CFG 5 | 12 |" in last[12] and "| 2 |" not in last[12]
    assert last[12].endswith(
        "**Stopped by you** during policy 2 (AG 7.5 (threshold 0.995)): the policies that finished are kept."
    )
    assert [label for label, _, _ in last[13]] == ["policy 1 (CFG 5), image 1"]
    assert session == {} and sessions.request_compare_stop(session) == "nothing is running"
    again = list(compare(*tiny_sd(6), *policy_values(CFG, AG)))[-1]  # no interrupt left
    assert pixels(again[0][0]).tolist() == pixels(first[0][0]).tolist() and "**Cheapest: policy 2" in again[12]
    seen.clear()
    *_, last = compare(*tiny_sd(6), *slots, session=session, progress=stop_at(session, "policy 1: step 1/6", seen))
    assert seen[-1] == "policy 1: step 1/6" and all(last[3 * k] is None for k in range(demo.MAX_POLICIES))
    assert last[12] == "**Stopped by you** during policy 1 (CFG 5): no policy had finished." and last[13] == []


def test_a_stop_after_the_last_step_is_named_and_two_runs_of_one_session_both_stop():
    session, seen = {}, []
    stop = stop_at(session, "policy 2: step 4/4", seen)
    *_, last = compare(*tiny_sd(4), *policy_values(CFG, AG), session=session, progress=stop)
    assert "| 2 | AG 7.5 (threshold 0.995) |" in last[12]
    assert last[12].endswith("Stop came after the last step: every policy finished.")
    runs = [compare(*tiny_sd(4), *policy_values(CFG, AG), session=session) for _ in range(2)]
    firsts = [next(run) for run in runs]  # both under way in one session (the API allows it)
    assert len(session["compare"]) == 2 and firsts[0][12] == "running... (1 done)"
    assert sessions.request_compare_stop(session) == "stopping after the current step..."
    assert all("**Stopped by you** during policy 2" in list(run)[-1][12] for run in runs) and session == {}


def test_stop_works_from_the_moment_a_call_starts_even_while_it_waits_for_the_model():
    """A Stop pressed while the call waits for another session's run on its model: nothing of it runs."""
    for tab, run in (
        ("compare", lambda session: compare(*tiny_sd(4), *policy_values(CFG), session=session)),
        ("edit", lambda session: run_edit(session=session)),
    ):
        session, outputs, lock = {}, [], demo.MODELS.get("tiny:sd" if tab == "compare" else "shapes:sd3").lock
        with lock:  # another session's run
            worker = threading.Thread(target=lambda: outputs.extend(run(session)))  # noqa: B023
            worker.start()
            deadline = time.monotonic() + 30
            while not session.get(tab) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert (
                sessions.request_stop(session, tab)
                == f"stopping after the current {'step' if tab == 'compare' else 'iteration'}..."
            )
        worker.join(60)
        assert not worker.is_alive() and session == {}
        if tab == "compare":
            assert outputs[-1][0] is None and outputs[-1][12] == (
                "**Stopped by you** during policy 1 (CFG 5): no policy had finished."
            )
        else:
            assert outputs[-1][0] == [] and outputs[-1][3] == "stopped by you before it started"


def test_progress_counts_the_steps_of_a_second_order_scheduler_as_diffusers_does(tmp_path):
    from diffusers import HeunDiscreteScheduler

    from pipelines import GuidedStableDiffusionPipeline
    from pipelines.testing import tiny_components

    pipe = GuidedStableDiffusionPipeline(**tiny_components("sd"))
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "heun")
    seen = []
    record = lambda value, desc=None, **_: seen.append((value, desc))  # noqa: E731
    list(compare(PROMPT, "", str(tmp_path / "heun"), 3, 1, 0, "", *policy_values(CFG), progress=record))
    assert [desc for _, desc in seen] == ["policy 1: step 0/3"] + [f"policy 1: step {k}/3" for k in (0, 1, 1, 2, 3)]
    assert seen[-1][0] == (3, 3)  # 5 model steps (Heun: 2 per step but the first), 3 as the user counts them


def test_a_prompt_longer_than_the_model_reads_is_named_with_what_it_reads():
    long = PROMPT + " with a very long tail of extra words here"
    last = run_compare(CFG, model="shapes:sd", images=1, prompt=long, negative=long)[-1]
    read = "its first 14, 'a large red circle at the center on white with a'."
    assert last[12].endswith(
        f"The prompt is 42 tokens long: the model's CLIP text encoder reads only {read}\n\n"
        f"The negative prompt is 42 tokens long: the model's CLIP text encoder reads only {read}"
    )
    assert "tokens long" not in run_compare(CFG, model="shapes:sd", images=1)[-1][12]
    *_, (_, _, _, status) = run_edit(iterations=1, target_prompt=long)
    assert status.startswith("all iterations done") and status.endswith(
        f"\n\nThe target prompt is 42 tokens long: the model's CLIP text encoder reads only {read}"
    )
    # SD3 and Flux: a T5 encoder reads on, up to the pipeline's max_sequence_length (SD3 256, Flux 512 by default)
    longer = " ".join([PROMPT] * 3)
    for family, length in (("sd3", 256), ("flux", 512)):
        loaded = demo.MODELS.get(f"tiny:{family}")
        assert demo.text_length(loaded) == length
        note = demo.truncation_note(loaded.pipe, longer, "prompt", length)
        assert re.fullmatch(
            r"The prompt is \d+ tokens long: the model's CLIP text encoder reads only its first 75, "
            r"'a large red .*'; its T5 encoder reads all of it\.",
            note,
        )
        note = demo.truncation_note(loaded.pipe, longer, "prompt", 20)
        assert re.search(r"; its T5 encoder reads its first 19 of its \d+ T5 tokens\.$", note)
    assert demo.text_length(demo.MODELS.get("shapes:sd3")) == 16
    assert demo.text_length(demo.MODELS.get("tiny:sd")) is None


def test_two_sessions_at_once_each_get_their_own_results():
    """Compare calls in two threads (NPO hooks on the shared model in one): each equals its run alone."""
    calls = {
        "a": dict(seed=0, adapter="", slots=(demo.PolicyControls("cfg", 7.5, npo=True),)),
        "b": dict(seed=5, adapter="", slots=(demo.PolicyControls("cfg", 7.5),)),
    }
    alone = {k: run_compare(*c["slots"], model="shapes:sd", seed=c["seed"])[-1][0] for k, c in calls.items()}
    together, threads = {}, []
    for key, call in calls.items():
        work = lambda key=key, call=call: together.__setitem__(  # noqa: E731
            key, run_compare(*call["slots"], model="shapes:sd", seed=call["seed"])[-1][0]
        )
        threads.append(threading.Thread(target=work))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for key in calls:
        assert [pixels(a).tolist() for a in together[key]] == [pixels(a).tolist() for a in alone[key]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": " "}, "prompt must not be empty"),
        ({"steps": 0}, r"steps must be in \[1, 100\], got 0"),
        ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
        ({"images": 9}, r"images per policy must be in \[1, 8\], got 9"),
        ({"seed": "x"}, "seed must be a number, got 'x'"),
        ({"seed": -1}, r"seed must be in \[0, 2147483647\], got -1"),
        ({"slot": {"guidance_scale": "abc"}}, "policy 1: guidance scale must be a number, got 'abc'"),
        ({"slot": {"guidance_scale": None}}, "policy 1: guidance scale must be a number, got an empty box"),
        ({"slot": {"guidance_scale": 45}}, r"policy 1: guidance scale must be in \[0, 30\], got 45"),
        ({"slot": {"method": "ag", "threshold": 2}}, r"policy 1: AG threshold must be in \[0, 1\], got 2"),
        ({"slot": {"method": "ag", "threshold": 0}}, r"policy 1: AG threshold must be in \(0, 1\], got 0"),
        ({"slot": {"method": "dynamic", "candidates": "1, x"}}, "policy 1: candidate scale must be a number, got 'x'"),
        (
            {"slot": {"method": "dynamic", "candidates": " "}},
            "policy 1: candidate scales must be numbers separated by commas, got an empty box",
        ),
        (
            {"slot": {"guidance_start": 0.8, "guidance_stop": 0.2}},
            r"policy 1: guidance interval start \(0.8\) must be <= its stop \(0.2\)",
        ),
        ({"slot": {"method": "magic"}}, r"policy 1: method must be one of \['off', 'cfg', .*\], got 'magic'"),
        ({"slot": {"method": "off"}}, "choose a method for at least one policy"),
        ({"model": ""}, r"model must be one of \['shapes:sd', 'shapes:sd3'\] or a local diffusers folder, got an"),
        ({"model": "shapes:xl"}, r"model 'shapes:xl': the shipped shapes models are \['shapes:sd', 'shapes:sd3'\]"),
        (
            {"model": "/no/such/folder"},
            "model '/no/such/folder' is neither a shipped shapes model .* nor an existing local diffusers folder",
        ),
        (
            {"adapter": "/no/such/folder", "slot": {"npo": True}},
            "the Self-NPO adapter must be a folder holding a LoRA .safetensors file, got '/no/such/folder'",
        ),
        ({"slot": {"npo": True}}, "no Self-NPO adapter is shipped for 'tiny:sd': give an adapter folder"),
        (
            {"slot": {"method": "linear-ag"}, "steps": 30},
            "policy 1: LinearAG needs a coefficients folder .*shipped only for shapes:sd and shapes:sd3 at 20 steps",
        ),
        (
            {
                "slot": {"method": "dynamic", "evaluators": [str(ASSETS / "shapes-sd-latent-clip")]},
                "model": "shapes:sd3",
            },
            r"policy 1: the evaluators \['shapes-sd-latent-clip'\] were trained on shapes:sd, not 'shapes:sd3'",
        ),
    ],
)
def test_bad_compare_input_is_a_readable_error(change, message):
    slot = demo.PolicyControls(**{"method": "cfg", "guidance_scale": 5.0, **change.pop("slot", {})})
    with pytest.raises(ValueError, match=message):
        run_compare(slot, **change)


def test_every_policy_is_built_and_started_before_any_runs(tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"not a LoRA")
    slots = policy_values(CFG, demo.PolicyControls("cfg", 5.0, npo=True))
    with pytest.raises(ValueError, match=f"policy 2: Self-NPO adapter '{tmp_path}' could not be loaded into"):
        next(compare(*tiny_sd(4)[:6], str(tmp_path), *slots))  # before policy 1 ran
    shapes_sd = demo.PolicyControls("linear-ag", 5.0, coefficients=str(ASSETS / "linear-ag" / "shapes-sd-20"))
    with pytest.raises(
        ValueError,
        match="policy 2: LinearAG coefficients were fitted for DDIMScheduler with 20 "
        "inference steps .* this run uses FlowMatchEulerDiscreteScheduler",
    ):
        next(compare(PROMPT, "", "shapes:sd3", 20, 1, 0, "", *policy_values(CFG, shapes_sd)))
    npo = policy_values(demo.PolicyControls("cfg", 5.0, npo=True))
    with pytest.raises(
        ValueError,
        match="policy 1: Self-NPO adapter '.*shapes-sd-npo' could not be loaded into "
        "'tiny:sd': .* does not fit this pipeline's UNet2DConditionModel: 64 of",
    ):
        next(compare(PROMPT, "", "tiny:sd", 4, 1, 0, str(ASSETS / "shapes-sd-npo"), *npo))


def test_model_folders_that_are_not_a_supported_family_or_do_not_load_are_readable_errors(tmp_path):
    (tmp_path / "kandinsky").mkdir()
    (tmp_path / "kandinsky" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="is a KandinskyPipeline; supported: "):
        run_compare(CFG, model=str(tmp_path / "kandinsky"))
    (tmp_path / "empty-sd").mkdir()
    (tmp_path / "empty-sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="model '.*empty-sd' could not be loaded: "):
        run_compare(CFG, model=str(tmp_path / "empty-sd"))
    with pytest.raises(ValueError, match="model folder '.*' is not a diffusers pipeline: it has no model_index.json"):
        run_compare(CFG, model=str(tmp_path))
    with pytest.raises(TypeError, match="compare takes 4 policies of 11 values, got 3 values"):
        list(compare(*tiny_sd(4), "cfg", 5.0, 1.0))


def test_each_method_shows_only_its_controls():
    shown = {
        m: [n for n, v in zip(demo.POLICY_FIELDS[1:], demo.method_controls(m), strict=True) if v]
        for m in [demo.OFF, *demo.SHOWN]
    }
    interval = ["guidance_start", "guidance_stop", "npo"]
    assert shown["off"] == shown["none"] == []
    assert shown["cfg"] == ["guidance_scale", *interval]
    assert shown["scheduled"] == ["guidance_scale", "final_guidance_scale", "schedule", *interval]
    assert shown["ag"] == ["guidance_scale", "threshold", *interval]
    assert shown["linear-ag"] == ["guidance_scale", "coefficients", *interval]
    assert shown["dynamic"] == ["candidates", "evaluators", *interval]
    with pytest.raises(ValueError, match=r"method must be one of \['off', 'cfg', .*\], got 'x'"):
        demo.method_controls("x")
    with pytest.raises(ValueError, match="preset must be one of"):
        demo.apply_preset("x")


def test_each_edit_mode_loads_its_settings_for_the_model_and_shows_only_what_it_reads():
    edit, regenerate, flowedit, invert = demo.EDIT_MODES
    assert demo.mode_settings(edit, "shapes:sd3") == ((15, 15, 4, "0.02", 3.5), [True, True, True, True])
    assert demo.mode_settings(regenerate, "shapes:sd3") == ((15, 15, 0, "0.02", 3.5), [True, False, False, True])
    assert demo.mode_settings(invert, "shapes:sd3") == ((10, 10, 30, "0.2", 1.0), [False, True, True, False])
    assert demo.mode_settings(flowedit, "shapes:sd3") == ((50, 33, 0, "", 13.5), [True, False, False, True])
    assert demo.mode_settings(edit, "tiny:sd3")[0] == (15, 12, 8, "0.01", 3.5)  # the paper's, for other models
    assert demo.mode_settings(edit, "tiny:flux")[0] == (15, 13, 8, "0.0025", 3.5)
    assert demo.mode_settings(flowedit, "tiny:flux")[0] == (28, 24, 0, "", 5.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        demo.mode_settings("x", "shapes:sd3")
    with pytest.raises(ValueError, match="model 'shapes:sd' is a SD model: editing needs a flow model"):
        demo.mode_settings(edit, "shapes:sd")


def test_upload_and_take_from_compare(tmp_path, red_circle_png):
    assert demo.upload(str(red_circle_png)).size == (32, 32) and demo.upload(None) is None
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"the uploaded file 'notes.txt' is not an image \(PNG, JPEG, WebP, ...\)"):
        demo.upload(str(tmp_path / "notes.txt"))
    kept = run_compare(CFG, images=1)[-1][13]
    image, prompt = demo.take_from_compare(kept, "policy 1 (CFG 5), image 1")
    assert image is kept[0][1] and prompt == PROMPT
    with pytest.raises(ValueError, match="run a comparison first, then pick one of its images"):
        demo.take_from_compare([], None)


SCENE = dict(color="red", shape="circle", size="large", position="center", background="white")


def run_edit(mode=demo.EDIT_MODES[0], image="scene", session=None, **change):
    """`demo.edit` of a rendered scene on shapes:sd3 with the mode's settings, `change` on top (the Edit tab's
    values by name)."""
    names = ["num_inference_steps", "n_max", "iterations", "step_size", "guidance_scale"]
    settings = dict(zip(names, demo.mode_settings(mode, "shapes:sd3")[0], strict=True))
    arguments = dict(model="shapes:sd3", source_prompt=PROMPT, target_prompt=PROMPT.replace("red", "blue"), seed=0)
    arguments.update(settings, **change)
    image = rendered_scene(**SCENE) if image == "scene" else image
    request = EditRequest.from_page(image=image, mode=mode, **arguments)
    return demo.edit(request, {} if session is None else session)


def test_an_edit_request_holds_what_its_mode_runs_with():
    """Settings a mode does not read (hidden in the page) are not checked and not used."""
    image = rendered_scene(**SCENE)
    invert = EditRequest.from_page(
        " shapes:sd3 ", image, " a red circle ", None, demo.INVERT, 10, 10, 3, "AUTO", 99, 5
    )
    assert (invert.model, invert.source_prompt, invert.target_prompt) == ("shapes:sd3", "a red circle", "a red circle")
    assert (invert.iterations, invert.step_size, invert.guidance_scale) == (3, "auto", 1.0)
    assert invert.texts() == {"source prompt": "a red circle"}
    regenerate = EditRequest.from_page("shapes:sd3", image, "a", "b", demo.REGENERATE, 15, 15, 99, "fast", 3.5, 0)
    assert (regenerate.iterations, regenerate.step_size, regenerate.guidance_scale) == (0, None, 3.5)
    assert regenerate.texts() == {"source prompt": "a", "target prompt": "b"}


def test_edit_streams_its_iterates_and_keeps_the_lowest_residual():
    outputs = list(run_edit())
    assert outputs[0][0] == [] and outputs[0][3] == "running FlowOpt edit on cpu..."
    assert [len(o[0]) for o in outputs[1:]] == [1, 2, 3, 4, 5, 5]  # iterates 0..4 one at a time, then the result
    gallery, kept, figure, status = outputs[-1]
    residuals = [line.get_ydata()[k] for line in figure.axes[0].lines[:1] for k in range(5)]
    best = min(range(5), key=residuals.__getitem__)
    assert kept is gallery[best][0] and f"kept iteration {best} (the lowest residual" in status
    assert status.startswith("all iterations done at iteration 4") and "166 model evaluations" in status
    red, green, blue = pixels(kept).view(32, 32, 3)[12:20, 12:20].mean((0, 1)).tolist()
    assert blue > red + 50  # the red circle turned blue


def test_stop_keeps_the_best_iterate_so_far():
    session, outputs = {}, []
    for output in run_edit(iterations=30, session=session):
        outputs.append(output)
        if len(output[0]) == 2:
            assert sessions.request_stop(session) == "stopping after the current iteration..."
    gallery, kept, _, status = outputs[-1]
    assert 2 <= len(gallery) <= 4 and re.match(r"stopped by you at iteration [1-3]; kept iteration", status)
    assert sessions.request_stop({}) == "nothing is running" and session == {}  # the run is over: nothing left behind
    flowedit = {"edit": [sessions.Running("FlowEdit", None)]}
    assert sessions.request_stop(flowedit) == "FlowEdit has no iterations to stop at: it runs to its end"


def test_closing_an_edit_stops_its_worker_and_frees_the_model():
    """What happens when the page goes away mid-run (Gradio closes the generator)."""
    session = {}
    outputs = run_edit(iterations=50, session=session)
    for _ in range(3):
        next(outputs)
    assert [run.name for run in session["edit"]] == [demo.EDIT_MODES[0]]
    outputs.close()
    lock, deadline = demo.MODELS.get("shapes:sd3").lock, time.monotonic() + 30
    while lock.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lock.locked() and session == {}


def test_the_kept_iterate_is_the_lowest_finite_residual():
    state = demo.EditState(["a", "b", "c", "d"], [[0.5], [0.2], [float("nan")], [0.3]])
    assert state.best == 1 and state.outputs()[1] == "b"
    assert demo.EditState([], []).best is None and demo.EditState(["a"], [[float("nan")]]).best is None


def test_invert_reconstructs_within_a_decibel_of_the_vae_and_the_other_modes_run():
    *_, (gallery, kept, _, status) = run_edit(demo.EDIT_MODES[3], iterations=3)
    reconstruction, ceiling = map(
        float, re.search(r"PSNR ([\d.]+) dB \(the VAE's round trip alone: ([\d.]+) dB", status).groups()
    )
    assert len(gallery) == 4 and ceiling - 1 < reconstruction <= ceiling + 0.5
    *_, (gallery, kept, _, status) = run_edit(demo.EDIT_MODES[1])
    assert len(gallery) == 1 and "kept iteration 0" in status and "46 model evaluations" in status
    *_, (gallery, kept, _, status) = run_edit(demo.EDIT_MODES[2], num_inference_steps=10, n_max=7)
    assert gallery == [] and kept.size == (32, 32) and status == "FlowEdit done: 28 model evaluations"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "shapes:sd"}, "model 'shapes:sd' is a SD model: editing needs a flow model"),
        ({"image": None}, "give a source image: upload one, or take one from the Compare tab"),
        ({"image": Image.new("RGB", (2, 32))}, r"the image \(2x32\) is too small for 'shapes:sd3'"),
        ({"mode": "x"}, "mode must be one of"),
        ({"source_prompt": ""}, "source prompt must not be empty"),
        ({"target_prompt": " "}, "target prompt must not be empty"),
        ({"n_max": 20}, r"n_max must be in \[1, 15\], got 20"),
        ({"iterations": -1}, r"iterations must be in \[0, 50\], got -1"),
        ({"step_size": "fast"}, r"step size \(a number or 'auto'\) must be a number, got 'fast'"),
        ({"guidance_scale": 31}, r"target guidance scale must be in \[0, 30\], got 31"),
        (
            {"image": Image.new("RGB", (4096, 32))},
            r"the image \(4096x32\) is too large for the demo: its sides must be",
        ),
    ],
)
def test_bad_edit_input_is_a_readable_error(change, message):
    with pytest.raises(ValueError, match=message):
        next(run_edit(**change))


def test_devices_and_models_load_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sessions.device_and_dtype("sd") == sessions.device_and_dtype("flux") == ("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sessions.device_and_dtype("sd3") == ("cuda", torch.float16)
    assert sessions.device_and_dtype("flux") == ("cuda", torch.bfloat16)
    monkeypatch.undo()
    assert demo.MODELS.get("tiny:sd") is demo.MODELS.get("tiny:sd")
    assert demo.npo_folder("", "shapes:sd") == str(ASSETS / "shapes-sd-npo")
    assert demo.npo_folder(" ", "shapes:sd3") == str(ASSETS / "shapes-sd3-npo")


@pytest.mark.parametrize("model", ["shapes:sd3", "tiny:flux"])
def test_streamed_iterates_are_the_pipelines_own_images(model):
    """The page decodes each iterate as it arrives (Flux: unpacking its tokens); they equal the pipeline's iterates."""
    pipe = demo.MODELS.get(model).pipe
    image = rendered_scene(**SCENE)
    image = image.resize((2 * pipe.pixel_multiple(),) * 2) if model == "tiny:flux" else image
    target = PROMPT.replace("red", "blue")
    request = EditRequest.from_page(model, image, PROMPT, target, demo.EDIT_MODES[0], 6, 6, 2, "0.02", 3.5, 0)
    *_, (gallery, kept, _, status) = demo.edit(request, {})
    extra = call_defaults(model, demo.MODELS.get(model).family)
    guidance = {"guidance_scale": 3.5} if model == "tiny:flux" else {"guidance": ClassifierFreeGuidance(3.5)}
    settings = dict(num_inference_steps=6, n_max=6, iterations=2, step_size=0.02, generator=seeded(0))
    out = pipe.edit(image, PROMPT, target, return_iterates=True, **settings, **guidance, **extra)
    assert len(gallery) == len(out.iterates) >= 2
    for (shown, _), (expected,) in zip(gallery, out.iterates, strict=True):
        assert (pixels(shown) - pixels(expected)).abs().max() <= 1


def test_a_local_folder_with_another_scheduler_negative_prompts_and_several_images(tmp_path):
    """Beyond the shapes models: a saved diffusers folder whose scheduler is DPM-Solver++, with a negative prompt and
    3 images per policy; each policy's images are the pipeline's own for the same call."""
    from diffusers import DPMSolverMultistepScheduler

    from pipelines import GuidedStableDiffusionPipeline
    from pipelines.testing import tiny_components

    pipe = GuidedStableDiffusionPipeline(**tiny_components("sd"))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "sd")
    last = run_compare(CFG, AG, model=str(tmp_path / "sd"), images=3, negative="blurry", seed=3)[-1]
    loaded = demo.MODELS.get(str(tmp_path / "sd")).pipe
    assert isinstance(loaded.scheduler, DPMSolverMultistepScheduler)
    for slot, policy in ((0, ClassifierFreeGuidance(5.0)), (3, AdaptiveGuidance(7.5))):
        own = loaded(
            PROMPT,
            negative_prompt="blurry",
            num_images_per_prompt=3,
            num_inference_steps=4,
            generator=[torch.Generator().manual_seed(3 + k) for k in range(3)],
            guidance=policy,
        ).images
        assert [pixels(a).tolist() for a in last[slot]] == [pixels(a).tolist() for a in own]


def test_model_names_the_page_does_not_take_are_readable_errors():
    with pytest.raises(ValueError, match=r"model 'tiny:xl': tiny:<family> takes a family in \['sd', "):
        demo.read_model("tiny:xl")
    assert demo.read_model(" tiny:flux ", flow=True) == ("tiny:flux", "flux")
    assert demo.read_model("shapes:sd") == ("shapes:sd", "sd")


def test_a_constant_schedule_reads_no_final_scale_and_edits_note_a_crop():
    constant = demo.PolicyControls("scheduled", 6.0, final_guidance_scale=1.0, schedule="constant")
    last = run_compare(constant, demo.PolicyControls("cfg", 6.0))[-1]
    assert last[2].startswith("**scheduled CFG 6 (constant)**: 8 NFEs")
    assert [pixels(a).tolist() for a in last[0]] == [pixels(a).tolist() for a in last[3]]  # = CFG 6
    image = rendered_scene(**SCENE).resize((37, 34))
    *_, (gallery, kept, _, status) = run_edit(image=image, iterations=1, step_size="AUTO")
    assert kept.size == (36, 32) and status.endswith(
        "\n\nThe image (37x34) was cut to 36x32 from its top left "
        "corner: the model takes sides that are multiples of 4 pixels."
    )
