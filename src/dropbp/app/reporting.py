"""What a run's history says: time to a loss, the last held-out loss, the comparison table."""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["COMPARE_NOTE", "format_table", "last_heldout", "time_to_heldout", "time_to_reach"]


def time_to_reach(history: list[dict[str, Any]], level: float, window: int = 10) -> float | None:
    """Wall-clock seconds until the trailing mean train loss first reaches ``level``."""
    losses: deque = deque(maxlen=window)
    for record in history:
        losses.append(record["loss"])
        if len(losses) == min(window, len(history)) and sum(losses) / len(losses) <= level:
            return record["wall_time_s"]
    return None


def last_heldout(history: list[dict[str, Any]]) -> float | None:
    """The last periodic held-out loss of a run, or None without periodic evaluation."""
    values = [r["heldout_loss"] for r in history if "heldout_loss" in r]
    return values[-1] if values else None


def time_to_heldout(history: list[dict[str, Any]], level: float | None) -> float | None:
    """Training-clock seconds at the first periodic evaluation with held-out loss <= ``level``."""
    if level is None:
        return None
    for record in history:
        if "heldout_loss" in record and record["heldout_loss"] <= level:
            return record["wall_time_s"]
    return None


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table with one column per run."""
    names = list(rows)
    keys = list(rows[names[0]])
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key in keys:
        cells = []
        for name in names:
            value = rows[name][key]
            cells.append("n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COMPARE_NOTE = (
    "Times are the training clock: optimizer steps plus DropBP's sensitivity measurement, without the held-out "
    "evaluations. heldout_loss_subset_final is the last periodic held-out loss (on the fixed --eval-subset); "
    "time_to_baseline_heldout_s is the training clock at the first evaluation where the run's held-out loss is at or "
    "below the baseline's final one; heldout_loss and the accuracies are on --eval-size examples before and after."
)
