"""Figures of a guidance trace (matplotlib, imported only here)."""

from __future__ import annotations

import os

from .trace import GuidanceTrace


def plot_trace(trace: GuidanceTrace, path: str | os.PathLike | None = None, title: str | None = None):
    """Per-step guidance scale of every image (dots mark steps whose unconditional pass ran); optional PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    scales = trace.scales_tensor()
    figure, axis = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps = range(trace.num_steps)
    for b in range(trace.batch_size):
        axis.plot(steps, scales[:, b].tolist(), label=f"image {b}", linewidth=1.5)
        ran = [i for i in steps if trace.branches[i].get("uncond", [False] * trace.batch_size)[b]]
        axis.scatter(ran, [float(scales[i, b]) for i in ran], s=12)
    axis.set_xlabel("denoising step")
    axis.set_ylabel("guidance scale")
    axis.set_title(title or f"applied guidance (NFE per image: {trace.nfe:g})")
    if trace.batch_size > 1:
        axis.legend(fontsize=7, ncol=min(trace.batch_size, 4))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure
