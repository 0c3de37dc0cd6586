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
    one untimed warm-up round, then ``--steps`` interleaved rounds A B C D A B C D ...; each config
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

Results go to ``benchmarks/results/core.json`` (raw times, medians, ratios, machine info) and
``core.md``. Usage: ``python benchmarks/bench_core.py [--layers 8] [--steps 10] ...``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dropbp
from dropbp.memory import ActivationMeter
from dropbp.reference import detach_branches

CONFIGS = ("none", "half", "all", "detach_half")
ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "OMP_", "MKL_")  # environment that changes timings; recorded


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
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.steps < 5 or args.sens_repeats < 2:
        p.error("need --steps >= 5 and --sens-repeats >= 2")
    return args


def build_model(layers: int, seq: int) -> LlamaForCausalLM:
    """Random-weight SmolLM2-shaped Llama in training mode, all parameters trainable, fp32, no KV cache."""
    config = LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, num_hidden_layers=layers, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=max(2048, seq), attention_dropout=0.0,
        use_cache=False, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float().train()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def layer_of(branch_name: str) -> int:
    """Decoder-layer index of a branch name such as ``model.layers.3.mlp``."""
    return int(branch_name.split(".layers.")[1].split(".")[0])


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


def timed_train_step(model, optimizer, handle, input_ids, masks) -> float:
    """One full training step under a config; returns its wall time in seconds."""
    gc.collect()
    start = time.perf_counter()
    with run_context(handle, masks):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


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
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for round_ in range(steps + 1):
        row = {name: timed_train_step(model, optimizer, handle, input_ids, masks[name]) for name in CONFIGS}
        if round_ > 0:
            for name, t in row.items():
                times[name].append(t)
        print(f"  round {round_}{' (warm-up)' if round_ == 0 else ''}: "
              + "  ".join(f"{c} {t:.3f}s" for c, t in row.items()), flush=True)
    return times


def time_sensitivity(handle, closure, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved fast/naive sensitivity calls after one untimed fast call; returns times and values."""
    handle.sensitivity(closure, method="fast")  # warm-up; recounts branch FLOPs if the shape changed
    times: dict[str, list[float]] = {"fast": [], "naive": []}
    values: dict[str, list[float]] = {}
    for _ in range(repeats):
        for method in ("naive", "fast"):
            gc.collect()
            start = time.perf_counter()
            values[method] = handle.sensitivity(closure, method=method)
            times[method].append(time.perf_counter() - start)
            print(f"  sensitivity {method}: {times[method][-1]:.2f}s", flush=True)
    return times, values


def summarise(times, f_half, act_bytes, sens_times, sens_values) -> dict:
    med = {c: statistics.median(v) for c, v in times.items()}
    predicted = f_half * (med["none"] - med["all"])
    actual = med["none"] - med["half"]
    fast, naive = sens_values["fast"], sens_values["naive"]
    diffs = [abs(a - b) for a, b in zip(fast, naive)]
    sens_med = {m: statistics.median(v) for m, v in sens_times.items()}
    return {
        "median_s": med,
        "ratio_to_none": {c: med[c] / med["none"] for c in CONFIGS},
        "spread_s": {c: [min(v), max(v)] for c, v in times.items()},
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


def markdown_report(args, summary, command: str, runtime_s: float, load: tuple, env: dict) -> str:
    s, i, h, se = summary, summary["interpolation"], summary["hooks_vs_detach"], summary["sensitivity"]
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines = [
        "# DropBP core benchmark", "",
        f"Command: `{command}`  ",
        f"Model: random SmolLM2-shaped Llama, {args.layers} layers, batch {args.batch} x seq {args.seq}, fp32, "
        f"full fine-tuning, AdamW, sdpa; {args.threads} threads, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"{args.steps} interleaved timed steps per config after 1 warm-up round; total run {runtime_s:.0f}s.", "",
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
        "", f"Load average (1 min) at start / end: {load[0][0]:.2f} / {load[1][0]:.2f}; allocator environment: "
        f"{env or 'default'}. Times are from a shared machine: read the ratios, not the absolute seconds.", "",
    ]
    return "\n".join(lines)


def dropbp_source() -> dict:
    """Which dropbp was measured: its path, and the git commit and dirty state of its checkout."""
    src = Path(dropbp.__file__).resolve().parent
    info = {"path": str(src), "version": dropbp.__version__}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = lambda *a: subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        info["commit"] = git("rev-parse", "HEAD")
        info["dirty_src"] = bool(git("status", "--porcelain", "--", "."))
    return info


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, stem: str, record: dict, report: str) -> None:
    """``<stem>.json`` (everything measured) and ``<stem>.md`` (the report), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    write_atomic(out / f"{stem}.md", report)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    command = "python " + shlex.join(sys.argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.layers, args.seq)
    handle = dropbp.apply(model, drop_rate=0.0, auto_step=False)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    with torch.no_grad():
        model(input_ids=input_ids)  # the first forward counts each branch's FLOPs
    f_half = handle.dropped_flops_fraction(config_masks(handle)["half"][0])
    print(f"{args.layers} layers, {len(handle.branches)} branches, half-mask FLOP fraction {f_half:.4f}, "
          f"{args.threads} threads, load average {os.getloadavg()}", flush=True)

    times = time_training(model, handle, input_ids, args.steps)
    act_bytes = {c: saved_activation_bytes(model, handle, input_ids, m) for c, m in config_masks(handle).items()}
    handle.set_mask([False] * len(handle.branches))

    sens_ids = input_ids[: args.sens_batch]
    sens_times, sens_values = time_sensitivity(handle, lambda: model(input_ids=sens_ids, labels=sens_ids).loss,
                                               args.sens_repeats)
    summary = summarise(times, f_half, act_bytes, sens_times, sens_values)
    runtime = time.perf_counter() - started
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "python": platform.python_version(),
               "processor": platform.processor(), "load_average_start": load_start,
               "load_average_end": os.getloadavg(), "dropbp": dropbp_source(),
               "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}}
    report = markdown_report(args, summary, command, runtime, (load_start, machine["load_average_end"]),
                             machine["env"])
    print(report)
    record = {"command": command, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "optimizer": "AdamW(lr=1e-5)", "machine": machine, "runtime_s": runtime,
              "raw_step_times_s": times, "raw_sensitivity_times_s": sens_times, **summary}
    write_results(args.out, "core", record, report)


if __name__ == "__main__":
    main()
