"""Self-NPO training: a run stopped and resumed gives the uninterrupted run's losses and adapter; the output is a LoRA
folder plain diffusers loads; the loss and the settings are checked."""

import json
import re

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import build, call_kwargs, seeded
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from guidance import ClassifierFreeGuidance
from pipelines.application.commands.train_npo import build_parser, main
from pipelines.testing import tiny_components
from pipelines.training.self_npo import (
    CheckpointMismatch,
    SelfNPOConfig,
    prepare_self_npo,
    pseudo_huber,
    train_self_npo,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SMALL = dict(
    steps=4, batch_size=2, pool_size=3, pool_steps=2, checkpoint_every=1, rank=2, lora_alpha=2.0, learning_rate=1e-2
)


def train(folder, stop_after=None, **overrides):
    pipe = build("sd")
    pipe.set_progress_bar_config(disable=True)
    return train_self_npo(
        pipe, PROMPTS, folder, SelfNPOConfig(**{**SMALL, **overrides}), stop_after=stop_after, progress=False
    )


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_stopped_run_resumes_exactly(tmp_path, accumulation):
    straight = train(tmp_path / "straight", gradient_accumulation_steps=accumulation)
    first = train(tmp_path / "resumed", stop_after=2, gradient_accumulation_steps=accumulation)
    assert not (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").exists()  # not finished yet
    second = train(tmp_path / "resumed", gradient_accumulation_steps=accumulation)
    assert len(first) == 2 and len(second) == 2
    np.testing.assert_allclose(first + second, straight, rtol=1e-5, atol=1e-7)
    a, b = (load_file(tmp_path / name / "pytorch_lora_weights.safetensors") for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "losses.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4]
    checkpoint = sorted(p.name for p in (tmp_path / "straight" / "checkpoint").iterdir())
    assert checkpoint == ["ema.safetensors", "optimizer.safetensors", "student.safetensors", "trainer.json"]
    with pytest.raises(
        CheckpointMismatch, match=r"holds a checkpoint of another run \(learning_rate: 0.01 there, 0.001 now\)"
    ):
        train(tmp_path / "resumed", learning_rate=1e-3, gradient_accumulation_steps=accumulation)


def test_the_adapter_loads_in_plain_diffusers_and_changes_the_model(tmp_path):
    train(tmp_path / "npo")
    pipe = StableDiffusionPipeline(**tiny_components("sd"))
    pipe.set_progress_bar_config(disable=True)
    before = pipe(**call_kwargs("sd", prompt="a red circle"), generator=seeded(0)).images
    pipe.load_lora_weights(tmp_path / "npo", adapter_name="npo")
    after = pipe(**call_kwargs("sd", prompt="a red circle"), generator=seeded(0)).images
    assert np.abs(after - before).max() > 1e-4
    assert "npo" in pipe.get_active_adapters()


def test_pseudo_huber_and_settings():
    x, target = torch.tensor([0.0, 3.0]), torch.tensor([0.0, 0.0])
    assert pseudo_huber(x, target, 0.001).item() == pytest.approx((np.sqrt(9 + 1e-6) - 0.001) / 2)
    with pytest.raises(ValueError, match="`steps` must be an int >= 1, got 0"):
        SelfNPOConfig(steps=0)
    with pytest.raises(ValueError, match="`ema_decay` must be in"):
        SelfNPOConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match=r"`mixed_precision` must be one of \['no', 'fp16', 'bf16'\]"):
        SelfNPOConfig(mixed_precision="fp8")


def test_command_line(tmp_path, capsys):
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    argv = [
        "--model",
        "tiny:sd",
        "--prompts-file",
        str(prompts),
        "--output-dir",
        str(tmp_path / "npo"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--pool-size",
        "2",
        "--pool-steps",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert (tmp_path / "npo" / "pytorch_lora_weights.safetensors").is_file()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "run.json").write_text('{"command": "guided-generate"}')
    assert "pipe.load_lora_weights(folder, adapter_name='npo')" in capsys.readouterr().out
    for bad, message in [
        (["--images", str(tmp_path)], "give `--prompts-file` (data-free) or `--images`"),
        (["--model", "tiny:flux"], "is a flux model; Self-NPO training takes SD 1.x/2.x, SDXL and SD3"),
        (["--rank", "0"], "`--rank` must be an int >= 1, got 0"),
        (["--seed", "-2"], "`--seed` must be an int in [0, 9223372036854775807], got -2"),
        (
            ["--output-dir", str(tmp_path / "images")],
            "`--output-dir` '{}' holds a guided-generate run: save".format(tmp_path / "images"),
        ),
    ]:
        with pytest.raises(SystemExit):
            main([*argv, *bad])
        assert message in capsys.readouterr().err


def test_generate_with_npo_on_every_method(tmp_path, capsys):
    from pipelines.application.commands.generate import main as generate

    train(tmp_path / "npo")
    argv = [
        "--model",
        "tiny:sd",
        "--prompt",
        "a red circle",
        "--num-inference-steps",
        "3",
        "--height",
        "16",
        "--width",
        "16",
        "--no-progress",
    ]
    for method in ("cfg", "ag", "scheduled"):
        plain, negative = tmp_path / f"{method}-plain", tmp_path / f"{method}-npo"
        assert generate([*argv, "--guidance", method, "--output-dir", str(plain)]) == 0
        assert (
            generate([*argv, "--guidance", method, "--output-dir", str(negative), "--npo", str(tmp_path / "npo")]) == 0
        )
        a, b = (np.asarray(PIL.Image.open(folder / "00000.png"), dtype=int) for folder in (plain, negative))
        assert np.abs(a - b).max() > 0, method
        record = json.loads((negative / "results.jsonl").read_text())
        assert record["policy"]["_class_name"] and json.loads((negative / "run.json").read_text())["npo"]
    with pytest.raises(SystemExit):
        generate([*argv, "--output-dir", str(tmp_path / "x"), "--npo", str(tmp_path / "nothing")])
    assert "`--npo` must be a folder holding a LoRA .safetensors file" in capsys.readouterr().err


def test_a_run_killed_with_sigkill_resumes_with_the_same_losses(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))

    def command(folder):
        return [
            sys.executable,
            "-m",
            "pipelines.application.commands.train_npo",
            "--model",
            "tiny:sd",
            "--prompts-file",
            str(prompts),
            "--output-dir",
            str(folder),
            "--steps",
            "12",
            "--batch-size",
            "2",
            "--pool-size",
            "3",
            "--pool-steps",
            "2",
            "--rank",
            "2",
            "--lora-alpha",
            "2",
            "--learning-rate",
            "0.01",
            "--checkpoint-every",
            "2",
            "--no-progress",
        ]

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "straight"), env=environment, cwd=root, check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=environment, cwd=root)

    def saved_step() -> int | None:
        """The step of the last checkpoint; during a save, `checkpoint` is briefly renamed `checkpoint.old`."""
        for name in ("checkpoint", "checkpoint.old"):
            try:
                return json.loads((killed / name / "trainer.json").read_text())["step"]
            except (FileNotFoundError, json.JSONDecodeError):
                continue
        return None

    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if (saved_step() or 0) >= 4:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = saved_step()
    assert 4 <= stopped_at < 12, "the run was not killed mid-way"
    subprocess.run(command(killed), env=environment, cwd=root, check=True, capture_output=True)

    def losses(folder):
        return {
            row["step"]: row["loss"] for row in map(json.loads, (folder / "losses.jsonl").read_text().splitlines())
        }

    straight, resumed = losses(tmp_path / "straight"), losses(killed)  # a step redone after the kill: its last loss
    assert sorted(resumed) == list(range(1, 13))
    np.testing.assert_allclose([resumed[k] for k in range(1, 13)], [straight[k] for k in range(1, 13)], rtol=1e-5)
    a, b = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (tmp_path / "straight", killed))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_processes_train_like_one(tmp_path):
    """accelerate launch with two CPU processes: each takes half of every step's batch; the averaged gradients give
    the one-process run's losses and adapter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    args = [
        "--model",
        "tiny:sd",
        "--prompts-file",
        str(prompts),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--pool-size",
        "4",
        "--pool-steps",
        "2",
        "--rank",
        "2",
        "--lora-alpha",
        "2",
        "--learning-rate",
        "0.01",
        "--no-progress",
    ]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
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
        "pipelines.application.commands.train_npo",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [*launch, *args, "--output-dir", str(tmp_path / "two")],
        env=environment,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    def losses(folder):
        return [json.loads(line)["loss"] for line in (folder / "losses.jsonl").read_text().splitlines()]

    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    a, b = (load_file(tmp_path / name / "pytorch_lora_weights.safetensors") for name in ("one", "two"))
    worst = max((a[k] - b[k]).abs().max().item() / a[k].abs().max().clamp_min(1e-8).item() for k in a)
    assert worst < 1e-3, worst  # Adam divides tiny gradients by their own size: summation order shows, barely


@pytest.mark.parametrize(
    ("family", "overrides", "extra"),
    [
        ("sdxl", {"teacher_weight": -5.0}, {}),  # the public code's SDXL weight
        ("sd3", {"target_modules": ["to_q", "to_k", "to_v"]}, {"max_sequence_length": 16}),  # x0 from the velocity
    ],
)
def test_sdxl_and_sd3_train_and_their_adapters_load_in_diffusers(tmp_path, family, overrides, extra):
    from conftest import REFERENCE

    pipe = build(family)
    pipe.set_progress_bar_config(disable=True)
    losses = train_self_npo(pipe, PROMPTS, tmp_path, SelfNPOConfig(**{**SMALL, **overrides}), progress=False, **extra)
    assert len(losses) == 4 and all(np.isfinite(losses))
    plain = REFERENCE[family][0](**tiny_components(family))
    plain.set_progress_bar_config(disable=True)
    before = plain(**call_kwargs(family, prompt="a red circle"), generator=seeded(0)).images
    plain.load_lora_weights(tmp_path, adapter_name="npo")
    after = plain(**call_kwargs(family, prompt="a red circle"), generator=seeded(0)).images
    assert np.abs(after - before).max() > 1e-4


def test_full_fine_tuning_resumes_exactly_and_writes_a_denoiser(tmp_path):
    from diffusers import UNet2DConditionModel

    from guidance import SeparateModel

    straight = train(tmp_path / "straight", full=True)
    first = train(tmp_path / "resumed", stop_after=2, full=True)
    second = train(tmp_path / "resumed", full=True)
    np.testing.assert_allclose(first + second, straight, rtol=1e-5, atol=1e-7)
    negative = UNet2DConditionModel.from_pretrained(tmp_path / "resumed" / "unet")
    base = build("sd")
    changed = [n for n, p in negative.named_parameters() if not torch.equal(p, dict(base.unet.named_parameters())[n])]
    assert changed  # the whole denoiser was trained
    out = base(
        **call_kwargs("sd", prompt="a red circle"),
        generator=seeded(0),
        guidance=ClassifierFreeGuidance(4.0, unconditional=SeparateModel(negative)),
    )
    assert np.isfinite(out.images).all()


def test_the_public_codes_defaults_come_from_one_place():
    """Issue 21, items 2 and 6: `--full` kept the LoRA learning rate 1e-4 (the public code uses 1e-6 for a full
    fine-tune), and from Python SDXL got teacher weight -1 and weight decay 1e-3 (the public code: -5 and 0)."""
    assert SelfNPOConfig().resolved("sd") == SelfNPOConfig(learning_rate=1e-4, weight_decay=1e-3, teacher_weight=-1.0)
    assert SelfNPOConfig().resolved("sdxl") == SelfNPOConfig(learning_rate=1e-4, weight_decay=0.0, teacher_weight=-5.0)
    assert SelfNPOConfig(full=True).resolved("sd").learning_rate == 1e-6
    assert SelfNPOConfig(full=True, learning_rate=3e-5).resolved("sdxl").learning_rate == 3e-5  # given: kept
    args = build_parser().parse_args(["--model", "tiny:sdxl", "--output-dir", "x", "--full"])
    from dataclasses import fields

    assert SelfNPOConfig(**{f.name: getattr(args, f.name) for f in fields(SelfNPOConfig)}) == SelfNPOConfig(full=True)


def test_sdxl_from_python_trains_with_the_public_codes_weight_and_decay(tmp_path):
    prepared = prepare_self_npo(build("sdxl"), PROMPTS, tmp_path, SelfNPOConfig(**SMALL))
    config = prepared.trainer.config
    assert (config.teacher_weight, config.weight_decay) == (-5.0, 0.0)
    assert prepared.trainer.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert prepared.trainer.pool is None  # nothing generated before `train`


def test_another_runs_checkpoint_is_refused_before_the_pool(tmp_path, capsys):
    """Failure 4 of the command-line issue: into a folder holding another run's checkpoint, other prompts with the
    same settings reported success without training on them; other settings, another model or a truncated checkpoint
    printed a raw traceback, after generating the sample pool."""
    prompts, other = tmp_path / "prompts.txt", tmp_path / "other.txt"
    prompts.write_text("\n".join(PROMPTS))
    other.write_text("a purple star\n")
    out = tmp_path / "npo"
    argv = [
        "--model",
        "tiny:sd",
        "--prompts-file",
        str(prompts),
        "--output-dir",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--pool-size",
        "2",
        "--pool-steps",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    refused = [
        (
            ["--prompts-file", str(other)],
            r"holds a checkpoint of another run \(prompts: '[0-9a-f]{12}\.\.\.' there, "
            r"'[0-9a-f]{12}\.\.\.' now\): resume it with the command that started it, start over with `--overwrite`",
        ),
        (["--rank", "4"], r"holds a checkpoint of another run \(rank: 8 there, 4 now\)"),
        (
            ["--model", "tiny:sdxl"],
            r"holds a checkpoint of another run \(denoiser: 'UNet2DConditionModel [0-9a-f]+' there, .*"
            r"model: 'tiny:sd' there, 'tiny:sdxl' now; teacher_weight: -1.0 there, -5.0 now; "
            r"weight_decay: 0.001 there, 0.0 now\)",
        ),
    ]
    for extra, message in refused:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert re.search(rf"^guided-train-npo: error: `--output-dir` '{out}' {message}", err.splitlines()[-1])
        assert {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    with pytest.raises(CheckpointMismatch, match="holds a checkpoint of another run"):  # before any sample is drawn
        prepare_self_npo(build("sd"), ["a purple star"], out, SelfNPOConfig(**SMALL), run={"model": "tiny:sd"})
    student = out / "checkpoint" / "student.safetensors"
    student.write_bytes(student.read_bytes()[:100])
    with pytest.raises(SystemExit):
        main(argv)
    assert re.search(
        r"holds a damaged checkpoint \(SafetensorError: .*\): start over with `--overwrite`, or use "
        "another `--output-dir`$",
        capsys.readouterr().err.splitlines()[-1],
    )
    first = json.loads((out / "checkpoint" / "trainer.json").read_text())["run"]["prompts"]
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--prompts-file", str(other), "--overwrite"]) == 0
    saved = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert saved["step"] == 2 and saved["run"]["prompts"] != first  # trained anew, on the new prompts
    assert (out / "notes.txt").read_text() == "mine"  # only what a training run writes is removed
    (out / "checkpoint").rename(tmp_path / "moved")
    with pytest.raises(SystemExit):
        main([*argv, "--prompts-file", str(other)])
    assert "holds trained weights (pytorch_lora_weights.safetensors) but no checkpoint" in capsys.readouterr().err


def test_sigint_stops_training_with_one_line_and_the_same_command_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "npo"
    command = [
        sys.executable,
        "-m",
        "pipelines.application.commands.train_npo",
        "--model",
        "tiny:sd",
        "--prompts-file",
        str(prompts),
        "--output-dir",
        str(out),
        "--steps",
        "40",
        "--batch-size",
        "2",
        "--pool-size",
        "3",
        "--pool-steps",
        "2",
        "--rank",
        "2",
        "--checkpoint-every",
        "2",
        "--no-progress",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=environment, cwd=root, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (
        not (out / "checkpoint" / "trainer.json").is_file() and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    saved = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    assert re.fullmatch(
        rf"guided-train-npo: interrupted by SIGINT at step \d+ of 40; the checkpoint "
        rf"'{out}/checkpoint' holds step {saved}: run the same command again to resume from it",
        err.strip().splitlines()[-1],
    )
    assert saved < 40
    finished = subprocess.run(command, env=environment, cwd=root, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    logged = [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 41))


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_video_models_train_data_free_and_the_adapter_guides_them(tmp_path, family):
    """The paper's video case (CogVideoX, v prediction) and Wan (flow matching): latents with a frame axis."""
    from guidance import ClassifierFreeGuidance, NegativeAdapter, load_npo_adapter
    from pipelines.families import guided_class

    def build_video():
        pipe = guided_class(family)(**tiny_components(family))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    size = {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16}
    pipe = build_video()
    losses = train_self_npo(pipe, PROMPTS, tmp_path, SelfNPOConfig(**SMALL), progress=False, **size)
    assert len(losses) == 4 and all(np.isfinite(losses))
    keys = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert keys and all(key.startswith("transformer.") for key in keys)
    guided = build_video()
    call = {"prompt": "a red circle", **size, "num_inference_steps": 2, "output_type": "np"}
    before = guided(**call, generator=seeded(0), guidance=ClassifierFreeGuidance(5.0)).frames
    load_npo_adapter(guided, tmp_path)
    policy = ClassifierFreeGuidance(5.0, unconditional=NegativeAdapter("npo"))
    after = guided(**call, generator=seeded(0), guidance=policy).frames
    assert np.abs(after - before).max() > 1e-4
    batch = {**call, "prompt": ["a red circle", "a blue square"], "negative_prompt": ["", "blurry"]}
    frames = guided(**batch, num_videos_per_prompt=2, generator=seeded(1), guidance=policy).frames
    assert len(frames) == 4 and np.isfinite(frames).all()
    with pytest.raises(
        ValueError, match=r"takes SD 1.x/2.x, SDXL, SD3, Wan or CogVideoX pipelines, got GuidedFluxPip"
    ):
        train_self_npo(build("flux"), PROMPTS, tmp_path / "x", SelfNPOConfig(**SMALL))
    with pytest.raises(ValueError, match=r"`images` \(captioned images\) are for image models"):
        train_self_npo(build_video(), PROMPTS, tmp_path / "x", SelfNPOConfig(**SMALL), images=[object()], **size)
