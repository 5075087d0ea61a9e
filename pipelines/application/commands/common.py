"""What several commands share: prompt files and checks of numeric options."""

from __future__ import annotations

import argparse
from pathlib import Path


def read_prompt_file(path: str | Path, option: str = "--prompts-file") -> list[str]:
    """The non-empty lines of a text file, stripped; an error naming `option` when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`{option}` {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"`{option}` {str(path)!r} holds no prompts")
    return prompts


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Every named integer option >= 1, else an error naming it."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
