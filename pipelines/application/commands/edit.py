"""Command line: edit (or invert) images with a flow model: FlowOpt, or the FlowEdit baseline.

`guided-edit --image in.png --source-prompt "a red circle ..." --target-prompt "a blue circle ..."` or
`guided-edit --manifest edits.jsonl` (rows `{"image": ..., "source_prompt": ..., "target_prompt": ...}`; image paths
relative to the manifest). Writes one PNG per image, `summary.json` beside them, and prints residuals and NFEs.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import groupby
from pathlib import Path

import PIL.Image
import torch
from safetensors.torch import save_file

from ...families import FLOW_FAMILIES
from ..models import call_defaults, load_pipeline
from .arguments import add_guidance_arguments, add_model_arguments, make_guidance
from .common import check_at_least_one


def step_size(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive number or 'auto', got {value!r}") from None


def read_jobs(args: argparse.Namespace) -> list[dict]:
    """Rows {image (path), source_prompt, target_prompt} from the options or the manifest."""
    if args.manifest:
        path = Path(args.manifest)
        if not path.is_file():
            raise ValueError(f"`--manifest` {str(path)!r} does not exist")
        jobs = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"`--manifest` line {number} is not JSON: {error}") from None
            if not isinstance(row, dict) or "image" not in row:
                raise ValueError(f"`--manifest` line {number} must be an object with an `image`, got {line.strip()!r}")
            jobs.append({**row, "image": str(path.parent / row["image"])})
    else:
        images, sources, targets = args.image or [], args.source_prompt or [], args.target_prompt or []
        if not images:
            raise ValueError("no images: give `--image` (repeatable) with `--source-prompt`, or `--manifest`")
        for name, values in (("--source-prompt", sources), ("--target-prompt", targets)):
            if len(values) not in (0, 1, len(images)):
                raise ValueError(
                    f"`{name}` given {len(values)} times for {len(images)} images: give it once, or once per image"
                )
        pick = lambda values, k: values[k] if len(values) > 1 else (values[0] if values else None)  # noqa: E731
        jobs = [
            {"image": image, "source_prompt": pick(sources, k), "target_prompt": pick(targets, k)}
            for k, image in enumerate(images)
        ]
    for job in jobs:
        if not Path(job["image"]).is_file():
            raise ValueError(f"image {job['image']!r} does not exist")
        needed = ("source_prompt",) if args.invert else ("source_prompt", "target_prompt")
        for key in needed:
            if not isinstance(job.get(key), str) or not job[key].strip():
                option = "--" + key.replace("_", "-")
                raise ValueError(f"image {job['image']!r} has no {key}: give `{option}` (or the manifest's `{key}`)")
    return jobs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guided-edit",
        description="Edit images with a flow model (SD3, Flux) by FlowOpt (zero-order optimisation through the "
        "whole flow) or FlowEdit, or invert them (--invert); writes the results and summary.json, prints residuals "
        "and NFEs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--image", action="append", help="a source image file; repeat the option for several")
    parser.add_argument(
        "--source-prompt",
        action="append",
        help="the prompt describing the source image; once for every image, or once per image",
    )
    parser.add_argument("--target-prompt", action="append", help="the prompt of the edit; once, or once per image")
    parser.add_argument(
        "--manifest",
        help="a JSONL file, one edit per line: {image, source_prompt, target_prompt} (image paths "
        "relative to the manifest); replaces --image and the prompts",
    )
    parser.add_argument(
        "--invert",
        action="store_true",
        help="inversion only: find the noise whose solve with "
        "the source prompt reproduces each image; writes the reconstruction and the noise latents",
    )
    parser.add_argument("--method", choices=("flowopt", "flowedit"), default="flowopt", help="editing method")
    parser.add_argument(
        "--num-inference-steps",
        type=int,
        default=None,
        help="T, the flow schedule's steps "
        "(default: the paper's for the family and task: FlowOpt edit 15, inversion 10; FlowEdit SD3 "
        "50, Flux 28)",
    )
    parser.add_argument(
        "--n-max",
        type=int,
        default=None,
        help="steps of each solve, from grid index T - n_max "
        "(default: FlowOpt SD3 12, Flux 13, inversion 10; FlowEdit SD3 33, Flux 24)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="flowopt: iterations after the first solve "
        "(0: invert, then regenerate; default 8 for edits, 30 for inversion)",
    )
    parser.add_argument(
        "--step-size",
        type=step_size,
        default=None,
        help="flowopt: eta, a positive number or 'auto' "
        "(estimated from the solve, with backtracking); default SD3 0.01, Flux 0.0025",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="flowopt: stop an image when the RMS residual per latent element falls to this",
    )
    parser.add_argument("--n-avg", type=int, default=1, help="flowedit: noise draws averaged per step")
    parser.add_argument("--negative-prompt", default=None, help="the unconditional prompt of the guided solves")
    add_guidance_arguments(parser, guidance_scale=None)
    parser.add_argument(
        "--source-guidance-scale",
        type=float,
        default=None,
        help="flowedit: CFG of the source velocity (default SD3 3.5; Flux: the embedded source guidance, default 1.5)",
    )
    parser.add_argument(
        "--embedded-guidance-scale",
        type=float,
        default=None,
        help="Flux: the guidance "
        "embedding of the target solves (guidance-distilled models; default 3.5, FlowEdit 5.5; 1 for "
        "inversion)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images of one size per pipeline call")
    parser.add_argument("--save-iterates", action="store_true", help="flowopt: also write every iteration's image")
    parser.add_argument("--seed", type=int, default=0, help="seed of 'auto''s probes and FlowEdit's noise")
    parser.add_argument("--output-dir", default="edits", help="folder for the PNG images and summary.json")
    add_model_arguments(parser, schedulers=False)
    parser.epilog = (
        "--guidance-scale defaults to the method's target guidance: FlowOpt 3.5 (SD3) and 1 (Flux, whose "
        "embedding carries it), FlowEdit 13.5 (SD3), inversion 1."
    )
    return parser


def check_method_options(args: argparse.Namespace) -> None:
    """Options of one method given to the other are errors, not ignored."""
    if args.method == "flowedit":
        options = {
            "--iterations": args.iterations is not None,
            "--step-size": args.step_size is not None,
            "--invert": args.invert,
            "--save-iterates": args.save_iterates,
            "--tolerance": args.tolerance != 0,
        }
        given = [option for option, on in options.items() if on]
        if given:
            raise ValueError(f"{given} are FlowOpt options; `--method flowedit` takes none of them")
    else:
        options = {"--n-avg": args.n_avg != 1, "--source-guidance-scale": args.source_guidance_scale is not None}
        given = [option for option, on in options.items() if on]
        if given:
            raise ValueError(f"{given} are FlowEdit options: add `--method flowedit`, or drop them")


def target_guidance_scale(args: argparse.Namespace, family: str) -> float:
    """The CFG scale of the target solves when `--guidance-scale` is not given."""
    if args.invert or family == "flux":
        return 1.0
    return 13.5 if args.method == "flowedit" else 3.5


def method_arguments(args: argparse.Namespace, guidance, generator: torch.Generator) -> dict:
    """The keyword arguments of `pipe.edit`, `pipe.invert` or `pipe.flowedit` the options name."""
    common = {"num_inference_steps": args.num_inference_steps, "n_max": args.n_max}
    embedded = {} if args.embedded_guidance_scale is None else {"guidance_scale": args.embedded_guidance_scale}
    if args.method == "flowedit":
        source = {} if args.source_guidance_scale is None else {"source_guidance_scale": args.source_guidance_scale}
        return {
            **common,
            **embedded,
            **source,
            "target_guidance": guidance,
            "n_avg": args.n_avg,
            "generator": generator,
            "negative_prompt": args.negative_prompt,
        }
    flowopt = {
        "iterations": args.iterations,
        "step_size": args.step_size,
        "tolerance": args.tolerance,
        "guidance": guidance,
        "generator": generator,
        "return_iterates": args.save_iterates,
    }
    return {**common, **embedded, **flowopt, **({} if args.invert else {"negative_prompt": args.negative_prompt})}


def batches(jobs: list[dict], batch_size: int):
    """Consecutive runs of at most `batch_size` jobs whose images share a size (one pipeline call each)."""
    for _, group in groupby(jobs, key=lambda job: job["pixels"].size):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_at_least_one(args, "batch_size", "n_avg")
        check_method_options(args)
        jobs = read_jobs(args)
        pipe, family = load_pipeline(args.model, getattr(torch, args.dtype), args.device)
        if family not in FLOW_FAMILIES:
            raise ValueError(
                f"`--model` {args.model!r} is a {family} model; editing needs a flow model: "
                f"{list(FLOW_FAMILIES)} (e.g. shapes:sd3)"
            )
        if args.embedded_guidance_scale is not None and family != "flux":
            raise ValueError(
                f"`--embedded-guidance-scale` is for Flux's guidance embedding; {args.model!r} is {family}"
            )
        if args.guidance_scale is None:
            args.guidance_scale = target_guidance_scale(args, family)
        guidance = make_guidance(args)
        for job in jobs:
            job["pixels"] = PIL.Image.open(job["image"]).convert("RGB")
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        parser.error(str(error))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = call_defaults(args.model, family, args.max_sequence_length)
    generator = torch.Generator().manual_seed(args.seed)
    records, index = [], 0
    for batch in batches(jobs, args.batch_size):
        images = [job["pixels"] for job in batch]
        sources = [job["source_prompt"] for job in batch]
        kwargs = {**method_arguments(args, guidance, generator), **extra}
        try:
            if args.invert:
                result = pipe.invert(images, sources, **kwargs)
            elif args.method == "flowedit":
                result = pipe.flowedit(images, sources, [job["target_prompt"] for job in batch], **kwargs)
            else:
                result = pipe.edit(images, sources, [job["target_prompt"] for job in batch], **kwargs)
        except (ValueError, TypeError) as error:
            parser.error(str(error))
        for b, (job, image) in enumerate(zip(batch, result.images, strict=True)):
            records.append(write_result(out, index, job, image, result, b, args))
            index += 1
    summary = {
        "model": args.model,
        "method": "invert" if args.invert else args.method,
        "guidance": repr(guidance),
        "nfe_per_image": sum(r["nfe"] for r in records) / len(records),
        "images": records,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {index} images to {out.resolve()} (summary.json beside them); guidance {guidance!r}")
    return 0


def write_result(out: Path, index: int, job: dict, image, result, b: int, args: argparse.Namespace) -> dict:
    """Write image `b` of a result (its iterates and inverted latents when asked), print and return its record."""
    name = f"{index:05d}"
    image.save(out / f"{name}.png")
    residuals = [step[b] for step in result.residuals]
    record = {
        "file": f"{name}.png",
        "image": job["image"],
        "source_prompt": job["source_prompt"],
        "target_prompt": None if args.invert else job["target_prompt"],
        "size": list(result.size),
        "residuals": residuals,
        "nfe": result.nfe,
        "stopped": result.stopped,
    }
    if result.iterates:
        folder = out / f"{name}-iterates"
        folder.mkdir(exist_ok=True)
        for k, iterate in enumerate(result.iterates):
            iterate[b].save(folder / f"{k:02d}.png")
        record["iterates"] = f"{folder.name}/"
    if args.invert:
        save_file({"latents": result.latents[b : b + 1].contiguous().cpu()}, out / f"{name}-latents.safetensors")
        record["latents"] = f"{name}-latents.safetensors"
    trail = " -> ".join(f"{r:.4f}" for r in (residuals if len(residuals) <= 6 else residuals[:3] + residuals[-2:]))
    print(f"{name}.png  {job['image']}: residual {trail} ({len(residuals) - 1} iterations), NFE {result.nfe:g}")
    return record


if __name__ == "__main__":
    sys.exit(main())
