"""The main job: fine-tune a causal LM on instruction data with (or without) DropBP.

``run_finetune`` is what ``dropbp finetune`` calls; ``run_compare`` runs the baseline and
DropBP on identical data, seeds and steps. Every run folder is written under a temporary
name and renamed into place at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dropbp.app.files import AtomicDir, write_json, write_text
from dropbp.config import DropBPConfig

__all__ = [
    "BatchStream", "FinetuneConfig", "Interrupted", "RunResult", "autocast_dtype", "first_examples", "load_data",
    "lr_scheduler", "partial_dir", "prepare_output_dir", "resolve_device", "resume_config", "run_compare",
    "run_finetune", "run_sensitivity",
]


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run. Every field has CLI help in its metadata.

    Raises:
        ValueError: From ``__post_init__`` on an out-of-range value.
    """

    model: str | None = field(default=None, metadata={
        "help": "A local model folder or .gguf file, or a Hugging Face Hub id (owner/name, from the Hugging Face "
                "cache or downloaded into it); default: the bundled SmolLM2-135M-Instruct."})
    revision: str | None = field(default=None, metadata={"help": "The Hub id's branch, tag or commit; default: main."})
    data: str | None = field(default=None, metadata={
        "help": "Training data: a .jsonl, .json, .csv or .parquet file, a folder saved with datasets' save_to_disk, "
                "or a Hub dataset id (owner/name); default: the bundled data."})
    eval_data: str | None = field(default=None, metadata={
        "help": "Held-out data, as --data; default: the bundled held-out set, or 10%% of --data."})
    data_split: str = field(default="train", metadata={
        "help": "The split of --data to train on (a Hub dataset, a saved DatasetDict or a folder of data files)."})
    eval_split: str = field(default="test", metadata={"help": "The split of --eval-data, as --data-split."})
    data_config: str | None = field(default=None, metadata={
        "help": "The configuration (subset) of a Hub dataset with several; applies to --data and --eval-data."})
    data_format: Literal["auto", "prompt", "chat", "alpaca", "sharegpt", "text"] = field(default="auto", metadata={
        "help": "auto: told from the columns. prompt: {prompt, response|completion}; chat: {messages}; "
                "alpaca: {instruction, input, output}; sharegpt: {conversations: [{from, value}]}; "
                "text: {text}, loss on every token, packed into --seq-len blocks."})
    data_columns: str | None = field(default=None, metadata={
        "help": "Columns under other names, as FIELD=COLUMN pairs, e.g. prompt=question,response=answer; "
                "applies to --data and --eval-data."})
    method: Literal["lora", "qlora", "full"] = field(default="lora", metadata={"help": "What to train."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps."})
    seq_len: int = field(default=96, metadata={"help": "Maximum tokens per example (prompt + response)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, LoRA init and DropBP masks."})
    eval_size: int = field(default=120, metadata={"help": "Held-out examples evaluated before and after (0: all)."})
    output_dir: str | None = field(default=None, metadata={"help": "Run folder; default: runs/<command>-<time>."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output folder."})
    use_dropbp: bool = field(default=True, metadata={"help": "False runs the plain baseline."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; default: torch's choice."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches of --batch-size per optimizer step."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward (Hugging Face, non-reentrant)."}
    )
    lr_schedule: Literal["cosine", "constant"] = field(
        default="cosine", metadata={"help": "Learning-rate schedule after the linear warm-up."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of --max-steps spent in linear warm-up."})
    eval_every: int = field(
        default=10,
        metadata={"help": "Held-out loss on a fixed subset every N optimizer steps, off the training clock (0: off)."},
    )
    eval_subset: int = field(default=48, metadata={"help": "Held-out examples in the periodic held-out loss."})
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "auto: CUDA when torch sees a GPU, else CPU."}
    )
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "auto: bfloat16 autocast on CUDA, float32 on CPU."}
    )
    save_every: int = field(
        default=0, metadata={"help": "Write a resumable checkpoint every N optimizer steps (0: only on Ctrl-C)."}
    )
    merge: bool = field(
        default=False,
        metadata={"help": "After a LoRA or QLoRA run, also write <run>/merged: the adapter merged into the base model, "
                          "with the tokenizer (what dropbp export does)."},
    )
    dropbp: DropBPConfig = field(default_factory=DropBPConfig)

    def __post_init__(self) -> None:
        if isinstance(self.dropbp, dict):
            self.dropbp = DropBPConfig(**self.dropbp)
        for name in ("max_steps", "seq_len", "batch_size", "grad_accum", "eval_subset"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_size", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        for name, allowed in (("lr_schedule", ("cosine", "constant")), ("device", ("auto", "cpu", "cuda")),
                              ("dtype", ("auto", "float32", "bfloat16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.method not in ("lora", "qlora", "full"):
            raise ValueError(f"method must be lora, qlora or full, got {self.method!r}")
        from dropbp.app.data.loading import DATA_FORMATS, parse_columns

        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data-format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        parse_columns(self.data_columns)  # a bad mapping fails here, before the model loads
        if self.merge and self.method == "full":
            raise ValueError("--merge merges a LoRA adapter; a full fine-tune's model/ folder is already a loadable "
                             "model, so drop --merge")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (written to the run folder as config.json)."""
        return asdict(self)


@dataclass
class RunResult:
    """What a run measured; also written to summary.json."""

    output_dir: str
    history: list[dict[str, Any]]
    summary: dict[str, Any]


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


def _check_seq_len(model: str | None, seq_len: int, revision: str | None = None) -> None:
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


def _prepare_run(
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
    _check_seq_len(cfg.model, cfg.seq_len, cfg.revision)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.method, revision=cfg.revision)
    return final, train, heldout, prepare_for_training(model, cfg.method), tokenizer


def _evaluate(model, tokenizer, heldout: list[dict], seq_len: int, batch_size: int) -> dict[str, float | None]:
    from dropbp.app.data import exact_match_accuracy, heldout_loss, is_text_data

    return {
        "heldout_loss": float(heldout_loss(model, tokenizer, heldout, max_length=seq_len, batch_size=batch_size)),
        # text examples have no answer to match: their held-out loss is the measure
        "accuracy": None if is_text_data(heldout) else
        float(exact_match_accuracy(model, tokenizer, heldout, batch_size=max(batch_size, 16))),
    }


class Interrupted(Exception):
    """Ctrl-C during a run; the message says where the checkpoint is and how to resume."""


class _StopRequest:
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

    def __enter__(self) -> _StopRequest:
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


def _save_checkpoint(out: Path, model, optimizer, scheduler, state: dict[str, Any]) -> None:
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


def _load_checkpoint(out: Path, model, optimizer, scheduler) -> dict[str, Any]:
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


def _rng_states(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def lr_scheduler(optimizer, cfg: FinetuneConfig):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
    )

    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    if cfg.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, cfg.max_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


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
    final, train, heldout, model, tokenizer = _prepare_run(cfg, command, need_full_batch=True, resume=resume)
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
        saved = _load_checkpoint(out, model, optimizer, scheduler)
        state = saved["run"]
        history = saved["history"]
        before = saved["before"]
        stream.load_state_dict(saved["stream"])
        recent.extend(saved["recent"])
        if handle is not None:
            handle.load_state_dict(saved["dropbp"])
            handle.sensitivities = saved["sensitivities"]
        _set_rng_states(saved["rng"], device)
    else:
        write_json(out / "config.json", cfg.to_dict())
        before = None  # evaluated in the try below, so that Ctrl-C there leaves nothing behind

    def checkpoint() -> None:
        _save_checkpoint(out, model, optimizer, scheduler, {
            "run": dict(state), "history": history, "before": before, "stream": stream.state_dict(),
            "recent": list(recent), "dropbp": handle.state_dict() if handle is not None else None,
            "sensitivities": handle.sensitivities if handle is not None else None, "rng": _rng_states(device),
        })

    params = list(model.parameters())
    model.train()
    say = tqdm.write if progress else (lambda _: None)
    bar = None
    stop = _StopRequest()
    try:
        if before is None:
            before = _evaluate(model, tokenizer, heldout, cfg.seq_len, cfg.batch_size)
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
    after = _evaluate(model, tokenizer, heldout, cfg.seq_len, cfg.batch_size)
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


def time_to_reach(history: list[dict[str, Any]], level: float, window: int = 10) -> float | None:
    """Wall-clock seconds until the trailing mean train loss first reaches ``level``."""
    losses: deque = deque(maxlen=window)
    for record in history:
        losses.append(record["loss"])
        if len(losses) == min(window, len(history)) and sum(losses) / len(losses) <= level:
            return record["wall_time_s"]
    return None


def run_compare(cfg: FinetuneConfig, progress: bool = True) -> dict[str, Any]:
    """Run the baseline and DropBP with identical data, seeds and steps; write both and a table.

    The folder holds ``baseline/`` and ``dropbp/`` run folders, ``compare.json``,
    ``compare.md`` and ``loss_vs_time.png``.

    Returns:
        The comparison rows (also in compare.json).

    Raises:
        ValueError: As :func:`run_finetune`.
    """
    from dropbp.app.plots import plot_losses

    final = prepare_output_dir(cfg.output_dir, "compare", cfg.overwrite)
    with AtomicDir(final) as out:
        runs = {}
        for name, use in (("baseline", False), ("dropbp", True)):
            sub = FinetuneConfig(**{**cfg.to_dict(), "use_dropbp": use, "output_dir": str(out / name),
                                    "overwrite": False})
            runs[name] = run_finetune(sub, progress=progress, command=name)
        base, drop = runs["baseline"].summary, runs["dropbp"].summary
        target = base["final_train_loss"]
        heldout_target = last_heldout(runs["baseline"].history)
        rows = {}
        for name, run in runs.items():
            s = run.summary
            rows[name] = {
                "median_step_time_s": s["median_step_time_s"],
                "tokens_per_s": s["tokens_per_s"],
                "backward_flops_skipped": s["mean_backward_flops_skipped"],
                "activation_mb": s["mean_activation_bytes"] / 2**20,
                "sensitivity_cost_steps": s["calibration_steps"] if name == "dropbp" else None,
                "final_train_loss": s["final_train_loss"],
                "heldout_loss_subset_final": last_heldout(run.history),
                "heldout_loss": s["after"]["heldout_loss"],
                "accuracy_before": s["before"]["accuracy"],
                "accuracy_after": s["after"]["accuracy"],
                "time_to_baseline_loss_s": time_to_reach(run.history, target),
                "time_to_baseline_heldout_s": time_to_heldout(run.history, heldout_target),
                "train_time_s": s["train_time_s"],
            }
        reached = rows["dropbp"]["time_to_baseline_heldout_s"]
        result = {
            "rows": rows,
            "speedup_step_time": base["median_step_time_s"] / drop["median_step_time_s"],
            # DropBP's training clock (sensitivity included) to the baseline's final held-out loss,
            # over the baseline's whole training clock; None if DropBP never reached it.
            "time_to_quality_ratio": None if reached is None else reached / base["train_time_s"],
        }
        write_json(out / "compare.json", result)
        write_text(out / "compare.md", format_table(rows) + "\n\n" + COMPARE_NOTE + "\n")
        plot_losses({"baseline": runs["baseline"].history, "DropBP": runs["dropbp"].history},
                    out / "loss_vs_time.png")
    return result


COMPARE_NOTE = (
    "Times are the training clock: optimizer steps plus DropBP's sensitivity measurement, without the held-out "
    "evaluations. heldout_loss_subset_final is the last periodic held-out loss (on the fixed --eval-subset); "
    "time_to_baseline_heldout_s is the training clock at the first evaluation where the run's held-out loss is at or "
    "below the baseline's final one; heldout_loss and the accuracies are on --eval-size examples before and after."
)


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


def run_sensitivity(cfg: FinetuneConfig) -> tuple[list[dict[str, Any]], str]:
    """Measure each branch's sensitivity on one training batch and allocate rates.

    Writes ``sensitivity.json`` and ``sensitivity.png`` (sensitivity and allocated rate
    per branch) to the run folder.

    Returns:
        One row per branch (``branch``, ``sensitivity``, ``flops``, ``drop_rate``) and the folder.

    Raises:
        ValueError: As :func:`run_finetune`.
    """
    import dropbp
    from dropbp.app.data import collate, tokenize_examples
    from dropbp.app.plots import plot_sensitivity

    final, train, _, model, tokenizer = _prepare_run(cfg, "sensitivity", need_full_batch=False)
    d = cfg.dropbp
    handle = dropbp.apply(model, drop_rate=0.0, seed=d.seed, branches=d.branches)
    tokenized = tokenize_examples(tokenizer, train, cfg.seq_len)
    items = next(BatchStream(tokenized, cfg.batch_size, cfg.seed)) if len(tokenized) >= cfg.batch_size else tokenized
    batch = collate(items, tokenizer.pad_token_id)
    model.train()
    sample = first_examples(batch, d.sensitivity_examples)
    sensitivity = handle.sensitivity(lambda: model(**sample).loss, metric=d.sensitivity_metric)
    rates = handle.allocate(d.drop_rate, sensitivity, max_rate=d.max_rate, method=d.allocation)
    rows = [
        {"branch": b.name, "sensitivity": s, "flops": float(b.flops), "drop_rate": r}
        for b, s, r in zip(handle.branches, sensitivity, rates)
    ]
    with AtomicDir(final) as out:
        write_json(out / "config.json", cfg.to_dict())
        write_json(out / "sensitivity.json", rows)
        plot_sensitivity([r["branch"] for r in rows], sensitivity, rates, out / "sensitivity.png")
    handle.remove()
    return rows, str(final)
