"""Training is reproducible from a seed and a killed run resumes exactly (the scorer: the fastest model)."""

import torch
from safetensors.torch import load_file

from guidance.shapes.scorer import AttributeScorer
from pipelines.application.commands.train_shapes import main


def train(tmp_path, name, steps):
    main(["scorer", "--steps", str(steps), "--checkpoints", str(tmp_path / name), "--assets", str(tmp_path / name)])
    return AttributeScorer.from_pretrained(tmp_path / name / "shapes-scorer").state_dict()


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    uninterrupted = train(tmp_path, "a", 6)
    train(tmp_path, "b", 3)  # "killed" after 3 steps: its checkpoint says step 3
    assert load_file(tmp_path / "b" / "scorer.safetensors")["optim.heads.color.weight.step"].item() == 3
    resumed = train(tmp_path, "b", 6)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    other_seed = main(
        [
            "scorer",
            "--steps",
            "2",
            "--seed",
            "1",
            "--checkpoints",
            str(tmp_path / "c"),
            "--assets",
            str(tmp_path / "c"),
        ]
    )
    assert other_seed == 0
    assert (tmp_path / "a" / "shapes-world.json").is_file()
