"""Run folders: a folder belongs to one command and one run.

A run folder holds `run.json` (the command that wrote it and what its outputs depend on), numbered outputs
(`00000.png`, ...; `guided-edit` also writes `00000-iterates/` and `00000-latents.safetensors` before the PNG), each
written to a temporary name, flushed and renamed, and `results.jsonl`, one record per output (while a run goes, each
process appends to its own `results-<process>.jsonl`, merged at the end and at the next start; a PNG carries its record
too, so a line lost to a kill comes back). Run again with the same settings, a run resumes: the outputs there are kept,
the missing ones made. Another command's folder, another run's (a different `run.json`) and numbered outputs without a
`run.json` are refused, naming what differs, unless the caller starts over (`overwrite`): that removes the old run's
files, and only those, after every input was checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .image_files import TEMPORARY_SUFFIX, read_record
from .naming import PYTHON, Naming

RUN_FILE, RESULTS_FILE, PART_GLOB, SUMMARY_FILE = "run.json", "results.jsonl", "results-*.jsonl", "summary.json"
OUTPUT_NAME = re.compile(r"\d{5,}(\.png|-latents\.safetensors|-iterates)")
IMAGE_NAME = re.compile(r"\d{5,}\.png")
LEGACY_COMMAND = "guided-generate"  # the one command that wrote run.json before it named its command


class RunError(RuntimeError):
    """A run that cannot go on for a reason the user can act on; the message says how (the commands print it as one
    line)."""


def output_name(index: int, suffix: str = ".png") -> str:
    return f"{index:05d}{suffix}"


def read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a results file (a line cut short by a kill is skipped)."""
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def append_lines(path: Path, records: Iterable[dict]) -> None:
    """Records appended as JSON lines, on disk when this returns."""
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def json_hash(value) -> str:
    """The SHA-256 of a JSON-able value's JSON text: what a run depends on, compared across runs."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def mean_nfe(records: Iterable[dict]) -> float:
    """The mean NFE per output of `records` (0 for none)."""
    nfes = [record["nfe"] for record in records]
    return sum(nfes) / max(len(nfes), 1)


def write_atomically(path: Path, text: str) -> None:
    """`text` written to a temporary file, flushed to disk and renamed to `path`."""
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def differences(saved: dict, record: dict) -> str:
    """`key: value there, value now` for every key whose value differs."""
    keys = [key for key in sorted(set(saved) | set(record)) if saved.get(key) != record.get(key)]
    return "; ".join(f"{key}: {saved.get(key)!r} there, {record.get(key)!r} now" for key in keys)


@dataclass(frozen=True)
class RunFolder:
    """The folder of one run of `command`; `naming` spells the arguments in messages."""

    path: Path
    command: str
    naming: Naming = PYTHON

    @property
    def described(self) -> str:
        return f"`{self.naming('output_dir')}` {str(self.path)!r}"

    def outputs(self) -> list[Path]:
        """The numbered outputs a run wrote here (00000.png, ..., 100000.png, their iterates and latents)."""
        if not self.path.is_dir():
            return []
        return sorted(path for path in self.path.iterdir() if OUTPUT_NAME.fullmatch(path.name))

    def saved(self) -> dict | None:
        """The `run.json` there, if any."""
        run_file = self.path / RUN_FILE
        if not run_file.is_file():
            return None
        try:
            saved = json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{self.described}: its {RUN_FILE} is not readable JSON ({error}): use "
                f"{self.naming.switch('overwrite')} to start over, or another folder"
            ) from None
        if not isinstance(saved, dict):
            raise ValueError(
                f"{self.described}: its {RUN_FILE} is not a run record: use "
                f"{self.naming.switch('overwrite')} to start over, or another folder"
            )
        return saved

    def check(self, record: dict, overwrite: bool) -> None:
        """Refuse a folder of another command, of another run (a different record) or of outputs without a record,
        unless `overwrite`."""
        if overwrite:
            return
        saved, restart = self.saved(), f"use {self.naming.switch('overwrite')} to start over, or another folder"
        if saved is None:
            if self.outputs():
                raise ValueError(
                    f"{self.described} holds images but no {RUN_FILE} ({self.outputs()[0].name}, ...: "
                    f"not a run of {self.command}): {restart}"
                )
            return
        command = saved.pop("command", LEGACY_COMMAND)
        if command != self.command:
            raise ValueError(
                f"{self.described} holds a {command} run, not a {self.command} one: use another folder, "
                f"or {self.naming.switch('overwrite')} to replace that run"
            )
        changed = differences(saved, record)
        if changed:
            raise ValueError(f"{self.described} holds another run ({changed}): {restart}")

    def records(self, count: int) -> dict[int, dict]:
        """The record of every output of the `count` there (read, nothing written): from the results files, or for
        an image whose line was lost (killed between its rename and its line), from the image itself."""
        records: dict[int, dict] = {}
        for path in [self.path / RESULTS_FILE, *sorted(self.path.glob(PART_GLOB))]:
            if path.is_file():
                for record in read_lines(path):
                    records.setdefault(record["index"], record)
        present = {}
        for index in range(count):
            image = self.path / output_name(index)
            if image.is_file():
                present[index] = records[index] if index in records else self.image_record(image)
        return present

    def image_record(self, image: Path) -> dict:
        try:
            return read_record(image)
        except ValueError as error:
            raise ValueError(f"{error}: remove it and run the same command again to make it anew") from None

    def start(self, record: dict, overwrite: bool, records: dict[int, dict]) -> None:
        """Make the folder ready for a checked run: the old run removed with `overwrite`, cut-short writes dropped,
        `run.json` written and `results.jsonl` holding `records` (what `records()` found) in order."""
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.clear()
        for path in self.path.glob(f"*{TEMPORARY_SUFFIX}"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        write_atomically(self.path / RUN_FILE, json.dumps({"command": self.command, **record}, indent=1))
        self.write_results(records)

    def clear(self) -> None:
        """Remove the files a run writes (numbered outputs, temporary files, results, run.json, summary.json), nothing
        else."""
        for path in self.outputs():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for pattern in (f"*{TEMPORARY_SUFFIX}", PART_GLOB, RESULTS_FILE, RUN_FILE, SUMMARY_FILE):
            for path in self.path.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def write_results(self, records: dict[int, dict]) -> None:
        """`results.jsonl` with one line per record, in order; the processes' own results files removed."""
        write_atomically(self.path / RESULTS_FILE, "".join(json.dumps(records[i]) + "\n" for i in sorted(records)))
        for path in self.path.glob(PART_GLOB):
            path.unlink()

    def merge(self, count: int) -> dict[int, dict]:
        """Fold the processes' results files into `results.jsonl` (see `records`); returns the records."""
        records = self.records(count)
        self.write_results(records)
        return records

    def count_done(self, count: int) -> int:
        """How many of the `count` outputs are there (each is whole: written under another name, then renamed)."""
        return sum((self.path / output_name(index)).is_file() for index in range(count))


def check_not_a_run(path: str | Path, argument: str) -> None:
    """Refuse a run folder (of guided-generate or guided-edit) as the folder a model is saved to."""
    folder = RunFolder(Path(path), "")
    if (folder.path / RUN_FILE).is_file() or folder.outputs():
        try:
            command = (folder.saved() or {}).get("command", LEGACY_COMMAND)
        except ValueError:
            command = "a command"
        raise ValueError(f"`{argument}` {str(path)!r} holds a {command} run: save the model to a folder of its own")
