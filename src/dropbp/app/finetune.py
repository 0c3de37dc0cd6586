"""The main job: fine-tune a causal LM on instruction data with (or without) DropBP.

The application's public names, gathered from its modules: :mod:`~dropbp.app.config` (the run's
settings), :mod:`~dropbp.app.checkpoint` (run folders, checkpoints, resume),
:mod:`~dropbp.app.training` (data, model, the step loop), :mod:`~dropbp.app.reporting` (what a
history says) and :mod:`~dropbp.app.jobs` (compare, sensitivity).

``run_finetune`` is what ``dropbp finetune`` calls; ``run_compare`` runs the baseline and
DropBP on identical data, seeds and steps. Every run folder is written under a temporary
name and renamed into place at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

from dropbp.app.checkpoint import Interrupted, partial_dir, prepare_output_dir, resume_config
from dropbp.app.config import FinetuneConfig, RunResult
from dropbp.app.jobs import run_compare, run_sensitivity
from dropbp.app.reporting import format_table, last_heldout, time_to_heldout, time_to_reach
from dropbp.app.training import (
    BatchStream,
    autocast_dtype,
    first_examples,
    load_data,
    lr_scheduler,
    resolve_device,
    run_finetune,
)

__all__ = [
    "BatchStream", "FinetuneConfig", "Interrupted", "RunResult", "autocast_dtype", "first_examples", "format_table",
    "last_heldout", "load_data", "lr_scheduler", "partial_dir", "prepare_output_dir", "resolve_device",
    "resume_config", "run_compare", "run_finetune", "run_sensitivity", "time_to_heldout", "time_to_reach",
]
