"""The images of an edit run: rows `{"image", "source_prompt", "target_prompt"}` of a JSONL manifest (image paths
relative to it) or of the command's options, every one checked before anything is written: its fields (none unknown),
the prompts its task needs, and the image itself (a whole, decodable file whose size the model takes)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import PIL.Image

from .manifest import json_lines
from .naming import PYTHON, Naming
from .paths import check_input_file, read_text_file

EDIT_FIELDS = ("image", "source_prompt", "target_prompt")


@dataclass(frozen=True)
class EditJob:
    """One image of an edit run: `index` names its output; `where` says where it was given (for messages); `size`
    (height, width) and `sha256` are the source file's, once `inspect_image` has read it."""

    index: int
    image: str
    source_prompt: str | None
    target_prompt: str | None
    where: str
    size: tuple[int, int] | None = None
    sha256: str | None = None


def read_edit_manifest(path: str | Path, argument: str = "manifest") -> list[EditJob]:
    """The rows of a JSONL edit manifest, one object per line; `argument` names the file in errors."""
    path = check_input_file(path, argument)
    jobs = []
    for number, row in json_lines(read_text_file(path, argument), f"`{argument}` {str(path)!r}"):
        where = f"`{argument}` {str(path)!r} line {number}"
        unknown = sorted(set(row) - set(EDIT_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}; a row may set {list(EDIT_FIELDS)}")
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: `image` must be the path of an image file, got {image!r}")
        prompts = [row.get("source_prompt"), row.get("target_prompt")]
        jobs.append(EditJob(len(jobs), str(path.parent / image), *prompts, where))
    if not jobs:
        raise ValueError(f"`{argument}` {str(path)!r} holds no rows")
    return jobs


def jobs_from_options(images: Sequence[str], sources: Sequence[str], targets: Sequence[str]) -> list[EditJob]:
    """One job per `--image`; a prompt given once holds for every image, else it is given once per image."""
    if not images:
        raise ValueError("no images: give `--image` (repeatable) with `--source-prompt`, or `--manifest`")
    for name, values in (("--source-prompt", sources), ("--target-prompt", targets)):
        if len(values) not in (0, 1, len(images)):
            raise ValueError(
                f"`{name}` given {len(values)} times for {len(images)} images: give it once, or once per image"
            )

    def pick(values: Sequence[str], k: int) -> str | None:
        return values[k] if len(values) > 1 else (values[0] if values else None)

    return [
        EditJob(k, image, pick(sources, k), pick(targets, k), f"`--image` {k + 1}") for k, image in enumerate(images)
    ]


def check_prompts(jobs: Sequence[EditJob], invert: bool, name: Naming = PYTHON) -> None:
    """Every job has the prompts its task needs: a source prompt, and for an edit a target prompt."""
    needed = ("source_prompt",) if invert else ("source_prompt", "target_prompt")
    for job in jobs:
        for key in needed:
            value = getattr(job, key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{job.where}: image {job.image!r} has no {key}: give `{name(key)}` (or the "
                    f"manifest's `{key}`), a non-empty string; got {value!r}"
                )


def image_file(job: EditJob) -> Path:
    """The job's image file, which must exist."""
    path = Path(job.image)
    if not path.is_file():
        found = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"{job.where}: image {job.image!r} {found}, expected an image file")
    return path


def inspect_image(job: EditJob, multiple: int, largest: int | None) -> EditJob:
    """The job with its image's size and hash, once the whole file decodes and its size, cropped to `multiple`, is
    at least one `multiple` and at most `largest` pixels a side."""
    data = image_file(job).read_bytes()
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(
            f"{job.where}: image {job.image!r} cannot be read ({error}): expected a whole image file "
            "(PNG, JPEG, WebP, ...)"
        ) from None
    cropped = (height - height % multiple, width - width % multiple)
    if min(cropped) == 0:
        raise ValueError(
            f"{job.where}: image {job.image!r} is {width}x{height} pixels: each side must be at least "
            f"{multiple}, the model's multiple"
        )
    if largest is not None and max(cropped) > largest:
        raise ValueError(
            f"{job.where}: image {job.image!r} is {width}x{height} pixels: this model takes at most "
            f"{largest} pixels a side"
        )
    return replace(job, size=(height, width), sha256=hashlib.sha256(data).hexdigest())


def load_image(job: EditJob) -> PIL.Image.Image:
    """The job's image as RGB (it was checked by `inspect_image`)."""
    with PIL.Image.open(job.image) as image:
        return image.convert("RGB")
