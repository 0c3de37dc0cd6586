"""The jobs built on the training run: ``dropbp compare`` (baseline and DropBP side by side) and ``dropbp sensitivity``."""

from __future__ import annotations

from typing import Any

from dropbp.app.checkpoint import prepare_output_dir
from dropbp.app.config import FinetuneConfig
from dropbp.app.files import AtomicDir, write_json, write_text
from dropbp.app.reporting import COMPARE_NOTE, format_table, last_heldout, time_to_heldout, time_to_reach
from dropbp.app.training import BatchStream, first_examples, prepare_run, run_finetune

__all__ = ["run_compare", "run_sensitivity"]


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

    final, train, _, model, tokenizer = prepare_run(cfg, "sensitivity", need_full_batch=False)
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
