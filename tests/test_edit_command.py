"""`guided-edit`: single images and manifests, inversion with its latents, iterates, FlowEdit, and the errors."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from pipelines.application.commands.edit import build_parser, main

SMALL = ["--model", "tiny:sd3", "--num-inference-steps", "4", "--n-max", "3", "--max-sequence-length", "16"]


def write_image(path, size=(16, 16), seed=0):
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_edits_one_image_prints_residuals_and_nfe(tmp_path, capsys):
    image, out = write_image(tmp_path / "in.png"), tmp_path / "out"
    argv = [*SMALL, "--image", image, "--source-prompt", "a red circle", "--target-prompt", "a blue circle",
            "--iterations", "2", "--step-size", "0.05", "--save-iterates", "--output-dir", str(out)]  # fmt: skip
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
    argv = [*SMALL, "--invert", "--image", image, "--source-prompt", "a red circle", "--iterations", "3",
            "--step-size", "auto", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    latents = load_file(out / "00000-latents.safetensors")["latents"]
    assert latents.shape == (1, 4, 8, 8)
    record = json.loads((out / "summary.json").read_text())["images"][0]
    assert record["target_prompt"] is None and record["latents"] == "00000-latents.safetensors"
    assert all(b <= a for a, b in zip(record["residuals"], record["residuals"][1:], strict=False))


def test_flowedit_from_the_command_line(tmp_path):
    image, out = write_image(tmp_path / "in.png"), tmp_path / "out"
    argv = [*SMALL, "--method", "flowedit", "--image", image, "--source-prompt", "a red circle", "--target-prompt",
            "a blue circle", "--output-dir", str(out)]  # fmt: skip
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
        (["--image", "/no/such.png", "--source-prompt", "a", "--target-prompt", "b"], "'/no/such.png' does not exist"),
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
        ),  # fmt: skip
        (["--manifest", "/no/such.jsonl"], "`--manifest` '/no/such.jsonl' does not exist"),
        (["--manifest", "{bad_manifest}"], "`--manifest` line 1 is not JSON"),
        (["--step-size", "fast"], "argument --step-size: a positive number or 'auto', got 'fast'"),
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--step-size", "-1"],
            "`step_size` must be a positive number or 'auto', got -1.0",
        ),  # fmt: skip
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--n-max", "9"],
            r"`n_max` must be an int in \[1, num_inference_steps=4\], got 9",
        ),  # fmt: skip
        (["--method", "flowedit", "--iterations", "2"], r"\['--iterations'\] are FlowOpt options"),
        (["--method", "flowedit", "--invert"], r"\['--invert'\] are FlowOpt options"),
        (["--n-avg", "2"], r"\['--n-avg'\] are FlowEdit options"),
        (["--batch-size", "0"], "`--batch-size` must be >= 1, got 0"),
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--model", "tiny:sd"],
            r"is a sd model; editing needs a flow model: \['sd3', 'flux'\]",
        ),  # fmt: skip
        (
            ["--image", "{image}", "--source-prompt", "a", "--target-prompt", "b", "--embedded-guidance-scale", "2"],
            "`--embedded-guidance-scale` is for Flux's guidance embedding",
        ),  # fmt: skip
    ],
)
def test_bad_input_exits_with_the_message(tmp_path, capsys, argv, message):
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text("{not json\n")
    names = {"image": write_image(tmp_path / "in.png"), "bad_manifest": str(bad_manifest)}
    argv = [a.format(**names) for a in argv]
    model = [] if "--model" in argv else ["--model", "tiny:sd3"]
    with pytest.raises(SystemExit) as exit_info:
        main([*model, "--num-inference-steps", "4", "--n-max", "3", "--max-sequence-length", "16", *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_help_documents_every_option():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    text = parser.format_help()
    assert "--manifest" in text and "--save-iterates" in text and "'auto'" in text
