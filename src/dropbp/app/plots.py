"""PNG plots of runs and sensitivities (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dropbp.app.files import atomic_path

__all__ = ["plot_losses", "plot_sensitivity", "pyplot", "save_figure"]


def pyplot():
    """matplotlib's pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` as a PNG atomically (nothing half-written on failure), then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    pyplot().close(fig)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(histories: dict[str, list[dict[str, Any]]], path: str | Path) -> None:
    """Training loss against step and against the training clock; held-out loss against the clock.

    The third panel appears when the records carry periodic ``heldout_loss`` values; the
    training clock (``wall_time_s``) leaves the evaluation time out.

    Args:
        histories: Run name -> per-step records with ``step``, ``wall_time_s`` and ``loss``
            (and ``heldout_loss`` on evaluated steps).
        path: PNG file to write (atomically).
    """
    plt = pyplot()
    heldout = any("heldout_loss" in r for history in histories.values() for r in history)
    fig, axes = plt.subplots(1, 3 if heldout else 2, figsize=(16 if heldout else 11, 4))
    by_step, by_time = axes[0], axes[1]
    for name, history in histories.items():
        losses = _smooth([r["loss"] for r in history])
        by_step.plot([r["step"] for r in history], losses, label=name)
        by_time.plot([r["wall_time_s"] for r in history], losses, label=name)
        if heldout:
            points = [(r["wall_time_s"], r["heldout_loss"]) for r in history if "heldout_loss" in r]
            axes[2].plot([t for t, _ in points], [v for _, v in points], marker="o", label=name)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training clock (s)")
    for ax in (by_step, by_time):
        ax.set_ylabel("training loss (5-step mean)")
    if heldout:
        axes[2].set_xlabel("training clock (s), evaluation excluded")
        axes[2].set_ylabel("held-out loss (fixed subset)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_sensitivity(names: Sequence[str], sensitivity: Sequence[float], rates: Sequence[float], path: str | Path) -> None:
    """Bar chart of each branch's sensitivity (top) and allocated drop rate (bottom).

    Args:
        names: Branch names in execution order.
        sensitivity: Per-branch sensitivity.
        rates: Per-branch allocated drop rate.
        path: PNG file to write (atomically).
    """
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.25 * len(names)), 6), sharex=True)
    positions = range(len(names))
    colors = ["tab:blue" if "attn" in n or "attention" in n else "tab:orange" for n in names]
    top.bar(positions, sensitivity, color=colors)
    top.set_ylabel("sensitivity ||G - G_-l||^2")
    top.set_yscale("log" if min(sensitivity) > 0 else "linear")
    bottom.bar(positions, rates, color=colors)
    bottom.set_ylabel("allocated drop rate")
    bottom.set_xticks(list(positions), [n.split("layers.")[-1] for n in names], rotation=90, fontsize=6)
    top.set_title("blue: attention, orange: MLP")
    save_figure(fig, path)
