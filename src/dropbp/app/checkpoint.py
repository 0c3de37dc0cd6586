"""Run folders and resumable checkpoints: written under a temporary name, renamed at the end; Ctrl-C stops between steps."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from dropbp.app.config import FinetuneConfig

__all__ = [
    "CHECKPOINT", "Interrupted", "StopRequest", "load_checkpoint", "partial_dir", "prepare_output_dir",
    "resume_config", "rng_states", "save_checkpoint", "set_rng_states",
]


class Interrupted(Exception):
    """Ctrl-C during a run; the message says where the checkpoint is and how to resume."""


class StopRequest:
    """While active, Ctrl-C asks the run to stop after the step in progress (a second one stops at once).

    A checkpoint is only consistent between steps: the data position, the RNG, the DropBP mask
    stream and the weights all move during a step. Only the main thread can own the handler;
    elsewhere Ctrl-C keeps Python's default behaviour.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *args: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


CHECKPOINT = "checkpoint"


def partial_dir(final: Path) -> Path:
    """Where a run is written until it finishes (and where an interrupted run waits to be resumed)."""
    return final.with_name(f"{final.name}.partial")


def prepare_output_dir(output_dir: str | None, command: str, overwrite: bool) -> Path:
    """Resolve the final run folder and check it may be written.

    Raises:
        ValueError: If it exists, is not empty, and ``overwrite`` is False.
    """
    path = Path(output_dir) if output_dir else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {str(path)!r} is a file; pass another --output-dir")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"output folder {str(path)!r} is not empty; pass --overwrite or another --output-dir")
    if (partial_dir(path) / CHECKPOINT).is_dir() and not overwrite:
        raise ValueError(f"an interrupted run waits in {str(partial_dir(path))!r}; continue it with "
                         f"dropbp finetune --resume {path}, or pass --overwrite to start again")
    return path


def save_checkpoint(out: Path, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Write everything a resumed run needs, atomically: ``out/checkpoint`` is old or new, never half."""
    tmp = out / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(trainable, tmp / "trainable.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(state, tmp / "state.pt")
    final, old = out / CHECKPOINT, out / f"{CHECKPOINT}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model, optimizer, scheduler) -> dict[str, Any]:
    folder = out / CHECKPOINT
    if not (folder / "state.pt").is_file():
        old = out / f"{CHECKPOINT}.old"  # killed between the two renames
        if (old / "state.pt").is_file():
            folder = old
        else:
            raise ValueError(f"{str(out)!r} holds no checkpoint to resume from; rerun without --resume")
    trainable = torch.load(folder / "trainable.pt", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    saved = torch.load(folder / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return torch.load(folder / "state.pt", weights_only=False)


def rng_states(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def resume_config(run_dir: str | os.PathLike) -> FinetuneConfig:
    """The settings of the interrupted run in ``run_dir`` (its final name or its ``.partial`` folder).

    Raises:
        ValueError: If no interrupted run with a checkpoint is there.
    """
    path = Path(run_dir)
    final = path.with_name(path.name[: -len(".partial")]) if path.name.endswith(".partial") else path
    partial = partial_dir(final)
    if not (partial / "config.json").is_file():
        if final.is_dir() and (final / "summary.json").is_file():
            raise ValueError(f"the run in {str(final)!r} already finished; nothing to resume")
        raise ValueError(f"no interrupted run at {str(partial)!r}; pass the --output-dir of a run started with "
                         "--save-every, or one stopped with Ctrl-C")
    values = json.loads((partial / "config.json").read_text())
    return FinetuneConfig(**{**values, "output_dir": str(final)})
