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

from guidance.shapes.world import WORLD_FILE, ShapesWorld

from ...training.shapes import DEFAULT_STEPS, MODELS, ShapesTraining
from .common import check_at_least_one


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps is not None:
        check_at_least_one(args, "steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ShapesTraining(Path(args.assets), Path(args.checkpoints), args.steps, args.seed, args.device)
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


if __name__ == "__main__":
    raise SystemExit(main())
