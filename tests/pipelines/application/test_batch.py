"""Batch generation: the same image whatever the batching or resume point, resumes that lose nothing and repeat
nothing, metadata inside every PNG, clear refusals before anything is written (kill-and-resume, signals and two
processes: commands/test_generate_runs.py)."""

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
from pipelines.application.batch import BatchSettings, compile_denoiser
from pipelines.application.image_files import read_record
from pipelines.application.signals import RunInterrupted
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
        (0, 0, 0, 0),
        (1, 0, 1, 1),
        (2, 1, 0, 50),
        (3, 2, 0, 3),
        (4, 3, 0, 4),
    ]
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
    with pytest.raises(ValueError, match=r"num_inference_steps: 3 there, 4 now\): use `overwrite=True` to start"):
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
        ({"batch_size": 0}, ValueError, r"`batch_size` must be an int >= 1, got 0"),
        ({"num_inference_steps": 2.5}, TypeError, r"`num_inference_steps` must be an int, got float 2.5"),
        ({"num_inference_steps": 0}, ValueError, r"`num_inference_steps` must be an int >= 1, got 0"),
        ({"seed": "1"}, TypeError, r"`seed` must be an int, got str '1'"),
        ({"seed": -1}, ValueError, r"`seed` must be an int in \[0, 9223372036854775807\], got -1"),
        ({"height": 0}, ValueError, r"`height` must be an int >= 1, got 0"),
        ({"height": 33}, ValueError, r"`height` must be a multiple of 8 \(the model's latent grid\), got 33"),
        ({"width": 20}, ValueError, r"`width` must be a multiple of 8"),
        ({"dtype": "float64"}, ValueError, r"`dtype` must be one of \['float32', 'float16', 'bfloat16'\]"),
        (
            {"guidance": {"guidance": "linear-ag"}},
            ValueError,
            r"`guidance`: guidance 'linear-ag' needs",
        ),
        (
            {"guidance": {"threshold": 2.0, "guidance": "ag"}},
            ValueError,
            r"`guidance`: `threshold` must be a number in",
        ),
        ({"model": None}, ValueError, r"`model` must be a model name \(recorded in run.json and every image; with a"),
        ({"guidance": {"sampler": "x"}}, ValueError, r"unknown guidance parameter 'sampler'"),
        ({"sampler": "x"}, TypeError, r"generate_batch\(\) got unknown arguments \['sampler'\]; the settings are"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(pipe, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        generate_batch(["a red circle"], tmp_path / "out", pipe=pipe, **{**TINY, **kwargs})
    assert not (tmp_path / "out").exists()


def test_settings_as_one_typed_object(pipe, tmp_path):
    settings = BatchSettings(model="tiny:sd", num_inference_steps=3, height=16, width=16, seed=4)
    result = generate_batch(["a red circle"], tmp_path, settings, pipe=pipe, progress=False)
    assert (result.generated, lines(tmp_path)[0]["seed"]) == (1, 4)
    with pytest.raises(TypeError, match=r"give `settings` or its fields as keywords, not both \(got \['seed'\]\)"):
        generate_batch(["a red circle"], tmp_path, settings, pipe=pipe, seed=5)


def snapshot(folder):
    """Every file under `folder` with its bytes (what a test checks nothing lost or changed in)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_bad_size_never_deletes_nor_writes(pipe, tmp_path):
    """Failure 2 of the command-line issue: `--height 33 --overwrite` deleted a finished run's PNGs before the size
    was checked; without `--overwrite` it wrote run.json and results.jsonl first, so the corrected command was then
    refused."""
    generate_batch(["a red circle", "a blue square"], tmp_path, pipe=pipe, **TINY)
    before = snapshot(tmp_path)
    for overwrite in (True, False):
        with pytest.raises(ValueError, match="`height` must be a multiple of 8"):
            generate_batch(["a red circle"], tmp_path, pipe=pipe, overwrite=overwrite, **{**TINY, "height": 33})
        assert snapshot(tmp_path) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="`height` must be a multiple of 8"):
        generate_batch(["a red circle"], fresh, pipe=pipe, **{**TINY, "height": 33})
    assert not fresh.exists()
    assert generate_batch(["a red circle"], fresh, pipe=pipe, **TINY).generated == 1  # the corrected call runs


def test_output_folders_that_cannot_hold_a_run_are_named(pipe, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=r"`output_dir` '.*file' is a file, expected a folder"):
        generate_batch(["a"], tmp_path / "file", pipe=pipe, **TINY)
    with pytest.raises(
        ValueError, match=r"`output_dir` '.*file/run' cannot be made: '.*file' is a file, not a folder"
    ):
        generate_batch(["a"], tmp_path / "file" / "run", pipe=pipe, **TINY)
    assert snapshot(tmp_path) == {"file": b"mine"}


def test_a_folder_of_another_command_is_refused(pipe, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"command": "guided-edit", "model": "tiny:sd3"}))
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "00000.png")
    before = snapshot(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"holds a guided-edit run, not a guided-generate one: use another folder, or "
        r"`overwrite=True` to replace that run",
    ):
        generate_batch(["a red circle"], tmp_path, pipe=pipe, **TINY)
    assert snapshot(tmp_path) == before


def test_overwrite_removes_only_what_the_run_wrote(pipe, tmp_path):
    """A mixed folder: the user's own files (a note, a picture, a numbered image in a subfolder) stay byte for byte
    when a run there is overwritten; the old run's images, lines and temporaries go."""
    generate_batch(["a red circle", "a blue square", "a moon"], tmp_path, pipe=pipe, **TINY)
    (tmp_path / "notes.txt").write_text("mine")
    PIL.Image.new("RGB", (4, 4), "red").save(tmp_path / "photo.png")
    (tmp_path / "kept").mkdir()
    PIL.Image.new("RGB", (4, 4), "blue").save(tmp_path / "kept" / "00001.png")
    (tmp_path / "00009.png.partial").write_bytes(b"\x89PNG")
    mine = {
        name: data for name, data in snapshot(tmp_path).items() if name in ("notes.txt", "photo.png", "kept/00001.png")
    }
    generate_batch(["a green triangle"], tmp_path, pipe=pipe, overwrite=True, **TINY)
    after = snapshot(tmp_path)
    assert {name: after[name] for name in mine} == mine  # 0 of the user's files lost or changed
    assert sorted(set(after) - set(mine)) == ["00000.png", "results.jsonl", "run.json"]
    assert lines(tmp_path)[0]["prompt"] == "a green triangle"


def test_a_damaged_image_found_on_resume_is_named_and_kept(pipe, tmp_path):
    """Failure 6: a truncated PNG without its line raised "Truncated File Read" during a resume."""
    generate_batch(["a red circle", "a blue square"], tmp_path, pipe=pipe, **TINY)
    data = (tmp_path / "00001.png").read_bytes()
    (tmp_path / "00001.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "results.jsonl").write_text((tmp_path / "results.jsonl").read_text().splitlines()[0] + "\n")
    before = snapshot(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"'.*00001.png' is not a readable PNG \(.*\): remove it and run the same "
        r"command again to make it anew",
    ):
        generate_batch(["a red circle", "a blue square"], tmp_path, pipe=pipe, **TINY)
    assert snapshot(tmp_path) == before
    (tmp_path / "00001.png").unlink()
    assert generate_batch(["a red circle", "a blue square"], tmp_path, pipe=pipe, **TINY).generated == 1


class Interrupting(GuidedStableDiffusionPipeline):
    """A pipeline whose second call is interrupted, as Ctrl-C would."""

    calls = 0

    def __call__(self, prompt, **kwargs):
        type(self).calls += 1
        if type(self).calls == 2:
            raise KeyboardInterrupt
        return super().__call__(prompt, **kwargs)


def test_an_interrupt_says_how_far_the_run_got_and_the_run_resumes(tmp_path):
    prompts = ["a red circle", "a blue square", "a moon", "a star"]
    pipe = Interrupting(**tiny_components("sd"))
    with pytest.raises(RunInterrupted) as stop:
        generate_batch(prompts, tmp_path, pipe=pipe, batch_size=2, **TINY)
    assert (stop.value.done, stop.value.total, stop.value.exit_code) == (2, 4, 130)
    assert str(stop.value) == (
        f"interrupted by SIGINT: 2 of 4 images are done in {str(tmp_path)!r}; run the same command again to resume"
    )
    assert [r["index"] for r in lines(tmp_path)] == [0, 1] and not list(tmp_path.glob("results-*.jsonl"))
    again = generate_batch(prompts, tmp_path, pipe=pipe, batch_size=2, **TINY)
    assert (again.generated, again.resumed) == (2, 2)


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
