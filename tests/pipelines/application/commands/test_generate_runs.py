"""`guided-generate` as separate processes: a run killed with SIGKILL and restarted loses no image, repeats none and
leaves none corrupt; SIGINT and SIGTERM stop it with one line and 130 / 143, and the same command resumes; `accelerate
launch` with two CPU processes splits a run and resumes one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image

from pipelines.application.commands.generate import main

ROOT = Path(__file__).resolve().parents[4]
SCENES = [
    "large red circle center",
    "small blue square left",
    "large green triangle right",
    "small yellow circle top",
    "large purple square bottom",
    "small red triangle left",
    "large blue circle right",
    "small green square center",
    "large yellow triangle top",
    "small purple circle bottom",
    "large red square right",
    "small blue triangle top",
]
PROMPTS = ["a {} {} {} at the {} on white".format(*scene.split()) for scene in SCENES]
STEPS = 8


def command(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        "shapes:sd",
        "--prompts-file",
        str(prompts),
        "--num-inference-steps",
        str(STEPS),
        "--output-dir",
        str(out),
        "--no-progress",
        *extra,
    ]


def environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def pixels(folder: Path) -> dict:
    return {path.name: np.asarray(PIL.Image.open(path)).astype(int) for path in sorted(folder.glob("*.png"))}


def same_images(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(np.abs(first[k] - second[k]).max() <= 1 for k in first)


def indices(folder: Path) -> list[int]:
    return [json.loads(line)["index"] for line in (folder / "results.jsonl").read_text().splitlines()]


def reference(tmp_path: Path, prompts: Path) -> Path:
    """The run in this process, in one batch, never interrupted."""
    out = tmp_path / "reference"
    assert main(command(prompts, out, "--batch-size", "12")) == 0
    return out


def test_a_killed_run_resumes_with_nothing_lost_repeated_or_corrupt(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "run"
    generate = [sys.executable, "-m", "pipelines.application.commands.generate"]
    process = subprocess.Popen([*generate, *command(prompts, out, "--batch-size", "2")], env=environment(), cwd=ROOT)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.png"))) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    assert 4 <= len(kept) < len(PROMPTS), "the run was not killed mid-way"
    finished = subprocess.run(
        [*generate, *command(prompts, out, "--batch-size", "3")],
        env=environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr
    assert f"wrote {len(PROMPTS) - len(kept)} images" in finished.stdout
    assert f"({len(kept)} already there" in finished.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # none generated twice
    assert indices(out) == list(range(len(PROMPTS)))  # none lost, one line each
    for path in out.glob("*.png"):
        with PIL.Image.open(path) as image:
            image.verify()  # none corrupt
    assert not list(out.glob("*.partial")) and not list(out.glob("results-*.jsonl"))
    assert same_images(pixels(out), pixels(reference(tmp_path, prompts)))  # the same images as a run never killed


def start_and_signal(prompts: Path, out: Path, number: int, wait_for: int) -> subprocess.CompletedProcess:
    """Start the run, send `number` once `wait_for` images are there; the finished process."""
    generate = [sys.executable, "-m", "pipelines.application.commands.generate"]
    process = subprocess.Popen(
        [*generate, *command(prompts, out, "--batch-size", "2")],
        env=environment(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.png"))) < wait_for and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(number)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_sigint_and_sigterm_stop_with_one_line_and_the_same_command_resumes(tmp_path):
    """Failure 5 of the command-line issue: Ctrl-C printed a 61-line traceback, SIGTERM exited 143 silently; neither
    said that the same command resumes."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "run"
    for number, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        wait_for = len(list(out.glob("*.png"))) + 2  # images made by this process
        stopped = start_and_signal(prompts, out, number, wait_for)
        done = len(list(out.glob("*.png")))
        assert stopped.returncode == code, stopped.stderr[-2000:]
        assert wait_for <= done < len(PROMPTS), "the run was not stopped mid-way"
        assert "Traceback" not in stopped.stderr
        name = signal.Signals(number).name
        assert stopped.stderr.strip().splitlines()[-1] == (
            f"guided-generate: interrupted by {name}: {done} of {len(PROMPTS)} images are done in {str(out)!r}; run "
            "the same command again to resume"
        )
        assert indices(out) == list(range(done))  # a line for every image there, nothing for the batch dropped
        assert not list(out.glob("*.partial")) and not list(out.glob("results-*.jsonl"))
    kept = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    finished = subprocess.run(
        [sys.executable, "-m", "pipelines.application.commands.generate", *command(prompts, out, "--batch-size", "3")],
        env=environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr
    assert (
        f"wrote {len(PROMPTS) - len(kept)} images" in finished.stdout
        and f"({len(kept)} already there" in finished.stdout
    )
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # 0 images lost or made twice
    assert indices(out) == list(range(len(PROMPTS)))
    assert same_images(pixels(out), pixels(reference(tmp_path, prompts)))


def test_two_processes_split_a_run_and_resume_one(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    expected = reference(tmp_path, prompts)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "pipelines.application.commands.generate",
    ]
    out = tmp_path / "two"
    run = subprocess.run(
        [*launch, *command(prompts, out, "--batch-size", "4")],
        env=environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote 12 images") == 1  # the main process reports for both
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(12)) and not list(out.glob("results-*.jsonl"))
    assert sorted(r["process"] for r in records) == [0] * 6 + [1] * 6  # each image made once, half by each
    assert same_images(pixels(out), pixels(expected))
    # a single-process run, three images lost, finished by two processes
    resumed = tmp_path / "resumed"
    shutil.copytree(expected, resumed)
    for index in (1, 6, 11):
        (resumed / f"{index:05d}.png").unlink()
    kept = {path.name: path.stat().st_mtime_ns for path in resumed.glob("*.png")}
    run = subprocess.run(
        [*launch, *command(prompts, resumed, "--batch-size", "12")],
        env=environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 3 images" in run.stdout and "(9 already there" in run.stdout
    assert indices(resumed) == list(range(12)) and same_images(pixels(resumed), pixels(expected))
    assert {name: (resumed / name).stat().st_mtime_ns for name in kept} == kept
    records = [json.loads(line) for line in (resumed / "results.jsonl").read_text().splitlines()]
    assert sorted(r["process"] for r in records if r["index"] in (1, 6, 11)) == [0, 0, 1]  # 3 split as 2 + 1
