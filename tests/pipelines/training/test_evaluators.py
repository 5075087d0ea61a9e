"""Training dynamic guidance's evaluators: the discriminator and the latent heads (pipelines.training.evaluators),
their command, saving and loading, and errors naming the rebuild command."""

import json

import pytest
import torch
from conftest import call_kwargs, seeded

from guidance import DynamicGuidance
from guidance.evaluators import Candidates
from guidance.evaluators.discriminator import FidelityDiscriminator
from guidance.evaluators.latent import LatentEvaluator
from guidance.evaluators.networks import ConvEncoder
from guidance.shapes.assets import ASSETS
from pipelines.application.commands.train_evaluator import main

TINY = [
    "--model",
    "tiny:sd",
    "--num-generated",
    "8",
    "--num-real",
    "16",
    "--num-inference-steps",
    "2",
    "--batch-size",
    "8",
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return ["--prompts-file", str(path)]


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("real")
    for k in range(3):
        Image.new("RGB", (20, 20), (40 * k, 90, 200)).save(folder / f"{k}.png")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prompts, real_folder):
    root = tmp_path_factory.mktemp("evaluators")
    common = [*TINY, *prompts, "--real", str(real_folder), "--checkpoints", str(root / "checkpoints")]
    main(["discriminator", "--output", str(root / "fidelity"), "--steps", "30", *common])
    teacher = f"discriminator:{root / 'fidelity'}"
    main(["latent", "--teacher", teacher, "--output", str(root / "latent"), "--steps", "3", *common])
    clip = f"clip:local-dir:{ASSETS / 'shapes-clip'}"
    main(["latent", "--teacher", clip, "--output", str(root / "latent-clip"), "--steps", "2", "--width", "8", *common])
    return root


def test_the_command_writes_every_evaluator_with_its_width(trained):
    widths = {
        name: json.loads((trained / name / "config.json").read_text())["width"]
        for name in ("fidelity", "latent", "latent-clip")
    }
    assert widths == {"fidelity": 32, "latent": 16, "latent-clip": 8}


def test_discriminator_learns_real_from_generated_and_round_trips(trained, real_folder):
    from pipelines.application.commands.train_evaluator import folder_images

    discriminator = FidelityDiscriminator.from_pretrained(trained / "fidelity")
    real = folder_images(str(real_folder), 32)
    noise = torch.rand(3, 3, 32, 32, generator=seeded(9)) * 2 - 1
    assert discriminator.logits(real).mean() > discriminator.logits(noise).mean()
    candidates = Candidates(torch.zeros(3, 4, 2, 2), torch.zeros(3), decode=lambda _: real)
    torch.testing.assert_close(discriminator.score(candidates), discriminator.logits(real))


def test_latent_evaluators_drive_dynamic_guidance_without_decoding(trained, sd_pipe):
    score = LatentEvaluator.from_pretrained(trained / "latent", name="fidelity")
    clip = LatentEvaluator.from_pretrained(trained / "latent-clip")
    assert score.kind == "score" and clip.kind == "clip" and clip.teacher == f"local-dir:{ASSETS / 'shapes-clip'}"
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


def test_a_head_saved_beside_its_clip_finds_it_from_anywhere(trained, tmp_path):
    import shutil

    shutil.copytree(ASSETS / "shapes-clip", tmp_path / "shapes-clip")
    shutil.copytree(trained / "latent-clip", tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    (tmp_path / "head" / "config.json").write_text(json.dumps({**config, "teacher": "local-dir:../shapes-clip"}))
    head = LatentEvaluator.from_pretrained(tmp_path / "head")
    assert head.teacher == f"local-dir:{tmp_path / 'shapes-clip'}"
    shipped = LatentEvaluator.from_pretrained(ASSETS / "shapes-sd-latent-clip")
    assert shipped.teacher == f"local-dir:{ASSETS / 'shapes-clip'}"


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
        match=r"latent evaluator in .* is corrupt \(.*\); rebuild it with `guided-train-evaluator latent`",
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
        (["latent", "--teacher", "judge"], r"`--teacher`: evaluator 'judge' is not one of 'clip:<open_clip model>@"),
        (["latent", "--teacher", "hpsv2:"], r"`--teacher`: evaluator 'hpsv2:' needs what it loads after the colon"),
        (["latent", "--teacher", "hpsv2:/no/file.pt"], r"`checkpoint` must be a .safetensors file of the HPSv2"),
        (
            ["latent", "--teacher", str(ASSETS / "shapes-sd-latent-clip")],
            r"is a latent head: a head is distilled from",
        ),
        (
            ["discriminator", "--resolution", "33"],
            r"`--resolution` must be a multiple of 2 \(the model's latent grid\)",
        ),
        (["latent"], r"`--teacher` is required for `latent`"),
        (["latent", "--teacher", "clip"], r"`--teacher`: evaluator 'clip' is the shapes-world CLIP, for the shapes"),
        (["discriminator", "--real", "/no/such"], r"`--real` must be a folder of \['.png'"),
        (["discriminator", "--real", None], r"`--real` is required for 'tiny:sd': a folder of real images"),
        (["discriminator", "--steps", "0"], r"`--steps` must be an int >= 1, got 0"),
        (["latent", "--width", "0", "--teacher", "judge"], r"`--width` must be an int >= 1, got 0"),
        (["discriminator", "--prompts-file", "/no/file"], r"`--prompts-file` '/no/file' does not exist"),
        (["discriminator", "--prompts-file", None], r"`--prompts-file` is required for 'tiny:sd'"),
    ],
)
def test_training_command_rejects_bad_input(argv, message, tmp_path, prompts, real_folder, capsys):
    left_out = {
        option for option, value in zip(argv, argv[1:], strict=False) if value is None
    }  # `--option None`: not given
    given = [a for a in argv if a is not None and a not in left_out]
    args = [
        *given,
        "--output",
        str(tmp_path / "out"),
        "--num-generated",
        "2",
        "--num-real",
        "2",
        "--num-inference-steps",
        "1",
        "--checkpoints",
        str(tmp_path),
    ]
    args += [] if "--steps" in argv else ["--steps", "1"]
    args += [] if "--model" in argv else ["--model", "tiny:sd"]
    args += [] if "--prompts-file" in argv else prompts
    args += [] if "--real" in argv else ["--real", str(real_folder)]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2 and message and __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_the_shapes_world_draws_new_real_images_and_the_shapes_clip_teaches(tmp_path):
    from pipelines.application.commands.train_evaluator import prompts_of, real_images, teacher_of

    args = __import__("argparse").Namespace(
        model="shapes:sd",
        real=None,
        prompts_file=None,
        num_real=4,
        seed=0,
        teacher="clip",
        output=str(ASSETS / "shapes-sd-latent-clip"),
    )
    draw = real_images(args, 32, fresh=True)
    first, second = draw(seeded(1), 3), draw(seeded(2), 3)
    assert first.shape == (3, 3, 32, 32) and not torch.equal(first, second)
    assert real_images(args, 16, fresh=False).shape == (4, 3, 16, 16)
    assert len(prompts_of(args)) > 100 and teacher_of(args)[1] == "local-dir:../shapes-clip"  # as shipped


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_head_distilled_on_every_family_reports_its_agreement_and_guides_that_family(
    family, tmp_path, prompts, real_folder, capsys
):
    import re

    from conftest import build

    from guidance.evaluators.testing import tiny_open_clip
    from pipelines.schedulers import set_scheduler

    clip = tiny_open_clip(tmp_path / "clip", "ViT-L-14", "openai")
    argv = ["latent", "--model", f"tiny:{family}", "--teacher", f"clip:{clip}", "--output", str(tmp_path / "head")]
    argv += [*TINY[2:], "--resolution", "32", "--steps", "4", "--width", "8", *prompts, "--real", str(real_folder)]
    assert main([*argv, "--checkpoints", str(tmp_path / "checkpoints")]) == 0
    printed = capsys.readouterr().out
    agreement = re.search(
        r"on (\d+) held-out images its image embeddings have cosine (-?[\d.]+) with the teacher's "
        r"\(a constant embedding: (-?[\d.]+)\)",
        printed,
    )
    assert agreement and int(agreement[1]) == 2  # a fifth of the 8 generated and 3 real images
    assert all(-1 <= float(value) <= 1 for value in agreement.groups()[1:])
    head = LatentEvaluator.from_pretrained(tmp_path / "head")
    assert head.teacher == clip and head.network.config["in_channels"] == build(family).vae.config.latent_channels
    pipe = build(family)
    pipe.decode_for_guidance = None  # a latent evaluator never decodes
    policy = DynamicGuidance(candidates=[1.0, 5.0], evaluators=[head], lookahead="next_latent")
    result = pipe(
        **call_kwargs(family, prompt=["a red circle", "a blue square"], height=32, width=32), guidance=policy
    )
    assert all(scale in (1.0, 5.0) for step in result.trace.scales for scale in step)
    assert set(result.trace.extras[0]["weights"]) == {"latent-clip"}
    if family != "flux":  # diffusers' FluxPipeline takes neither Heun nor a multistep diffusion scheduler
        set_scheduler(pipe, {"sdxl": "dpm++2m", "sd3": "flow-heun"}[family])
    negatives = ["", "blurry"]
    kwargs = call_kwargs(family, prompt=["a red circle", "a blue square"], height=32, width=32)
    result = pipe(**kwargs, negative_prompt=negatives, num_images_per_prompt=2, guidance=policy)
    assert len(result.images) == 4 and all(len(step) == 4 for step in result.trace.scales)
    assert all(scale in (1.0, 5.0) for step in result.trace.scales for scale in step)


def test_distillation_refuses_what_it_cannot_learn_from(sd_pipe):
    from guidance.evaluators import RewardEvaluator
    from pipelines.training.evaluators import EvaluatorTraining, distill_latent_head, fit_latent_head, teacher_targets

    head = LatentEvaluator(ConvEncoder(4, 8, 1), "score")
    images = torch.zeros(4, 3, 16, 16)
    with pytest.raises(TypeError, match=r"`teacher` must be a pixel Evaluator \(it scores the clean images\), got a"):
        teacher_targets(head, images)
    with pytest.raises(TypeError, match=r"`teacher` must be a pixel Evaluator .*, got int"):
        teacher_targets(3, images)
    brightness = RewardEvaluator(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    with pytest.raises(ValueError, match=r"`prompts` must hold one prompt per image \(4\), got 1"):
        teacher_targets(brightness, images, ["a"])
    training = EvaluatorTraining("t", 1, None, 2, 1e-3, 8, 0)
    with pytest.raises(ValueError, match=r"latent heads read square latents; got \(8, 4\) \(use square images\)"):
        fit_latent_head(sd_pipe, torch.zeros(2, 4, 8, 4), "score", torch.zeros(2, 1), training)
    latents = torch.zeros(4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"`held_out` must be a fraction in \(0, 1\), got 1.5"):
        distill_latent_head(sd_pipe, images, latents, brightness, training, held_out=1.5)
    with pytest.raises(ValueError, match=r"`held_out` 0.2 of 4 images leaves 1 to measure agreement on and 3 to"):
        distill_latent_head(sd_pipe, images, latents, brightness, training)
