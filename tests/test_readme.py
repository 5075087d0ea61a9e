"""The README's examples are real code: extract them, run them, check what they claim."""

import re
from pathlib import Path

import numpy as np
import torch
from conftest import call_kwargs

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example(marker: str) -> dict:
    """Run the README's python block that contains `marker`; its globals."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    source = next(block for block in blocks if marker in block)
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    return namespace


def test_readme_scheduler_example_guides_the_first_half(sd_pipe):
    policy = readme_example("class GuideFirstHalf")["GuideFirstHalf"](guidance_scale=6.0)
    result = sd_pipe(**call_kwargs("sd", prompt="a red circle", num_inference_steps=4), guidance=policy)
    assert result.trace.scales == [[6.0], [6.0], [1.0], [1.0]]  # progress 0, 1/3 < 0.5 <= 2/3, 1
    assert result.trace.nfe == 6.0


def test_readme_stages_example_runs_again_and_edits():
    from guidance.shapes.assets import load_scorer, load_world

    example = readme_example("pipe.prepare(")
    assert torch.equal(example["again"].latents, example["result"].latents)
    assert example["edited"].trace.num_steps == 10
    edited = example["pipe"].decode(example["edited"].latents, example["target"], output_type="pt").images * 2 - 1
    world, logits = load_world(), load_scorer()(edited)
    assert world.values["color"][int(logits["color"].argmax())] == "blue"  # the target prompt's colour
    assert world.values["shape"][int(logits["shape"].argmax())] == "circle"  # the source image's shape


def test_readme_composition_example_composes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = readme_example("same_thing = ")
    first, second = example["out"], example["again"]
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert first.trace.scales[0] == [2.0] and first.trace.nfe < 40
    assert (tmp_path / "my-policy" / "guidance_config.json").is_file()
    assert example["dynamic_in_interval"].config.start == 0.2


def test_readme_dynamic_guidance_example_chooses_among_its_candidates():
    example = readme_example("DynamicGuidance(candidates=(5, 7.5, 10, 15)")
    scales = example["out"].trace.scales
    assert len(scales) == 20 and {row[0] for row in scales} <= {5.0, 7.5, 10.0, 15.0}
    assert example["out"].trace.extras[0]["lookahead"] == "next_latent" and example["pixel"].lookahead_kind == "x0"


def test_readme_guider_bridge_example_builds():
    example = readme_example("GuiderScale(apg)")
    assert type(example["policy"].scale.guider).__name__ == "AdaptiveProjectedGuidance"


def test_readme_flowopt_example_edits_and_inverts(tmp_path, monkeypatch):
    from guidance.shapes.assets import load_scorer, load_world

    monkeypatch.chdir(tmp_path)  # the example saves blue.png
    example = readme_example("edited = pipe.edit(")
    pipe, edited, again = example["pipe"], example["edited"], example["again"]
    world, scorer = load_world(), load_scorer()
    pixels = lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # noqa: E731
    colour = lambda image: world.values["color"][int(scorer(pixels(image))["color"].argmax())]  # noqa: E731
    assert colour(example["source"]) == "red" and colour(edited.images[0]) == "blue"
    assert len(edited.iterates) == 5 and len(edited.residuals) == 5 and edited.nfe > 0
    mse = ((pixels(again) - pixels(example["source"])) ** 2).mean() / 4  # images in [0, 1]
    assert 10 * torch.log10(1 / mse) > 25  # the inverted noise regenerates the source
    assert example["with_ag"].nfe < edited.nfe and colour(example["flowedit"].images[0]) == "blue"
    assert pipe.__class__.__name__ == "GuidedStableDiffusion3Pipeline" and (tmp_path / "blue.png").is_file()


def test_readme_batch_example_writes_a_run_that_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = readme_example("result = generate_batch(")
    assert (example["result"].generated, example["result"].resumed) == (3, 0)
    assert sorted(p.name for p in (tmp_path / "outputs" / "batch").glob("*.png")) == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]
    assert 20 < example["result"].nfe_per_image < 40  # AG: CFG until the predictions agree
    again = readme_example("result = generate_batch(")["result"]
    assert (again.generated, again.resumed) == (0, 3)


def test_readme_npo_example_uses_the_shipped_adapter():
    from guidance.lora import active_adapters, lora_layers

    example = readme_example("npo = load_npo_adapter(pipe")
    assert example["out"].trace.nfe == 100 and example["with_ag"].trace.nfe < 100  # 50 steps, diffusers default
    assert all(active_adapters(layer) == [] for layer in lora_layers(example["pipe"].unet))  # kept off
