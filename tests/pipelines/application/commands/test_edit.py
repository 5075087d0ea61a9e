"""`guided-edit`: single images and manifests, inversion with its latents, iterates, FlowEdit; run folders that resume
and record like guided-generate's, every input checked before anything is written, and the errors."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from pipelines.application.commands.edit import build_parser, main
from pipelines.application.image_files import read_record

SMALL = ["--model", "tiny:sd3", "--num-inference-steps", "4", "--n-max", "3", "--max-sequence-length", "16"]


def write_image(path, size=(16, 16), seed=0):
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_edits_one_image_prints_residuals_and_nfe(tmp_path, capsys):
    image, out = write_image(tmp_path / "in.png"), tmp_path / "out"
    argv = [
        *SMALL,
        "--image",
        image,
        "--source-prompt",
        "a red circle",
        "--target-prompt",
        "a blue circle",
        "--iterations",
        "2",
        "--step-size",
        "0.05",
        "--save-iterates",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    assert Image.open(out / "00000.png").size == (16, 16)
    assert sorted(p.name for p in (out / "00000-iterates").iterdir()) == ["00.png", "01.png", "02.png"]
    summary = json.loads((out / "summary.json").read_text())
    record = summary["images"][0]
    assert summary["method"] == "flowopt" and "guidance_scale=3.5" in summary["guidance"]
    assert record["nfe"] == 4 + 3 * 3 * 2 and len(record["residuals"]) == 3 and record["size"] == [16, 16]
    assert record["target_prompt"] == "a blue circle" and record["stopped"] == "iterations"
    printed = capsys.readouterr().out
    assert re.search(r"00000\.png .*in\.png: residual [\d.]+ -> [\d.]+ -> [\d.]+ \(2 iterations\), NFE 22", printed)


def test_a_manifest_runs_in_batches_of_one_size(tmp_path, capsys):
    rows = [
        {"image": write_image(tmp_path / "a.png", seed=1), "source_prompt": "a red circle", "target_prompt": "a cat"},
        {"image": "b.png", "source_prompt": "a green square", "target_prompt": "a dog"},
        {"image": "c.png", "source_prompt": "a gray triangle", "target_prompt": "a bird"},
    ]
    write_image(tmp_path / "b.png", seed=2)
    write_image(tmp_path / "c.png", size=(18, 16), seed=3)
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    out = tmp_path / "out"
    assert main([*SMALL, "--manifest", str(manifest), "--iterations", "0", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["target_prompt"] for r in summary["images"]] == ["a cat", "a dog", "a bird"]
    assert [Image.open(out / r["file"]).size for r in summary["images"]] == [(16, 16), (16, 16), (18, 16)]
    assert summary["images"][1]["image"] == str(tmp_path / "b.png")


def test_inversion_writes_the_reconstruction_and_the_noise_latents(tmp_path, capsys):
    image, out = write_image(tmp_path / "in.png"), tmp_path / "out"
    argv = [
        *SMALL,
        "--invert",
        "--image",
        image,
        "--source-prompt",
        "a red circle",
        "--iterations",
        "3",
        "--step-size",
        "auto",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    latents = load_file(out / "00000-latents.safetensors")["latents"]
    assert latents.shape == (1, 4, 8, 8)
    record = json.loads((out / "summary.json").read_text())["images"][0]
    assert record["target_prompt"] is None and record["latents"] == "00000-latents.safetensors"
    assert all(b <= a for a, b in zip(record["residuals"], record["residuals"][1:], strict=False))


def test_flowedit_from_the_command_line(tmp_path):
    image, out = write_image(tmp_path / "in.png"), tmp_path / "out"
    argv = [
        *SMALL,
        "--method",
        "flowedit",
        "--image",
        image,
        "--source-prompt",
        "a red circle",
        "--target-prompt",
        "a blue circle",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "flowedit" and summary["images"][0]["nfe"] == 3 * 2 * 2
    assert "guidance_scale=13.5" in summary["guidance"]  # FlowEdit's target guidance for SD3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no images: give `--image`"),
        (["--image", "{image}"], "has no source_prompt: give `--source-prompt`"),
        (["--image", "{image}", "--source-prompt", "a"], "has no target_prompt: give `--target-prompt`"),
        (
            ["--image", "/no/such.png", "--source-prompt", "a", "--target-prompt", "b"],
            "`--image` 1: image '/no/such.png' does not exist, expected an image file",
        ),
        (
            [
                "--image",
                "{image}",
                "--image",
                "{image}",
                "--image",
                "{image}",
                "--source-prompt",
                "a",
                "--source-prompt",
                "b",
                "--target-prompt",
                "c",
            ],
            "`--source-prompt` given 2 times for 3 images",
        ),
        (["--manifest", "/no/such.jsonl"], "`--manifest` '/no/such.jsonl' does not exist"),
        (["--manifest", "{bad_manifest}"], r"`--manifest` '.*bad.jsonl': line 1 is not valid JSON \(Expecting"),
        (
            ["--manifest", "{bad_manifest}", "--image", "{image}"],
            r"give either `--manifest` or \['--image'\], not both",
        ),
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--seed", "-1"],
            r"`--seed` must be an int in",
        ),
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--output-dir", "{image}"],
            r"`--output-dir` '.*in.png' is a file, expected a folder",
        ),
        (["--step-size", "fast"], "argument --step-size: a positive number or 'auto', got 'fast'"),
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--step-size", "-1"],
            "`--step-size` must be a positive number or 'auto', got -1.0",
        ),
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--n-max", "9"],
            r"`--n-max` must be an int in \[1, num_inference_steps=4\], got 9",
        ),
        (["--method", "flowedit", "--iterations", "2"], r"\['--iterations'\] are FlowOpt options"),
        (["--method", "flowedit", "--invert"], r"\['--invert'\] are FlowOpt options"),
        (["--n-avg", "2"], r"\['--n-avg'\] are FlowEdit options"),
        (["--batch-size", "0"], "`--batch-size` must be an int >= 1, got 0"),
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--model", "tiny:sd"],
            r"is a sd model; editing needs a flow model: \['sd3', 'flux'\]",
        ),
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--embedded-guidance-scale", "2"],
            "`--embedded-guidance-scale` is for Flux's guidance embedding",
        ),
    ],
)
def test_bad_input_exits_with_the_message(tmp_path, capsys, argv, message):
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text("{not json\n")
    names = {"image": write_image(tmp_path / "in.png"), "bad_manifest": str(bad_manifest)}
    argv = [a.format(**names) for a in argv]
    model = [] if "--model" in argv else ["--model", "tiny:sd3"]
    out = ["--output-dir", str(tmp_path / "out")] if "--output-dir" not in argv else []
    with pytest.raises(SystemExit) as exit_info:
        main([*model, "--num-inference-steps", "4", "--n-max", "3", "--max-sequence-length", "16", *out, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(message, err.splitlines()[-1])
    assert not (tmp_path / "out").exists()


def test_help_documents_every_option():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    text = parser.format_help()
    assert "--manifest" in text and "--save-iterates" in text and "'auto'" in text


def snapshot(folder):
    """Every file under `folder` with its bytes (what a test checks nothing lost or changed in)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_resumes_records_every_image_and_refuses_other_runs(tmp_path, capsys):
    images = [write_image(tmp_path / f"{k}.png", seed=k) for k in range(3)]
    out = tmp_path / "out"
    argv = [
        *SMALL,
        "--source-prompt",
        "a red circle",
        "--target-prompt",
        "a blue circle",
        "--iterations",
        "1",
        "--batch-size",
        "2",
        "--output-dir",
        str(out),
    ]
    for image in images:
        argv += ["--image", image]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2] and [r["image"] for r in records] == images
    assert read_record(out / "00001.png") == records[1] and records[2]["seed"] == 2  # batch 2 starts at image 2
    assert Image.open(out / "00000.png").text["parameters"].startswith("a blue circle\nMethod: flowopt, Source ")
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "guided-edit" and (run["num_inference_steps"], run["n_max"], run["iterations"]) == (
        4,
        3,
        1,
    )
    capsys.readouterr()
    (out / "00001.png").unlink()  # a lost image: the rerun makes that one only
    kept = {name: (out / name).stat().st_mtime_ns for name in ("00000.png", "00002.png")}
    assert main(argv) == 0
    assert "wrote 1 images" in capsys.readouterr().out.splitlines()[-1]
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    summary = json.loads((out / "summary.json").read_text())
    assert [r["index"] for r in summary["images"]] == [0, 1, 2]
    before = snapshot(out)
    with pytest.raises(SystemExit):
        main([*argv, "--iterations", "2"])
    assert "holds another run (iterations: 1 there, 2 now): use `--overwrite` to start over" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main([*argv, "--iterations", "2", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["iterations"] == 2


def test_a_generate_run_folder_is_refused(tmp_path, capsys):
    """Failure 1 of the command-line issue: guided-edit into a guided-generate run overwrote 00000.png silently, and
    the generate run's resume then kept the foreign image."""
    from pipelines.application.commands.generate import main as generate

    out = tmp_path / "run"
    run = [
        "--model",
        "tiny:sd",
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--num-inference-steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    assert generate(run) == 0
    before = snapshot(out)
    argv = [
        *SMALL,
        "--image",
        write_image(tmp_path / "in.png"),
        "--source-prompt",
        "a",
        "--target-prompt",
        "b",
        "--output-dir",
        str(out),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        f"guided-edit: error: `--output-dir` {str(out)!r} holds a guided-generate run, not a guided-edit one: use "
        "another folder, or `--overwrite` to replace that run"
    )
    assert snapshot(out) == before
    assert generate(run) == 0 and "wrote 0 images" in capsys.readouterr().out


def test_every_row_and_image_is_checked_before_anything_is_written(tmp_path, capsys):
    """Failure 3: a bad second manifest row failed after the first row's PNG overwrote an earlier edit (summary.json
    left stale), and unknown manifest keys were accepted."""
    good = {"image": write_image(tmp_path / "a.png"), "source_prompt": "a red circle", "target_prompt": "a cat"}
    manifest, out = tmp_path / "edits.jsonl", tmp_path / "out"
    argv = [*SMALL, "--manifest", str(manifest), "--iterations", "0", "--output-dir", str(out)]
    manifest.write_text(json.dumps(good) + "\n")
    assert main(argv) == 0
    (tmp_path / "truncated.png").write_bytes((tmp_path / "a.png").read_bytes()[:60])
    (tmp_path / "tiny.png").write_bytes(b"")
    Image.new("RGB", (1, 30)).save(tmp_path / "narrow.png")  # tiny:sd3 takes multiples of 2, up to 192 pixels
    Image.new("RGB", (200, 16)).save(tmp_path / "wide.png")
    bad_rows = [
        (
            {**good, "strength": 0.5},
            r"line 2: unknown field 'strength'; a row may set \['image', 'source_prompt', 'target_prompt'\]",
        ),
        ({**good, "image": "missing.png"}, r"line 2: image '.*missing.png' does not exist, expected an image file"),
        (
            {**good, "image": "truncated.png"},
            r"line 2: image '.*truncated.png' cannot be read \(.*\): expected a whole",
        ),
        ({**good, "image": "tiny.png"}, r"line 2: image '.*tiny.png' cannot be read"),
        (
            {**good, "image": "narrow.png"},
            r"line 2: image '.*narrow.png' is 1x30 pixels: each side must be at least 2, the model's multiple",
        ),
        ({**good, "image": "wide.png"}, r"line 2: image '.*wide.png' is 200x16 pixels: this model takes at most 192"),
        ({**good, "target_prompt": ""}, r"line 2: image '.*a.png' has no target_prompt: give `--target-prompt`"),
        ({"source_prompt": "x"}, r"line 2: `image` must be the path of an image file, got None"),
    ]
    before = snapshot(out)
    for row, message in bad_rows:
        manifest.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err and re.search(message, err.splitlines()[-1])
        assert snapshot(out) == before  # 0 files lost or changed


def run_until_signalled(argv: list[str], out, number: int):
    """`guided-edit` in a process of its own, sent `number` once two images are there."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[4]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.application.commands.edit", *argv],
        env=environment,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.png"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(number)
    return process.wait(timeout=300), process.communicate()[1]


def test_sigterm_stops_an_edit_run_with_one_line_and_it_resumes(tmp_path, capsys):
    import signal

    images = [write_image(tmp_path / f"{k}.png", seed=k) for k in range(24)]
    out = tmp_path / "out"
    argv = [
        *SMALL,
        "--source-prompt",
        "a",
        "--target-prompt",
        "b",
        "--iterations",
        "4",
        "--batch-size",
        "1",
        "--output-dir",
        str(out),
    ]
    for image in images:
        argv += ["--image", image]
    code, err = run_until_signalled(argv, out, signal.SIGTERM)
    done = len(list(out.glob("*.png")))
    assert code == 143 and "Traceback" not in err and 2 <= done < 24, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"guided-edit: interrupted by SIGTERM: {done} of 24 images are done in {str(out)!r}; run the same command "
        "again to resume"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [r["index"] for r in summary["images"]] == list(range(done))  # the summary says what is there
    kept = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    assert main(argv) == 0
    assert f"wrote {24 - done} images" in capsys.readouterr().out.splitlines()[-1]
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert len(json.loads((out / "summary.json").read_text())["images"]) == 24
