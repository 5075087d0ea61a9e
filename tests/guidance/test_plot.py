import torch
from PIL import Image

from guidance import GuidanceTrace
from guidance.plot import plot_trace


def test_plot_trace_draws_each_image_and_writes_a_png(tmp_path):
    trace = GuidanceTrace(batch_size=2)
    for scales, uncond in [([7.5, 1.0], [True, False]), ([5.0, 1.0], [True, False])]:
        trace.record(torch.tensor(scales), {"cond": torch.tensor([True, True]), "uncond": torch.tensor(uncond)})
    figure = plot_trace(trace, tmp_path / "trace.png")
    lines = figure.axes[0].lines
    assert [list(line.get_ydata()) for line in lines] == [[7.5, 5.0], [1.0, 1.0]]
    assert "NFE per image: 3" in figure.axes[0].get_title()
    assert Image.open(tmp_path / "trace.png").size == (600, 320)


def test_plot_dynamic_trace_draws_scales_scores_and_weights(sd_pipe, tmp_path):
    import pytest
    from conftest import call_kwargs

    from guidance import DynamicGuidance
    from guidance.evaluators import RewardEvaluator
    from guidance.plot import plot_dynamic_trace

    brightness = RewardEvaluator(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    policy = DynamicGuidance(candidates=[1.0, 5.0], evaluators=[brightness], start=0.4)
    trace = sd_pipe(**call_kwargs("sd", prompt=["a", "b"], num_inference_steps=4), guidance=policy).trace
    figure = plot_dynamic_trace(trace, tmp_path / "dynamic.png", sample=1)
    assert len(figure.axes) == 3
    assert [list(line.get_ydata()) for line in figure.axes[0].lines] == trace.scales_tensor().T.tolist()
    assert [line.get_label() for line in figure.axes[1].lines] == ["w=1", "w=5"]
    assert list(figure.axes[1].lines[1].get_xdata()) == [2, 3]  # guided steps only (progress >= 0.4)
    assert Image.open(tmp_path / "dynamic.png").size == (600, 660)
    with pytest.raises(ValueError, match=r"`sample` must be in \[0, 2\), got 2"):
        plot_dynamic_trace(trace, sample=2)
    with pytest.raises(ValueError, match=r"`trace` has no candidate scores: it was not produced by DynamicGuidance"):
        plot_dynamic_trace(GuidanceTrace(batch_size=1))
