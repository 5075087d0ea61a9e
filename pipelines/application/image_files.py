"""Images written so that a killed run leaves nothing corrupt, and that say how they were made: a PNG is written to a
temporary file, flushed to disk and renamed into place; it carries a "parameters" text chunk in the format image
viewers and web UIs read (prompt, "Negative prompt: ...", then "Steps: 20, Sampler: ..., CFG scale: ..., Seed: ...")
and a "generation" chunk with the full record as JSON."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import PIL.Image
from PIL.PngImagePlugin import PngInfo

TEMPORARY_SUFFIX = ".partial"


def cfg_scale(record: dict) -> float:
    """The scale to show: the constant one, else (scheduled, dynamic) the mean scale this image got."""
    method = record["guidance"].get("guidance", "cfg")
    if method == "none":
        return 1.0
    if method in ("cfg", "ag", "linear-ag") and "guidance_scale" in record["guidance"]:
        return record["guidance"]["guidance_scale"]
    applied = [scale for scale in record["scales"] if scale != 1.0] or [1.0]
    return round(sum(applied) / len(applied), 2)


def parameters_text(record: dict) -> str:
    """The widely used "parameters" text: prompt, negative prompt, then `key: value` pairs."""
    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    guidance = record["guidance"]
    pairs = {
        "Steps": record["num_inference_steps"],
        "Sampler": record["scheduler"],
        "CFG scale": cfg_scale(record),
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["model"],
        "Guidance": guidance.get("guidance", "cfg"),
        "NFE": f"{record['nfe']:g}",
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items()))
    return "\n".join(lines)


def write_png(image: PIL.Image.Image, path: Path, record: dict) -> None:
    """Write `image` to `path` atomically, with `record` in its text chunks. A full disk raises an OSError that says
    so, after removing the partial file."""
    info = PngInfo()
    info.add_text("parameters", parameters_text(record))
    info.add_text("generation", json.dumps(record))
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        with open(temporary, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"the disk is full: {path} could not be written (the partial file was removed); free some space and "
                "run the same command again to resume",
            ) from error
        raise


def read_record(path: str | Path) -> dict:
    """The "generation" record a PNG written by `write_png` carries."""
    with PIL.Image.open(path) as image:
        text = getattr(image, "text", {}).get("generation")
    if text is None:
        raise ValueError(f"{path} carries no generation record (not written by guided-generate)")
    return json.loads(text)
