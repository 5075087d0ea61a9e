"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) in the commands. Within `stop_on_signals`, the first of them
raises `Interrupted` in the main thread: the run drops the batch in progress (every file already written stays whole:
each is written to a temporary name and renamed), says how far it got and exits with 128 + the signal's number (130,
143). Signals that follow while it winds down are ignored. A run reports where it stopped as `RunInterrupted`."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (`signum`)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class RunInterrupted(Interrupted):
    """A run stopped by a signal (or Ctrl-C in Python): `done` of its `total` outputs are in `folder`."""

    def __init__(self, folder: Path, done: int, total: int, signum: int = signal.SIGINT, unit: str = "images"):
        super().__init__(signum)
        self.folder, self.done, self.total, self.unit = Path(folder), done, total, unit

    def __str__(self) -> str:
        return (
            f"interrupted by {self.signal_name}: {self.done} of {self.total} {self.unit} are done in "
            f"{str(self.folder)!r}; run the same command again to resume"
        )


def signal_number(error: KeyboardInterrupt) -> int:
    """The signal behind an interrupt (a plain KeyboardInterrupt is Ctrl-C's SIGINT)."""
    return error.signum if isinstance(error, Interrupted) else int(signal.SIGINT)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: the first SIGINT or SIGTERM raises `Interrupted`; later ones are ignored. The previous handlers are put
    back after. Outside the main thread (where Python delivers no signal) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
