import pytest

import app


def test_generate_returns_images_plot_and_summary():
    images, figure, summary = app.generate(
        "a red circle",
        method="cfg",
        guidance_scale=5.0,
        start=0.5,
        num_inference_steps=4,
        num_images=2,
        model="tiny:sd",
    )
    assert len(images) == 2 and images[0].size == (32, 32)
    line = figure.axes[0].lines[0]
    assert list(line.get_ydata()) == [1.0, 1.0, 5.0, 5.0]
    assert "6 model evaluations per image over 4 steps" in summary


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": " "}, "`prompt` must not be empty"),
        (
            {"prompt": "x", "method": "magic"},
            r"`method` must be one of \['cfg', 'scheduled', 'ag', 'linear-ag', 'dynamic', 'none'\], got 'magic'",
        ),
        ({"prompt": "x", "guidance_scale": -1.0}, "`guidance_scale` must be a finite number >= 0, got -1.0"),
        ({"prompt": "x", "start": 0.9, "stop": 0.1}, "`start` must be <= `stop`"),
        ({"prompt": "x", "num_inference_steps": 0}, "steps and images must be >= 1, got 0 and 4"),
    ],
)
def test_bad_input_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        app.generate(model="tiny:sd", **kwargs)


def test_demo_builds():
    demo = app.build_demo()
    assert demo.title == "Guidance schedulers"


def test_default_model_is_the_shapes_world_sd_and_dynamic_guidance_runs():
    images, figure, summary = app.generate(
        "a large red circle at the center on white", method="dynamic", num_inference_steps=4, num_images=1
    )
    pixels = list(images[0].getdata())
    assert sum(r > 150 and g < 120 and b < 120 for r, g, b in pixels) >= 20  # a red shape (placed anywhere)
    assert "8 model evaluations per image over 4 steps" in summary
    assert set(figure.axes[0].lines[0].get_ydata()) <= {1.0, 3.0, 7.5, 11.0, 15.0}


def test_the_npo_switch_puts_the_shipped_adapter_in_the_unconditional_branch():
    from guidance.shapes.assets import ASSETS

    common = dict(method="cfg", num_inference_steps=4, num_images=1, model="shapes:sd")
    plain, _, summary = app.generate("a large red circle at the center on white", **common)
    negative, _, npo_summary = app.generate("a large red circle at the center on white", **common,
                                            npo=str(ASSETS / "shapes-sd-npo"))  # fmt: skip
    assert "unconditional=NegativeAdapter('npo'" in npo_summary and "8 model evaluations" in npo_summary
    assert list(plain[0].getdata()) != list(negative[0].getdata())
    with pytest.raises(ValueError, match="the Self-NPO adapter must be a folder holding a LoRA .safetensors file"):
        app.generate("x", model="tiny:sd", npo="/no/such/folder")
