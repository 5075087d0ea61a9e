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
