import json

import pytest
import torch

from guidance.shapes.world import DEFAULT_WORLD, ShapesWorld


def test_rendering_is_deterministic_and_follows_the_attributes():
    world = ShapesWorld()
    scene = world.scene(color="red", shape="square", size="large", position="left", background="white")
    first = world.render([scene], torch.Generator().manual_seed(3))
    again = world.render([scene], torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and first.shape == (1, 3, 32, 32)
    plain = world.render([scene])[0]
    red = torch.tensor([220, 50, 50]) / 255 * 2 - 1
    white = torch.tensor([245, 245, 245]) / 255 * 2 - 1
    torch.testing.assert_close(plain[:, 16, 9], red)  # shape centre at the left
    torch.testing.assert_close(plain[:, 16, 28], white)  # background on the right
    torch.testing.assert_close(plain[:, 16, 3], red)  # a large square: half-size 6.6 px around x = 9
    torch.testing.assert_close(plain[:, 16, 14], red)
    torch.testing.assert_close(plain[:, 16, 16], white)
    assert -0.6 < plain[1, 16, 15] < 0.9  # an anti-aliased edge pixel


def test_shapes_differ_and_sizes_differ():
    world = ShapesWorld()
    base = dict(color="blue", size="large", position="center", background="black")
    masks = {
        shape: (world.render([world.scene(shape=shape, **base)])[0, 2] > 0).float().sum()
        for shape in world.values["shape"]
    }
    assert len(set(masks.values())) == 3
    small = world.render([world.scene(shape="circle", **{**base, "size": "small"})])
    assert (small[0, 2] > 0).float().sum() < masks["circle"] / 2


def test_captions_and_heldout_split():
    world = ShapesWorld()
    scene = world.scene(color="green", shape="circle", size="small", position="top", background="gray")
    assert world.caption(scene) == "a small green circle at the top on gray"
    assert world.is_heldout(scene)  # green circle at the top is a held-out combination
    assert len(world.heldout_scenes()) == 8 * 2 * 3
    assert not any(world.is_heldout(s) for s in world.sample(500, torch.Generator().manual_seed(0)))
    assert all(world.is_heldout(s) for s in world.sample(50, torch.Generator().manual_seed(0), heldout=True))


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"color": "purple"}, r"unknown color 'purple'; valid: \['red', 'green', 'blue', 'yellow'\]"),
        ({"shape": "hexagon"}, r"unknown shape 'hexagon'; valid: \['circle', 'square', 'triangle'\]"),
        ({"position": "corner"}, r"unknown position 'corner'; valid: \['left', 'right', 'top', 'bottom', 'center'\]"),
        ({"size": "huge"}, r"unknown size 'huge'; valid: \['small', 'large'\]"),
        ({"background": "pink"}, r"unknown background 'pink'; valid: \['white', 'gray', 'black'\]"),
        ({"texture": "dots"}, r"unknown attributes \['texture'\]"),
    ],
)
def test_unknown_attribute_values_list_the_valid_ones(attributes, message):
    base = dict(color="red", shape="circle", size="small", position="left", background="white")
    with pytest.raises(ValueError, match=message):
        ShapesWorld().scene(**{**base, **attributes})


def test_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "shapes-world.json"
    ShapesWorld().write_json(path)
    spec = json.loads(path.read_text())
    for key in ("palette", "colors", "shapes", "sizes", "positions", "backgrounds", "template", "heldout"):
        assert spec[key] == DEFAULT_WORLD[key]
    assert ShapesWorld.from_json(path).spec == DEFAULT_WORLD
    with pytest.raises(
        FileNotFoundError,
        match=r"missing; rebuild it with `python -m pipelines.application.commands.train_shapes world",
    ):
        ShapesWorld.from_json(tmp_path / "absent.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"shapes-world.json' is corrupt .*rebuild it with"):
        ShapesWorld.from_json(path)
    path.write_text('{"colors": []}')
    with pytest.raises(ValueError, match=r"is corrupt \(keys \['palette'"):
        ShapesWorld.from_json(path)


def test_shipped_world_file_is_the_default():
    from guidance.shapes.assets import load_world

    assert load_world().spec == DEFAULT_WORLD


def test_render_images_are_the_renders_in_8_bits():
    world = ShapesWorld()
    scenes = [world.scene(color="red", shape="circle", size="large", position="center", background="white")]
    image = world.render_images(scenes)[0]
    expected = ((world.render(scenes)[0].permute(1, 2, 0) + 1) * 127.5).round()
    assert image.mode == "RGB" and image.size == (32, 32)
    assert torch.equal(torch.tensor(list(image.getdata()), dtype=torch.float32).view(32, 32, 3), expected)
