"""Images written so that a killed run leaves nothing corrupt, and that say how they were made: a PNG is written to a
temporary file, flushed to disk and renamed into place; it carries a "parameters" text chunk in the format image
viewers and web UIs read (prompt, "Negative prompt: ...", then "Steps: 20, Sampler: ..., CFG scale: ..., Seed: ...")
and a "generation" chunk with the full record as JSON (`read_record` reads it back)."""

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


def parameters_text(prompt: str, negative_prompt: str | None, pairs: dict) -> str:
    """The widely used "parameters" text: the prompt, the negative prompt, then `key: value` pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items()))
    return "\n".join(lines)


def generation_parameters(record: dict) -> str:
    """The "parameters" text of a generated image's record."""
    pairs = {
        "Steps": record["num_inference_steps"],
        "Sampler": record["scheduler"],
        "CFG scale": cfg_scale(record),
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["model"],
        "Guidance": record["guidance"].get("guidance", "cfg"),
        "NFE": f"{record['nfe']:g}",
    }
    return parameters_text(record["prompt"], record.get("negative_prompt"), pairs)


def edit_parameters(record: dict) -> str:
    """The "parameters" text of an edited (or inverted) image's record: the target prompt (the source prompt for an
    inversion) first."""
    pairs = {
        "Method": record["method"],
        "Source prompt": record["source_prompt"],
        "Steps": record["num_inference_steps"],
        "Size": f"{record['size'][1]}x{record['size'][0]}",
        "Seed": record["seed"],
        "Model": record["model"],
        "NFE": f"{record['nfe']:g}",
    }
    prompt = record["target_prompt"] or record["source_prompt"]
    return parameters_text(prompt, record.get("negative_prompt"), pairs)


def write_png(image: PIL.Image.Image, path: Path, record: dict | None = None, parameters: str | None = None) -> None:
    """Write `image` to `path` atomically, with `record` (JSON, the "generation" chunk) and `parameters` (the
    "parameters" chunk; default: a generated image's) in its text chunks. A full disk raises an OSError that says so,
    after removing the partial file."""
    info = PngInfo()
    if record is not None:
        info.add_text("parameters", generation_parameters(record) if parameters is None else parameters)
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
    """The "generation" record a PNG written by `write_png` carries; a ValueError naming the file when it is not a
    whole PNG (the pixels are decoded: a truncated file is found) or carries no record."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}).get("generation")
    except (OSError, SyntaxError, ValueError) as error:  # PIL: OSError when truncated, SyntaxError for a bad chunk
        raise ValueError(f"{str(path)!r} is not a readable PNG ({error})") from None
    if text is None:
        raise ValueError(f"{str(path)!r} carries no generation record (not written by guided-generate or guided-edit)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} carries a damaged generation record ({error.msg})") from None
