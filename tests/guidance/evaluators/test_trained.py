"""The trained evaluators: their training command, saving and loading, and errors naming the rebuild command."""

import json

import pytest
import torch
from conftest import call_kwargs, seeded

from guidance import DynamicGuidance
from guidance.evaluators import Candidates
from guidance.evaluators.discriminator import FidelityDiscriminator
from guidance.evaluators.latent import LatentEvaluator
from guidance.evaluators.networks import ConvEncoder
from pipelines.commands.train_evaluators import main

TINY = ["--model", "tiny:sd", "--num-generated", "8", "--num-real", "16", "--num-inference-steps", "2",
        "--batch-size", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluators")
    ck = ["--checkpoints", str(root / "checkpoints")]
    assert main(["discriminator", "--output", str(root / "fidelity"), "--steps", "30", *TINY, *ck]) == 0
    teacher = f"discriminator:{root / 'fidelity'}"
    assert main(["latent", "--teacher", teacher, "--output", str(root / "latent"), "--steps", "3", *TINY, *ck]) == 0
    clip_argv = ["latent", "--teacher", "clip", "--output", str(root / "latent-clip"), "--steps", "2", "--width", "8"]
    assert main([*clip_argv, *TINY, *ck]) == 0
    return root


def test_network_widths_default_small_for_latent_heads_and_follow_width(trained):
    widths = {name: json.loads((trained / name / "config.json").read_text())["width"] for name in
              ("fidelity", "latent", "latent-clip")}  # fmt: skip
    assert widths == {"fidelity": 32, "latent": 16, "latent-clip": 8}


def test_discriminator_learns_real_from_generated_and_round_trips(trained):
    from guidance.shapes.assets import load_world

    discriminator = FidelityDiscriminator.from_pretrained(trained / "fidelity")
    world = load_world()
    real = world.render(world.sample(16, seeded(9)), seeded(9))
    noise = torch.rand(16, 3, 32, 32) * 2 - 1
    assert discriminator.logits(real).mean() > discriminator.logits(noise).mean()
    candidates = Candidates(torch.zeros(16, 4, 2, 2), torch.zeros(16), decode=lambda _: real)
    torch.testing.assert_close(discriminator.score(candidates), discriminator.logits(real))


def test_latent_evaluators_drive_dynamic_guidance_without_decoding(trained, sd_pipe):
    score = LatentEvaluator.from_pretrained(trained / "latent", name="fidelity")
    clip = LatentEvaluator.from_pretrained(trained / "latent-clip")
    assert score.kind == "score" and clip.kind == "clip" and clip.teacher == "shapes-clip"
    decoded = []
    original = sd_pipe.decode_for_guidance
    sd_pipe.decode_for_guidance = lambda *a, **k: decoded.append(1) or original(*a, **k)
    try:
        policy = DynamicGuidance(evaluators=[score, clip], lookahead="next_latent")
        kwargs = call_kwargs("sd", prompt=["a red circle", "a blue square"], height=None, width=None)
        result = sd_pipe(**kwargs, guidance=policy)
        with pytest.raises(ValueError, match=r"evaluator 'fidelity' reads latents of shape \(4, 16, 16\) \(the model"):
            sd_pipe(**call_kwargs("sd", prompt="a"), guidance=policy)  # 16 px images: 8x8 latents
    finally:
        del sd_pipe.decode_for_guidance
    assert decoded == [] and result.trace.nfe == 6.0
    assert set(result.trace.extras[1]["weights"]) == {"fidelity", "latent-clip"}
    assert all(s in [1.0, 3.0, 7.5, 11.0, 15.0] for step in result.trace.scales for s in step)


def test_latent_head_is_timestep_aware():
    torch.manual_seed(0)
    network = ConvEncoder(4, 8, 1, timestep_aware=True)
    latents = torch.randn(2, 4, 8, 8)
    assert not torch.equal(network(latents, torch.tensor([0.0, 0.0])), network(latents, torch.tensor([900.0, 900.0])))
    with pytest.raises(ValueError, match=r"this network is timestep-aware: pass the latents' `timestep`"):
        network(latents)
    with pytest.raises(ValueError, match=r"`size` must be a power of two >= 4, got 12"):
        ConvEncoder(4, 12, 1)


def test_missing_or_corrupt_files_name_the_rebuild_command(trained, tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"fidelity discriminator file .*config.json' is missing; rebuild it "
        r"with `guided-train-evaluator discriminator`",
    ):
        FidelityDiscriminator.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"in_channels": 4, "size": 8, "out_dim": 1, "width": 4}')
    (tmp_path / "model.safetensors").write_bytes((trained / "latent" / "model.safetensors").read_bytes())
    with pytest.raises(
        ValueError,
        match=r"latent evaluator in .* is corrupt \(.*\); rebuild it with "
        r"`guided-train-evaluator latent`",
    ):
        LatentEvaluator.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is corrupt \(no latent evaluator config\)"):
        LatentEvaluator.from_pretrained(trained / "fidelity")
    with pytest.raises(ValueError, match=r"`kind` must be one of \['clip', 'score'\], got 'x'"):
        LatentEvaluator(ConvEncoder(4, 8, 1), "x")
    with pytest.raises(ValueError, match=r"`teacher` \(the CLIP whose text tower scores"):
        LatentEvaluator(ConvEncoder(4, 8, 1), "clip")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["latent", "--teacher", "judge", "--output", "x"], r"`--teacher` must be 'clip', 'clip:<model>' or "),
        (["discriminator", "--real", "/no/such", "--output", "x"], r"`--real` must be 'shapes-world' or a folder"),
        (["discriminator", "--steps", "0", "--output", "x"], r"`--steps` must be >= 1, got 0"),
        (["latent", "--width", "0", "--output", "x"], r"`--width` must be >= 1, got 0"),
        (["discriminator", "--prompts-file", "/no/file", "--output", "x"], r"`--prompts-file` '/no/file' does not"),
        (
            ["discriminator", "--model", "tiny:flux", "--output", "x"],
            r"evaluators can be trained for SD, SDXL and SD3",
        ),
    ],
)
def test_training_command_rejects_bad_input(argv, message, tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    argv = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in argv]
    args = [*argv, "--num-generated", "2", "--num-real", "2", "--num-inference-steps", "1"]
    args += [] if "--steps" in argv else ["--steps", "1"]
    args += [] if "--model" in argv else ["--model", "tiny:sd"]
    with pytest.raises(ValueError, match=message):
        main([*args, "--checkpoints", str(tmp_path)])


def test_discriminator_reads_real_images_from_a_folder(tmp_path):
    from PIL import Image

    for k in range(3):
        Image.new("RGB", (20, 20), (40 * k, 90, 200)).save(tmp_path / f"{k}.png")
    args = ["discriminator", "--real", str(tmp_path), "--output", str(tmp_path / "out"), "--steps", "2", *TINY,
            "--checkpoints", str(tmp_path / "ck")]  # fmt: skip
    assert main(args) == 0 and (tmp_path / "out" / "model.safetensors").is_file()
