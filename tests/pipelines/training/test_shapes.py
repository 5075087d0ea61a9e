"""The shapes world's own training (pipelines.training.shapes, a development fixture): reproducible from a seed, and a
killed run resumes exactly (the scorer: the fastest model); the development command writes the world's description
and its calibration captions."""

import json

import torch
from safetensors.torch import load_file

from guidance.shapes.scorer import AttributeScorer
from guidance.shapes.world import ShapesWorld
from pipelines.application.commands.train_shapes import main
from pipelines.training.shapes import ShapesTraining, train_scorer


def train(folder, steps, seed=0):
    train_scorer(ShapesTraining(assets=folder, checkpoints=folder, steps=steps, seed=seed), ShapesWorld())
    return AttributeScorer.from_pretrained(folder / "shapes-scorer").state_dict()


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    uninterrupted = train(tmp_path / "a", 6)
    train(tmp_path / "b", 3)  # "killed" after 3 steps: its checkpoint says step 3
    assert load_file(tmp_path / "b" / "scorer.safetensors")["optim.heads.color.weight.step"].item() == 3
    resumed = train(tmp_path / "b", 6)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    other_seed = train(tmp_path / "c", 6, seed=1)
    assert not all(torch.equal(uninterrupted[k], other_seed[k]) for k in uninterrupted)


def test_the_development_command_writes_the_world_and_its_captions(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    main(["world", "--assets", str(tmp_path / "assets"), "--prompts", str(prompts), "--count", "5"])
    spec = json.loads((tmp_path / "assets" / "shapes-world.json").read_text())
    captions = prompts.read_text().splitlines()
    world = ShapesWorld(spec)
    training = {world.caption(scene) for scene in world.training_scenes()}
    assert len(captions) == len(set(captions)) == 5 and set(captions) <= training
    assert "wrote 5 training captions" in capsys.readouterr().out
    shipped = (tmp_path / "assets" / "shapes-world.json").read_text()
    assert json.loads(shipped)["template"] == "a {size} {color} {shape} at the {position} on {background}"
