"""Batch generation input: a prompts file (one per line) or a JSONL/CSV manifest whose rows may set `prompt`,
`negative_prompt`, `seed`, `num_images` and a guidance method with its parameters (`guidance`, `guidance_scale`, ...:
the names of `pipelines.application.options.GUIDANCE_OPTIONS`). Rows become image jobs with fixed indices and seeds, so
an image is the same whatever the batching, the number of processes or the resume point."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guidance.checks import check_int, check_seed

from .options import GUIDANCE_OPTIONS, METHOD_OPTIONS, check_option
from .paths import check_input_file, read_text_file

ROW_FIELDS = ("prompt", "negative_prompt", "seed", "num_images")


@dataclass(frozen=True)
class ManifestRow:
    """One validated row: `row` counts the rows from 0, `line` is where it stands in its file (for messages)."""

    row: int
    line: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_images: int | None = None
    guidance: tuple[tuple[str, Any], ...] = ()
    source: str = "manifest"

    @property
    def where(self) -> str:
        return f"{self.source}: row {self.row} (line {self.line})"


@dataclass(frozen=True)
class ImageJob:
    """One image of a run: `index` names its file; `image` counts the images of its row."""

    index: int
    row: int
    image: int
    prompt: str
    negative_prompt: str | None
    seed: int
    guidance: tuple[tuple[str, Any], ...]

    @property
    def guidance_options(self) -> dict:
        """The guidance options, lists as lists."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.guidance}

    @property
    def group(self) -> tuple:
        """What images batched together must share: the guidance, and whether a negative prompt is given (diffusers
        treats none and "" differently for SDXL)."""
        return self.guidance, self.negative_prompt is None


def frozen(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Guidance options as a hashable, ordered key (lists as tuples; unset ones left out)."""
    return tuple(
        sorted(
            (key, tuple(value) if isinstance(value, list) else value)
            for key, value in options.items()
            if value is not None
        )
    )


def _integer(value: Any) -> Any:
    """A CSV cell or an integral JSON float (3.0) as the integer it stands for; anything else as it is, for the
    checks to name."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _from_text(name: str, value: str) -> Any:
    """A CSV cell as the kind of value its column takes."""
    kind = GUIDANCE_OPTIONS.get(name, (None, "text"))[1]
    try:
        if kind == "number":
            return float(value)
        if kind == "numbers":
            return [float(v) for v in value.split()]
    except ValueError:
        return value  # check_option names the field and the value
    return value.split(";") if kind == "texts" else value


def parse_row(values: Mapping[str, Any], row: int, line: int, where: str) -> ManifestRow:
    """A row's fields checked; a ValueError naming the row, its line and the field otherwise."""
    context = f"{where}: row {row} (line {line})"
    unknown = [key for key in values if key not in ROW_FIELDS and key not in GUIDANCE_OPTIONS]
    if unknown:
        known = sorted(ROW_FIELDS) + sorted(GUIDANCE_OPTIONS)
        raise ValueError(f"{context}: unknown field {unknown[0]!r}; a row may set {known}")
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{context}: `prompt` must be a non-empty string, got {prompt!r}")
    negative = values.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{context}: `negative_prompt` must be a string, got {negative!r}")
    try:
        seed = None if values.get("seed") is None else check_seed("seed", _integer(values["seed"]))
        count = values.get("num_images")
        num_images = None if count is None else check_int("num_images", _integer(count), minimum=1)
        guidance = {key: check_option(key, value) for key, value in values.items() if key in GUIDANCE_OPTIONS}
    except (ValueError, TypeError) as error:
        raise ValueError(f"{context}: {error}") from None
    return ManifestRow(row, line, prompt, negative, seed, num_images, frozen(guidance), where)


MANIFEST_SUFFIXES = (".jsonl", ".csv", ".txt")


def json_lines(text: str, where: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL text; `where` names the file in errors."""
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{where}: line {number} must be a JSON object, got {type(values).__name__}")
        yield number, values


def read_manifest(path: str | Path, argument: str = "manifest") -> list[ManifestRow]:
    """The rows of a `.jsonl` manifest (one JSON object per line), a `.csv` manifest (a header row naming the
    fields; numbers lists space-separated, evaluators `;`-separated) or a `.txt` file (one prompt per line);
    `argument` names the path in errors."""
    path = check_input_file(path, argument)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(
            f"`{argument}` {str(path)!r}: the name must end in .jsonl (one JSON object per line), .csv (a header row) "
            f"or .txt (one prompt per line), got {suffix or 'no suffix'!r}"
        )
    text = read_text_file(path, argument)
    where = str(path)
    rows: list[ManifestRow] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            raise ValueError(f"{where}: a CSV manifest needs a header row naming its fields, e.g. `prompt,seed`")
        for record in reader:
            if None in record:
                raise ValueError(f"{where}: line {reader.line_num}: more cells than the header names")
            values = {key: _from_text(key, value) for key, value in record.items() if value not in (None, "")}
            rows.append(parse_row(values, len(rows), reader.line_num, where))
    elif suffix == ".txt":
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                rows.append(parse_row({"prompt": line.strip()}, len(rows), number, where))
    else:
        for number, values in json_lines(text, where):
            rows.append(parse_row(values, len(rows), number, where))
    if not rows:
        raise ValueError(f"`{argument}` {where!r} holds no rows")
    return rows


def rows_from(items: Sequence[str | Mapping[str, Any]], where: str = "manifest") -> list[ManifestRow]:
    """Rows from Python values: prompts, or mappings with the fields of a manifest row."""
    if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence) or not items:
        raise TypeError(f"`manifest` must be a file path or a non-empty list of prompts or dicts, got {items!r}")
    values = [{"prompt": item} if isinstance(item, str) else item for item in items]
    if not all(isinstance(value, Mapping) for value in values):
        raise TypeError("`manifest` items must be prompts (str) or dicts of row fields")
    return [parse_row(value, row, row + 1, where) for row, value in enumerate(values)]


def image_jobs(
    rows: Sequence[ManifestRow],
    seed: int,
    guidance: Mapping[str, Any] | None = None,
    negative_prompt: str | None = None,
    num_images: int = 1,
) -> list[ImageJob]:
    """Every image of the run, in order. Image `j` of a row with a `seed` uses `seed + j`; otherwise image `k` of the
    run uses the run's `seed + k`. A row's guidance options, negative prompt and number of images override the run's
    (`guidance`, `negative_prompt`, `num_images`)."""
    defaults = {key: check_option(key, value) for key, value in (guidance or {}).items()}
    jobs = []
    for row in rows:
        merged = {**defaults, **dict(row.guidance)}
        method = merged.get("guidance", GUIDANCE_OPTIONS["guidance"][0])
        unused = [key for key, _ in row.guidance if key != "guidance" and key not in METHOD_OPTIONS[method]]
        if unused:
            raise ValueError(
                f"{row.where}: `{unused[0]}` is not an option of guidance {method!r}, which takes "
                f"{list(METHOD_OPTIONS[method])}"
            )
        options = frozen(merged)
        negative = negative_prompt if row.negative_prompt is None else row.negative_prompt
        for image in range(num_images if row.num_images is None else row.num_images):
            index = len(jobs)
            image_seed = seed + index if row.seed is None else row.seed + image
            jobs.append(ImageJob(index, row.row, image, row.prompt, negative, image_seed, options))
    return jobs
