import json
import re
from pathlib import Path

import pytest
from PIL import Image

from pipelines.application.commands.arguments import make_guidance
from pipelines.application.commands.generate import build_parser, main


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_generates_images_results_and_prints_nfe(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    code = main(
        [
            "--model",
            "tiny:sd",
            "--prompts-file",
            str(prompts),
            "--prompt",
            "green",
            "--num-inference-steps",
            "4",
            "--height",
            "16",
            "--width",
            "16",
            "--batch-size",
            "2",
            "--output-dir",
            str(tmp_path / "out"),
            "--guidance",
            "cfg",
            "--guidance-scale",
            "5",
            "--guidance-start",
            "0.5",
        ]
    )
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert files == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(tmp_path / "out" / "00000.png").size == (16, 16)
    records = results(tmp_path / "out")
    assert [r["nfe"] for r in records] == [6.0] * 3  # 4 steps, guided at progress 2/3 and 1
    assert [r["prompt"] for r in records] == ["green", "a red circle", "a blue square"]
    assert records[0]["scales"] == [1.0, 1.0, 5.0, 5.0] and [r["seed"] for r in records] == [0, 1, 2]
    out = capsys.readouterr().out
    assert "wrote 3 images to" in out and "(0 already there" in out and "NFE per image: 6 (4 steps)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no prompts: give `--prompt`"),
        (["--prompt", "x", "--manifest", "m.jsonl"], "give either `--manifest` or prompts"),
        (["--manifest", "/no/such.jsonl"], "`--manifest` '/no/such.jsonl' does not exist"),
        (["--prompts-file", "/no/such/file.txt"], "`--prompts-file` '/no/such/file.txt' does not exist"),
        (["--prompt", "x", "--guidance-scale", "-2"], "`--guidance-scale` must be a finite number >= 0, got -2.0"),
        (["--prompt", "x", "--num-inference-steps", "0"], "`--num-inference-steps` must be an int >= 1, got 0"),
        (["--prompt", "x", "--batch-size", "0"], "`--batch-size` must be an int >= 1, got 0"),
        (["--prompt", "x", "--seed", "-1"], r"`--seed` must be an int in \[0, 9223372036854775807\], got -1"),
        (["--prompt", "x", "--height", "0"], "`--height` must be an int >= 1, got 0"),
        (
            ["--prompt", "x", "--height", "33"],
            r"`--height` must be a multiple of 8 \(the model's latent grid\), got 33",
        ),
        (["--prompt", "x", "--model", "tiny:sd4"], r"tiny:<family> takes a family in \['sd', 'sdxl', 'sd3', 'flux'\]"),
        (
            ["--prompt", "x", "--guidance", "linear-ag", "--model", "tiny:sd"],
            "guidance 'linear-ag' needs `--coefficients`, a folder written by guided-calibrate-linear-ag",
        ),
        (
            ["--prompt", "x", "--guidance", "linear-ag", "--num-inference-steps", "7"],
            "guidance 'linear-ag' needs `--coefficients`",  # none shipped for shapes:sd at 7 steps
        ),
        (
            ["--prompt", "x", "--guidance", "ag", "--threshold", "2"],
            r"`--threshold` must be a number in \(0, 1\], got 2.0",
        ),
        (["--prompt", "x", "--model", "shapes:xl"], r"shapes:<model> takes one of \['shapes:sd', 'shapes:sd3'\]"),
        (["--prompt", "x", "--model", "/no/such/model"], "is not an existing folder nor a hub id: '/no/such/model'"),
        (
            ["--prompt", "x", "--model", "tiny:sd", "--guidance", "dynamic"],
            r"dynamic guidance on 'tiny:sd' needs "
            r"evaluators \(`--evaluator`\): 'clip:<open_clip model",
        ),
        (
            ["--prompt", "x", "--model", "tiny:sd", "--guidance", "dynamic", "--evaluator", "clip"],
            r"evaluator 'clip' "
            r"is the shapes-world CLIP, for the shapes models; for 'tiny:sd' use 'clip:",
        ),
    ],
)
def test_bad_input_exits_with_the_message(argv, message, capsys, tmp_path):
    argv = argv if "--model" in argv else ["--model", "shapes:sd", *argv]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("guided-generate")]  # one line, no usage block
    assert "Traceback" not in err and line.startswith("guided-generate: error: ") and re.search(message, line)
    assert not (tmp_path / "out").exists()


def test_paths_that_are_not_what_they_should_be_are_named(tmp_path, capsys):
    """Failure 6 of the command-line issue: an output folder that is a file ("File exists"), one under a file ("Not a
    directory"), a binary prompts file ("'utf-8' codec can't decode ...") and `--manifest <folder>` ("does not exist")
    gave messages that named no path or argument."""
    (tmp_path / "file").write_text("mine")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    (tmp_path / "rows.jsonl").mkdir()
    prompt = ["--model", "tiny:sd", "--prompt", "a red circle"]
    cases = [
        (
            [*prompt, "--output-dir", str(tmp_path / "file")],
            f"`--output-dir` {str(tmp_path / 'file')!r} is a file, expected a folder",
        ),
        (
            [*prompt, "--output-dir", str(tmp_path / "file" / "out")],
            f"`--output-dir` {str(tmp_path / 'file' / 'out')!r} "
            f"cannot be made: {str(tmp_path / 'file')!r} is a file, not a folder",
        ),
        (
            ["--model", "tiny:sd", "--prompts-file", str(tmp_path / "binary.txt")],
            f"`--prompts-file` "
            f"{str(tmp_path / 'binary.txt')!r} is not UTF-8 text (byte 0 is 0x89): expected a text file",
        ),
        (
            ["--model", "tiny:sd", "--prompts-file", str(tmp_path)],
            f"`--prompts-file` {str(tmp_path)!r} is a folder, expected a file",
        ),
        (
            ["--model", "tiny:sd", "--manifest", str(tmp_path / "rows.jsonl")],
            f"`--manifest` {str(tmp_path / 'rows.jsonl')!r} is a folder, expected a file",
        ),
    ]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv if "--output-dir" in argv else [*argv, "--output-dir", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines() == [f"guided-generate: error: {message}"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and (tmp_path / "file").read_text() == "mine"


def test_the_model_must_be_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--prompt", "x"])
    assert exit_info.value.code == 2 and "the following arguments are required: --model" in capsys.readouterr().err


def test_help_documents_every_option():
    text = build_parser().format_help()
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    assert "--guidance-scale" in text and "--prompts-file" in text and "tiny:<sd|sdxl|sd3|flux>" in text


def test_adaptive_guidance_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--model",
        "shapes:sd",
        "--prompt",
        "a large red circle at the center on white",
        "--num-inference-steps",
        "4",
        "--output-dir",
    ]
    assert main(argv + [str(out), "--guidance", "ag", "--threshold", "1e-6", "--height", "16", "--width", "16"]) == 0
    assert Image.open(out / "00000.png").size == (16, 16)
    assert "NFE per image: 5 (4 steps)" in capsys.readouterr().out  # CFG at step 0 only
    (record,) = results(out)
    assert record["model"] == "shapes:sd" and record["scales"] == [7.5, 1.0, 1.0, 1.0]


def test_model_folder_family_comes_from_model_index(tmp_path, capsys):
    from pipelines.application.models import model_family

    with pytest.raises(ValueError, match="no readable model_index.json in this folder"):
        model_family(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match=r"is a KandinskyPipeline; supported: \['FluxPipeline'"):
        model_family(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(ValueError, match=r"is a WanPipeline, a video model: .* use GuidedWanPipeline from Python"):
        model_family(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "GuidedStableDiffusionXLPipeline"}')
    assert model_family(str(tmp_path)) == "sdxl"


def test_dynamic_guidance_with_the_shapes_clip(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "--model",
        "shapes:sd",
        "--prompt",
        "a large red circle at the center on white",
        "--guidance",
        "dynamic",
        "--candidates",
        "1",
        "5",
        "--evaluator",
        "clip",
        "--num-inference-steps",
        "4",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    (record,) = results(out)
    assert record["model"] == "shapes:sd" and record["nfe"] == 8.0
    assert set(record["scales"]) <= {1.0, 5.0}
    with pytest.raises(SystemExit):
        main([*argv, "--evaluator", "/no/such/evaluator"])
    assert "evaluator '/no/such/evaluator' is not one of 'clip:<open_clip model" in capsys.readouterr().err


def test_dynamic_guidance_defaults_to_the_shipped_latent_heads_for_shapes_sd(tmp_path):
    from guidance.evaluators import ClipEvaluator

    policy = make_guidance(build_parser().parse_args(["--guidance", "dynamic", "--model", "shapes:sd"]))
    assert [e.name for e in policy.evaluators] == ["shapes-sd-latent-clip", "shapes-sd-latent-fidelity"]
    assert all(e.space == "latent" for e in policy.evaluators) and policy.lookahead_kind == "next_latent"
    assert policy.config.candidates == [1.0, 3.0, 7.5, 11.0, 15.0]
    other = make_guidance(build_parser().parse_args(["--guidance", "dynamic", "--model", "shapes:sd3"]))
    assert [type(e) for e in other.evaluators] == [ClipEvaluator] and other.lookahead_kind == "x0"


def test_a_hub_id_is_loaded_as_the_family_its_model_index_names(tmp_path):
    """Failure 4 of the core v2 issue: a hub id was always read as SD 1.x. Offline, from a local hub cache that holds
    a tiny SDXL pipeline under a made-up id (no network)."""
    import os
    import subprocess
    import sys

    from conftest import build

    revision = "0123456789abcdef0123456789abcdef01234567"
    repository = tmp_path / "cache" / "models--local--tiny-sdxl"
    build("sdxl", guided=False).save_pretrained(repository / "snapshots" / revision)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    argv = [
        "--model",
        "local/tiny-sdxl",
        "--prompt",
        "a red circle",
        "--num-inference-steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.application.commands.generate", *argv],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[4],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NFE per image: 4 (2 steps)" in done.stdout
    assert Image.open(tmp_path / "out" / "00000.png").size == (16, 16)


def test_a_manifest_run_resumes_and_a_full_disk_exits_with_the_message(tmp_path, capsys, monkeypatch):
    import errno

    manifest = tmp_path / "rows.jsonl"
    rows = [{"prompt": "a red circle", "num_images": 2, "seed": 7}, {"prompt": "a blue square", "guidance": "none"}]
    manifest.write_text("\n".join(json.dumps(row) for row in rows))
    argv = [
        "--model",
        "tiny:sd",
        "--manifest",
        str(manifest),
        "--num-inference-steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    assert [(r["seed"], r["nfe"]) for r in results(tmp_path / "out")] == [(7, 4.0), (8, 4.0), (2, 2.0)]
    assert main(argv) == 0 and "wrote 0 images" in capsys.readouterr().out.splitlines()[-2]
    with pytest.raises(SystemExit):
        main([*argv, "--num-inference-steps", "3"])
    assert (
        "holds another run (num_inference_steps: 2 there, 3 now): use `--overwrite` to start over, or another "
        "folder" in capsys.readouterr().err
    )

    def full(image, handle, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    assert main([*argv, "--output-dir", str(tmp_path / "full")]) == 1
    assert "guided-generate: error: the disk is full: " in capsys.readouterr().err
