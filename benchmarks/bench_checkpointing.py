"""Gradient checkpointing: dropped branches are not recomputed in backward (FLOPs, time, memory).

What it measures
    Hugging Face gradient checkpointing re-runs each decoder layer's forward during backward.
    A dropped branch's output is a constant of the backward, so re-running it is wasted work;
    by default the handle keeps (``dropbp.apply(..., replay=True)``; the attribute ``handle.replay``)
    each dropped branch's first-pass output and hands it back to the recompute instead of running the
    branch again. ``handle.replay = False`` is the old behaviour (the dropped branch is recomputed,
    under no-grad). This benchmark compares the two, for ``use_reentrant`` False and True, on a
    random-weight SmolLM2-shaped ``LlamaForCausalLM`` (the shapes of ``bench_core.py``; fp32,
    full fine-tuning, sdpa, ``--layers`` decoder layers).

    1. FLOPs executed inside ``loss.backward()`` (backward proper + checkpoint recompute),
       counted with ``torch.utils.flop_counter.FlopCounterMode`` (dropbp's counter, which also
       knows the CPU attention kernel). Deterministic. Fixed masks:

       * ``none``  nothing dropped (dropbp attached, mask all False)
       * ``half``  layers 0, 2, 4, ... dropped, attention and MLP
       * ``attn``  every attention branch dropped
       * ``mlp``   every MLP branch dropped

       For each mask the saving, recompute FLOPs minus replay FLOPs, is compared with the
       forward FLOPs of the dropped branches (``handle.flops``) and with what the mechanism
       predicts (see below); the check passes if the saving equals the prediction.
       A run of the same model without checkpointing gives the FLOPs the recompute adds.
    2. Memory, from the same passes, via the CPU allocator's own accounting
       (``torch.profiler`` with ``profile_memory=True``: every allocation torch makes during the
       step and its free; blocks that existed before the step do not count): bytes alive when
       the forward ends, peak during the forward and during ``loss.backward()``; and, exactly,
       the bytes of the first-pass outputs the replay keeps (``handle.kept_for_replay_bytes()``, at
       the end of the forward and still kept after the backward).
    3. Wall time of forward and of ``loss.backward()`` (no optimizer: the weights do not change,
       so every variant sees the same model) for ``none`` and random p = 0.5 masks with and
       without the replay. Round r draws its mask with ``dropbp.sample_mask(seed, r, [0.5]*n)``
       and every p = 0.5 variant of that round uses it. One untimed warm-up round, then
       ``--rounds`` interleaved rounds (``harness.interleaved``); medians and ratios.

What the mechanism predicts
    * reentrant checkpointing re-runs the whole layer, so without the replay every dropped
      branch is recomputed: saving = forward FLOPs of all dropped branches.
    * non-reentrant checkpointing recomputes a layer lazily, when the backward first needs a
      tensor the first pass saved in it, and stops (``early_stop``) as soon as the last such
      tensor is rebuilt. A dropped branch saves nothing, and neither does the residual add after
      it, so a dropped MLP (the last branch of its layer) is never recomputed anyway: the replay
      saves nothing there. A dropped attention is followed by ``post_attention_layernorm``, whose
      saved input the kept MLP's backward needs, so without the replay the recompute runs through
      the attention. If both branches of a layer are dropped, both norms feed only dropped
      branches, their backward graph is dead, no saved tensor of the layer is ever unpacked and
      the layer is not recomputed at all. Saving = forward FLOPs of the dropped attention
      branches whose layer keeps its MLP.
      (The same early stop also skips the last ``down_proj`` matmul of every layer, which is why
      non-reentrant ``none`` executes fewer backward FLOPs than reentrant ``none``.)

Noise: run with ``MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184`` as
``make bench`` does for ``bench_core.py`` (recorded in the JSON). Results go to
``benchmarks/results/checkpointing.{md,json}`` (``checkpointing_quick.*`` with ``--quick``).
Usage: ``python benchmarks/bench_checkpointing.py [--layers 8] [--rounds 20] [--quick] ...``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import dropbp
from dropbp.flops import flop_counter
from harness import RESULTS, Run, args_record, interleaved, layer_of, medians, smollm2_llama, spreads

REENTRANT = (False, True)
FIXED_MASKS = ("none", "half", "attn", "mlp")
TIMED = ("none", "p05_replay", "p05_recompute")
BACKWARD_MARK = "bench_checkpointing::backward"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--batch", type=int, default=2, help="bench_core uses 4; 2 keeps the run near 3.5 minutes")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds (>= 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="weights, batch and the p = 0.5 masks")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 layers, batch 1 x seq 64, 2 rounds, writes checkpointing_quick.*")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.batch, args.seq, args.rounds = 2, 1, 64, 2
    if args.rounds < 2:
        p.error("need --rounds >= 2")
    return args


def branch_kind(name: str) -> str:
    kind = name.rsplit(".", 1)[-1]
    if kind not in ("self_attn", "mlp"):
        raise ValueError(f"unexpected branch {name}")
    return "attn" if kind == "self_attn" else "mlp"


def fixed_masks(handle: dropbp.DropBPHandle) -> dict[str, list[bool]]:
    kinds = [branch_kind(b.name) for b in handle.branches]
    return {"none": [False] * len(kinds),
            "half": [layer_of(b.name) % 2 == 0 for b in handle.branches],
            "attn": [k == "attn" for k in kinds],
            "mlp": [k == "mlp" for k in kinds]}


def predicted_saving(handle: dropbp.DropBPHandle, mask: list[bool], reentrant: bool) -> int:
    """FLOPs the replay saves by the mechanism (module docstring): all dropped branches when
    reentrant; otherwise only dropped attention branches whose layer keeps its MLP."""
    kept_mlp = {layer_of(b.name) for b, m in zip(handle.branches, mask) if branch_kind(b.name) == "mlp" and not m}
    return sum(b.flops for b, m in zip(handle.branches, mask)
               if m and (reentrant or (branch_kind(b.name) == "attn" and layer_of(b.name) in kept_mlp)))


def allocator_profile(trace_path: str) -> dict[str, int]:
    """Bytes allocated during the step and still alive: at the end of the forward, and peaks.

    From the profiler's CPU ``[memory]`` events (address, signed size). Only blocks allocated
    inside the profiled step count, and only their frees: the profiler's own running total
    carries over blocks from earlier sessions, so it is not used.
    """
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    mark = [e for e in events if e.get("name") == BACKWARD_MARK and e.get("ph") == "X"]
    if len(mark) != 1:
        raise RuntimeError(f"expected one {BACKWARD_MARK} range in the trace, found {len(mark)}")
    start = mark[0]["ts"]
    memory = sorted((e["ts"], e["args"].get("Ev Idx", 0), e["args"]["Bytes"], e["args"]["Addr"]) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    live: dict[int, int] = {}
    total = held_end_forward = peak_forward = peak_backward = 0
    for ts, _, nbytes, addr in memory:
        if nbytes > 0:
            live[addr] = nbytes
            total += nbytes
        elif addr in live:
            total -= live.pop(addr)
        if ts < start:
            held_end_forward, peak_forward = total, max(peak_forward, total)
        else:
            peak_backward = max(peak_backward, total)
    return {"held_end_forward": held_end_forward, "peak_forward": peak_forward,
            "peak_backward": max(peak_backward, held_end_forward), "end_of_step": total}


def measure(model, handle, input_ids, mask, replay: bool) -> dict:
    """One untimed forward+backward: backward FLOPs, allocator memory, replay-kept bytes."""
    handle.replay = replay
    handle.set_mask(mask)
    model.zero_grad(set_to_none=True)
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with flop_counter() as forward_counter:
                loss = model(input_ids=input_ids, labels=input_ids).loss
            kept_forward, kept_outputs = handle.kept_for_replay_bytes(), sum(handle.kept_for_replay)
            with record_function(BACKWARD_MARK), flop_counter() as backward_counter:
                loss.backward()
            kept_after, kept_outputs_after = handle.kept_for_replay_bytes(), sum(handle.kept_for_replay)
            del loss
        prof.export_chrome_trace(trace)
        memory = allocator_profile(trace)
    model.zero_grad(set_to_none=True)
    return {"forward_flops": int(forward_counter.get_total_flops()),
            "backward_flops": int(backward_counter.get_total_flops()),
            "replay_kept_bytes_end_forward": kept_forward, "replay_kept_bytes_after_backward": kept_after,
            "replay_kept_outputs_end_forward": kept_outputs, "replay_kept_outputs_after_backward": kept_outputs_after,
            "allocator_bytes": memory}


def measure_flops_and_memory(models, handles, plain, plain_handle, input_ids) -> dict:
    masks = fixed_masks(plain_handle)
    result = {"plain": {}, **{f"reentrant={r}": {} for r in REENTRANT}}
    for name, mask in masks.items():
        result["plain"][name] = measure(plain, plain_handle, input_ids, mask, True)
        for r in REENTRANT:
            entry = result[f"reentrant={r}"][name] = {}
            for replay in ((True,) if name == "none" else (True, False)):
                entry["replay" if replay else "recompute"] = measure(models[r], handles[r], input_ids, mask, replay)
            flops = handles[r].flops
            entry["dropped_forward_flops"] = sum(f for f, m in zip(flops, mask) if m)
            entry["predicted_saving_flops"] = predicted_saving(handles[r], mask, r)
            if name != "none":
                entry["saving_flops"] = (entry["recompute"]["backward_flops"]
                                         - entry["replay"]["backward_flops"])
            entry["recompute_flops_over_plain"] = {
                k: entry[k]["backward_flops"] - result["plain"][name]["backward_flops"]
                for k in ("replay", "recompute") if k in entry}
        print(f"  measured {name}", flush=True)
    return result


def timed_step(model, handle, input_ids, mask, replay: bool) -> dict[str, float]:
    """One forward and ``loss.backward()``; their wall times."""
    handle.replay = replay
    handle.set_mask(mask)
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    mid = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    return {"forward": mid - start, "backward": end - mid}


def time_variants(models, handles, input_ids, rounds: int, seed: int):
    """Round r: ``none`` and the p = 0.5 variants at ``sample_mask(seed, r)``, for both checkpointing modes."""
    n = len(handles[False].branches)
    p05 = lambda round_: dropbp.sample_mask(seed, round_, [0.5] * n)  # noqa: E731
    setups = {"none": (lambda _: [False] * n, True), "p05_replay": (p05, True), "p05_recompute": (p05, False)}
    variants = {f"{'R' if r else 'NR'}/{name}": (lambda round_, r=r, m=mask, rp=replay:
                                                 timed_step(models[r], handles[r], input_ids, m(round_), rp))
                for r in REENTRANT for name, (mask, replay) in setups.items()}
    raw = interleaved(variants, rounds)
    times = {f"reentrant={r}": {name: raw[f"{'R' if r else 'NR'}/{name}"] for name in TIMED} for r in REENTRANT}
    return times, [p05(round_) for round_ in range(1, rounds + 1)]


def summarise(flops_mem, times, masks, handles) -> dict:
    checks = {}
    for r in REENTRANT:
        key = f"reentrant={r}"
        for name in FIXED_MASKS[1:]:
            e = flops_mem[key][name]
            checks[f"{key}/{name}"] = e["saving_flops"] == e["predicted_saving_flops"]
    timing = {}
    for r in REENTRANT:
        key = f"reentrant={r}"
        med = medians(times[key])
        none_bwd_flops = flops_mem[key]["none"]["replay"]["backward_flops"]
        rate = none_bwd_flops / med["none"]["backward"]  # backward FLOP/s, to turn FLOPs into seconds
        pred = [predicted_saving(handles[r], m, r) for m in masks]
        dropped = [sum(f for f, d in zip(handles[r].flops, m) if d) for m in masks]
        timing[key] = {
            "median_s": med,
            "spread_backward_s": {v: spread["backward"] for v, spread in spreads(times[key]).items()},
            "backward_ratio_to_none": {v: med[v]["backward"] / med["none"]["backward"] for v in TIMED},
            "backward_replay_over_recompute": med["p05_replay"]["backward"] / med["p05_recompute"]["backward"],
            "backward_saving_s": med["p05_recompute"]["backward"] - med["p05_replay"]["backward"],
            "p05_mean_dropped_forward_flops": statistics.mean(dropped),
            "p05_mean_predicted_saving_flops": statistics.mean(pred),
            "predicted_saving_s": statistics.mean(pred) / rate,
            "none_backward_flops_per_s": rate,
        }
    return {"flops_memory": flops_mem, "timing": timing, "checks": {"saving_equals_prediction": checks}}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown_report(args, summary, run: Run, n_branches, branch_flops) -> str:
    fm, tm = summary["flops_memory"], summary["timing"]
    g = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
    attn = next(f for b, f in branch_flops if branch_kind(b) == "attn")
    mlp = next(f for b, f in branch_flops if branch_kind(b) == "mlp")
    lines = [
        "# Gradient checkpointing: replaying dropped branches instead of recomputing them", "",
        f"Command: `{run.command}`  ",
        f"Model: random SmolLM2-shaped Llama, {args.layers} layers ({n_branches} branches), batch {args.batch} x "
        f"seq {args.seq}, fp32, full fine-tuning, sdpa, HF gradient checkpointing on every decoder layer; "
        f"{args.threads} threads, {os.cpu_count()} CPUs, torch {torch.__version__}; total run {run.runtime_s:.0f}s. "
        f"Forward FLOPs per branch: attention {g(attn)} G, MLP {g(mlp)} G.", "",
        "## Backward FLOPs (FlopCounterMode around `loss.backward()`, exact and deterministic)", "",
        "`recompute` = `handle.replay = False` (dropped branches re-run in the recompute); "
        "`replay` = default (`handle.replay = True`). `plain` = the same model without checkpointing. Saving = recompute - replay; "
        "predicted = forward FLOPs of all dropped branches (reentrant) or of the dropped attention branches only "
        "(non-reentrant, see below).", "",
        "| use_reentrant | mask | plain bwd (GFLOP) | ckpt bwd, recompute (GFLOP) | ckpt bwd, replay (GFLOP) "
        "| dropped branches' fwd (GFLOP) | saving (GFLOP) | predicted (GFLOP) | saving / dropped fwd | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in REENTRANT:
        key = f"reentrant={r}"
        for name in FIXED_MASKS:
            e = fm[key][name]
            plain = fm["plain"][name]["backward_flops"]
            rec = e["recompute"]["backward_flops"] if "recompute" in e else e["replay"]["backward_flops"]
            if name == "none":
                lines.append(f"| {r} | none | {g(plain)} | {g(rec)} | {g(e['replay']['backward_flops'])} | 0 | - | - "
                             "| - | - |")
                continue
            ok = summary["checks"]["saving_equals_prediction"][f"{key}/{name}"]
            frac = e["saving_flops"] / e["dropped_forward_flops"]
            lines.append(f"| {r} | {name} | {g(plain)} | {g(rec)} | {g(e['replay']['backward_flops'])} "
                         f"| {g(e['dropped_forward_flops'])} | {g(e['saving_flops'])} "
                         f"| {g(e['predicted_saving_flops'])} | {frac:.3f} | {'PASS' if ok else 'FAIL'} |")
    lines += [
        "", "## Memory (CPU allocator: bytes allocated during the step and still alive; replay-kept bytes exact)", "",
        "| use_reentrant | mask | variant | held at end of forward (MiB) | peak forward (MiB) "
        "| peak backward (MiB) | replay keeps at end of forward (MiB) | still kept after backward (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in FIXED_MASKS:
        a = fm["plain"][name]["allocator_bytes"]
        lines.append(f"| plain | {name} | - | {mib(a['held_end_forward'])} | {mib(a['peak_forward'])} "
                     f"| {mib(a['peak_backward'])} | - | - |")
    for r in REENTRANT:
        for name in FIXED_MASKS:
            e = fm[f"reentrant={r}"][name]
            for variant in ("replay", "recompute"):
                if variant not in e:
                    continue
                a, v = e[variant]["allocator_bytes"], e[variant]
                lines.append(f"| {r} | {name} | {variant} | {mib(a['held_end_forward'])} | {mib(a['peak_forward'])} "
                             f"| {mib(a['peak_backward'])} | {mib(v['replay_kept_bytes_end_forward'])} "
                             f"| {mib(v['replay_kept_bytes_after_backward'])} |")
    lines += [
        "", f"## Wall time (random p = 0.5 masks, {args.rounds} interleaved rounds after 1 warm-up round, medians)", "",
        "| use_reentrant | variant | forward (s) | backward (s) | backward min..max (s) | backward / none |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in REENTRANT:
        t = tm[f"reentrant={r}"]
        for v in TIMED:
            lo, hi = t["spread_backward_s"][v]
            lines.append(f"| {r} | {v} | {t['median_s'][v]['forward']:.3f} | {t['median_s'][v]['backward']:.3f} "
                         f"| {lo:.3f}..{hi:.3f} | {t['backward_ratio_to_none'][v]:.3f} |")
    lines += ["", "| use_reentrant | backward replay / recompute | measured saving (s) | predicted saving (s) "
              "| mean dropped fwd / predicted saving per step (GFLOP) |", "|---|---:|---:|---:|---:|"]
    for r in REENTRANT:
        t = tm[f"reentrant={r}"]
        lines.append(f"| {r} | {t['backward_replay_over_recompute']:.3f} | {t['backward_saving_s']:.3f} "
                     f"| {t['predicted_saving_s']:.3f} | {g(t['p05_mean_dropped_forward_flops'])} / "
                     f"{g(t['p05_mean_predicted_saving_flops'])} |")
    lines += [
        "", "Predicted saving (s) = the mechanism's FLOP saving for the timed masks divided by the backward "
        "FLOP rate of `none` (its backward FLOPs / its median backward time).", "",
        "Why non-reentrant saves less: its recompute of a layer starts when the backward first unpacks a "
        "tensor the first pass saved there, and stops once the last one is rebuilt. A dropped branch and the "
        "residual add after it save nothing, so a dropped MLP, the last branch of its layer, is never "
        "recomputed with or without the replay. A dropped attention is followed by `post_attention_layernorm`, "
        "whose saved input the kept MLP needs, so without the replay it is recomputed. A layer with both "
        "branches dropped (`half`) has a dead graph in both norms and is not recomputed at all. So under "
        "non-reentrant checkpointing the handle keeps a dropped branch's output only when a later branch of "
        "its layer is kept (the `attn` rows); every kept output is replayed (`still kept after backward` is 0).",
        "",
        run.footer(read="the ratios and the FLOPs, not the seconds"), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = Run(threads=args.threads)
    models, handles = {}, {}
    for r in (*REENTRANT, None):  # None: the same weights without checkpointing (FLOP reference)
        torch.manual_seed(args.seed)
        model = smollm2_llama(args.layers, args.seq)
        if r is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": r})
        models[r], handles[r] = model, dropbp.apply(model, drop_rate=0.0, auto_step=False)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, models[None].config.vocab_size, (args.batch, args.seq), generator=generator)
    for r, model in models.items():
        with handles[r].paused():
            model(input_ids=input_ids)  # a training forward (nothing dropped) counts each branch's FLOPs
    branch_flops = [(b.name, b.flops) for b in handles[None].branches]
    print(f"{args.layers} layers, {len(branch_flops)} branches, {args.threads} threads, "
          f"load average {os.getloadavg()}", flush=True)

    flops_mem = measure_flops_and_memory(models, handles, models[None], handles[None], input_ids)
    times, masks = time_variants(models, handles, input_ids, args.rounds, args.seed)
    summary = summarise(flops_mem, times, masks, handles)
    run.finish()
    report = markdown_report(args, summary, run, len(branch_flops), branch_flops)
    print(report)
    record = {"command": run.command, "args": args_record(args), "machine": run.machine(),
              "runtime_s": run.runtime_s, "branch_forward_flops": dict(branch_flops),
              "fixed_masks": fixed_masks(handles[None]), "timed_p05_masks": masks,
              "raw_times_s": times, **summary}
    run.write(args.out, "checkpointing_quick" if args.quick else "checkpointing", record, report)


if __name__ == "__main__":
    main()
