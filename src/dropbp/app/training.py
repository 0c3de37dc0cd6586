"""The training job: data and model in, the step loop with DropBP, periodic held-out loss, the run folder out."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dropbp.app.checkpoint import (
    CHECKPOINT,
    Interrupted,
    StopRequest,
    load_checkpoint,
    partial_dir,
    prepare_output_dir,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from dropbp.app.config import FinetuneConfig, RunResult
from dropbp.app.files import write_json

__all__ = [
    "BatchStream", "autocast_dtype", "check_seq_len", "evaluate", "first_examples", "load_data", "lr_scheduler",
    "prepare_run", "resolve_device", "run_finetune",
]


def load_data(cfg: FinetuneConfig) -> tuple[list[dict], list[dict]]:
    """The run's training and held-out examples (see :func:`dropbp.app.data.load_examples`).

    Without ``--eval-data``, a user's ``--data`` gives up a deterministic 10% (by ``--seed``) as
    the held-out set; the bundled data has its own. ``--eval-size`` keeps the first examples.

    Raises:
        ValueError: On unreadable or malformed data (a one-line :class:`~dropbp.app.data.DataError`).
    """
    from dropbp.app.data import bundled_data_path, load_examples

    def load(source: str | os.PathLike[str], split: str) -> list[dict]:
        return load_examples(source, split=split, config=cfg.data_config, data_format=cfg.data_format,
                             columns=cfg.data_columns)

    if cfg.data is None:
        train = load_examples(bundled_data_path("train"))
        heldout = load(cfg.eval_data, cfg.eval_split) if cfg.eval_data else load_examples(bundled_data_path("heldout"))
    else:
        train = load(cfg.data, cfg.data_split)
        if cfg.eval_data is not None:
            heldout = load(cfg.eval_data, cfg.eval_split)
        else:  # hold out a deterministic 10% of the user's data
            if len(train) < 2:
                raise ValueError(f"{cfg.data} has {len(train)} example(s); pass --eval-data or add more examples")
            order = list(range(len(train)))
            random.Random(cfg.seed).shuffle(order)
            cut = max(1, len(train) // 10)
            heldout = [train[i] for i in order[:cut]]
            train = [train[i] for i in order[cut:]]
    if cfg.eval_size:
        heldout = heldout[: cfg.eval_size]
    return train, heldout


def check_seq_len(model: str | None, seq_len: int, revision: str | None = None) -> None:
    from dropbp.app.models import max_positions

    limit = max_positions(model, revision)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's maximum of {limit} positions; pass --seq-len <= {limit}")


class BatchStream:
    """Endless stream of batches, a fresh seeded shuffle per epoch, with a resumable position.

    Args:
        examples: The examples to draw from.
        batch_size: Examples per batch (a last partial batch of an epoch is skipped).
        seed: Seed of the shuffles.
    """

    def __init__(self, examples: list, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.index = 0, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> list:
        if self.index + self.batch_size > len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order()
        batch = [self.examples[i] for i in order[self.index : self.index + self.batch_size]]
        self.index += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def resolve_device(requested: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU; ``cuda`` without one is refused.

    Raises:
        ValueError: If ``cuda`` is requested and torch sees no GPU.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                         "use --device cpu or install a CUDA build of torch")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bfloat16 on CUDA and none (float32) on CPU."""
    if requested == "bfloat16" or (requested == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def first_examples(batch: dict[str, torch.Tensor], count: int | None) -> dict[str, torch.Tensor]:
    """The first ``count`` examples of a right-padded collated batch (all of it for None).

    The columns that are padding in all of them are cut off: the loss is the same (padding
    carries no label and is masked out of attention), the measurement costs less.
    """
    if count is None:
        return batch
    first = {k: v[:count] for k, v in batch.items()}
    width = int(first["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] for k, v in first.items()}


def lr_scheduler(optimizer, cfg: FinetuneConfig):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
    )

    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    if cfg.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, cfg.max_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def prepare_run(
    cfg: FinetuneConfig, command: str, need_full_batch: bool, resume: bool = False
) -> tuple[Path, list[dict], list[dict], Any, Any]:
    """Checks and loading shared by every job: cheap checks first, the model last.

    Args:
        cfg: The run settings.
        command: Prefix of the default output folder name.
        need_full_batch: Refuse fewer training examples than ``cfg.batch_size``.
        resume: The run folder is an interrupted run's, to be continued.

    Returns:
        The final run folder, training and held-out examples, the model ready to train, its tokenizer.
    """
    from dropbp.app.data import is_text_data
    from dropbp.app.models import load_model, prepare_for_training

    final = Path(cfg.output_dir) if resume else prepare_output_dir(cfg.output_dir, command, cfg.overwrite)
    train, heldout = load_data(cfg)
    # text documents are packed into blocks: their count is known after tokenizing (run_finetune checks it)
    if need_full_batch and not is_text_data(train) and len(train) < cfg.batch_size:
        raise ValueError(
            f"only {len(train)} training examples for --batch-size {cfg.batch_size}; lower --batch-size or add examples"
        )
    check_seq_len(cfg.model, cfg.seq_len, cfg.revision)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.method, revision=cfg.revision)
    return final, train, heldout, prepare_for_training(model, cfg.method), tokenizer


def evaluate(model, tokenizer, heldout: list[dict], seq_len: int, batch_size: int) -> dict[str, float | None]:
    from dropbp.app.data import exact_match_accuracy, heldout_loss, is_text_data

    return {
        "heldout_loss": float(heldout_loss(model, tokenizer, heldout, max_length=seq_len, batch_size=batch_size)),
        # text examples have no answer to match: their held-out loss is the measure
        "accuracy": None if is_text_data(heldout) else
        float(exact_match_accuracy(model, tokenizer, heldout, batch_size=max(batch_size, 16))),
    }


def run_finetune(cfg: FinetuneConfig, progress: bool = True, command: str = "finetune",
                 resume: bool = False, prepare: Callable[[Any], Any] | None = None) -> RunResult:
    """Fine-tune, evaluate before, during and after, and write the run folder.

    The folder holds ``config.json``, ``metrics.jsonl`` (one line per optimizer step, with
    ``heldout_loss`` on the steps it was evaluated), ``summary.json``, the adapter (or full
    weights with ``method="full"``) and ``loss.png``. It is written as ``<folder>.partial``
    and renamed when the run ends; ``--save-every`` checkpoints and Ctrl-C leave a resumable
    ``<folder>.partial/checkpoint``. ``wall_time_s`` is the training clock: held-out
    evaluation is not counted.

    Args:
        cfg: The run settings.
        progress: Show a progress bar with loss, tokens/s and the current drop rate.
        command: Prefix of the default output folder name.
        resume: Continue the interrupted run in ``cfg.output_dir`` from its checkpoint
            (see :func:`resume_config`): the same losses and weights as an uninterrupted run.
        prepare: Called with the model, ready to train and on its device, before the optimizer is
            built (``benchmarks/evidence.py`` attaches its forward-LayerDrop baseline with it).

    Returns:
        The per-step history and the summary.

    Raises:
        ValueError: On bad settings, a non-empty output folder without ``overwrite``, a
            missing model, malformed data, or a sequence length the model cannot take.
        Interrupted: On Ctrl-C, after writing a checkpoint of the last finished step.
    """
    from tqdm.auto import tqdm

    import dropbp
    from dropbp.app.data import collate, heldout_loss, tokenize_examples
    from dropbp.app.plots import plot_losses
    from dropbp.memory import ActivationMeter

    device = resolve_device(cfg.device)
    final, train, heldout, model, tokenizer = prepare_run(cfg, command, need_full_batch=True, resume=resume)
    tokenized = tokenize_examples(tokenizer, train, cfg.seq_len)
    if len(tokenized) < cfg.batch_size:
        raise ValueError(f"the training data makes {len(tokenized)} sequence(s) of --seq-len {cfg.seq_len}, fewer than "
                         f"--batch-size {cfg.batch_size}; lower --batch-size or add data")
    pad = tokenizer.pad_token_id
    if getattr(model, "hf_quantizer", None) is None:
        model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast = autocast_dtype(cfg.dtype, device)
    handle = None
    d = cfg.dropbp
    if cfg.use_dropbp:
        handle = dropbp.apply(model, d, total_steps=cfg.max_steps * (cfg.grad_accum if d.auto_step else 1))
        if handle.branch_source == "fallback":  # not a table architecture: verify before training on it
            from dropbp.verify import require_sound_branches

            require_sound_branches(model, handle, _to(collate(tokenized[: cfg.batch_size], pad), device))
    if prepare is not None:
        prepare(model)

    def forward_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            return model(**batch).loss

    eval_examples = heldout[: cfg.eval_subset]
    out = partial_dir(final)
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = lr_scheduler(optimizer, cfg)
    stream = BatchStream(tokenized, cfg.batch_size, cfg.seed)
    calibrate_at = d.sensitivity_step(cfg.max_steps) if handle is not None else None
    recent: deque = deque(maxlen=d.sensitivity_batches)
    history: list[dict[str, Any]] = []
    state: dict[str, Any] = {"step": 0, "clock_s": 0.0, "calibration_s": 0.0, "calibrated": False}
    if resume:
        saved = load_checkpoint(out, model, optimizer, scheduler)
        state = saved["run"]
        history = saved["history"]
        before = saved["before"]
        stream.load_state_dict(saved["stream"])
        recent.extend(saved["recent"])
        if handle is not None:
            handle.load_state_dict(saved["dropbp"])
            handle.sensitivities = saved["sensitivities"]
        set_rng_states(saved["rng"], device)
    else:
        write_json(out / "config.json", cfg.to_dict())
        before = None  # evaluated in the try below, so that Ctrl-C there leaves nothing behind

    def checkpoint() -> None:
        save_checkpoint(out, model, optimizer, scheduler, {
            "run": dict(state), "history": history, "before": before, "stream": stream.state_dict(),
            "recent": list(recent), "dropbp": handle.state_dict() if handle is not None else None,
            "sensitivities": handle.sensitivities if handle is not None else None, "rng": rng_states(device),
        })

    params = list(model.parameters())
    model.train()
    say = tqdm.write if progress else (lambda _: None)
    bar = None
    stop = StopRequest()
    try:
        if before is None:
            before = evaluate(model, tokenizer, heldout, cfg.seq_len, cfg.batch_size)
            say(f"held-out before training: {_evaluation_line(before)}")
            model.train()
        # Made after the initial evaluation, so that its rate and ETA are the training's from step 1.
        bar = tqdm(range(state["step"] + 1, cfg.max_steps + 1), desc=command, disable=not progress,
                   dynamic_ncols=True, initial=state["step"], total=cfg.max_steps)
        with stop, open(out / "metrics.jsonl", "w") as metrics:
            for record in history:  # a resumed run rewrites what it had up to its checkpoint
                metrics.write(json.dumps(record) + "\n")
            for step in bar:
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                if handle is not None and not handle.auto_step:
                    handle.step()
                loss_sum, tokens, activation_bytes, masks = 0.0, 0, 0, []
                for _ in range(cfg.grad_accum):
                    batch = _to(collate(next(stream), pad), device)
                    with ActivationMeter(params) as meter:
                        loss = forward_loss(batch)
                    activation_bytes = max(activation_bytes, meter.held_bytes)
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.item()
                    tokens += int(batch["attention_mask"].sum())
                    masks.append(handle.mask if handle is not None else [])
                    recent.append(batch)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_s = time.perf_counter() - t0
                state["clock_s"] += step_s
                dropped = [m for mask in masks for m in mask]
                record = {
                    "step": step,
                    "loss": loss_sum / cfg.grad_accum,
                    "lr": scheduler.get_last_lr()[0],
                    "step_time_s": step_s,
                    "tokens": tokens,
                    "tokens_per_s": tokens / step_s,
                    "drop_rate": sum(dropped) / len(dropped) if dropped else 0.0,
                    "backward_flops_skipped": (sum(handle.dropped_flops_fraction(m) for m in masks) / len(masks)
                                               if handle is not None else 0.0),
                    "activation_bytes": activation_bytes,
                }
                if device.type == "cuda":
                    record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
                if step == calibrate_at and not state["calibrated"]:
                    t1 = time.perf_counter()
                    handle.calibrate(  # the allocation settings come from handle.config, that is d
                        [lambda b=b: forward_loss(first_examples(b, d.sensitivity_examples)) for b in recent])
                    state["calibration_s"] = time.perf_counter() - t1
                    state["clock_s"] += state["calibration_s"]
                    state["calibrated"] = record["calibrated"] = True
                record["wall_time_s"] = state["clock_s"]
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    record["heldout_loss"] = float(heldout_loss(model, tokenizer, eval_examples,
                                                                max_length=cfg.seq_len, batch_size=cfg.batch_size))
                    say(f"step {step}: held-out loss {record['heldout_loss']:.3f} ({len(eval_examples)} examples)")
                    model.train()
                state["step"] = step
                history.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if stop.requested and step < cfg.max_steps:
                    checkpoint()
                    bar.close()
                    raise Interrupted(f"interrupted after step {step} of {cfg.max_steps}; checkpoint saved, continue "
                                      f"with: dropbp finetune --resume {final}")
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    checkpoint()
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                drop=f"{record['drop_rate']:.2f}")
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, mid-step, with whatever checkpoint there is
        if bar is not None:
            bar.close()
        saved = out / CHECKPOINT
        if not saved.is_dir():
            shutil.rmtree(out, ignore_errors=True)
            raise Interrupted("interrupted; nothing was written") from None
        kept = torch.load(saved / "state.pt", weights_only=False)["run"]["step"]
        raise Interrupted(f"interrupted during step {state['step'] + 1}; the checkpoint of step {kept} is kept, "
                          f"continue with: dropbp finetune --resume {final}") from None
    except Interrupted:
        raise
    except BaseException:
        if not (out / CHECKPOINT).is_dir():  # nothing to resume from: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    bar.close()
    after = evaluate(model, tokenizer, heldout, cfg.seq_len, cfg.batch_size)
    say(f"held-out after training: {_evaluation_line(after)}")
    saved = out / ("adapter" if cfg.method != "full" else "model")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)  # a full fine-tune's model/ then loads on its own, as pipeline() wants
    plot_losses({("DropBP" if handle else "baseline"): history}, out / "loss.png")
    summary = _summarize(history, before, after, state, handle)
    write_json(out / "summary.json", summary)
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(out, final)
    if handle is not None:
        handle.remove()
    if cfg.merge:
        from dropbp.app.export import export_merged

        export_merged(final)
    return RunResult(output_dir=str(final), history=history, summary=summary)


def _evaluation_line(result: dict[str, float | None]) -> str:
    accuracy = result["accuracy"]
    return f"loss {result['heldout_loss']:.3f}" + ("" if accuracy is None else
                                                   f", exact-match accuracy {100 * accuracy:.1f}%")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()} if device.type != "cpu" else batch


def _summarize(history, before, after, state, handle) -> dict[str, Any]:
    timed = history[1:] if len(history) > 1 else history  # the first step warms up
    tail = history[-min(10, len(history)):]
    return {
        "before": before,
        "after": after,
        "train_time_s": state["clock_s"],
        "calibration_time_s": state["calibration_s"],
        "calibration_steps": state["calibration_s"] / statistics.median(r["step_time_s"] for r in timed),
        "median_step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
        "mean_drop_rate": sum(r["drop_rate"] for r in history) / len(history),
        "mean_backward_flops_skipped": sum(r["backward_flops_skipped"] for r in history) / len(history),
        "mean_activation_bytes": sum(r["activation_bytes"] for r in history) / len(history),
        "final_train_loss": sum(r["loss"] for r in tail) / len(tail),
        "drop_rates": handle.drop_rates if handle is not None else None,
        "sensitivities": handle.sensitivities if handle is not None else None,
    }
