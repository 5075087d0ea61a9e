"""The paths a user names, checked before anything is read or written: an input file that exists, is a file and holds
UTF-8 text; an output folder that exists or can be made (no file in the way) and can be written. Each error names the
argument (`argument`, as the caller spells it: `manifest` or `--manifest`), the path, what was expected and what is
there."""

from __future__ import annotations

import os
from pathlib import Path


def check_input_file(path: str | Path, argument: str) -> Path:
    """An existing file (not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"`{argument}` {str(path)!r} is a folder, expected a file")
    if not path.is_file():
        raise ValueError(f"`{argument}` {str(path)!r} does not exist")
    return path


def read_text_file(path: str | Path, argument: str) -> str:
    """The text of an existing UTF-8 file (a byte-order mark, as spreadsheets write, dropped)."""
    path = check_input_file(path, argument)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"`{argument}` {str(path)!r} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}): "
            "expected a text file"
        ) from None
    except OSError as error:
        raise ValueError(f"`{argument}` {str(path)!r} could not be read: {error.strerror or error}") from None


def check_output_dir(path: str | Path, argument: str) -> Path:
    """A folder that exists, or can be made: no file at the path or above it, and the nearest existing folder
    writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`{argument}` {str(path)!r} is a file, expected a folder")
    existing = next(parent for parent in [path, *path.absolute().parents] if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"`{argument}` {str(path)!r} cannot be made: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"`{argument}` {str(path)!r} cannot be written: {str(existing)!r} is not writable")
    return path
