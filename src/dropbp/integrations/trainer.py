"""``DropBPCallback``: DropBP in ``transformers.Trainer`` and TRL's ``SFTTrainer``."""

from __future__ import annotations

import gc
from collections import deque
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from dropbp.checkpointing import reentrant_checkpointing, unswitchable_checkpointing
from dropbp.config import DropBPConfig
from dropbp.distributed import FSDP1_SENSITIVITY_REFUSED, fsdp_modules
from dropbp.errors import DropBPError
from dropbp.handle import COMPILE_REFUSED, DropBPHandle, apply, find_handle
from dropbp.sensitivity import unmeasurable_loss
from dropbp.verify import CallArguments, require_sound_branches

__all__ = ["DropBPCallback"]


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output:
        loss = output[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            "DropBPCallback measures sensitivity with the model's own loss, but the training batches "
            "carry no labels; add labels to the batches or pass sensitivity_at=None"
        )
    return loss


def _first_examples(args: tuple, kwargs: dict, count: int | None) -> tuple[tuple, dict]:
    """The call's arguments cut to the first ``count`` examples (tensors sharing the batch's first dimension)."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
    if count is None or not tensors:
        return args, kwargs
    size = tensors[0].shape[0]

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            return value[:count]
        return value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


class DropBPCallback(TrainerCallback, ExportableState):
    """Apply DropBP inside a Hugging Face ``Trainer`` (or TRL ``SFTTrainer``).

    - At train begin it applies DropBP to the model, unless :func:`dropbp.apply` already did.
      Every micro-batch's training forward samples its own mask (``auto_step=False``: one
      mask per optimizer step, shared by its micro-batches).
    - Settings that would fail later fail at train begin: ``torch_compile``, FSDP1 or a
      reentrant checkpointing function other than torch's with ``sensitivity_at`` set.
      torch's reentrant checkpointing (PEFT's ``prepare_model_for_kbit_training`` default)
      is switched to non-reentrant for the sensitivity measurement only.
    - When the branches came from the generic fallback (an architecture outside the table),
      the first training forward first checks on its batch that dropping them keeps the
      residual stream intact (:func:`dropbp.verify.require_sound_branches`) and raises
      :class:`~dropbp.DropBPError` if not.
    - After ``sensitivity_at * max_steps`` optimizer steps it measures each branch's
      sensitivity on the first ``sensitivity_examples`` examples of each of the last
      ``sensitivity_batches`` training batches (averaged, and
      averaged over ranks) and allocates per-branch rates for the target ``drop_rate``.
    - It adds ``dropbp/drop_rate`` (mean fraction of branches dropped) and
      ``dropbp/backward_flops_skipped`` (fraction of branch backward FLOPs skipped) to each
      log, ahead of the reporting integrations (TensorBoard, W&B, ...) and of
      ``trainer.state.log_history``: at train begin it moves itself to the front of the
      Trainer's callback list.
    - Its state (rates, sensitivities, mask step) is saved in every checkpoint's
      ``trainer_state.json``, so ``trainer.train(resume_from_checkpoint=...)`` continues
      with exactly the masks of an uninterrupted run.

    Args:
        config: A :class:`dropbp.DropBPConfig`; or pass its fields as keyword arguments,
            e.g. ``DropBPCallback(drop_rate=0.5, sensitivity_at=0.1, sensitivity_batches=1,
            max_rate=0.9, seed=0)``.

    Raises:
        ValueError: On invalid settings (see :class:`dropbp.DropBPConfig`).
    """

    def __init__(self, config: DropBPConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise ValueError("pass either config= or DropBPConfig fields as keyword arguments, not both")
        self.config = config if config is not None else DropBPConfig(**kwargs)
        self.handle: DropBPHandle | None = None
        self._measured = False
        self._recent: deque = deque(maxlen=self.config.sensitivity_batches)
        self._recorder = None
        self._verifier = None

    # ExportableState: what the Trainer writes into each checkpoint's trainer_state.json.
    def state(self) -> dict[str, Any]:
        return {
            "args": self.config.to_dict(),
            "attributes": {
                "handle_state": None if self.handle is None else self.handle.state_dict(),
                "measured": self._measured,
            },
        }

    def _saved_state(self, state) -> dict[str, Any]:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) or {}
        if isinstance(saved, list):  # several callbacks of this class: the first is ours
            saved = saved[0] if saved else {}
        return saved.get("attributes") or {}

    def _record_batch(self, module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            self._recent.append((args, kwargs))

    def _verify_first_batch(self, module, args: tuple, kwargs: dict) -> None:
        """On the first training forward: refuse fallback branches that would cut the residual stream."""
        if not (module.training and torch.is_grad_enabled()) or self._verifier is None:
            return
        self._verifier.remove()
        self._verifier = None
        require_sound_branches(module, self.handle, CallArguments(args, kwargs))

    def _run_first(self) -> None:
        """Move this callback to the front of the Trainer's callback list.

        The Trainer puts user callbacks after its reporting integrations, so metrics this
        callback adds in ``on_log`` would reach TensorBoard or W&B one call too late. The
        list is found through its reference to us; moving an element from the position
        being iterated to the front does not disturb the ongoing iteration.
        """
        for holder in gc.get_referrers(self):
            if isinstance(holder, list) and all(isinstance(c, TrainerCallback) for c in holder):
                holder.remove(self)
                holder.insert(0, self)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run_first()
        if args.torch_compile:
            raise ValueError(COMPILE_REFUSED)
        if model is None:
            raise ValueError("DropBPCallback needs the Trainer's model; none was passed to on_train_begin")
        handle = find_handle(model)
        if handle is None:
            cfg = self.config
            handle = apply(
                model, drop_rate=cfg.drop_rate, seed=cfg.seed, branches=cfg.branches, auto_step=cfg.auto_step,
                replay=cfg.replay,
            )
        self.handle = handle
        if handle.branch_source == "fallback" and self._verifier is None:
            self._verifier = model.register_forward_pre_hook(self._verify_first_batch, with_kwargs=True)
        saved = self._saved_state(state)
        if state.global_step > 0 and saved.get("handle_state"):
            handle.load_state_dict(saved["handle_state"])
            self._measured = bool(saved.get("measured"))
        if self.config.sensitivity_at is not None and not self._measured:
            # Fail now, not after sensitivity_at of the run.
            if fsdp_modules(model)[0]:
                raise ValueError(FSDP1_SENSITIVITY_REFUSED)
            problem = unmeasurable_loss(model)
            if problem is not None:
                raise DropBPError(problem)
            problem = unswitchable_checkpointing(model) if reentrant_checkpointing(model) else None
            if problem is not None:
                raise DropBPError(
                    f"sensitivity_at needs torch.autograd.grad, which reentrant gradient checkpointing does not "
                    f"support, and {problem}; use gradient_checkpointing_kwargs={{'use_reentrant': False}} or "
                    "sensitivity_at=None"
                )
            self._recorder = model.register_forward_pre_hook(self._record_batch, with_kwargs=True)
        handle.drop_statistics(reset=True)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.handle is not None and not self.config.auto_step:
            self.handle.step()  # one mask for every micro-batch of this optimizer step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._measured or self.config.sensitivity_at is None or self.handle is None:
            return
        if state.global_step < self.config.sensitivity_step(state.max_steps) or not self._recent:
            return
        model = model if model is not None else self.handle.model
        cfg = self.config
        closures = [
            (lambda a=batch_args, k=batch_kwargs: _loss_of(model(*a, **k)))
            for batch_args, batch_kwargs in (_first_examples(a, k, cfg.sensitivity_examples) for a, k in self._recent)
        ]
        self.handle.calibrate(closures, cfg.drop_rate, cfg.max_rate, cfg.allocation, cfg.sensitivity_metric)
        self._measured = True
        self._recent.clear()
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.handle is None or logs is None or "loss" not in logs:
            return
        stats = self.handle.drop_statistics(reset=True)
        extra = {
            "dropbp/drop_rate": stats["drop_rate"],
            "dropbp/backward_flops_skipped": stats["backward_flops_skipped"],
        }
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self._verifier is not None:
            self._verifier.remove()
            self._verifier = None
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
