"""Every event of the demo through `gradio_client`, against the served page: values, streaming, per-session state and
the readable errors."""

import re
import time

import pytest
from conftest import policy_values
from PIL import Image

from pipelines.application import demo

gradio_client = pytest.importorskip("gradio_client")
PROMPT = "a large red circle at the center on white"


@pytest.fixture
def client(demo_url):
    return gradio_client.Client(demo_url, verbose=False)


def test_every_event_has_a_named_endpoint(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    methods = {f"/method_controls_{k + 1}" for k in range(demo.MAX_POLICIES)}
    events = [
        "compare",
        "apply_preset",
        "mode_settings",
        "upload",
        "take_from_compare",
        "edit",
        "stop",
        "stop_compare",
    ]
    assert endpoints == {f"/{event}" for event in events} | methods


def test_compare_then_take_an_image_into_the_edit_tab(client):
    slots = policy_values(demo.PolicyControls("cfg", 5.0), demo.PolicyControls("ag", 5.0))
    outputs = client.predict(PROMPT, "", "shapes:sd", 6, 2, 0, "", *slots, api_name="/compare")
    assert [len(outputs[k]) for k in (0, 3)] == [2, 2] and not outputs[6]  # slot 3 is off
    assert Image.open(outputs[0][0]["image"]).size == (32, 32)
    assert outputs[2].startswith("**CFG 5**: 12 NFEs per image") and "**Cheapest: policy 2, AG 5" in outputs[12]
    assert outputs[1]["type"] == "matplotlib" and outputs[1]["plot"].startswith("data:image/")
    image, prompt = client.predict("policy 2 (AG 5 (threshold 0.995)), image 2", api_name="/take_from_compare")
    assert Image.open(image).size == (32, 32) and prompt == PROMPT
    other = gradio_client.Client(client.src, verbose=False)  # another session has no comparison of its own
    with pytest.raises(gradio_client.exceptions.AppError, match="run a comparison first"):
        other.predict("policy 1 (CFG 5), image 1", api_name="/take_from_compare")


def test_api_calls_may_leave_out_what_keeps_its_default(client):
    outputs = client.predict(prompt=PROMPT, model="tiny:sd", num_inference_steps=2, api_name="/compare")
    assert outputs[2].startswith("**CFG 7.5**: 4 NFEs per image") and outputs[5].startswith("**AG 7.5")


def test_bad_input_comes_back_as_its_message(client):
    slots = policy_values(demo.PolicyControls("cfg", 45))
    with pytest.raises(gradio_client.exceptions.AppError, match=r"policy 1: guidance scale must be in \[0, 30\]"):
        client.predict(PROMPT, "", "shapes:sd", 4, 1, 0, "", *slots, api_name="/compare")
    with pytest.raises(gradio_client.exceptions.AppError, match="is neither a shipped shapes model"):
        client.predict(PROMPT, "", "/no/such/model", 4, 1, 0, "", *slots, api_name="/compare")


def test_presets_controls_and_modes(client):
    preset = "Self-NPO in the unconditional branch (docs: Self-NPO)"
    model, steps, *values = client.predict(preset, api_name="/apply_preset")
    width = len(demo.POLICY_FIELDS)
    npo = [values[k * width + width - 1] for k in range(demo.MAX_POLICIES)]
    assert (model, steps, npo) == ("shapes:sd", 20, [False, True, False, True])
    for k in range(demo.MAX_POLICIES):
        updates = client.predict("ag", api_name=f"/method_controls_{k + 1}")
        assert [update["visible"] for update in updates] == demo.method_controls("ag")
    updates = client.predict("FlowEdit", "shapes:sd3", api_name="/mode_settings")
    assert [u.get("value") for u in updates] == [50, 33, 0, "", 13.5, None]
    assert [u["visible"] for u in updates] == [True, True, False, False, True, True]


def test_upload_is_lossless(client, tmp_path, red_circle_png):
    image = client.predict(gradio_client.handle_file(str(red_circle_png)), api_name="/upload")
    assert list(Image.open(image).convert("RGB").getdata()) == list(Image.open(red_circle_png).getdata())
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(gradio_client.exceptions.AppError, match="'notes.txt' is not an image"):
        client.predict(gradio_client.handle_file(str(tmp_path / "notes.txt")), api_name="/upload")


def test_edit_streams_iterates_and_stop_keeps_the_best_so_far(client, red_circle_png):
    arguments = dict(
        model="shapes:sd3",
        image=gradio_client.handle_file(str(red_circle_png)),
        source_prompt=PROMPT,
        target_prompt=PROMPT.replace("red", "blue"),
        mode="FlowOpt edit",
        num_inference_steps=15,
        n_max=15,
        step_size="0.02",
        guidance_scale=3.5,
        seed=0,
    )
    # Invert runs all 40 iterations on this image (the edit converges at iteration 14: a race with Stop)
    job = client.submit(iterations=40, api_name="/edit", **{**arguments, "mode": "Invert (reconstruction)"})
    while len(job.outputs()) < 3 and not job.done():  # the first iterates have arrived
        time.sleep(0.05)
    assert client.predict(api_name="/stop") == "stopping after the current iteration..."
    gallery, kept, _, status = job.result()
    counts = [len(output[0]) for output in job.outputs()]
    # the page cleared, the run started, then one iterate at a time; stopped well before the end
    assert counts[:4] == [0, 0, 1, 2] and len(gallery) < 41
    assert re.match(r"stopped by you at iteration \d+; kept iteration \d+ \(the lowest residual", status)
    assert Image.open(kept).size == (32, 32)
    with pytest.raises(gradio_client.exceptions.AppError, match="editing needs a flow model"):
        client.predict(iterations=1, api_name="/edit", **{**arguments, "model": "shapes:sd"})


def test_stop_compare_ends_the_comparison_of_its_own_session(client):
    slots = policy_values(demo.PolicyControls("cfg", 5.0), demo.PolicyControls("ag", 5.0))
    job = client.submit(PROMPT, "", "shapes:sd", 100, 8, 0, "", *slots, api_name="/compare")
    other = gradio_client.Client(client.src, verbose=False)
    while not job.status().progress_data and not job.done():  # its first progress: the comparison is under way
        time.sleep(0.02)
    assert other.predict(api_name="/stop_compare") == "nothing is running"  # another session's Stop
    assert client.predict(api_name="/stop_compare") == "stopping after the current step..."
    outputs = job.result()
    assert "**Stopped by you** during policy" in outputs[12] and not outputs[3]  # policy 2 did not finish
