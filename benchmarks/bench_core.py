"""Core DropBP benchmark: step time, activation memory and sensitivity cost on a SmolLM2-shaped model.

What it measures
    A random-weight ``LlamaForCausalLM`` with SmolLM2-135M's shapes (hidden 576, 9 heads / 3 KV heads,
    MLP 1536, vocab 49152, tied embeddings; ``--layers`` of the real 30) is fully fine-tuned in fp32
    with AdamW (lr 1e-5, torch defaults otherwise). A step is forward with labels, ``loss.backward()``,
    ``optimizer.step()``, ``zero_grad(set_to_none=True)``; AdamW skips parameters whose grad is
    None, so the optimizer work of dropped branches is saved too. Four fixed-mask configurations:

    * ``none``        nothing dropped (dropbp attached, mask all False)
    * ``half``        layers 0, 2, 4, ... dropped, attention and MLP (half of the branch FLOPs)
    * ``all``         every branch dropped
    * ``detach_half`` the paper code's detach-style mechanism (``dropbp.reference.detach_branches``)
                      at the half mask, with dropbp's own mask all False

How
    Following DESIGN.md ("Measuring on shared, noisy machines"): one process, fixed thread count,
    branch FLOPs counted by one training forward with nothing dropped (``handle.paused()``), one
    untimed warm-up round, then ``--steps`` interleaved rounds A B C D A B C D ...; each config
    is summarised by its median and quoted as a ratio to ``none``. Checks:

    * interpolation: with f = ``handle.dropped_flops_fraction(half)``, the FLOP model predicts a
      saving of f * (t_none - t_all); efficiency = (t_none - t_half) / prediction, PASS if >= 0.95.
    * hooks vs detach: t_half / t_detach_half, PASS if <= 1.0 (the two differ only in graph
      bookkeeping, so this ratio sits near 1 and is at the mercy of noise).
    * activation memory: bytes autograd saves for backward in one (untimed) forward, via
      ``saved_tensors_hooks``, deduplicated by storage, parameters excluded; both what is still
      held when the forward ends and everything saved on the way (detached graphs included).
    * sensitivity: ``handle.sensitivity(closure, method="fast")`` vs ``"naive"``, interleaved,
      ``--sens-repeats`` each after one untimed fast call; PASS if median fast / naive <= 0.5.

Noise: on CPU, glibc returns large freed blocks to the OS, so every step page-faults its
activations back in (about 1 s of system time per default step here); that cost scales with
memory and varies from step to step. Setting ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
(e.g. to 17179869184) in the environment keeps that memory in the process and steadies the
times; the JSON records these variables.

Timing loop, medians, machine info and result files come from ``harness.py``. Results go to
``benchmarks/results/core.json`` (raw times, medians, ratios, machine info) and ``core.md``. Usage: ``python benchmarks/bench_core.py [--layers 8] [--steps 10] ...``
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch

import dropbp
from dropbp.memory import ActivationMeter
from dropbp.reference import detach_branches
from harness import RESULTS, Run, args_record, interleaved, layer_of, medians, smollm2_llama, summarise, verdict

CONFIGS = ("none", "half", "all", "detach_half")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=16, help="timed steps per configuration (>= 5)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--sens-batch", type=int, default=2, help="batch size of the sensitivity closure")
    p.add_argument("--sens-repeats", type=int, default=2, help="timed calls of each sensitivity method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.steps < 5 or args.sens_repeats < 2:
        p.error("need --steps >= 5 and --sens-repeats >= 2")
    return args


def config_masks(handle: dropbp.DropBPHandle) -> dict[str, tuple[list[bool], list[bool] | None]]:
    """Each config's (dropbp mask, detach mask or None)."""
    n = len(handle.branches)
    half = [layer_of(b.name) % 2 == 0 for b in handle.branches]
    return {"none": ([False] * n, None), "half": (half, None), "all": ([True] * n, None),
            "detach_half": ([False] * n, half)}


def run_context(handle, masks):
    """Set dropbp's mask; return the context the forward+backward runs in (detach hooks or none)."""
    mask, detach_mask = masks
    handle.set_mask(mask)
    if detach_mask is None:
        return contextlib.nullcontext()
    return detach_branches([b.module for b in handle.branches], detach_mask)


def train_step(model, optimizer, handle, input_ids, masks) -> None:
    """One full training step under a config (the harness times it)."""
    with run_context(handle, masks):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_activation_bytes(model, handle, input_ids, masks) -> dict[str, int]:
    """Bytes autograd saves for backward in one forward, one count per storage, parameters excluded.

    ``held``: still saved when the forward ends (what backward will use). ``packed``: everything
    saved during the forward, including graphs built and freed on the way (detach-style branches).
    """
    with run_context(handle, masks), ActivationMeter(model.parameters(), track_freed=True) as meter:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    held, packed = meter.held_bytes, meter.saved_bytes
    del loss
    return {"held": held, "packed": packed}


def time_training(model, handle, input_ids, steps: int) -> dict[str, list[float]]:
    """One warm-up round, then ``steps`` interleaved rounds over all configs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    masks = config_masks(handle)
    return interleaved({name: (lambda _, m=masks[name]: train_step(model, optimizer, handle, input_ids, m))
                        for name in CONFIGS}, steps)


def time_sensitivity(handle, closure, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved naive/fast sensitivity calls after one untimed fast call; returns times and values."""
    handle.sensitivity(closure, method="fast")  # warm-up
    values: dict[str, list[float]] = {}

    def method(name: str):
        def call(_round: int) -> None:
            values[name] = handle.sensitivity(closure, method=name)
        return call

    times = interleaved({"naive": method("naive"), "fast": method("fast")}, repeats, warmup=0,
                        label="sensitivity round")
    return times, values


def summarise_all(times, f_half, act_bytes, sens_times, sens_values) -> dict:
    core = summarise(times, "none")
    med = core["median_s"]
    predicted = f_half * (med["none"] - med["all"])
    actual = med["none"] - med["half"]
    fast, naive = sens_values["fast"], sens_values["naive"]
    diffs = [abs(a - b) for a, b in zip(fast, naive)]
    sens_med = medians(sens_times)
    return {
        **core,
        "activation_bytes": act_bytes,
        "interpolation": {"f_half": f_half, "predicted_saving_s": predicted, "actual_saving_s": actual,
                          "efficiency": actual / predicted, "pass": actual / predicted >= 0.95},
        "hooks_vs_detach": {"ratio": med["half"] / med["detach_half"],
                            "pass": med["half"] / med["detach_half"] <= 1.0},
        "sensitivity": {"median_s": sens_med, "ratio_fast_over_naive": sens_med["fast"] / sens_med["naive"],
                        "pass": sens_med["fast"] / sens_med["naive"] <= 0.5,
                        "max_rel_diff": max(d / max(abs(b), 1e-30) for d, b in zip(diffs, naive)),
                        "max_diff_over_max_value": max(diffs) / max(max(map(abs, naive)), 1e-30),
                        "fast": fast, "naive": naive},
    }


def markdown_report(args, summary, run: Run) -> str:
    s, i, h, se = summary, summary["interpolation"], summary["hooks_vs_detach"], summary["sensitivity"]
    lines = [
        "# DropBP core benchmark", "",
        f"Command: `{run.command}`  ",
        f"Model: random SmolLM2-shaped Llama, {args.layers} layers, batch {args.batch} x seq {args.seq}, fp32, "
        f"full fine-tuning, AdamW, sdpa; {args.threads} threads, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"{args.steps} interleaved timed steps per config after 1 warm-up round; total run {run.runtime_s:.0f}s.", "",
        "| config | median step (s) | min..max (s) | ratio to none | saved for backward, held at end of forward (MiB) "
        "| saved during forward incl. freed (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in CONFIGS:
        lo, hi = s["spread_s"][c]
        lines.append(f"| {c} | {s['median_s'][c]:.3f} | {lo:.3f}..{hi:.3f} | {s['ratio_to_none'][c]:.3f} "
                     f"| {s['activation_bytes'][c]['held'] / 2**20:.1f} "
                     f"| {s['activation_bytes'][c]['packed'] / 2**20:.1f} |")
    lines += [
        "", "| check | value | bar | result |", "|---|---:|---:|---|",
        f"| half-mask efficiency: (t_none - t_half) / (f (t_none - t_all)), f = {i['f_half']:.3f} "
        f"| {i['efficiency']:.3f} | >= 0.95 | {verdict(i['pass'])} |",
        f"| hooks vs detach: t_half / t_detach_half | {h['ratio']:.3f} | <= 1.0 | {verdict(h['pass'])} |",
        f"| sensitivity fast / naive (batch {args.sens_batch}, median of {args.sens_repeats}: "
        f"{se['median_s']['fast']:.2f}s / {se['median_s']['naive']:.2f}s) "
        f"| {se['ratio_fast_over_naive']:.3f} | <= 0.5 | {verdict(se['pass'])} |",
        f"| sensitivity agreement: max relative diff (max diff / max value) "
        f"| {se['max_rel_diff']:.2e} ({se['max_diff_over_max_value']:.2e}) | reported | - |",
        "", run.footer(), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = Run(threads=args.threads)
    torch.manual_seed(args.seed)
    model = smollm2_llama(args.layers, args.seq)
    handle = dropbp.apply(model, drop_rate=0.0, auto_step=False)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    with handle.paused():
        model(input_ids=input_ids)  # a training forward (nothing dropped) counts each branch's FLOPs
    f_half = handle.dropped_flops_fraction(config_masks(handle)["half"][0])
    print(f"{args.layers} layers, {len(handle.branches)} branches, half-mask FLOP fraction {f_half:.4f}, "
          f"{args.threads} threads, load average {os.getloadavg()}", flush=True)

    times = time_training(model, handle, input_ids, args.steps)
    act_bytes = {c: saved_activation_bytes(model, handle, input_ids, m) for c, m in config_masks(handle).items()}
    handle.set_mask([False] * len(handle.branches))

    sens_ids = input_ids[: args.sens_batch]
    sens_times, sens_values = time_sensitivity(handle, lambda: model(input_ids=sens_ids, labels=sens_ids).loss,
                                               args.sens_repeats)
    summary = summarise_all(times, f_half, act_bytes, sens_times, sens_values)
    run.finish()
    report = markdown_report(args, summary, run)
    print(report)
    record = {"command": run.command, "args": args_record(args), "optimizer": "AdamW(lr=1e-5)",
              "machine": run.machine(), "runtime_s": run.runtime_s, "raw_step_times_s": times,
              "raw_sensitivity_times_s": sens_times, **summary}
    run.write(args.out, "core", record, report)


if __name__ == "__main__":
    main()
