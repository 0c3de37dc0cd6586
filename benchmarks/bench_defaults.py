"""Defaults from evidence: uniform vs sensitivity-based rates in the default job, at several seeds.

Run (about 10 minutes per arm and seed on 2 idle CPU cores; 40 minutes with the defaults)::

    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python benchmarks/bench_defaults.py

What it runs
    ``dropbp compare`` (the default job twice, without and with DropBP, same data order and seeds)
    once per arm and seed, one after another, in one process each:

    * ``allocated``  the defaults as ``dropbp compare`` runs them, but with rates allocated from
                     sensitivity (``--sensitivity-at 0.1``: measured after 10% of the steps on the
                     batch's first example, then the exact allocation at target 0.5)
    * ``uniform``    ``--sensitivity-at none``: every branch at 0.5, nothing measured

    ``--arms`` and ``--seeds`` choose the set; ``--reuse`` keeps runs whose ``compare.json`` exists (a
    re-run then only rewrites the summary).

What it reports, per arm (mean and each seed)
    the DropBP step time over the baseline's (both from the same compare run), the final held-out
    loss on the fixed subset for both arms, the held-out accuracy after training (120 examples), the
    training clock at which DropBP reaches the baseline's final held-out loss as a fraction of the
    baseline's (the issue's target: <= 0.8, with accuracy within 2 points), and *progress per step*:
    the baseline step at which the baseline's held-out loss (linearly interpolated between its
    evaluations) first reaches the DropBP run's final one, over the DropBP run's steps. A DropBP step
    is worth that fraction of a baseline step in this job; times the step-time speedup it gives the
    wall-clock progress ratio (above 1: DropBP gets there sooner).

Results: ``benchmarks/results/defaults.{json,md}``; the runs stay in ``--runs-dir``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

from harness import RESULTS, Run, args_record, say

ARMS = {"allocated": ["--sensitivity-at", "0.1"], "uniform": ["--sensitivity-at", "none"]}
TARGET_TIME = 0.8
TARGET_ACCURACY_POINTS = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arms", default="allocated,uniform", help=f"comma-separated, from {sorted(ARMS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--runs-dir", type=Path, default=Path("/tmp/dropbp-defaults"), help="where the compare runs go")
    p.add_argument("--reuse", action="store_true", help="keep runs whose compare.json exists")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.arms or any(a not in ARMS for a in args.arms) or not args.seeds:
        p.error(f"--arms must name some of {sorted(ARMS)} and --seeds some integers")
    return args


def run_compare(folder: Path, arm: str, seed: int, reuse: bool) -> None:
    if reuse and (folder / "compare.json").exists():
        say(f"{folder.name}: reusing {folder}")
        return
    command = [sys.executable, "-m", "dropbp.app.cli", "compare", "--seed", str(seed), *ARMS[arm],
               "--output-dir", str(folder), "--overwrite"]
    say(f"{folder.name}: {' '.join(command[2:])}")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def heldout_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out loss on the fixed subset) at every periodic evaluation of one arm."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["heldout_loss"]) for r in records if "heldout_loss" in r]


def step_reaching(curve: list[tuple[int, float]], loss: float) -> float | None:
    """First step (linear between evaluations) at which the curve is at or below ``loss``."""
    if curve and curve[0][1] <= loss:
        return float(curve[0][0])
    for (s0, l0), (s1, l1) in itertools.pairwise(curve):
        if l1 <= loss:
            return s0 + (s1 - s0) * (l0 - loss) / (l0 - l1)
    return None


def summarise_run(folder: Path) -> dict:
    rows = json.loads((folder / "compare.json").read_text())["rows"]
    base, drop = rows["baseline"], rows["dropbp"]
    base_curve, drop_curve = heldout_curve(folder / "baseline"), heldout_curve(folder / "dropbp")
    drop_steps = drop_curve[-1][0]
    equivalent = step_reaching(base_curve, drop["heldout_loss_subset_final"])
    speedup = base["median_step_time_s"] / drop["median_step_time_s"]
    progress = None if equivalent is None else min(equivalent, base_curve[-1][0]) / drop_steps
    reached = drop["time_to_baseline_heldout_s"]
    return {
        "speedup_step": speedup,
        "baseline_heldout_final": base["heldout_loss_subset_final"],
        "dropbp_heldout_final": drop["heldout_loss_subset_final"],
        "baseline_accuracy": base["accuracy_after"], "dropbp_accuracy": drop["accuracy_after"],
        "accuracy_points": 100 * (drop["accuracy_after"] - base["accuracy_after"]),
        "baseline_train_s": base["train_time_s"], "dropbp_train_s": drop["train_time_s"],
        "sensitivity_cost_steps": drop["sensitivity_cost_steps"],
        "time_to_quality_ratio": None if reached is None else reached / base["train_time_s"],
        "baseline_equivalent_step": equivalent, "dropbp_steps": drop_steps,
        "progress_per_step": progress,
        "wallclock_progress_ratio": None if progress is None else progress * speedup,
        "curves": {"baseline": base_curve, "dropbp": drop_curve},
    }


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known and len(known) == len(values) else None


def _f(value: float | None, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def report(args, per_arm: dict[str, dict[int, dict]], run: Run) -> tuple[str, dict]:
    means = {arm: {key: _mean([runs[s][key] for s in args.seeds]) for key in
                   ("speedup_step", "baseline_heldout_final", "dropbp_heldout_final", "baseline_accuracy",
                    "dropbp_accuracy", "accuracy_points", "sensitivity_cost_steps", "progress_per_step",
                    "wallclock_progress_ratio", "time_to_quality_ratio")}
             for arm, runs in per_arm.items()}
    best = min(per_arm, key=lambda arm: means[arm]["dropbp_heldout_final"])
    met = {arm: all(r["time_to_quality_ratio"] is not None and r["time_to_quality_ratio"] <= TARGET_TIME
                    and r["accuracy_points"] >= -TARGET_ACCURACY_POINTS for r in runs.values())
           for arm, runs in per_arm.items()}
    lines = [
        "# Defaults from evidence: uniform vs sensitivity-based rates in the default job", "",
        f"Command: `{run.command}`  ",
        f"Each row is one `dropbp compare` (the default job without and with DropBP at target 0.5: LoRA on the bundled "
        f"SmolLM2-135M-Instruct, 60 steps of 8, lr 1e-3, warm-up and cosine, held-out loss on a fixed subset of 48 "
        f"every 10 steps off the training clock); seeds {', '.join(map(str, args.seeds))}; "
        + (f"the runs were reused from `{args.runs_dir}` (`--reuse`), made earlier by the same `dropbp compare` commands."
           if args.reuse else f"total {run.runtime_s / 60:.0f} min."), "",
        "| arm | seed | step speedup | held-out loss, baseline / DropBP | accuracy, baseline / DropBP | "
        "sensitivity (steps) | DropBP step worth (baseline steps) | wall-clock progress ratio | time to baseline's "
        "final held-out loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, runs in per_arm.items():
        for seed in args.seeds:
            r = runs[seed]
            lines.append(
                f"| {arm} | {seed} | {r['speedup_step']:.2f}x | {r['baseline_heldout_final']:.3f} / "
                f"{r['dropbp_heldout_final']:.3f} | {100 * r['baseline_accuracy']:.1f}% / {100 * r['dropbp_accuracy']:.1f}% "
                f"| {_f(r['sensitivity_cost_steps'], '.2f') if r['sensitivity_cost_steps'] else '-'} "
                f"| {_f(r['progress_per_step'], '.2f')} | {_f(r['wallclock_progress_ratio'], '.2f')} "
                f"| {_f(r['time_to_quality_ratio'], '.2f')} |")
        m = means[arm]
        lines.append(
            f"| **{arm}, mean** | | {m['speedup_step']:.2f}x | {m['baseline_heldout_final']:.3f} / "
            f"{m['dropbp_heldout_final']:.3f} | {100 * m['baseline_accuracy']:.1f}% / {100 * m['dropbp_accuracy']:.1f}% "
            f"| {_f(m['sensitivity_cost_steps'], '.2f') if m['sensitivity_cost_steps'] else '-'} "
            f"| {_f(m['progress_per_step'], '.2f')} | {_f(m['wallclock_progress_ratio'], '.2f')} "
            f"| {_f(m['time_to_quality_ratio'], '.2f')} |")
    b = means[best]
    lines += [
        "",
        f"**Better arm: {best}** (lower mean final held-out loss: "
        + ", ".join(f"{arm} {means[arm]['dropbp_heldout_final']:.3f}" for arm in per_arm)
        + f"; the baseline's {b['baseline_heldout_final']:.3f}).",
        "",
        f"Target (DropBP at the baseline's final held-out loss in <= {TARGET_TIME}x its training clock, accuracy within "
        f"{TARGET_ACCURACY_POINTS:.0f} points, at every seed): "
        + "; ".join(f"{arm} {'met' if ok else 'not met'}" for arm, ok in met.items()) + ".",
        "",
        "Columns. *step speedup*: baseline median step time over DropBP's, in the same compare run. *DropBP step "
        "worth*: the baseline step at which the baseline's held-out loss (interpolated between evaluations) first "
        "reaches the DropBP run's final one, over the DropBP run's 60 steps. *wall-clock progress ratio*: that times "
        "the step speedup (above 1 = DropBP reaches its final quality sooner than the baseline does). *time to "
        "baseline's final held-out loss*: DropBP's training clock at the first evaluation at or below it, over the "
        "baseline's whole training clock (sensitivity counted, evaluations not).",
        "",
        run.footer(read="the ratios; the held-out losses are the same on any machine for the same seed"),
        "",
    ]
    summary = {"means": means, "better_arm": best, "target_met": met}
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = Run()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    per_arm: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            folder = args.runs_dir / f"{arm}_s{seed}"
            run_compare(folder, arm, seed, args.reuse)
            per_arm.setdefault(arm, {})[seed] = summarise_run(folder)
    run.finish()
    text, summary = report(args, per_arm, run)
    print(text)
    record = {"command": run.command, "args": args_record(args), "machine": run.machine(threads=False),
              "runtime_s": run.runtime_s, "runs": per_arm, **summary}
    run.write(args.out, "defaults", record, text)


if __name__ == "__main__":
    main()
