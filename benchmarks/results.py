"""Results files of the benchmarks: what was measured, with the command, the library versions and the machine it
ran on, as Markdown (for people) and JSON (for scripts), in `benchmarks/results/` unless `--out` says otherwise."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"


def git_commit() -> str:
    """The commit the code ran from, marked when tracked files other than benchmark outputs differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        outputs = [":!benchmarks/results", ":!docs/figures"]
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit.stdout.strip() + (" with uncommitted changes" if status.stdout.strip() else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict:
    """The command line, library versions and machine of this run."""
    import diffusers
    import torch
    import transformers

    script = Path(sys.argv[0])
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    return {
        "command": " ".join(["python", "-m", f"benchmarks.{script.stem}", *sys.argv[1:]]),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU: {cpu_name()}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def machine(env: dict) -> str:
    """A short description of where it ran, for the text of a results file."""
    if not env["device"].startswith("CPU"):
        return f"one {env['device']}"
    return f"{env['cpu_count']} CPU cores ({env['torch_threads']} torch threads)"


def write_results(name: str, markdown: str, data, out: str | os.PathLike | None = None, env: dict | None = None):
    """`<out>/<name>.md` (the table, then the environment) and `<out>/<name>.json`; returns the Markdown path."""
    env = env or environment()
    folder = Path(out) if out is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    lines = [markdown.rstrip(), "", "| environment | |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in env.items()]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    payload = {"environment": env, "results": data}
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {folder / name}.md and .json")
    return folder / f"{name}.md"
