"""Batch generation: the same image whatever the batching or resume point, resumes that lose nothing and repeat
nothing, metadata inside every PNG, clear refusals (kill-and-resume and two processes: tests/test_generate.py)."""

import errno
import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import build

from pipelines import GuidedStableDiffusionPipeline
from pipelines.application import generate_batch
from pipelines.application.batch import compile_denoiser
from pipelines.application.image_files import read_record
from pipelines.testing import tiny_components

TINY = {"model": "tiny:sd", "num_inference_steps": 3, "height": 16, "width": 16, "progress": False}
MANIFEST = [
    {"prompt": "a red circle", "num_images": 2},
    {"prompt": "a blue square", "negative_prompt": "green", "seed": 50},
    {"prompt": "a green triangle", "guidance": "ag", "threshold": 1e-6},
    "a yellow star",
]


@pytest.fixture(scope="module")
def pipe():
    return build("sd")


def pixels(folder):
    return {path.name: np.asarray(PIL.Image.open(path)) for path in sorted(folder.glob("*.png"))}


def lines(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_images_do_not_depend_on_the_batching_and_rows_keep_their_settings(pipe, tmp_path):
    one = generate_batch(MANIFEST, tmp_path / "one", pipe=pipe, batch_size=1, **TINY)
    three = generate_batch(MANIFEST, tmp_path / "three", pipe=pipe, batch_size=3, **TINY)
    assert (one.images, one.generated, one.resumed, three.generated) == (5, 5, 0, 5)
    first, second = pixels(tmp_path / "one"), pixels(tmp_path / "three")
    assert list(first) == [f"{k:05d}.png" for k in range(5)]
    for name in first:
        assert np.abs(first[name].astype(int) - second[name].astype(int)).max() <= 1, name
    records = lines(tmp_path / "three")
    assert [(r["index"], r["row"], r["image"], r["seed"]) for r in records] == [
        (0, 0, 0, 0), (1, 0, 1, 1), (2, 1, 0, 50), (3, 2, 0, 3), (4, 3, 0, 4)
    ]  # fmt: skip
    assert [r["nfe"] for r in records] == [6.0, 6.0, 6.0, 4.0, 6.0]  # AG at threshold 1e-6: CFG at the first step only
    assert records[3]["scales"] == [7.5, 1.0, 1.0] and records[2]["negative_prompt"] == "green"
    assert three.nfe_per_image == pytest.approx(28 / 5)


def test_every_png_says_how_it_was_made(pipe, tmp_path):
    generate_batch(["a red circle"], tmp_path, pipe=pipe, negative_prompt="blurry", seed=9, **TINY)
    image = PIL.Image.open(tmp_path / "00000.png")
    assert image.text["parameters"] == (
        "a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: DDIMScheduler, CFG scale: 7.5, Seed: 9, "
        "Size: 16x16, Model: tiny:sd, Guidance: cfg, NFE: 6"
    )
    record = read_record(tmp_path / "00000.png")
    assert record == lines(tmp_path)[0] and record["seed"] == 9 and record["guidance"] == {}
    assert record["policy"]["_class_name"] == "ClassifierFreeGuidance" and record["policy"]["guidance_scale"] == 7.5
    assert record["file"] == "00000.png" and record["model"] == "tiny:sd" and record["nfe"] == 6.0


def test_a_rerun_resumes_without_regenerating_and_recovers_lost_lines(pipe, tmp_path):
    generate_batch(MANIFEST, tmp_path, pipe=pipe, **TINY)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    reference = pixels(tmp_path)
    (tmp_path / "00002.png").unlink()  # lost image (its line stays in results.jsonl: dropped)
    kept = lines(tmp_path)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept if r["index"] != 3))
    (tmp_path / "results-001.jsonl").write_text('{"index": 4, "row"')  # a line cut short by a kill
    (tmp_path / "00004.png.partial").write_bytes(b"\x89PNG")  # a write cut short by a kill
    again = generate_batch(MANIFEST, tmp_path, pipe=pipe, batch_size=2, **TINY)
    assert (again.generated, again.resumed) == (1, 4)
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    assert {name for name in after if after[name] != before.get(name)} == {"00002.png"}
    assert [r["index"] for r in lines(tmp_path)] == [0, 1, 2, 3, 4]  # line 3 recovered from its PNG
    assert lines(tmp_path)[3] == kept[3]
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("results-*.jsonl"))
    assert np.array_equal(pixels(tmp_path)["00002.png"], reference["00002.png"])
    assert generate_batch(MANIFEST, tmp_path, pipe=pipe, **TINY).generated == 0


def test_another_run_into_the_same_folder_is_refused_unless_overwritten(pipe, tmp_path):
    generate_batch(["a red circle"], tmp_path, pipe=pipe, **TINY)
    with pytest.raises(ValueError, match=r"holds another run \(images: 1 there, 2 now; manifest: '[0-9a-f]+' there"):
        generate_batch(["a blue square", "x"], tmp_path, pipe=pipe, **TINY)
    with pytest.raises(ValueError, match=r"num_inference_steps: 3 there, 4 now\): use `--overwrite`"):
        generate_batch(["a red circle"], tmp_path, pipe=pipe, **{**TINY, "num_inference_steps": 4})
    (tmp_path / "notes.txt").write_text("mine")
    out = generate_batch(["a blue square"], tmp_path, pipe=pipe, overwrite=True, **TINY)
    assert out.generated == 1 and lines(tmp_path)[0]["prompt"] == "a blue square"
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only what a run wrote is removed
    other = tmp_path / "other"
    other.mkdir()
    PIL.Image.new("RGB", (4, 4)).save(other / "00000.png")
    with pytest.raises(ValueError, match="holds images but no run.json"):
        generate_batch(["a red circle"], other, pipe=pipe, **TINY)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1, got 0"),
        ({"num_inference_steps": 2.5}, ValueError, r"`num_inference_steps` must be an integer >= 1, got 2.5"),
        ({"seed": "1"}, ValueError, r"`seed` must be an integer, got '1'"),
        ({"dtype": "float64"}, ValueError, r"`dtype` must be one of \['float32', 'float16', 'bfloat16'\]"),
        ({"guidance": {"guidance": "linear-ag"}}, ValueError, r"the run's guidance options: guidance 'linear-ag' needs"),
        ({"guidance": {"threshold": 2.0, "guidance": "ag"}}, ValueError, r"options: `threshold` must be a number in"),
        ({"model": None}, ValueError, r"`model` must name the pipeline given as `pipe`"),
        ({"guidance": {"sampler": "x"}}, ValueError, r"unknown guidance parameter 'sampler'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(pipe, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        generate_batch(["a red circle"], tmp_path / "out", pipe=pipe, **{**TINY, **kwargs})
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_said_and_the_partial_image_removed(pipe, tmp_path, monkeypatch):
    def save_half_then_fail(image, handle, **kwargs):
        handle.write(b"\x89PNG\r\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", save_half_then_fail)
    with pytest.raises(OSError, match=r"the disk is full: .*00000.png could not be written \(the partial file was"):
        generate_batch(["a red circle"], tmp_path, pipe=pipe, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "run.json"]


class SmallDevice(GuidedStableDiffusionPipeline):
    """A device that holds `capacity` images at most: larger calls raise torch's out-of-memory error."""

    capacity, calls = 2, []

    def __call__(self, prompt, **kwargs):
        self.calls.append(len(prompt))
        if len(prompt) > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return super().__call__(prompt, **kwargs)


def test_out_of_memory_halves_the_batch(pipe, tmp_path, caplog):
    small = SmallDevice(**tiny_components("sd"))
    prompts = ["a red circle", "a blue square", "a green triangle", "a star", "a moon"]
    with caplog.at_level(logging.WARNING):
        generate_batch(prompts, tmp_path / "a", pipe=small, batch_size=5, **TINY)
    assert small.calls == [5, 2, 2, 1] and "out of memory with a batch of 5: retrying with 2" in caplog.text
    generate_batch(prompts, tmp_path / "b", pipe=pipe, batch_size=5, **TINY)
    for a, b in zip(pixels(tmp_path / "a").values(), pixels(tmp_path / "b").values(), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    small.capacity = 0
    with pytest.raises(RuntimeError, match="out of memory at batch size 1"):
        generate_batch(["a"], tmp_path / "c", pipe=small, **TINY)


def test_compile_wraps_the_denoiser():
    pipe = build("sd")
    compile_denoiser(pipe)
    assert type(pipe.unet).__name__ == "OptimizedModule"
    assert pipe.unet.config.sample_size == pipe.unet._orig_mod.config.sample_size


def test_row_guidance_errors_name_the_row(pipe, tmp_path):
    rows = ["a", {"prompt": "b", "guidance": "ag", "threshold": 2.0}]
    with pytest.raises(ValueError, match=r"manifest: row 1 \(line 2\): its guidance: `threshold` must be a number in"):
        generate_batch(rows, tmp_path, pipe=pipe, **TINY)
    with pytest.raises(ValueError, match=r"row 0 \(line 1\): `threshold` is not an option of guidance 'cfg', which"):
        generate_batch([{"prompt": "b", "threshold": 0.9}], tmp_path, pipe=pipe, **TINY)


def test_runs_past_99999_images_are_still_recognised(pipe, tmp_path):
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "100000.png")
    with pytest.raises(ValueError, match="holds images but no run.json"):
        generate_batch(["a red circle"], tmp_path, pipe=pipe, **TINY)
    (tmp_path / "notes.png").write_bytes(b"mine")
    generate_batch(["a red circle"], tmp_path, pipe=pipe, overwrite=True, **TINY)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000.png", "notes.png"]
