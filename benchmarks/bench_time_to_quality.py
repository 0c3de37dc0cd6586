"""Time to quality: held-out loss against the training clock, per arm and seed, on the bundled job.

Run (about 5 minutes per 60-step run on 2 idle CPU cores; nothing else may run meanwhile)::

    make bench-quality                                   # 60 steps, seeds 0 and 1, the DEFAULT_ARMS
    .venv/bin/python benchmarks/bench_time_to_quality.py --arms all --seeds 0      # the screen of every arm
    .venv/bin/python benchmarks/bench_time_to_quality.py --arms baseline,structured0.5 --seeds 0 --steps 300 \
        --eval-every 25 --out benchmarks/results/quality_300

What it runs
    First, the step time of the job's model and batch at each drop rate the arms use, interleaved in
    this process (baseline, p, baseline, p, ... after a warm-up round): the step speedup, and a
    straight line ``t(p)`` through the medians (the FLOP model: backward work falls linearly in p).
    Then one ``dropbp finetune`` run per arm and seed, one after another, with the same data order,
    LoRA initialisation and learning-rate schedule, and the held-out loss on the fixed subset every
    ``--eval-every`` steps, off the training clock. ``--fit-budget`` adds, for every DropBP arm, a run
    of as many steps as the baseline's clock buys at the arm's mean rate (``t(0) / t(mean p)`` times
    the baseline's steps, the schedule stretched to that length).

Memory-bound users (``--arms baseline,p0.875,checkpointing,micro-batches4``): where the sequence does not
fit, the alternatives to DropBP at a high rate are gradient checkpointing and the step's examples in
smaller micro-batches with accumulation; those arms are timed in the same interleaved rounds, and the
table gives every arm's activations held for backward beside its time to quality.

What it reports, per arm (each seed, and the mean where there are several)
    * the training clock (optimizer steps plus any sensitivity measurement, no evaluations) at which
      the arm's held-out loss first reaches the baseline's at 50%, 75% and 100% of the baseline's
      run, as a fraction of the baseline's own clock to that point (below 1: sooner);
    * the held-out loss at 25%, 50%, 75% and 100% of the baseline's training clock (linear between
      evaluations; an arm that ended earlier is read at its end);
    * the worth of a step: the baseline step at which the baseline reaches the arm's final held-out
      loss, over the arm's steps;
    * the accuracy after training (exact match on ``--eval-size`` held-out examples).

Results: ``benchmarks/results/time_to_quality.{json,md,png}`` (``--quick``: a temporary folder); the
runs stay in ``--runs-dir``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_defaults import step_reaching
from harness import RESULTS, Run, args_record, interleaved, say

from dropbp.app.finetune import FinetuneConfig, run_finetune
from dropbp.config import DropBPConfig
from dropbp.schedules import parse_schedule

@dataclass(frozen=True)
class Arm:
    """One way to train the job: DropBP at ``rate`` (None: no DropBP), or a memory-saving baseline."""

    rate: float | None = None
    schedule: str = "constant"
    mask: str = "random"
    checkpointing: bool = False  # gradient checkpointing (non-reentrant)
    micro_batches: int = 1  # the step's examples in this many micro-batches, accumulated

    @property
    def dropbp(self) -> bool:
        return self.rate is not None


#: Every schedule and mask mode in the library is an arm; the last three are the memory-bound comparison
#: (item 5 of issue 21): what a user whose sequence does not fit would do instead of DropBP at a high rate.
ARMS: dict[str, Arm] = {
    "baseline": Arm(),
    "p0.25": Arm(0.25),
    "p0.5": Arm(0.5),
    "p0.75": Arm(0.75),
    "warmup": Arm(0.5, "warmup:0.2"),
    "cooldown": Arm(0.5, "cooldown:0.2"),
    "linear0.5": Arm(0.5, "linear:0.5:0"),
    "cosine0.5": Arm(0.5, "cosine:0.5:0"),
    "linear0.75": Arm(0.75, "linear:0.75:0"),
    "cosine0.75": Arm(0.75, "cosine:0.75:0"),
    "structured0.25": Arm(0.25, mask="structured"),
    "structured0.5": Arm(0.5, mask="structured"),
    "structured0.75": Arm(0.75, mask="structured"),
    "structured-linear0.5": Arm(0.5, "linear:0.5:0", "structured"),
    "structured-linear0.75": Arm(0.75, "linear:0.75:0", "structured"),
    "p0.875": Arm(0.875),
    "checkpointing": Arm(checkpointing=True),
    "micro-batches4": Arm(micro_batches=4),
}
#: What make bench-quality runs (at seeds 0 and 1): the baseline, the paper's random masks and the best measured trades.
DEFAULT_ARMS = ("baseline", "p0.5", "structured0.5", "structured-linear0.5")
FRACTIONS = (0.5, 0.75, 1.0)  # of the baseline's run: its held-out loss there is a target
CLOCKS = (0.25, 0.5, 0.75, 1.0)  # of the baseline's training clock: every arm's held-out loss there


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated, from {list(ARMS)}, or 'all' (default: {','.join(DEFAULT_ARMS)})")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (same data order per seed for every arm)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of the baseline's run")
    p.add_argument("--eval-every", type=int, default=5, help="held-out loss every N steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (cuda: a GPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--fit-budget", action="store_true", help="also run each DropBP arm for the baseline's clock")
    p.add_argument("--speed-rounds", type=int, default=5, help="timed interleaved rounds per rate")
    p.add_argument("--quick", action="store_true", help="a tiny random model, 4 steps: checks the pipeline only")
    p.add_argument("--runs-dir", type=Path, default=None, help="default: /tmp/dropbp-quality")
    p.add_argument("--reuse", action="store_true", help="keep finished runs (summary.json) in --runs-dir")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from --out's time_to_quality.json and the runs in --runs-dir")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    args.arms = list(ARMS) if args.arms == "all" else [a for a in args.arms.split(",") if a]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.arms or any(a not in ARMS for a in args.arms) or "baseline" not in args.arms or not args.seeds:
        p.error(f"--arms must include baseline and name only {list(ARMS)}; --seeds some integers")
    return args


# ---------------------------------------------------------------------------------- pure measures
def value_at(curve: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of ``[(x, y), ...]`` (sorted by x) at ``x``; the ends beyond the curve."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return curve[-1][1]


def curves(history: list[dict[str, Any]]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(step, held-out loss) and (training clock, held-out loss) at every periodic evaluation."""
    points = [r for r in history if "heldout_loss" in r]
    return [(r["step"], r["heldout_loss"]) for r in points], [(r["wall_time_s"], r["heldout_loss"]) for r in points]


def modelled(history: list[dict[str, Any]], line: dict[str, float], step_s: float | None = None
             ) -> list[dict[str, Any]]:
    """The history with ``wall_time_s`` replaced by the modelled clock: every step timed by the
    interleaved line ``t0 + slope * p`` at the fraction ``p`` of branches it dropped, or by
    ``step_s`` (a memory arm's interleaved step time).

    Sequential runs on a shared machine drift (a later run's steps can be slower at a lower rate);
    the line was measured interleaved, so every arm's clock comes from the same conditions.
    """
    clock, out = 0.0, []
    for record in history:
        clock += step_s if step_s is not None else line["t0_s"] + line["slope_s"] * record["drop_rate"]
        out.append({**record, "wall_time_s": clock})
    return out


def _time_to(clock: list[tuple[float, float]], base_clock: list[tuple[float, float]],
             targets: dict[float, float]) -> dict[str, float | None]:
    ratios = {}
    for f, level in targets.items():
        reached, own = step_reaching(clock, level), step_reaching(base_clock, level)
        ratios[str(f)] = None if reached is None or not own else reached / own
    return ratios


def measure(arm: dict[str, Any], base: dict[str, Any], line: dict[str, float] | None = None,
            step_s: float | None = None) -> dict[str, Any]:
    """The report's figures for one run against the baseline run of the same seed.

    With ``line`` (the interleaved step-time line), the clock figures are also given on the
    modelled clock (see :func:`modelled`; ``step_s`` for a memory arm).
    """
    base_steps, base_clock = curves(base["history"])
    steps, clock = curves(arm["history"])
    total_steps, total_clock = base_steps[-1][0], base["summary"]["train_time_s"]
    targets = {f: value_at(base_steps, f * total_steps) for f in FRACTIONS}
    worth_step = step_reaching(base_steps, steps[-1][1])
    extra: dict[str, Any] = {}
    if line is not None:
        _, base_model = curves(modelled(base["history"], line))
        _, arm_model = curves(modelled(arm["history"], line, step_s))
        extra = {"modelled_time_to_target_ratio": _time_to(arm_model, base_model, targets),
                 "modelled_heldout_at_clock": {str(c): value_at(arm_model, c * base_model[-1][0]) for c in CLOCKS}}
    return {
        **extra,
        "targets": {str(f): v for f, v in targets.items()},
        "time_to_target_ratio": _time_to(clock, base_clock, targets),
        "heldout_at_clock": {str(c): value_at(clock, c * total_clock) for c in CLOCKS},
        "final_heldout": steps[-1][1],
        "steps": steps[-1][0],
        "train_time_s": arm["summary"]["train_time_s"],
        "step_worth": None if worth_step is None else worth_step / steps[-1][0],
        "step_worth_bound": worth_step is None,  # the arm ended above the baseline's first evaluation
        "accuracy": arm["summary"]["after"]["accuracy"],
        "median_step_time_s": arm["summary"]["median_step_time_s"],
        "activation_bytes": statistics.median(r.get("activation_bytes", 0) for r in arm["history"]),
    }


def mean_rate(rate: float, schedule: str, steps: int) -> float:
    """The drop rate a schedule averages over a run of ``steps`` mask steps."""
    parsed = parse_schedule(schedule)
    return sum(parsed.rate(t, steps, rate) for t in range(steps)) / steps


# ---------------------------------------------------------------------------------- runs
def job_config(args: argparse.Namespace, model: str | None, arm: str, seed: int, steps: int, folder: Path,
               **scale: Any) -> FinetuneConfig:
    setting = ARMS[arm]
    if setting.micro_batches > 1:
        size = scale.pop("batch_size", FinetuneConfig.batch_size)
        if size % setting.micro_batches:
            raise ValueError(f"arm {arm}: a batch of {size} does not split into {setting.micro_batches} micro-batches")
        scale = {**scale, "batch_size": size // setting.micro_batches, "grad_accum": setting.micro_batches}
    return FinetuneConfig(
        model=model, method=args.method, max_steps=steps, lr=args.lr, seed=seed, eval_every=args.eval_every,
        output_dir=str(folder), overwrite=True, use_dropbp=setting.dropbp, device=args.device, dtype=args.dtype,
        gradient_checkpointing=setting.checkpointing,
        dropbp=DropBPConfig(drop_rate=setting.rate if setting.dropbp else 0.5, drop_schedule=setting.schedule,
                            seed=seed, sensitivity_at=None, mask=setting.mask),
        **scale)


def run_one(config: FinetuneConfig, reuse: bool, log: Callable[[str], None]) -> dict[str, Any]:
    folder = Path(config.output_dir)
    if reuse and (folder / "summary.json").is_file():
        log(f"  {folder.name}: reusing")
    else:
        log(f"  {folder.name}: training {config.max_steps} steps")
        run_finetune(config, progress=False, command=folder.name)
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"history": history, "summary": json.loads((folder / "summary.json").read_text())}


def step_times(config: FinetuneConfig, rates: list[float], rounds: int,
               structured: list[float] = (), memory: list[str] = ()) -> dict[str, Any]:
    """Median step time of the job's model and first batch at each rate, interleaved with rate 0.

    ``structured``: rates also timed with a structured mask, the cut that drops that fraction of
    the branches (their speedups are reported; the line ``t(p)`` is fitted to the random-mask
    rates, by the fraction of branches dropped). ``memory``:
    names of memory-saving baseline arms (checkpointing, micro-batches), timed the same way; their
    medians time every step of their runs on the modelled clock.
    """
    import dropbp
    from dropbp.app.data import collate, tokenize_example
    from dropbp.app.finetune import autocast_dtype, load_data, resolve_device
    from dropbp.app.models import load_model, prepare_for_training

    train, _ = load_data(config)
    device = resolve_device(config.device)
    autocast = autocast_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model, config.method)
    model = prepare_for_training(model, config.method).to(device).train()
    examples = [tokenize_example(tokenizer, ex["prompt"], ex["response"], config.seq_len)
                for ex in train[: config.batch_size]]
    batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    handle = dropbp.apply(model, drop_rate=0.0, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    count = len(handle.branches)

    def step_at(rate: float, mask: str = "random", arm: Arm = Arm()) -> Callable[[int], None]:
        def step(_: int) -> None:
            handle.set_drop_rates(rate)
            # A structured step's cut is drawn anew each step, so a few timed rounds would time a few
            # random cuts: time the cut at the mean instead (the steps of a run cost t(p) at the fraction
            # p each dropped, on the modelled clock).
            handle.auto_step = mask != "structured"
            if mask == "structured":
                handle.set_mask([i < round(rate * count) for i in range(count)])
            if arm.checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            size = len(batch["input_ids"]) // arm.micro_batches
            for start in range(0, len(batch["input_ids"]), size):
                micro = {k: v[start : start + size] for k, v in batch.items()}
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    loss = model(**micro).loss / arm.micro_batches
                loss.backward()
            if arm.checkpointing:
                model.gradient_checkpointing_disable()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the harness times the call: the GPU's work must be in it
        return step

    variants = {"p0": step_at(0.0)}
    for rate in rates:
        variants[f"p{rate:g}"] = step_at(rate)
        variants[f"p0 ({rate:g})"] = step_at(0.0)  # a baseline beside every rate: neighbours share the load
    for rate in structured:
        variants[f"p{rate:g} structured"] = step_at(rate, "structured")
        variants[f"p0 ({rate:g} structured)"] = step_at(0.0)
    for name in memory:
        variants[name] = step_at(0.0, arm=ARMS[name])
        variants[f"p0 ({name})"] = step_at(0.0)
    times = interleaved(variants, rounds, warmup=1, label="speed round")
    handle.remove()
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["p0"]
    points = [(0.0, base)] + [(r, medians[f"p{r:g}"]) for r in rates]
    slope = _fit_slope(points)
    speedup = {f"{r:g}": statistics.median(b / t for b, t in zip(times[f"p0 ({r:g})"], times[f"p{r:g}"]))
               for r in rates}
    speedup.update({f"{r:g} structured": statistics.median(
        b / t for b, t in zip(times[f"p0 ({r:g} structured)"], times[f"p{r:g} structured"])) for r in structured})
    speedup.update({name: statistics.median(b / t for b, t in zip(times[f"p0 ({name})"], times[name]))
                    for name in memory})
    # On the modelled clock a memory arm's step takes the baseline's time over its measured speedup.
    arm_s = {name: base / speedup[name] for name in memory}
    return {"median_s": medians, "speedup": speedup, "line": {"t0_s": base, "slope_s": slope}, "arm_s": arm_s}


def _arm_step_s(speed: dict[str, Any], name: str) -> float | None:
    """A memory arm's modelled step time (None for DropBP arms and the baseline, which follow the line)."""
    return speed.get("arm_s", {}).get(name)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else device


def _fit_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``t = t0 + slope * p`` through ``(0, t0)``."""
    t0 = points[0][1]
    num = sum(p * (t - t0) for p, t in points[1:])
    den = sum(p * p for p, _ in points[1:])
    return num / den if den else 0.0


# ---------------------------------------------------------------------------------- report
def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return None if len(known) < len(values) or not known else sum(known) / len(known)


def _activations(per_seed: list[dict[str, Any]]) -> str:
    """Median activations held for backward per step (MiB), mean over seeds; runs from before it was kept: -."""
    known = [r["activation_bytes"] for r in per_seed if "activation_bytes" in r]
    return f"{sum(known) / len(known) / 2**20:.0f}" if known else "-"


def _cell(value: float | None, fmt: str = ".3f") -> str:
    return "not reached" if value is None else format(value, fmt)


def report(record: dict[str, Any]) -> str:
    rows = record["measures"]
    seeds = record["args"]["seeds"]
    lines = [
        "# Time to quality",
        "",
        f"Job: {record['job']}. Seeds {', '.join(map(str, seeds))} (the same data order for every arm of a seed). "
        f"Machine: {record['machine_note']}.",
        "",
        "## Step speedup, measured interleaved in this run",
        "",
        "| drop rate (or memory arm) | step time / baseline's | speedup |",
        "| --- | ---: | ---: |",
    ]
    for rate, speedup in record["speed"]["speedup"].items():
        lines.append(f"| {rate} | {1 / speedup:.3f} | {speedup:.2f}x |")
    lines += [
        "",
        "## Per arm (mean over seeds; each seed in the JSON)",
        "",
        "Clock to the baseline's held-out loss at 50% / 75% / 100% of its run, as a fraction of the baseline's "
        "clock to the same loss (below 1: sooner); held-out loss at 50% and 100% of the baseline's clock; worth "
        "of a step (baseline steps to the arm's final loss / the arm's steps); accuracy after training.",
        "",
        "| arm | steps | clock to 50% | to 75% | to 100% | held-out @50% clock | @100% clock | final held-out | "
        "step worth | accuracy | activations (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, per_seed in rows.items():
        m = list(per_seed.values())
        ratio = {f: _mean([r["time_to_target_ratio"][f] for r in m]) for f in ("0.5", "0.75", "1.0")}
        worth = _mean([r["step_worth"] for r in m])
        bound = any(r["step_worth_bound"] for r in m)
        lines.append(
            f"| {name} | {m[0]['steps']} | {_cell(ratio['0.5'], '.2f')} | {_cell(ratio['0.75'], '.2f')} | "
            f"{_cell(ratio['1.0'], '.2f')} | {_mean([r['heldout_at_clock']['0.5'] for r in m]):.3f} | "
            f"{_mean([r['heldout_at_clock']['1.0'] for r in m]):.3f} | {_mean([r['final_heldout'] for r in m]):.3f} | "
            f"{'< first eval' if bound else _cell(worth, '.2f')} | "
            f"{100 * _mean([r['accuracy'] for r in m]):.1f}% | {_activations(m)} |")
    if all("modelled_time_to_target_ratio" in r for per_seed in rows.values() for r in per_seed.values()):
        lines += [
            "",
            "On the modelled clock (every step of every run timed by the interleaved line t(p) = "
            f"{record['speed']['line']['t0_s']:.3f} s {record['speed']['line']['slope_s']:+.3f} s x p at the "
            "fraction p it dropped; the sequential runs' own clocks drift with the machine):",
            "",
            "| arm | clock to 50% | to 75% | to 100% | held-out @50% clock | @100% clock |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, per_seed in rows.items():
            m = list(per_seed.values())
            ratio = {f: _mean([r["modelled_time_to_target_ratio"][f] for r in m]) for f in ("0.5", "0.75", "1.0")}
            lines.append(
                f"| {name} | {_cell(ratio['0.5'], '.2f')} | {_cell(ratio['0.75'], '.2f')} | "
                f"{_cell(ratio['1.0'], '.2f')} | {_mean([r['modelled_heldout_at_clock']['0.5'] for r in m]):.3f} | "
                f"{_mean([r['modelled_heldout_at_clock']['1.0'] for r in m]):.3f} |")
    lines += ["", record["footer"], ""]
    return "\n".join(lines)


def plot(record: dict[str, Any], histories: dict[str, dict[int, list]], path: Path) -> None:
    from dropbp.app.plots import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    line = record["speed"]["line"]
    for name, per_seed in histories.items():
        for seed, history in per_seed.items():
            # The modelled clock: the sequential runs' own clocks drift with the machine.
            _, clock = curves(modelled(history, line, _arm_step_s(record["speed"], name)))
            axis.plot([c for c, _ in clock], [v for _, v in clock], label=f"{name} (seed {seed})",
                      linestyle="-" if name == "baseline" else "--", marker=".")
    axis.set_xlabel("training clock (s, modelled: each step timed by the interleaved line t(p))")
    axis.set_ylabel("held-out loss (fixed subset)")
    axis.set_title(record["job"])
    axis.legend(fontsize=7, ncol=2)
    save_figure(figure, path)


def rewrite_report(out: Path, runs_dir: Path) -> dict[str, Any]:
    """Recompute the measures of a finished run from its JSON and run folders; rewrite the report."""
    record = json.loads((out / "time_to_quality.json").read_text())
    steps = record["args"]["steps"]
    results = {name: {int(seed): run_one(FinetuneConfig(output_dir=str(runs_dir / f"{name}_s{seed}_{steps}")),
                                         True, lambda _: None)
                      for seed in per_seed} for name, per_seed in record["measures"].items()}
    record["measures"] = {name: {seed: measure(r, results["baseline"][seed], record["speed"]["line"],
                                               _arm_step_s(record["speed"], name))
                                 for seed, r in per_seed.items()} for name, per_seed in results.items()}
    Run.write(out, "time_to_quality", record, report(record))
    plot(record, {name: {seed: r["history"] for seed, r in per_seed.items()} for name, per_seed in results.items()},
         out / "time_to_quality.png")
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_only:
        record = rewrite_report(args.out or RESULTS, args.runs_dir or Path("/tmp/dropbp-quality"))
        say(report(record))
        return record
    run = Run(threads=None)
    with tempfile.TemporaryDirectory(prefix="dropbp-quality-") as tmp:
        model, scale = None, {}
        if args.quick:
            from dropbp.testing import save_tiny_chat_model

            model = str(save_tiny_chat_model(Path(tmp) / "model", layers=2))
            scale = dict(batch_size=4, seq_len=160, eval_size=4, eval_subset=4)
            args.steps, args.eval_every, args.speed_rounds = 4, 2, 1
        out = args.out or (Path(tmp) / "results" if args.quick else RESULTS)
        runs_dir = args.runs_dir or (Path(tmp) / "runs" if args.quick else Path("/tmp/dropbp-quality"))
        where = "" if args.device == "cpu" else f", {_device_name(args.device)} ({args.dtype} autocast)"
        job = (f"{args.method}, {args.steps} steps, lr {args.lr:g} cosine, eval every {args.eval_every} steps{where}, "
               + ("a tiny random model (--quick: checks the pipeline, not the numbers)" if args.quick
                  else "the bundled SmolLM2-135M-Instruct and data"))
        say(f"time to quality: {job}")
        rates = sorted({ARMS[a].rate for a in args.arms if ARMS[a].dropbp})
        structured = sorted({ARMS[a].rate for a in args.arms if ARMS[a].dropbp and ARMS[a].mask == "structured"})
        memory = [a for a in args.arms if not ARMS[a].dropbp and a != "baseline"]
        speed = step_times(job_config(args, model, "baseline", 0, args.steps, runs_dir / "speed", **scale), rates,
                           args.speed_rounds, structured, memory)
        plan = [(arm, arm, args.steps) for arm in args.arms]
        if args.fit_budget:
            for arm in args.arms:
                if not ARMS[arm].dropbp:
                    continue
                rate, schedule = ARMS[arm].rate, ARMS[arm].schedule
                line = speed["line"]
                per_step = line["t0_s"] + line["slope_s"] * mean_rate(rate, schedule, args.steps)
                plan.append((f"{arm}@budget", arm, max(args.steps, round(args.steps * line["t0_s"] / per_step))))
        histories: dict[str, dict[int, list]] = {}
        results: dict[str, dict[int, dict]] = {}
        for seed in args.seeds:
            for name, arm, steps in plan:
                folder = runs_dir / f"{name}_s{seed}_{args.steps}"
                config = job_config(args, model, arm, seed, steps, folder, **scale)
                results.setdefault(name, {})[seed] = run_one(config, args.reuse, say)
                histories.setdefault(name, {})[seed] = results[name][seed]["history"]
        measures = {name: {seed: measure(r, results["baseline"][seed], speed["line"], _arm_step_s(speed, name))
                           for seed, r in per_seed.items()}
                    for name, per_seed in results.items()}
        run.finish()
        record = {
            "args": args_record(args, skip=("out", "runs_dir")),
            "job": job,
            "machine_note": "the machine was otherwise idle only if nothing else ran meanwhile: check the load "
                            "average in the footer",
            "speed": speed,
            "measures": measures,
            "machine": run.machine(),
            "runtime_s": run.runtime_s,
        }
        record["footer"] = run.footer(read="the ratios; the runs are sequential, the speed rounds interleaved")
        out.mkdir(parents=True, exist_ok=True)
        Run.write(out, "time_to_quality", record, report(record))
        plot(record, histories, out / "time_to_quality.png")
        say(report(record))
        if args.quick:
            record["written"] = sorted(p.name for p in out.iterdir())
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
