"""``DropBPCallback``: DropBP in ``transformers.Trainer`` and TRL's ``SFTTrainer``."""

from __future__ import annotations

import contextlib
import copy
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from dropbp.callstack import calling_instance
from dropbp.checkpointing import reentrant_checkpointing, unswitchable_checkpointing
from dropbp.config import DropBPConfig
from dropbp.distributed import fsdp_modules
from dropbp.errors import COMPILE_REFUSED, FSDP1_SENSITIVITY_REFUSED, DropBPError
from dropbp.api import apply
from dropbp.handle import DropBPHandle, find_handle
from dropbp.calibration import unmeasurable_loss
from dropbp.verify import CallArguments, require_sound_branches
from dropbp.zero import refuse_zero3

__all__ = ["DropBPCallback", "attach"]


def _scalar_loss(loss: Any) -> torch.Tensor:
    if isinstance(loss, (tuple, list)) and loss:  # a compute_loss that returns (loss, outputs) regardless
        loss = loss[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
        raise DropBPError(
            "DropBPCallback measures sensitivity on the Trainer's compute_loss, which returned no differentiable "
            "scalar for the recorded batch; fix compute_loss or pass sensitivity_at=None"
        )
    return loss


def _first_examples(inputs: Any, count: int | None, size: int | None = None) -> Any:
    """``inputs`` (a batch dict, or nested tuples/dicts of them) cut to the first ``count`` examples.

    Only tensors whose first dimension is the batch's (that of the first such tensor found) are
    cut; scalars and other tensors are kept as they are.
    """
    if count is None:
        return inputs
    if size is None:
        first = _first_batched_tensor(inputs)
        if first is None:
            return inputs
        size = first.shape[0]
    if isinstance(inputs, torch.Tensor):
        return inputs[:count] if inputs.dim() > 0 and inputs.shape[0] == size else inputs
    if isinstance(inputs, Mapping):
        return {key: _first_examples(value, count, size) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(_first_examples(value, count, size) for value in inputs)
    return inputs


def _first_batched_tensor(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, torch.Tensor):
        return inputs if inputs.dim() > 0 else None
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, tuple) else ()
    for value in values:
        found = _first_batched_tensor(value)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def _trainer_state_kept(trainer: Any) -> Iterator[None]:
    """Undo what the measurement's ``compute_loss`` calls record on the trainer (TRL's metrics, token counts).

    The measurement is not training: its batches must not reach the logged averages.
    """
    attributes = dict(vars(trainer))
    metrics = {name: copy.deepcopy(vars(trainer)[name]) for name in _METRICS if name in vars(trainer)}
    try:
        yield
    finally:
        for name, value in attributes.items():
            if vars(trainer).get(name) is not value:
                setattr(trainer, name, value)
        for name, value in metrics.items():
            setattr(trainer, name, value)


class _LossRecorder:
    """Keeps the inputs of the Trainer's training ``compute_loss`` calls (an instance attribute over its method)."""

    def __init__(self, trainer: Any, recent: deque):
        self.trainer = trainer
        self.compute_loss = trainer.compute_loss
        self.recent = recent
        trainer.compute_loss = self

    def __call__(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if model.training and torch.is_grad_enabled():
            # A copy of the dict: compute_loss may pop from it (the Trainer pops "labels" under label smoothing).
            kept = copy.copy(inputs) if isinstance(inputs, Mapping) else inputs
            self.recent.append((kept, {**dict(zip(("return_outputs", "num_items_in_batch"), args)), **kwargs}))
        return self.compute_loss(model, inputs, *args, **kwargs)

    def remove(self) -> None:
        if vars(self.trainer).get("compute_loss") is self:
            del self.trainer.compute_loss


def _one_row_per_example(trainer: Any) -> bool:
    """Whether the trainer's ``compute_loss`` takes a batch whose rows are examples, so a cut keeps its meaning.

    Only the Trainer's and SFTTrainer's are known to. Others lay their inputs out their own way (RewardTrainer
    stacks the chosen rows above the rejected ones, so the first rows are not pairs); they get the whole batch.
    """
    method = type(trainer).compute_loss
    return f"{method.__module__}.{method.__qualname__}" in _ROW_PER_EXAMPLE


_ROW_PER_EXAMPLE = {"transformers.trainer.Trainer.compute_loss", "trl.trainer.sft_trainer.SFTTrainer.compute_loss"}
_STACK_DEPTH = 20  # Trainer._inner_training_loop -> CallbackHandler.on_train_begin -> call_event -> us
_METRICS = ("_metrics", "_stored_metrics")  # where TRL's trainers collect the metrics compute_loss logs


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
      The loss measured is the one being trained: the Trainer's own ``compute_loss`` (DPO's,
      GRPO's, KTO's, a reward model's pairwise loss, ...) on the recorded inputs, in its
      ``compute_loss_context_manager``; what those calls log (TRL's metrics) is discarded.
      Their losses are kept in :attr:`sensitivity_losses`. ``sensitivity_examples`` cuts the
      batch only for the Trainer's and SFTTrainer's own ``compute_loss``, whose rows are
      examples; any other ``compute_loss`` (TRL's preference and RL trainers, a subclass's) is
      measured on the whole batch, since a cut could pair the wrong rows.
    - It adds ``dropbp/drop_rate`` (mean fraction of branches dropped) and
      ``dropbp/backward_flops_skipped`` (fraction of branch backward FLOPs skipped) to each
      log, ahead of the reporting integrations (TensorBoard, W&B, ...) and of
      ``trainer.state.log_history``: at train begin it moves itself to the front of
      ``trainer.callback_handler.callbacks``.
    - Its state (rates, sensitivities, mask step) is saved in every checkpoint's
      ``trainer_state.json``, so ``trainer.train(resume_from_checkpoint=...)`` continues
      with exactly the masks of an uninterrupted run.

    Binding: :func:`dropbp.attach` adds the callback to a built Trainer, bound to it. A callback
    passed as ``Trainer(callbacks=[...])`` exists before its Trainer; it finds the Trainer at train
    begin as the ``self`` of the Trainer method a few frames up the call stack (a documented
    fallback; without a Trainer there, only ``sensitivity_at`` fails, with a one-line error).

    Args:
        config: A :class:`dropbp.DropBPConfig`; or pass its fields as keyword arguments,
            e.g. ``DropBPCallback(drop_rate=0.5, sensitivity_at=0.1, sensitivity_batches=1,
            max_rate=0.9, seed=0)``.
        trainer: The Trainer this callback serves, if known when it is built.

    Attributes:
        handle: The :class:`~dropbp.DropBPHandle` (after train begin).
        sensitivity_losses: The losses of the batches sensitivity was measured on (None before).

    Raises:
        ValueError: On invalid settings (see :class:`dropbp.DropBPConfig`).
        DropBPError: At train begin, with ``sensitivity_at`` set, if no ``transformers.Trainer``
            runs the callback, or the model or its checkpointing cannot be measured (see above).
    """

    def __init__(self, config: DropBPConfig | None = None, *, trainer: Any = None, **kwargs: Any):
        if config is not None and kwargs:
            raise ValueError("pass either config= or DropBPConfig fields as keyword arguments, not both")
        self.config = config if config is not None else DropBPConfig(**kwargs)
        self.trainer = trainer
        self.handle: DropBPHandle | None = None
        self._measured = False
        self._recent: deque = deque(maxlen=self.config.sensitivity_batches)
        self._recorder: _LossRecorder | None = None
        self._verifier = None
        self.sensitivity_losses: list[float] | None = None

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

    def _verify_first_batch(self, module, args: tuple, kwargs: dict) -> None:
        """On the first training forward: refuse fallback branches that would cut the residual stream."""
        if not (module.training and torch.is_grad_enabled()) or self._verifier is None:
            return
        self._verifier.remove()
        self._verifier = None
        require_sound_branches(module, self.handle, CallArguments(args, kwargs))

    def _find_trainer(self) -> Any:
        """The Trainer this callback serves: the one it was bound to, else the one running on_train_begin.

        The call-stack walk is the fallback for ``Trainer(callbacks=[DropBPCallback(...)])``, where the
        callback exists before its Trainer; :func:`attach` binds it explicitly.
        """
        if self.trainer is not None:
            return self.trainer
        from transformers import Trainer  # imported on use: it loads the whole training stack

        return calling_instance(Trainer, _STACK_DEPTH)

    def _run_first(self, trainer: Any) -> None:
        """Move this callback to the front of the Trainer's callback list.

        The Trainer puts user callbacks after its reporting integrations, so metrics this
        callback adds in ``on_log`` would reach TensorBoard or W&B one call too late. Moving
        an element from the position being iterated to the front leaves the elements after it
        where they were, so the ongoing ``on_train_begin`` round is not disturbed.
        """
        callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
        if isinstance(callbacks, list) and any(c is self for c in callbacks):
            callbacks[:] = [self] + [c for c in callbacks if c is not self]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self._find_trainer()
        self._run_first(trainer)
        if args.torch_compile:
            raise DropBPError(COMPILE_REFUSED)
        if model is None:
            raise ValueError("DropBPCallback needs the Trainer's model; none was passed to on_train_begin")
        # Mask steps: every micro-batch's forward with auto_step, else one per optimizer step.
        mask_steps = state.max_steps * (args.gradient_accumulation_steps if self.config.auto_step else 1) or None
        handle = find_handle(model)
        if handle is None:
            handle = apply(model, self.config, total_steps=mask_steps)
        elif self.config.drop_schedule != "constant":
            handle.set_schedule(self.config.drop_schedule, total_steps=mask_steps)
        self.handle = handle
        if handle.branch_source == "fallback" and self._verifier is None:
            self._verifier = model.register_forward_pre_hook(self._verify_first_batch, with_kwargs=True)
        saved = self._saved_state(state)
        if state.global_step > 0 and saved.get("handle_state"):
            handle.load_state_dict(saved["handle_state"])
            self._measured = bool(saved.get("measured"))
        refuse_zero3(model, sensitivity=self.config.sensitivity_at is not None and not self._measured)
        if self.config.sensitivity_at is not None and not self._measured:
            # Fail now, not after sensitivity_at of the run.
            if fsdp_modules(model)[0]:
                raise DropBPError(FSDP1_SENSITIVITY_REFUSED)
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
            if trainer is None:
                raise DropBPError(
                    "sensitivity_at measures sensitivity on the Trainer's compute_loss, and no transformers.Trainer "
                    "is running this callback; train with a Trainer (or a subclass) or pass sensitivity_at=None"
                )
            if self._recorder is not None:  # left by a train() that raised before on_train_end
                self._recorder.remove()
            self._recorder = _LossRecorder(trainer, self._recent)
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
        recorder = self._recorder
        trainer = recorder.trainer
        losses: dict[int, float] = {}  # per batch: the loss of its first forward (the measurement may rerun one)

        def closure(index: int, inputs: Any, keywords: dict) -> torch.Tensor:
            keywords = {k: v for k, v in keywords.items() if k != "return_outputs"}
            if cfg.sensitivity_examples is not None and _one_row_per_example(trainer):
                # The loss's normaliser counted the whole batch (and accumulation window); the cut batch has its own.
                inputs = _first_examples(inputs, cfg.sensitivity_examples)
                keywords.pop("num_items_in_batch", None)
            with trainer.compute_loss_context_manager():
                loss = _scalar_loss(recorder.compute_loss(model, inputs, **keywords))
            losses.setdefault(index, loss.item())
            return loss

        closures = [
            lambda n=n, i=inputs, k=keywords: closure(n, i, k) for n, (inputs, keywords) in enumerate(self._recent)
        ]
        recorder.remove()  # its own calls are not training batches
        self._recorder = None
        with _trainer_state_kept(trainer):
            self.handle.calibrate(closures, cfg.drop_rate, cfg.max_rate, cfg.allocation, cfg.sensitivity_metric)
        self.sensitivity_losses = [losses[n] for n in sorted(losses)]
        self._measured = True
        self._recent.clear()

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
            self._recent.clear()


def attach(trainer: Any, config: DropBPConfig | None = None, **kwargs: Any) -> DropBPCallback:
    """Add DropBP to a built ``transformers.Trainer`` (or TRL trainer): the explicit form of the callback.

    ``dropbp.attach(trainer, drop_rate=0.5)`` is ``Trainer(..., callbacks=[DropBPCallback(drop_rate=0.5)])``
    with the callback bound to ``trainer`` instead of finding it on the call stack, and placed first in
    ``trainer.callback_handler.callbacks`` so that its metrics reach every reporting integration.

    Args:
        trainer: The Trainer, before ``trainer.train()``.
        config: A :class:`dropbp.DropBPConfig`; or pass its fields as keyword arguments.

    Returns:
        The :class:`DropBPCallback` added (its ``handle`` is set when training begins).

    Raises:
        ValueError: If ``trainer`` has no ``callback_handler`` (not a Trainer) or already has a
            ``DropBPCallback``, or on invalid settings.
    """
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
    if not isinstance(callbacks, list):
        raise ValueError(f"dropbp.attach needs a transformers.Trainer (with a callback_handler), got "
                         f"{type(trainer).__name__}")
    if any(isinstance(c, DropBPCallback) for c in callbacks):
        raise ValueError("this Trainer already has a DropBPCallback; attach DropBP once")
    callback = DropBPCallback(config, trainer=trainer, **kwargs)
    callbacks.insert(0, callback)
    return callback
