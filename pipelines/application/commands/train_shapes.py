"""Development command: rebuild the shapes world's models from the generator alone.

    python -m pipelines.application.commands.train_shapes all --assets assets

`vae`, `sd`, `sd3`, `clip`, `scorer` or `all` (in dependency order); each resumable from `--checkpoints` and
reproducible from `--seed`. `world` writes only the world's description (and with `--prompts FILE`, `--count` distinct
training captions: the calibration prompts). Not a console script: the shapes world is the project's fixture, not a
user's model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from guidance.checks import check_seed
from guidance.shapes.world import WORLD_FILE, ShapesWorld

from ...training.shapes import DEFAULT_STEPS, MODELS, ShapesTraining
from ..paths import check_output_dir
from .common import check_at_least_one, checkpoints_kept, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.application.commands.train_shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", choices=[*MODELS, "all", "world"], help="what to train ('all': in dependency order; 'world': nothing)"
    )
    parser.add_argument("--assets", default="assets", help="where the trained models are written")
    parser.add_argument("--checkpoints", default="checkpoints", help="resumable checkpoints (safetensors)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (defaults: {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device of sd and sd3 training")
    parser.add_argument("--prompts", default=None, help="world: also write distinct training captions to this file")
    parser.add_argument("--count", type=int, default=200, help="world: how many captions --prompts gets")
    return parser


def prepare(args: argparse.Namespace) -> ShapesTraining:
    """The options checked; nothing written."""
    if args.steps is not None:
        check_at_least_one(args, "steps")
    check_at_least_one(args, "count")
    if args.threads is not None:
        check_at_least_one(args, "threads")
    check_seed("--seed", args.seed)
    check_output_dir(args.assets, "--assets")
    check_output_dir(args.checkpoints, "--checkpoints")
    if args.prompts is not None and Path(args.prompts).is_dir():
        raise ValueError(f"`--prompts` {args.prompts!r} is a folder, expected a file to write")
    return ShapesTraining(Path(args.assets), Path(args.checkpoints), args.steps, args.seed, args.device)


def execute(settings: ShapesTraining, args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    world = ShapesWorld()
    settings.assets.mkdir(parents=True, exist_ok=True)
    world.write_json(settings.assets / WORLD_FILE)
    print(f"wrote {settings.assets / WORLD_FILE}")
    if args.prompts:
        captions = world.training_captions(args.count, args.seed)
        Path(args.prompts).write_text("\n".join(captions) + "\n")
        print(f"wrote {len(captions)} training captions to {args.prompts}")
    names = {"all": list(MODELS), "world": []}.get(args.model, [args.model])
    for name in names:
        start = time.time()
        MODELS[name](settings, world)
        print(f"{name}: {time.time() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(
        parser,
        lambda: prepare(args),
        lambda settings: execute(settings, args),
        lambda settings, stop: checkpoints_kept(settings.checkpoints, stop),
    )


if __name__ == "__main__":
    raise SystemExit(main())
