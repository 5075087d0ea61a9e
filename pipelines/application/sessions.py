"""What the demo's page shares between its sessions and what each session runs: the model cache (a lock per model, at
most a few kept), the runs a Stop ends, and a worker thread whose results stream back as they come."""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from guidance.npo import NegativeAdapter, load_npo_adapter

from .models import load_pipeline, model_family


def device_and_dtype(family: str) -> tuple[str, torch.dtype]:
    """CUDA in float16 (bfloat16 for Flux, which overflows in float16) when there is a GPU, else the CPU in float32."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if family == "flux" else torch.float16
    return "cpu", torch.float32


@dataclass
class LoadedModel:
    """A pipeline shared by every session, with its lock: runs on one model take turns, since a Self-NPO pass puts
    hooks on the shared denoiser for its length (per-call state otherwise lives in the call)."""

    name: str
    pipe: Any
    family: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: dict[str, str] = field(default_factory=dict)  # Self-NPO adapter folder -> its name in the pipeline

    def negative_adapter(self, folder: str) -> NegativeAdapter:
        """Self-NPO's `NegativeAdapter` for adapter `folder`, loaded on first use (kept off but for the unconditional
        rows of the policies that ask for it). Call with the lock held."""
        if folder not in self.adapters:
            name = f"npo{len(self.adapters)}"
            try:
                load_npo_adapter(self.pipe, folder, adapter_name=name)
            except Exception as error:
                raise ValueError(
                    f"Self-NPO adapter {folder!r} could not be loaded into {self.name!r}: {error}"
                ) from error
            self.adapters[folder] = name
        return NegativeAdapter(self.adapters[folder])


class LoadedModels:
    """The models of the page, each loaded once (a lock per name, so one slow load does not hold up the others), at
    most `size` kept: the least recently used one that is not running is let go."""

    def __init__(self, size: int = 2):
        self.size = size
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.loading: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    def get(self, model: str) -> LoadedModel:
        with self.lock:
            loading = self.loading.setdefault(model, threading.Lock())
        with loading:
            with self.lock:
                if model in self.models:
                    self.models.move_to_end(model)
                    return self.models[model]
            entry = self.load(model)
            with self.lock:
                self.models[model] = entry
                self.evict(keep=model)
            return entry

    @staticmethod
    def load(model: str) -> LoadedModel:
        device, dtype = device_and_dtype(model_family(model, argument="model"))
        try:
            pipe, family = load_pipeline(model, dtype=dtype, device=device, argument="model")
        except Exception as error:  # any failure to load is the user's model: say so in the page
            raise ValueError(f"model {model!r} could not be loaded: {error}") from error
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(model, pipe, family)

    def evict(self, keep: str) -> None:
        """Lets go of the least recently used models beyond `size` that are not running. Call with `lock` held."""
        idle = [name for name, other in self.models.items() if name != keep and not other.lock.locked()]
        for name in idle[: max(0, len(self.models) - self.size)]:
            del self.models[name]


@dataclass
class Running:
    """A run of a tab in a browser session: what the tab's Stop ends, and after what."""

    name: str
    stop: threading.Event | None  # None: the run has nowhere to stop (FlowEdit)
    unit: str = "iteration"


class StopRequested(Exception):
    """Raised from a step callback: the run ends at once (no decode of a result nobody will see)."""


@contextmanager
def running_in(session: dict | None, tab: str, running: Running) -> Iterator[None]:
    """`running` is one of `tab`'s runs in this session (a dict kept per browser session; None: a call without one)
    for the length of the block: what the tab's Stop ends."""
    runs = session.setdefault(tab, []) if isinstance(session, dict) else []
    runs.append(running)
    try:
        yield
    finally:  # finished, failed, or closed by the page
        runs.remove(running)
        if not runs and isinstance(session, dict) and session.get(tab) is runs:
            del session[tab]


def request_stop(session: dict | None, tab: str = "edit") -> str:
    """A Stop button: this session's runs on `tab` ("edit": FlowOpt, keeping the best iterate so far; "compare": the
    policies that finished) end after their current iteration or step."""
    runs = (session or {}).get(tab) or []
    stoppable = [run for run in runs if run.stop is not None]
    if not runs:
        return "nothing is running"
    if not stoppable:
        return f"{runs[0].name} has no iterations to stop at: it runs to its end"
    for run in stoppable:
        run.stop.set()
    return f"stopping after the current {stoppable[0].unit}..."


def request_compare_stop(session: dict | None) -> str:
    """The Compare tab's Stop: the comparison ends after the current step; the policies that finished are kept."""
    return request_stop(session, "compare")


def in_background(work: Callable[[Callable[..., None]], Any]) -> Iterator[tuple[Any, ...]]:
    """Runs `work(emit)` in a thread; yields what it emits (a tuple of the arguments of each `emit` call), as it emits
    it, then ("done", its result); its exception is raised here."""
    events: queue.Queue = queue.Queue()

    def target():
        try:
            events.put(("done", work(lambda *event: events.put(event))))
        except BaseException as error:  # handed to the caller's thread
            events.put(("error", error))

    threading.Thread(target=target, daemon=True).start()
    while True:
        event = events.get()
        if event[0] == "error":
            raise event[1]
        yield event
        if event[0] == "done":
            return
