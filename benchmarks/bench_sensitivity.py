"""Sensitivity on fewer examples: what it costs and whether it keeps the allocation, on the bundled model.

Run (about 6 minutes on 2 idle CPU cores)::

    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/bench_sensitivity.py

What it measures
    ``dropbp finetune`` measures each branch's sensitivity once (``handle.sensitivity``, the exact fast
    recipe: one forward, one backward, one partial backward per branch) on a training batch and
    allocates per-branch drop rates from it (``allocate_drop_rates(..., method="exact")``: minimise
    ``sum_l S_l p_l^2`` at a FLOPs-weighted mean rate equal to the target). On the full batch of 8 that
    measurement costs many training steps; the paper measures on a single example. This benchmark asks
    how few examples keep the allocation.

    The model is prepared as ``dropbp finetune`` prepares it (``_prepare_run``): the bundled
    SmolLM2-135M-Instruct (30 layers, 60 branches) with the default LoRA adapters (rank 16, alpha 32),
    the bundled training data tokenised with ``tokenize_example`` at seq_len 96, batches of 8 from the
    run's seeded ``BatchStream``, ``dropbp.apply(drop_rate=0.5)``, AdamW at lr 1e-3 with the run's
    schedule (linear warm-up over 10% of 60 steps, then cosine). It first trains
    ``--steps`` + 1 steps (the first one untimed): with the defaults these are the 6 steps after which a
    default 60-step run measures sensitivity (``sensitivity_at`` 0.1), and their times give the step
    time. Then, on the next ``--batches`` batches of the stream (one round per batch, after an untimed
    warm-up step and ``k=1`` measurement on another batch), it runs in this order:

    * ``step``  one training step on the round's batch (forward + backward + AdamW step, DropBP at
                drop rate 0.5); the trainable weights are restored afterwards, so every measurement
                sees the same model. The branch FLOPs recorded by this step are the ones allocated with.
    * ``full``  sensitivity on the whole batch of 8 (the reference)
    * ``k4``, ``k2``, ``k1``  sensitivity on the first k examples of the batch, taken as ``dropbp
                finetune`` takes them for ``sensitivity_examples=k`` (``finetune.first_examples``: the
                first k rows, with the columns that are padding in all of them cut off; the loss is the
                same, the measurement cheaper)
    * ``k1_serial``  ``k1`` with the partial backwards run one branch at a time, as before they
                were batched down the decoder layers (same values; shows what batching saves)

    Derived variants, measured by nothing extra: ``k1x2`` averages the ``k1`` sensitivities of this
    batch and of the previous one (cyclically), which is what ``sensitivity_batches=2`` with one example
    per batch would do (its cost is the two ``k1`` times); ``uniform`` is p = 0.5 everywhere (cost 0).

    For each variant and batch: Spearman rank correlation of its sensitivities with the full batch's;
    Spearman correlation of the allocated rates (target 0.5, max_rate 0.9, exact) with the full batch's
    allocation; and the objective ratio ``sum_l S_full,l p_l^2 / sum_l S_full,l p_full,l^2`` (the
    variant's rates judged by the full batch's sensitivities; 1.0 = as good, the full allocation is the
    minimum). Because the full batch of 8 is itself a sample, the same ratio is also given against the
    *pooled* reference (the mean of the full-batch sensitivities of all rounds, 8 x batches examples),
    for the full batch too: that is the noise floor an 8-example measurement already has.

    A second timed step, ``step_mid``, runs in the middle of each round (after the largest subsample).
    Cost in steps = median measurement wall time / median wall time of the round steps (``step`` and
    ``step_mid``: they are interleaved with the measurements, so they share the machine's load; the
    training steps before are reported but not used, since the machine's load can change between the
    phases); also the median over rounds of the measurement's time over the mean of its own round's two
    steps, in wall and in process CPU time.

    Token subsampling is not measured: the loss covers the response tokens only and they come after
    the prompt, so keeping the first T tokens of every example drops the end of every response (a
    different, biased objective, and for long prompts no response at all); masking random label
    positions instead keeps the distribution but saves no compute (forward and backward still run on
    every token).

Timing follows DESIGN.md through ``harness.py`` (one process, fixed threads, fixed-order interleaved
rounds, medians, ratios, machine record). Results: ``benchmarks/results/sensitivity.{json,md}``.
Usage: ``python benchmarks/bench_sensitivity.py [--batches 5] [--steps 5] [--ks 1,2,4] [--threads 2]``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from pathlib import Path

import torch

import dropbp
from dropbp.allocation import allocation_objective
from harness import RESULTS, Run, args_record, cpu_and_wall, interleaved, say

TARGET = 0.5
MAX_RATE = 0.9
COST_BAR = 2.0       # training steps
OBJECTIVE_BAR = 1.05  # worst batch, against the full batch's own optimum
RATE_RANK_BAR = 0.9   # mean Spearman of the allocated rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, default=5, help="training batches measured (rounds, >= 3)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps before the measurements (>= 3)")
    p.add_argument("--ks", default="1,2,4", help="example subsamples (first k examples of each batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.ks = sorted({int(k) for k in args.ks.split(",")}, reverse=True)
    if args.batches < 3 or args.steps < 3 or not all(0 < k < args.batch_size for k in args.ks):
        p.error("need --batches >= 3, --steps >= 3 and every k in [1, batch-size)")
    return args


# ---------------------------------------------------------------------------------- statistics
def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank); NaN if either side is constant."""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for m in range(i, j + 1):
                r[order[m]] = (i + j) / 2 + 1
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = math.fsum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = math.fsum((x - ma) ** 2 for x in ra), math.fsum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def _agg(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": statistics.fmean(finite), "min": min(finite), "max": max(finite)}


# ---------------------------------------------------------------------------------- setup
def prepare(args):
    """Model, tokenizer, handle, optimizer and the batch stream, as ``dropbp finetune`` prepares them."""
    from dropbp.app.data import tokenize_example
    from dropbp.app.finetune import BatchStream, FinetuneConfig, load_data, lr_scheduler
    from dropbp.app.models import load_model, prepare_for_training

    cfg = FinetuneConfig(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    train, _ = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.method)
    model = prepare_for_training(model, cfg.method)
    tokenized = [tokenize_example(tokenizer, ex["prompt"], ex["response"], cfg.seq_len) for ex in train]
    d = cfg.dropbp
    handle = dropbp.apply(model, drop_rate=d.drop_rate, seed=d.seed, branches=d.branches, auto_step=d.auto_step,
                          replay=d.replay)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    optimizer.scheduler = lr_scheduler(optimizer, cfg)  # stepped by train_step, as in the run
    model.train()
    return cfg, model, tokenizer, handle, optimizer, BatchStream(tokenized, cfg.batch_size, cfg.seed)


def train_step(model, optimizer, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    scheduler = getattr(optimizer, "scheduler", None)
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def branch_by_branch():
    """The sensitivity measurement as it was before the batched path: one partial backward per branch."""
    import dropbp.calibration

    saved = dropbp.calibration.block_modules
    dropbp.calibration.block_modules = lambda *_: None
    try:
        yield
    finally:
        dropbp.calibration.block_modules = saved


def first_examples(batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The first ``k`` examples as ``dropbp finetune`` takes them for ``sensitivity_examples=k``."""
    from dropbp.app.finetune import first_examples

    return first_examples(batch, k)


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = Run(threads=args.threads)
    from dropbp.app.data import collate

    t0 = time.perf_counter()
    _cfg, model, tokenizer, handle, optimizer, stream = prepare(args)
    pad = tokenizer.pad_token_id
    params = handle.trainable_parameters()
    say(f"loaded in {time.perf_counter() - t0:.0f}s: {len(handle.branches)} branches, "
        f"{sum(p.numel() for p in params)} trainable parameters, {args.threads} threads, "
        f"load average {os.getloadavg()}")

    # 1. training steps: the model reaches the state in which a default run measures; their times.
    train_times = interleaved({"step": lambda _r: cpu_and_wall(
        lambda: train_step(model, optimizer, collate(next(stream), pad)))}, args.steps, label="training step")["step"]

    # 2. measurements, one round per batch.
    saved = [p.detach().clone() for p in params]
    warm = collate(next(stream), pad)
    batches = [collate(next(stream), pad) for _ in range(args.batches)]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    train_step(model, optimizer, warm)  # untimed warm-up of the round's step and of a measurement
    restore()
    handle.sensitivity(lambda: model(**first_examples(warm, 1)).loss)
    say(f"warm-up done; load average {os.getloadavg()}")

    sens: dict[str, list[list[float]]] = {}
    flops: list[list[int]] = []
    widths: dict[str, list[int]] = {}

    def step_variant(record_flops: bool):
        def call(r: int):
            t = cpu_and_wall(lambda: train_step(model, optimizer, batches[r]))
            if record_flops:
                flops.append(list(handle.flops))  # this batch's shape: what calibrate would allocate with
            restore()
            return t
        return call

    def measure(name: str, k: int, batched: bool = True):
        def call(r: int):
            sub = batches[r] if k == args.batch_size else first_examples(batches[r], k)
            widths.setdefault(name, []).append(int(sub["input_ids"].shape[1]))
            out: list[float] = []
            with contextlib.nullcontext() if batched else branch_by_branch():
                t = cpu_and_wall(lambda: out.extend(handle.sensitivity(lambda: model(**sub).loss)))
            sens.setdefault(name, []).append(out)
            return t
        return call

    measured = ["full"] + [f"k{k}" for k in args.ks]
    variants = {"step": step_variant(True), "full": measure("full", args.batch_size)}
    for i, k in enumerate(args.ks):  # ks in decreasing order; step_mid after the largest subsample
        variants[f"k{k}"] = measure(f"k{k}", k)
        if i == 0:
            variants["step_mid"] = step_variant(False)
    variants["k1_serial"] = measure("k1_serial", 1, batched=False)
    measured.append("k1_serial")
    order = list(variants)
    times = interleaved(variants, args.batches, warmup=0, label="batch")

    # 3. derived variants, allocations, statistics.
    n_b = args.batches
    sens["k1x2"] = [[(a + b) / 2 for a, b in zip(sens["k1"][r], sens["k1"][r - 1])] for r in range(n_b)]
    times["k1x2"] = {ph: [times["k1"][ph][r] + times["k1"][ph][r - 1] for r in range(n_b)] for ph in ("wall", "cpu")}
    pooled = [statistics.fmean(col) for col in zip(*sens["full"])]
    n = len(handle.branches)

    def rates_of(s: list[float], r: int) -> list[float]:
        return dropbp.allocate_drop_rates(s, flops[r], TARGET, max_rate=MAX_RATE, method="exact")

    full_rates = [rates_of(sens["full"][r], r) for r in range(n_b)]
    pooled_rates = [rates_of(pooled, r) for r in range(n_b)]
    round_steps = {ph: times["step"][ph] + times["step_mid"][ph] for ph in ("wall", "cpu")}
    step_med = {ph: statistics.median(v) for ph, v in round_steps.items()}
    pair_step = {ph: [(a + b) / 2 for a, b in zip(times["step"][ph], times["step_mid"][ph])] for ph in ("wall", "cpu")}

    rows: dict[str, dict] = {}
    for name in [*measured, "k1x2", "uniform"]:
        per: dict[str, list[float]] = {"sens_rank": [], "rate_rank": [], "objective_ratio": [],
                                       "objective_ratio_pooled": []}
        rates_all = []
        for r in range(n_b):
            rates = [TARGET] * n if name == "uniform" else rates_of(sens[name][r], r)
            rates_all.append(rates)
            per["sens_rank"].append(float("nan") if name == "uniform" else spearman(sens[name][r], sens["full"][r]))
            per["rate_rank"].append(spearman(rates, full_rates[r]))
            per["objective_ratio"].append(allocation_objective(sens["full"][r], rates)
                                          / allocation_objective(sens["full"][r], full_rates[r]))
            per["objective_ratio_pooled"].append(allocation_objective(pooled, rates)
                                                 / allocation_objective(pooled, pooled_rates[r]))
        row: dict = {"per_batch": per, **{key: _agg(v) for key, v in per.items()}, "rates": rates_all}
        if name == "uniform":
            row["cost_steps"] = {"median": 0.0, "min": 0.0, "max": 0.0, "paired_wall": 0.0, "paired_cpu": 0.0}
        else:
            wall, cpu = times[name]["wall"], times[name]["cpu"]
            row["cost_steps"] = {
                "median": statistics.median(wall) / step_med["wall"],
                "min": min(wall) / step_med["wall"], "max": max(wall) / step_med["wall"],
                "paired_wall": statistics.median(w / s for w, s in zip(wall, pair_step["wall"])),
                "paired_cpu": statistics.median(c / s for c, s in zip(cpu, pair_step["cpu"])),
            }
            row["median_s"] = {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}
        rows[name] = row
        say(f"  {name:8s} cost {row['cost_steps']['median']:6.2f} steps  sens rank {row['sens_rank']['mean']:.3f}  "
            f"rate rank {row['rate_rank']['mean']:.3f}  objective {row['objective_ratio']['mean']:.4f} "
            f"(max {row['objective_ratio']['max']:.4f})")

    recommendation = recommend(rows, args)
    run.finish()
    summary = {"step_time_s": {"median": step_med, "training": train_times, "round_steps": round_steps,
                               "training_median": {ph: statistics.median(v) for ph, v in train_times.items()}},
               "round_order": order,
               "rows": {k: {kk: vv for kk, vv in v.items() if kk != "rates"} for k, v in rows.items()},
               "recommendation": recommendation, "sensitivities": sens, "batch_widths": {"full": [int(b["input_ids"].shape[1])
                                                                             for b in batches], **widths}}
    report = markdown_report(args, summary, rows, run, n)
    print(report)
    record = {"command": run.command, "args": args_record(args), "machine": run.machine(),
              "runtime_s": run.runtime_s, "target": TARGET, "max_rate": MAX_RATE,
              "model": "bundled SmolLM2-135M-Instruct, LoRA r16 alpha32, fp32",
              "branches": [b.name for b in handle.branches], "flops": flops,
              "raw_times_s": times, "pooled_sensitivity": pooled,
              "rates": {k: v["rates"] for k, v in rows.items()}, **summary}
    run.write(args.out, "sensitivity", record, report)


def recommend(rows: dict[str, dict], args) -> dict:
    """The cheapest subsample within the cost bar that keeps the allocation; or why none does."""
    candidates = [f"k{k}" for k in args.ks] + ["k1x2"]

    def keeps(name: str) -> bool:
        r = rows[name]
        return r["objective_ratio"]["max"] <= OBJECTIVE_BAR and r["rate_rank"]["mean"] >= RATE_RANK_BAR

    def cost(name: str) -> float:
        return rows[name]["cost_steps"]["median"]

    good = sorted((c for c in candidates if keeps(c)), key=cost)
    within = [c for c in good if cost(c) <= COST_BAR]
    if within:
        pick, ok = within[0], True
    elif good:
        pick, ok = good[0], False
    else:
        pick, ok = min(candidates, key=lambda c: rows[c]["objective_ratio"]["max"]), False
    return {"variant": pick, "meets_all_bars": ok, "keeps_allocation": good, "within_cost_bar": within,
            "bars": {"cost_steps": COST_BAR, "objective_ratio_max": OBJECTIVE_BAR, "rate_rank_mean": RATE_RANK_BAR}}


def markdown_report(args, summary, rows, run: Run, n: int) -> str:
    step = summary["step_time_s"]["median"]
    rec = summary["recommendation"]
    labels = {"full": f"full batch ({args.batch_size} examples): reference", "k1x2": "k=1, averaged over 2 batches",
              "uniform": "uniform p = 0.5 (no measurement)",
              "k1_serial": "first 1 example, one partial backward per branch (before batching)"}
    for k in args.ks:
        labels[f"k{k}"] = f"first {k} example{'s' if k > 1 else ''} (`sensitivity_examples={k}`)"
    lines = [
        "# Sensitivity on fewer examples: cost and allocation quality", "",
        f"Command: `{run.command}`  ",
        f"Model: the bundled SmolLM2-135M-Instruct ({n} branches), LoRA r16/alpha 32 as `dropbp finetune` prepares "
        f"it, after {args.steps + 1} training steps (batch {args.batch_size}, seq_len {args.seq_len}, AdamW lr 1e-3, "
        f"DropBP at 0.5); {args.batches} further training batches of the run's stream measured, one interleaved "
        f"round each ({', '.join(summary['round_order'])}); exact allocation at target {TARGET}, "
        f"max_rate {MAX_RATE}; {args.threads} threads, {os.cpu_count()} CPUs, torch {torch.__version__}; total run "
        f"{run.runtime_s:.0f}s.  ",
        f"Training step (forward + backward + AdamW, DropBP at 0.5, batch {args.batch_size}): median "
        f"{step['wall']:.2f}s wall, {step['cpu']:.2f}s CPU over the {2 * args.batches} round steps (the "
        f"{args.steps} timed training steps before the rounds: median "
        f"{summary['step_time_s']['training_median']['wall']:.2f}s wall, not used).", "",
        "| variant | cost (steps) | cost min..max | paired cost wall / CPU | Spearman S mean (min) "
        "| Spearman rates mean (min) | objective ratio mean (max) | vs pooled reference mean (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x: float, spec: str = ".3f") -> str:
        return "n/a" if math.isnan(x) else format(x, spec)

    for name, row in rows.items():
        c = row["cost_steps"]
        lines.append(
            f"| {labels[name]} | {c['median']:.2f} | {c['min']:.2f}..{c['max']:.2f} | {c['paired_wall']:.2f} / "
            f"{c['paired_cpu']:.2f} | {f(row['sens_rank']['mean'])} ({f(row['sens_rank']['min'])}) "
            f"| {f(row['rate_rank']['mean'])} ({f(row['rate_rank']['min'])}) "
            f"| {f(row['objective_ratio']['mean'], '.4f')} ({f(row['objective_ratio']['max'], '.4f')}) "
            f"| {f(row['objective_ratio_pooled']['mean'], '.4f')} ({f(row['objective_ratio_pooled']['max'], '.4f')}) |")
    pick = rec["variant"]
    r = rows[pick]
    verdict_line = (
        f"**Recommended default: {labels[pick]}** (`{pick}`): it costs {r['cost_steps']['median']:.2f} training "
        f"steps (median; paired {r['cost_steps']['paired_wall']:.2f}), its allocation judged by the full batch's "
        f"sensitivities is within {100 * (r['objective_ratio']['max'] - 1):.1f}% of the full batch's optimum on "
        f"every batch (mean {100 * (r['objective_ratio']['mean'] - 1):.1f}%), and its rates rank like the full "
        f"batch's (Spearman {r['rate_rank']['mean']:.3f} mean). ")
    if rec["meets_all_bars"]:
        verdict_line += (f"It is the cheapest variant within the bars (cost <= {COST_BAR} steps, objective ratio "
                         f"<= {OBJECTIVE_BAR} on every batch, mean rate Spearman >= {RATE_RANK_BAR}).")
    elif rec["keeps_allocation"]:
        verdict_line += (f"No variant keeps the allocation within {COST_BAR} steps; this is the cheapest that keeps "
                         f"it (objective ratio <= {OBJECTIVE_BAR} on every batch, mean rate Spearman >= "
                         f"{RATE_RANK_BAR}).")
    else:
        verdict_line += (f"No subsample keeps the allocation by the bars (objective ratio <= {OBJECTIVE_BAR} on every "
                         f"batch, mean rate Spearman >= {RATE_RANK_BAR}); this is the closest.")
    uni = rows["uniform"]["objective_ratio"]
    current = dropbp.DropBPConfig().sensitivity_examples
    cheap = min((c for c in rows if c not in ("uniform", "k1_serial")), key=lambda c: rows[c]["cost_steps"]["median"])
    trade = []
    for name in dict.fromkeys([cheap, f"k{current}" if current else "full"]):
        if name in rows:
            r = rows[name]
            trade.append(f"`{name}` costs {r['cost_steps']['median']:.2f} steps and its allocation is "
                         f"{100 * (r['objective_ratio']['mean'] - 1):.1f}% worse than the full batch's (mean; max "
                         f"{100 * (r['objective_ratio']['max'] - 1):.1f}%; against the pooled reference "
                         f"{100 * (r['objective_ratio_pooled']['mean'] - 1):.1f}%, max "
                         f"{100 * (r['objective_ratio_pooled']['max'] - 1):.1f}%)")
    serial, batched = rows["k1_serial"]["cost_steps"]["median"], rows["k1"]["cost_steps"]["median"]
    same = max(abs(a - b) / max(abs(b), 1e-300) for ra, rb in zip(summary["sensitivities"]["k1"],
                                                                  summary["sensitivities"]["k1_serial"])
               for a, b in zip(ra, rb))
    lines += [
        "", verdict_line, "",
        f"Batched partial backwards (the measurement walks down the decoder layers once, one row per branch): the "
        f"first example costs {batched:.2f} steps against {serial:.2f} steps one branch at a time "
        f"({serial / batched:.2f}x less), with the same sensitivities (largest relative difference {same:.1e}).", "",
        f"The library's default when this ran was `sensitivity_examples={current}`; the cheapest measurement here "
        f"is `{cheap}`. " + "; ".join(trade) + ".", "",
        f"For scale: uniform rates are {100 * (uni['mean'] - 1):.0f}% worse than the full batch's allocation (max "
        f"{100 * (uni['max'] - 1):.0f}%), and the full batch of {args.batch_size} itself is "
        f"{100 * (rows['full']['objective_ratio_pooled']['mean'] - 1):.1f}% worse (mean; max "
        f"{100 * (rows['full']['objective_ratio_pooled']['max'] - 1):.1f}%) than the pooled reference of "
        f"{args.batch_size * args.batches} examples, the noise floor of an {args.batch_size}-example measurement.", "",
        "Columns. *cost*: median measurement wall time / median round-step wall time (min..max over batches); "
        "*paired*: median over batches of the measurement's time over the mean of the same round's two step "
        "times, in wall and in process CPU time. *Spearman S*: rank correlation of the variant's sensitivities with the full batch's "
        "(per batch; mean and min over batches). *Spearman rates*: the same for the allocated rates (ties, e.g. "
        "rates at max_rate, ranked by their average). *objective ratio*: sum_l S_full,l p_l^2 at the variant's "
        "rates over the same at the full batch's allocation (1.0 = as good; the full allocation minimises it). "
        "*vs pooled*: the same ratio with the mean full-batch sensitivity over all measured batches in place of "
        "the batch's own, against that reference's optimum. `k1x2` pairs each batch's k=1 measurement with the "
        "previous batch's (cyclically); its cost is the two measurements' times. A k-example subsample is the "
        "first k rows of the batch as `dropbp finetune` takes them (`first_examples`: padding columns common to "
        "the k rows cut off).", "",
        "Token subsampling is not measured: the loss covers only the response tokens, which follow the prompt, so "
        "truncating every example to its first T tokens drops the end of every response (a biased objective); "
        "masking random label positions keeps the distribution but saves no compute.", "",
        run.footer(read="the costs in steps (ratios), not the absolute seconds"), "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
