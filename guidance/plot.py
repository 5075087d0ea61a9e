"""Figures of a guidance trace (matplotlib, imported only here)."""

from __future__ import annotations

import os

from .trace import GuidanceTrace


def new_figure(width: float, height: float):
    """A matplotlib figure outside pyplot's global registry: safe to draw from several threads (the demo's calls), and
    never left open."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def plot_trace(trace: GuidanceTrace, path: str | os.PathLike | None = None, title: str | None = None):
    """Per-step guidance scale of every image (dots mark steps whose unconditional pass ran); optional PNG."""
    scales = trace.scales_tensor()
    figure = new_figure(6, 3.2)
    axis = figure.subplots()
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


def plot_dynamic_trace(trace: GuidanceTrace, path: str | os.PathLike | None = None, sample: int = 0):
    """Dynamic guidance at a glance: the chosen scale per step (every image), then for image `sample` each
    evaluator's score of every candidate per step, and the evaluators' weights; optional PNG."""
    scored = [i for i, extras in enumerate(trace.extras) if "candidate_scores" in extras]
    if not scored:
        raise ValueError("`trace` has no candidate scores: it was not produced by DynamicGuidance")
    if not 0 <= sample < trace.batch_size:
        raise ValueError(f"`sample` must be in [0, {trace.batch_size}), got {sample}")
    names = list(trace.extras[scored[0]]["candidate_scores"])
    figure = new_figure(6, 2.2 * (2 + len(names)))
    axes = figure.subplots(2 + len(names), 1, sharex=True)
    scales = trace.scales_tensor()
    for b in range(trace.batch_size):
        axes[0].plot(range(trace.num_steps), scales[:, b].tolist(), marker=".", label=f"image {b}")
    axes[0].set_ylabel("chosen scale")
    axes[0].set_title(f"dynamic guidance (NFE per image: {trace.nfe:g})")
    if trace.batch_size > 1:
        axes[0].legend(fontsize=7, ncol=min(trace.batch_size, 4))
    mine = [i for i in scored if trace.extras[i]["candidate_scores"][names[0]][sample] is not None]  # guided steps
    for axis, name in zip(axes[1:-1], names, strict=True):
        per_step = [trace.extras[i]["candidate_scores"][name][sample] for i in mine]
        for k, scale in enumerate(trace.extras[scored[0]]["candidates"]):
            axis.plot(mine, [scores[k] for scores in per_step], label=f"w={scale:g}")
        axis.set_ylabel(f"{name} score")
        axis.legend(fontsize=6, ncol=3)
    for name in names:
        axes[-1].plot(mine, [trace.extras[i]["weights"][name][sample] for i in mine], marker=".", label=name)
    axes[-1].set_ylabel(f"weights (image {sample})")
    axes[-1].set_xlabel("denoising step")
    axes[-1].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure


def plot_residuals(residuals: list[list[float]], best: int | None = None, title: str | None = None):
    """FlowOpt's residual `|f_c(z_k) - y|` (RMS per latent element) per iteration, one line per image; `best` marks an
    iteration (e.g. the one kept)."""
    figure = new_figure(6, 3.2)
    axis = figure.subplots()
    iterations = range(len(residuals))
    for b in range(len(residuals[0]) if residuals else 0):
        axis.plot(iterations, [row[b] for row in residuals], marker=".", label=f"image {b}")
    if best is not None:
        axis.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"kept: iteration {best}")
        axis.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("FlowOpt iteration (0: invert, then solve)")
    axis.set_ylabel("residual |f(z) - y|")
    axis.set_title(title or "FlowOpt residual")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure
