"""A smoke run of every benchmark (1 caption, 2 steps, 1 repeat), so that none can rot: each writes its results
files with the command, library versions and machine it ran with."""

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SMOKE = {
    "guided_vs_diffusers": (["--steps", "2", "--repeats", "1"], "guided-vs-diffusers-tiny-cpu"),
    "methods_at_scale": (
        [
            "--model",
            "tiny",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--batch-size",
            "1",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ],
        "methods-at-scale-tiny-cpu",
    ),
    "video_guidance": (["--frames", "5", "--steps", "2", "--repeats", "1"], "video-guidance"),
    "full_size": (["--model", "tiny", "--steps", "2", "--repeats", "1"], "full-size-tiny-cpu"),
    "scheduler_matrix": (["--only", "sd:pndm", "--only", "flux:flow-heun"], "scheduler-matrix"),
    "shapes_quality": (["--seeds", "1", "--captions", "1", "--steps", "2"], "shapes-quality"),
    "adaptive_guidance": (
        [
            "--seeds",
            "1",
            "--captions",
            "1",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--calibration-prompts",
            "2",
            "--models",
            "shapes-sd3",
        ],
        "adaptive-guidance",
    ),
    "dynamic_guidance": (["--seeds", "1", "--captions", "1", "--steps", "2", "--repeats", "1"], "dynamic-guidance"),
    "flowopt_editing": (["--scenes", "1", "--inversion-iterations", "1", "--attributes", "color"], "flowopt-editing"),
    "batch_generation": (["--images", "4", "--steps", "2", "--rounds", "1", "--processes"], "batch-generation"),
    "self_npo": (["--captions", "2", "--seeds", "1", "--steps", "2", "--repeats", "1"], "self-npo"),
}


@pytest.mark.parametrize("script", list(SMOKE))
def test_benchmark_smoke_run_writes_its_results(script, tmp_path, monkeypatch):
    argv, name = SMOKE[script]
    path = BENCHMARKS / f"{script}.py"
    figures = ["--figures", str(tmp_path)] if "--figures" in path.read_text() else []
    monkeypatch.setattr(sys, "argv", [str(path), *argv, "--out", str(tmp_path), *figures])
    runpy.run_module(f"benchmarks.{script}", run_name="__main__", alter_sys=True)
    results = json.loads((tmp_path / f"{name}.json").read_text())
    environment = results["environment"]
    assert environment["command"].startswith(f"python -m benchmarks.{script} ")
    assert environment["cpu_count"] >= 1 and environment["torch"] and environment["device"].startswith("CPU")
    assert len(environment["commit"].split()[0]) == 40  # the git commit the code ran from
    assert results["results"]
    markdown = (tmp_path / f"{name}.md").read_text()
    assert "| --- |" in markdown and environment["command"] in markdown
    assert "CPU cores" not in path.read_text()  # the machine is read, never written into a script
