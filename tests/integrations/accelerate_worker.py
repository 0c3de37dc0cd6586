"""Worker for test_accelerate.py, started by ``accelerate launch`` on 2 CPU processes (not a test module itself).

Each run is a ``transformers.Trainer`` (DDP over gloo, set up by accelerate) training tiny_llama
with ``DropBPCallback`` towards 6 optimizer steps of 2 micro-batches each; sensitivity is
measured after step 3. Every rank writes ``<tag>-rank<r>.json`` into ``--out``: the masks its
training forwards used (recorded as ``MaskLog`` in test_trainer.py does), the final drop rates
and sensitivities, the DDP wrapper's ``find_unused_parameters``, the logged DropBP metrics, and
at every optimizer step the names of the parameters whose (all-reduced, clipped) gradient
differs from rank 0's. Its final weights go to ``<tag>-rank<r>.pt``.

Phases (one ``accelerate launch`` each):
    1  ``full``: 6 steps straight. ``cut-1``: steps 1-2, checkpoint-2, then stops as a crash would.
    2  ``cut-2``: resumes from checkpoint-2 (sensitivity not measured yet), measures after step 3,
       saves checkpoint-4 and stops. ``cut-3``: a fresh model, callback and Trainer resume from
       checkpoint-4 (sensitivity already measured) and finish steps 5-6.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_llama  # noqa: E402
from trainer_helpers import MaskLog, StopAt, TokenData, training_args  # noqa: E402

from dropbp import DropBPCallback  # noqa: E402

MAX_STEPS, SENSITIVITY_AT = 6, 0.5  # sensitivity is measured after step 3


class GradientCheck(TrainerCallback):
    """Before every optimizer step: which parameters' gradients differ between this rank and rank 0."""

    def __init__(self):
        self.differing: list[list[str]] = []
        self.without_grad: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        differing, without = [], 0
        for name, p in model.named_parameters():
            grad = p.grad if p.grad is not None else torch.full_like(p, float("nan"))
            without += p.grad is None
            reference = grad.clone()
            dist.broadcast(reference, src=0)
            if not torch.equal(reference.nan_to_num(7.0), grad.nan_to_num(7.0)):
                differing.append(name)
        self.differing.append(differing)
        self.without_grad.append(without)


def train(out: Path, tag: str, run: str, stop_at: int | None = None, resume: str | None = None,
          save_steps: int | None = None) -> None:
    """One Trainer run on a fresh model and callback; writes ``<tag>-rank<r>.json`` and ``.pt``."""
    model = tiny_llama()
    masks = MaskLog(model)
    callback = DropBPCallback(drop_rate=0.5, sensitivity_at=SENSITIVITY_AT, sensitivity_batches=1)
    gradients = GradientCheck()
    extra = dict(save_strategy="steps", save_steps=save_steps) if save_steps else {}
    trainer = Trainer(model=model, args=training_args(out / run, max_steps=MAX_STEPS, **extra),
                      train_dataset=TokenData(), callbacks=[callback, gradients])
    if stop_at:
        trainer.add_callback(StopAt(stop_at))
    trainer.train(resume_from_checkpoint=None if resume is None else str(out / run / resume))

    handle = callback.handle
    record = {
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapper": type(trainer.model_wrapped).__name__,
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "global_step": trainer.state.global_step,
        "masks": masks.masks,
        "step_count": handle.step_count,
        "drop_rates": handle.drop_rates,
        "sensitivities": handle.sensitivities,
        "gradients_differing": gradients.differing,
        "parameters_without_grad": gradients.without_grad,
        "logged": [{k: v for k, v in entry.items() if k.startswith("dropbp/") or k == "step"}
                   for entry in trainer.state.log_history if "loss" in entry],
    }
    rank = dist.get_rank()
    (out / f"{tag}-rank{rank}.json").write_text(json.dumps(record))
    torch.save(model.state_dict(), out / f"{tag}-rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", type=int, choices=[1, 2], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.phase == 1:
        train(args.out, "full", "full")
        train(args.out, "cut-1", "cut", stop_at=2, save_steps=2)
    else:
        train(args.out, "cut-2", "cut", stop_at=4, resume="checkpoint-2", save_steps=2)
        train(args.out, "cut-3", "cut", resume="checkpoint-4")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
