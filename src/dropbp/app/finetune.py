"""The main job: fine-tune a causal LM on prompt/response data with (or without) DropBP.

``run_finetune`` is what ``dropbp finetune`` calls; ``run_compare`` runs the baseline and
DropBP on identical data, seeds and steps. Every run folder is written under a temporary
name and renamed into place at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dropbp.app.files import AtomicDir, write_json, write_text
from dropbp.config import DropBPConfig

__all__ = ["FinetuneConfig", "RunResult", "prepare_output_dir", "run_compare", "run_finetune", "run_sensitivity"]


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run. Every field has CLI help in its metadata.

    Raises:
        ValueError: From ``__post_init__`` on an out-of-range value.
    """

    model: str | None = field(default=None, metadata={"help": "Local model folder or .gguf file; default: bundled SmolLM2-135M-Instruct."})
    data: str | None = field(default=None, metadata={"help": "Training JSONL of {prompt, response}; default: bundled data."})
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out JSONL; default: bundled held-out set, or 10%% of --data."}
    )
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
    dropbp: DropBPConfig = field(default_factory=DropBPConfig)

    def __post_init__(self) -> None:
        if isinstance(self.dropbp, dict):
            self.dropbp = DropBPConfig(**self.dropbp)
        for name in ("max_steps", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_size < 0:
            raise ValueError(f"eval-size must be >= 0, got {self.eval_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.method not in ("lora", "qlora", "full"):
            raise ValueError(f"method must be lora, qlora or full, got {self.method!r}")

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
    return path


def _load_data(cfg: FinetuneConfig) -> tuple[list[dict], list[dict]]:
    from dropbp.app.data import bundled_data_path, load_examples

    if cfg.data is None:
        train = load_examples(bundled_data_path("train"))
        heldout = load_examples(cfg.eval_data or bundled_data_path("heldout"))
    else:
        train = load_examples(cfg.data)
        if cfg.eval_data is not None:
            heldout = load_examples(cfg.eval_data)
        else:  # hold out a deterministic 10% of the user's file
            order = list(range(len(train)))
            random.Random(cfg.seed).shuffle(order)
            cut = max(1, len(train) // 10)
            if len(train) < 2:
                raise ValueError(f"{cfg.data} has {len(train)} example(s); pass --eval-data or add more examples")
            heldout = [train[i] for i in order[:cut]]
            train = [train[i] for i in order[cut:]]
    if cfg.eval_size:
        heldout = heldout[: cfg.eval_size]
    return train, heldout


def _check_seq_len(model: str | None, seq_len: int) -> None:
    from dropbp.app.models import max_positions

    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's maximum of {limit} positions; pass --seq-len <= {limit}")


def _batches(examples: list[dict], batch_size: int, seed: int):
    """Endless stream of batches: a fresh seeded shuffle per epoch."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed * 1000003 + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]
        epoch += 1


def _prepare_run(
    cfg: FinetuneConfig, command: str, need_full_batch: bool
) -> tuple[Path, list[dict], list[dict], Any, Any]:
    """Checks and loading shared by every job: cheap checks first, the model last.

    Args:
        cfg: The run settings.
        command: Prefix of the default output folder name.
        need_full_batch: Refuse fewer training examples than ``cfg.batch_size``.

    Returns:
        The final run folder, training and held-out examples, the model ready to train, its tokenizer.
    """
    from dropbp.app.models import load_model, prepare_for_training

    final = prepare_output_dir(cfg.output_dir, command, cfg.overwrite)
    train, heldout = _load_data(cfg)
    if need_full_batch and len(train) < cfg.batch_size:
        raise ValueError(
            f"only {len(train)} training examples for --batch-size {cfg.batch_size}; lower --batch-size or add examples"
        )
    _check_seq_len(cfg.model, cfg.seq_len)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.method)
    return final, train, heldout, prepare_for_training(model, cfg.method), tokenizer


def _evaluate(model, tokenizer, heldout: list[dict], seq_len: int, batch_size: int) -> dict[str, float]:
    from dropbp.app.data import exact_match_accuracy, heldout_loss

    return {
        "heldout_loss": float(heldout_loss(model, tokenizer, heldout, max_length=seq_len, batch_size=batch_size)),
        "accuracy": float(exact_match_accuracy(model, tokenizer, heldout, batch_size=max(batch_size, 16))),
    }


def run_finetune(cfg: FinetuneConfig, progress: bool = True, command: str = "finetune") -> RunResult:
    """Fine-tune, evaluate before and after, and write the run folder.

    The folder holds ``config.json``, ``metrics.jsonl`` (one line per step),
    ``summary.json``, the adapter (or full weights with ``method="full"``) and PNG plots of
    loss against step and against wall-clock time.

    Args:
        cfg: The run settings.
        progress: Show a progress bar with loss, tokens/s and the current drop rate.
        command: Prefix of the default output folder name.

    Returns:
        The per-step history and the summary.

    Raises:
        ValueError: On bad settings, a non-empty output folder without ``overwrite``, a
            missing model, malformed data, or a sequence length the model cannot take.
    """
    from tqdm.auto import tqdm

    import dropbp
    from dropbp.app.data import collate, tokenize_example
    from dropbp.app.plots import plot_losses
    from dropbp.memory import ActivationMeter

    final, train, heldout, model, tokenizer = _prepare_run(cfg, command, need_full_batch=True)
    tokenized = [tokenize_example(tokenizer, ex["prompt"], ex["response"], cfg.seq_len) for ex in train]
    handle = None
    if cfg.use_dropbp:
        d = cfg.dropbp
        handle = dropbp.apply(
            model, drop_rate=d.drop_rate, seed=d.seed, branches=d.branches, auto_step=d.auto_step, replay=d.replay
        )
        if handle.branch_source == "fallback":  # not a table architecture: verify before training on it
            from dropbp.verify import require_sound_branches

            require_sound_branches(model, handle, collate(tokenized[: cfg.batch_size], tokenizer.pad_token_id))

    with AtomicDir(final) as out:
        write_json(out / "config.json", cfg.to_dict())
        before = _evaluate(model, tokenizer, heldout, cfg.seq_len, cfg.batch_size)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        calibrate_at = cfg.dropbp.sensitivity_step(cfg.max_steps) if handle is not None else None
        recent: deque = deque(maxlen=cfg.dropbp.sensitivity_batches)
        history: list[dict[str, Any]] = []
        stream = _batches(tokenized, cfg.batch_size, cfg.seed)
        pad = tokenizer.pad_token_id
        params = list(model.parameters())
        model.train()
        start = time.perf_counter()
        calibration_s = 0.0
        bar = tqdm(range(1, cfg.max_steps + 1), desc=command, disable=not progress, dynamic_ncols=True)
        with open(out / "metrics.jsonl", "w") as metrics:
            for step in bar:
                batch = collate(next(stream), pad)
                t0 = time.perf_counter()
                if handle is not None and not handle.auto_step:
                    handle.step()
                with ActivationMeter(params) as meter:
                    loss = model(**batch).loss
                activation_bytes = meter.held_bytes
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_s = time.perf_counter() - t0
                tokens = int(batch["attention_mask"].sum())
                mask = handle.mask if handle is not None else []
                record = {
                    "step": step,
                    "loss": loss.item(),
                    "step_time_s": step_s,
                    "wall_time_s": time.perf_counter() - start,
                    "tokens": tokens,
                    "tokens_per_s": tokens / step_s,
                    "drop_rate": (sum(mask) / len(mask)) if mask else 0.0,
                    "backward_flops_skipped": handle.dropped_flops_fraction(mask) if handle is not None else 0.0,
                    "activation_bytes": activation_bytes,
                }
                recent.append(batch)
                if step == calibrate_at:
                    t1 = time.perf_counter()
                    d = cfg.dropbp
                    handle.calibrate(
                        [lambda b=b: model(**b).loss for b in recent], d.drop_rate, d.max_rate, d.allocation,
                        d.sensitivity_metric,
                    )
                    calibration_s = time.perf_counter() - t1
                    record["calibrated"] = True
                    record["wall_time_s"] = time.perf_counter() - start
                history.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                drop=f"{record['drop_rate']:.2f}")
        train_s = time.perf_counter() - start
        after = _evaluate(model, tokenizer, heldout, cfg.seq_len, cfg.batch_size)
        model.save_pretrained(out / ("adapter" if cfg.method != "full" else "model"))
        plot_losses({("DropBP" if handle else "baseline"): history}, out / "loss.png")
        summary = _summarize(history, before, after, train_s, calibration_s, handle)
        write_json(out / "summary.json", summary)
    if handle is not None:
        handle.remove()
    return RunResult(output_dir=str(final), history=history, summary=summary)


def _summarize(history, before, after, train_s, calibration_s, handle) -> dict[str, Any]:
    timed = history[1:] if len(history) > 1 else history  # the first step warms up
    tail = history[-min(10, len(history)):]
    return {
        "before": before,
        "after": after,
        "train_time_s": train_s,
        "calibration_time_s": calibration_s,
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
        rows = {}
        for name, run in runs.items():
            s = run.summary
            rows[name] = {
                "median_step_time_s": s["median_step_time_s"],
                "tokens_per_s": s["tokens_per_s"],
                "backward_flops_skipped": s["mean_backward_flops_skipped"],
                "activation_mb": s["mean_activation_bytes"] / 2**20,
                "final_train_loss": s["final_train_loss"],
                "heldout_loss": s["after"]["heldout_loss"],
                "accuracy_before": s["before"]["accuracy"],
                "accuracy_after": s["after"]["accuracy"],
                "time_to_baseline_loss_s": time_to_reach(run.history, target),
                "train_time_s": s["train_time_s"],
            }
        result = {"rows": rows, "speedup_step_time": base["median_step_time_s"] / drop["median_step_time_s"]}
        write_json(out / "compare.json", result)
        write_text(out / "compare.md", format_table(rows) + "\n")
        plot_losses({"baseline": runs["baseline"].history, "DropBP": runs["dropbp"].history},
                    out / "loss_vs_time.png")
    return result


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
    from dropbp.app.data import collate, tokenize_example
    from dropbp.app.plots import plot_sensitivity

    final, train, _, model, tokenizer = _prepare_run(cfg, "sensitivity", need_full_batch=False)
    d = cfg.dropbp
    handle = dropbp.apply(model, drop_rate=0.0, seed=d.seed, branches=d.branches)
    examples = next(_batches(train, cfg.batch_size, cfg.seed)) if len(train) >= cfg.batch_size else train
    batch = collate([tokenize_example(tokenizer, e["prompt"], e["response"], cfg.seq_len) for e in examples],
                    tokenizer.pad_token_id)
    model.train()
    sensitivity = handle.sensitivity(lambda: model(**batch).loss, metric=d.sensitivity_metric)
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
