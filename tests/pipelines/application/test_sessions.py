"""The demo's sessions without Gradio: the model cache, the runs a Stop ends, and the worker whose results stream."""

import threading

import pytest

from pipelines.application import sessions


def test_models_load_once_and_the_least_recently_used_idle_one_is_let_go():
    cache = sessions.LoadedModels(size=2)
    sd, sd3 = cache.get("tiny:sd"), cache.get("tiny:sd3")
    assert cache.get("tiny:sd") is sd and (sd.family, sd3.family) == ("sd", "sd3")
    device, dtype = sessions.device_and_dtype("sd")
    assert sd.pipe.unet.dtype == dtype and sd.pipe.device.type == device
    with sd3.lock:  # running: kept, though the least recently used
        cache.get("tiny:flux")
    assert list(cache.models) == ["tiny:sd3", "tiny:flux"]
    assert cache.get("tiny:sd") is not sd  # let go, so loaded again; now tiny:sd3 is the least recently used
    assert list(cache.models) == ["tiny:flux", "tiny:sd"]


def test_a_model_that_does_not_load_is_named():
    with pytest.raises(ValueError, match=r"model tiny:<family> takes a family in \['sd', .*\], got 'tiny:xl'"):
        sessions.LoadedModels().get("tiny:xl")


def test_a_stop_ends_the_runs_of_its_tab_in_its_session_only():
    session: dict = {}
    edit, compare = (
        sessions.Running("FlowOpt edit", threading.Event()),
        sessions.Running("c", threading.Event(), "step"),
    )
    with sessions.running_in(session, "edit", edit), sessions.running_in(session, "compare", compare):
        assert sessions.request_stop({}) == "nothing is running"  # another session
        assert sessions.request_stop(session) == "stopping after the current iteration..."
        assert edit.stop.is_set() and not compare.stop.is_set()
        assert sessions.request_compare_stop(session) == "stopping after the current step..." and compare.stop.is_set()
    assert session == {} and sessions.request_stop(None) == "nothing is running"
    with sessions.running_in(None, "edit", edit):  # a call without a session still runs
        pass


def test_a_worker_streams_what_it_emits_then_its_result_and_raises_its_error_in_the_caller():
    def work(emit):
        emit("iterate", 0)
        emit("iterate", 1)
        return "result"

    assert list(sessions.in_background(work)) == [("iterate", 0), ("iterate", 1), ("done", "result")]

    def failing(emit):
        emit("iterate", 0)
        raise ValueError("the model ran out of steps")

    events = sessions.in_background(failing)
    assert next(events) == ("iterate", 0)
    with pytest.raises(ValueError, match="the model ran out of steps"):
        next(events)
