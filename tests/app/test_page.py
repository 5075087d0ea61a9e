"""The page's own code, without serving it: errors reach the page as readable messages, and the events keep the
signatures `gradio_client` shows."""

import inspect

import pytest
import torch

gr = pytest.importorskip("gradio")
import app  # noqa: E402


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ValueError("steps must be in [1, 100], got 0"), "steps must be in [1, 100], got 0"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "out of GPU memory: try fewer images, fewer steps or"),
        (ImportError("No module named 'open_clip'"), "No module named 'open_clip': install the demo's extra"),
        (RuntimeError("shapes do not match"), "RuntimeError: shapes do not match"),
    ],
)
def test_unexpected_errors_reach_the_page_as_messages(error, message):
    def failing(value):
        raise error

    def failing_stream(value):
        yield value
        raise error

    with pytest.raises(gr.Error) as raised:
        app.shown_in_page(failing)(1)
    assert raised.value.message.startswith(message)
    stream = app.shown_in_page(failing_stream)(1)
    assert next(stream) == 1  # a stream yields what it has before its error
    with pytest.raises(gr.Error) as raised:
        next(stream)
    assert raised.value.message.startswith(message)


def test_events_keep_the_signatures_of_the_functions_they_wrap():
    """What Gradio reads for the API: parameter names, and a generator function for a streaming event."""
    assert list(inspect.signature(app.edit).parameters)[:3] == ["model", "image", "source_prompt"]
    assert inspect.isgeneratorfunction(app.compare) and not inspect.isgeneratorfunction(app.mode_settings)
    assert list(inspect.signature(app.shown_in_page(app.demo.take_from_compare)).parameters) == ["kept", "choice"]


def test_a_compare_run_clears_the_last_results_first_and_reads_the_slots_by_name():
    values = dict(zip(app.SLOT_NAMES, app.demo.policy_values([app.demo.PolicyControls("cfg", 45)]), strict=True))
    run = app.compare("a red circle", "", "tiny:sd", 2, 1, 0, "", {}, **values)
    assert next(run) == (None, None, "") * app.demo.MAX_POLICIES + ("", [])
    with pytest.raises(gr.Error, match=r"policy 1: guidance scale must be in \[0, 30\], got 45"):
        next(run)
