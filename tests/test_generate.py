import json
import re
from pathlib import Path

import pytest
from PIL import Image

from pipelines.commands.generate import build_parser, main, make_guidance


def test_generates_images_trace_and_prints_nfe(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    code = main(
        [
            "--model", "tiny:sd", "--prompts-file", str(prompts), "--prompt", "green", "--num-inference-steps", "4",
            "--height", "16", "--width", "16", "--batch-size", "2", "--output-dir", str(tmp_path / "out"),
            "--guidance", "cfg", "--guidance-scale", "5", "--guidance-start", "0.5",
        ]
    )  # fmt: skip
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert files == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(tmp_path / "out" / "00000.png").size == (16, 16)
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert trace["nfe_per_image"] == 6.0  # 4 steps, guided at progress 2/3 and 1
    assert [r["prompt"] for r in trace["images"]] == ["green", "a red circle", "a blue square"]
    assert trace["images"][0]["scales"] == [1.0, 1.0, 5.0, 5.0]
    out = capsys.readouterr().out
    assert "wrote 3 images to" in out and "NFE per image: 6 (4 steps)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no prompts: give `--prompt`"),
        (["--prompts-file", "/no/such/file.txt"], "`--prompts-file` '/no/such/file.txt' does not exist"),
        (["--prompt", "x", "--guidance-scale", "-2"], "`guidance_scale` must be a finite number >= 0, got -2.0"),
        (["--prompt", "x", "--num-inference-steps", "0"], "`--num-inference-steps` must be >= 1, got 0"),
        (["--prompt", "x", "--model", "tiny:sd4"], r"tiny:<family> takes a family in \['sd', 'sdxl', 'sd3', 'flux'\]"),
        (
            ["--prompt", "x", "--guidance", "linear-ag", "--model", "tiny:sd"],
            "`--guidance linear-ag` needs `--coefficients FOLDER`",
        ),
        (
            ["--prompt", "x", "--guidance", "linear-ag", "--num-inference-steps", "7"],
            "`--guidance linear-ag` needs `--coefficients FOLDER`",  # none shipped for shapes:sd at 7 steps
        ),
        (
            ["--prompt", "x", "--guidance", "ag", "--threshold", "2"],
            r"`threshold` must be a number in \(0, 1\], got 2.0",
        ),
        (["--prompt", "x", "--model", "shapes:xl"], r"shapes:<model> takes one of \['shapes:sd', 'shapes:sd3'\]"),
        (["--prompt", "x", "--model", "/no/such/model"], "is not an existing folder nor a hub id: '/no/such/model'"),
    ],
)
def test_bad_input_exits_with_the_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_help_documents_every_option():
    text = build_parser().format_help()
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    assert "--guidance-scale" in text and "--prompts-file" in text and "tiny:<sd|sdxl|sd3|flux>" in text


def test_adaptive_guidance_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--prompt", "a large red circle at the center on white", "--num-inference-steps", "4", "--output-dir"]
    assert main(argv + [str(out), "--guidance", "ag", "--threshold", "1e-6", "--height", "16", "--width", "16"]) == 0
    assert Image.open(out / "00000.png").size == (16, 16)
    assert "NFE per image: 5 (4 steps)" in capsys.readouterr().out  # CFG at step 0 only
    trace = json.loads((out / "trace.json").read_text())
    assert trace["model"] == "shapes:sd" and trace["images"][0]["scales"] == [7.5, 1.0, 1.0, 1.0]


def test_model_folder_family_comes_from_model_index(tmp_path, capsys):
    from pipelines.loading import model_family

    with pytest.raises(ValueError, match="no readable model_index.json in this folder"):
        model_family(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match=r"is a KandinskyPipeline; supported: \['FluxPipeline'"):
        model_family(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "GuidedStableDiffusionXLPipeline"}')
    assert model_family(str(tmp_path)) == "sdxl"


def test_dynamic_guidance_with_the_shapes_clip(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--prompt", "a large red circle at the center on white", "--guidance", "dynamic", "--candidates", "1",
            "5", "--evaluator", "clip", "--num-inference-steps", "4", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace["model"] == "shapes:sd" and trace["nfe_per_image"] == 8.0
    assert set(trace["images"][0]["scales"]) <= {1.0, 5.0}
    with pytest.raises(SystemExit):
        main([*argv, "--evaluator", "/no/such/evaluator"])
    assert "evaluator '/no/such/evaluator' is neither 'clip'" in capsys.readouterr().err


def test_dynamic_guidance_defaults_to_the_shipped_latent_heads_for_shapes_sd(tmp_path):
    from guidance.evaluators import ClipEvaluator

    policy = make_guidance(build_parser().parse_args(["--guidance", "dynamic"]))
    assert [e.name for e in policy.evaluators] == ["shapes-sd-latent-clip", "shapes-sd-latent-fidelity"]
    assert all(e.space == "latent" for e in policy.evaluators) and policy.lookahead_kind == "next_latent"
    assert policy.config.candidates == [1.0, 3.0, 7.5, 11.0, 15.0]
    other = make_guidance(build_parser().parse_args(["--guidance", "dynamic", "--model", str(tmp_path)]))
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
    argv = ["--model", "local/tiny-sdxl", "--prompt", "a red circle", "--num-inference-steps", "2", "--height", "16",
            "--width", "16", "--output-dir", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "pipelines.commands.generate", *argv], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NFE per image: 4 (2 steps)" in done.stdout
    assert Image.open(tmp_path / "out" / "00000.png").size == (16, 16)
