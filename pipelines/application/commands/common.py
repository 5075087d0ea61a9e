"""What the commands share: prompt files, checks of numeric options by their flags, and how a command runs: every
input checked before anything is written (`prepare`), then the work (`execute`); every failure a user can cause is
one line (`<command>: error: ...`) naming the argument or path, never a traceback; SIGINT and SIGTERM stop the work
with one line saying how far it got and that the same command resumes, exit 130 / 143."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from guidance.checks import check_int

from ..naming import COMMAND_LINE
from ..paths import read_text_file
from ..runs import RunError
from ..signals import Interrupted, RunInterrupted, stop_on_signals

Work = TypeVar("Work")
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError)


def read_prompt_file(path: str | Path, option: str = "--prompts-file") -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; an error naming `option` when it is missing, not a file,
    not text or empty."""
    prompts = [line.strip() for line in read_text_file(path, option).splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"`{option}` {str(path)!r} holds no prompts")
    return prompts


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Every named integer option >= 1, else an error naming its flag."""
    for name in names:
        check_int(COMMAND_LINE(name), getattr(args, name), minimum=1)


def say(parser: argparse.ArgumentParser, message: str) -> None:
    """One line on stderr, prefixed with the command's name."""
    print(f"{parser.prog}: {message}".replace("\n", " "), file=sys.stderr, flush=True)


def refuse(parser: argparse.ArgumentParser, error: Exception) -> NoReturn:
    """A bad input: one line, exit 2 (argparse's code for a usage error)."""
    say(parser, f"error: {error}")
    raise SystemExit(2)


def run_command(
    parser: argparse.ArgumentParser,
    prepare: Callable[[], Work],
    execute: Callable[[Work], int],
    stopped: Callable[[Work, Interrupted], str] | None = None,
) -> int:
    """`prepare()` checks every input and writes nothing; `execute(work)` does the work and returns the exit code.
    `stopped(work, interrupt)` says how far the work got when a signal stopped it (default: what `RunInterrupted`
    says)."""
    with stop_on_signals():
        try:
            work = prepare()
        except Interrupted as stop:
            say(parser, f"interrupted by {stop.signal_name} before anything was written")
            return stop.exit_code
        except INPUT_ERRORS as error:
            refuse(parser, error)
        except OSError as error:
            say(parser, os_error(error))
            return 1
        try:
            return execute(work)
        except Interrupted as stop:
            if isinstance(stop, RunInterrupted) or stopped is None:
                say(parser, str(stop) if isinstance(stop, RunInterrupted) else f"interrupted by {stop.signal_name}")
            else:
                say(parser, stopped(work, stop))
            return stop.exit_code
        except OSError as error:  # a full disk, a folder removed under the run
            say(parser, os_error(error))
            return 1
        except RunError as error:  # out of memory at batch size 1, ...
            say(parser, f"error: {error}")
            return 1


def checkpoints_kept(checkpoints: str | Path, stop: Interrupted) -> str:
    """What a training command says when a signal stops it: its checkpoints keep the progress."""
    return (
        f"interrupted by {stop.signal_name}: the checkpoints in {str(checkpoints)!r} keep the training's progress; "
        "run the same command again to resume"
    )


def os_error(error: OSError) -> str:
    return f"error: {error.strerror or error}" + (f": {error.filename!r}" if error.filename else "")
