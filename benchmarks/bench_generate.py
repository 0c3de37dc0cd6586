"""Inference with DropBP attached: ``model.generate`` time with the handle vs the same model plain.

What it measures
    DropBP's hooks stay on the model after training, so every inference forward passes through them.
    They must cost nothing measurable there: no mask is drawn, no branch is dropped and no FLOPs are
    counted in eval mode, under ``no_grad`` or in ``generate`` (the library used to count branch
    FLOPs on every new input shape, which made the first ``generate`` about 5x slower).

    A random-weight SmolLM2-shaped ``LlamaForCausalLM`` (the shapes of ``bench_core.py``, fp32, sdpa,
    KV cache on, ``--layers`` decoder layers), ``plain`` and ``dropbp``: the same model object with
    ``dropbp.apply(model, drop_rate=--drop-rate)`` attached (auto_step on, as in training) or with
    the handle removed. Using one model for both (the handle is attached or removed, untimed, before
    each call) keeps differences of memory placement between two copies out of a ratio that has to
    resolve 2%. Greedy decoding of exactly ``--new-tokens`` tokens from a ``--prompt``-token random prompt
    (batch ``--batch``), in two modes:

    * ``eval``           ``model.eval()``
    * ``train_no_grad``  ``model.train()`` under ``torch.no_grad()`` (e.g. sampling during training)

How
    Following DESIGN.md ("Measuring on shared, noisy machines"), with ``harness.py``: one process,
    fixed thread count (default 1: decoding one sequence is latency-bound, and with one thread the
    process CPU time is the work done, which competing processes barely change), one untimed warm-up
    round, then ``--rounds`` interleaved rounds eval/plain eval/dropbp train_no_grad/plain
    train_no_grad/dropbp, each call's wall time and CPU time recorded; medians; ratio dropbp / plain
    per mode, PASS if the wall-time ratio is <= 1.02. Also reported, as checks on the noise: the CPU
    time ratio, and the median of the per-round wall ratios (the two calls of a round ran next to each
    other). Checks: both variants generate the same tokens, the handles drew no mask (``step_count``
    stays 0) and counted no FLOPs (``handle.flops`` stays ``None``).

    First call: the cost that shows up once per new shape. After the timed rounds (the process is
    warm), ``--first-call-pairs`` fresh pairs of models with identical weights per mode (one plain, one
    with the handle attached at build time), each timed on its first
    ``generate``; the order plain/dropbp alternates from pair to pair; the median of the per-pair
    ratios dropbp / plain (wall and CPU time) is reported.

Results go to ``benchmarks/results/generate.{json,md}``. Usage:
``python benchmarks/bench_generate.py [--layers 4] [--new-tokens 32] [--rounds 30] ...``
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

import dropbp

from harness import (
    RESULTS, Run, args_record, cpu_and_wall, interleaved, medians, paired_ratios, smollm2_llama, spreads, verdict,
)

MODES = ("eval", "train_no_grad")
KINDS = ("plain", "dropbp")
PHASES = ("wall", "cpu")
BAR = 1.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated (greedy, exactly this many)")
    p.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds (>= 5)")
    p.add_argument("--first-call-pairs", type=int, default=3, help="fresh model pairs per mode for the first call")
    p.add_argument("--drop-rate", type=float, default=0.5, help="drop rate of the attached handle")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 layer, 8 new tokens, 5 rounds, 1 pair, "
                   "writes generate_quick.*")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.new_tokens, args.rounds, args.first_call_pairs = 1, 8, 5, 1
    if args.rounds < 5 or args.first_call_pairs < 1:
        p.error("need --rounds >= 5 and --first-call-pairs >= 1")
    return args


def build_pair(args) -> tuple[dict[str, torch.nn.Module], dropbp.DropBPHandle]:
    """``plain`` and ``dropbp`` models with identical weights; the handle of the second."""
    models = {}
    for kind in KINDS:
        torch.manual_seed(args.seed)
        models[kind] = smollm2_llama(args.layers, args.prompt + args.new_tokens, use_cache=True)
    handle = dropbp.apply(models["dropbp"], drop_rate=args.drop_rate, seed=args.seed)
    return models, handle


def generate(model, mode: str, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens in ``mode``."""
    model.train(mode == "train_no_grad")
    with torch.no_grad():
        return model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
        )


def first_calls(args, prompt: torch.Tensor) -> dict[str, dict]:
    """Per mode: each fresh pair's first-``generate`` times and ratios dropbp / plain."""
    result = {}
    for mode in MODES:
        pairs = []
        for k in range(args.first_call_pairs):
            fresh, _ = build_pair(args)
            order = KINDS if k % 2 == 0 else KINDS[::-1]
            t = {kind: cpu_and_wall(lambda m=fresh[kind]: generate(m, mode, prompt, args.new_tokens))
                 for kind in order}
            pairs.append({"order": list(order), **t,
                          "ratio": {p: t["dropbp"][p] / t["plain"][p] for p in PHASES}})
            print(f"  first call {mode} pair {k}: plain {t['plain']['wall']:.3f}s  dropbp {t['dropbp']['wall']:.3f}s",
                  flush=True)
            del fresh
        result[mode] = {"pairs": pairs,
                        "median_ratio": {p: statistics.median(x["ratio"][p] for x in pairs) for p in PHASES}}
    return result


def markdown_report(args, summary, run: Run) -> str:
    lines = [
        "# Inference with DropBP attached: `model.generate`", "",
        f"Command: `{run.command}`  ",
        f"Model: random SmolLM2-shaped Llama, {args.layers} layers, fp32, sdpa, KV cache; greedy decoding of "
        f"{args.new_tokens} new tokens from a {args.prompt}-token prompt, batch {args.batch}; `dropbp` = the same "
        f"model with `dropbp.apply(model, drop_rate={args.drop_rate})` attached, `plain` = with the handle removed "
        f"(attached/removed untimed before each call); {args.threads} thread(s), "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; {args.rounds} interleaved timed rounds after 1 warm-up "
        f"round; total run {run.runtime_s:.0f}s.", "",
        "| mode | variant | median wall (s) | wall min..max (s) | median CPU (s) | wall ms per new token |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for kind in KINDS:
            name = f"{mode}/{kind}"
            lo, hi = summary["spread_s"][name]["wall"]
            med = summary["median_s"][name]
            lines.append(f"| {mode} | {kind} | {med['wall']:.3f} | {lo:.3f}..{hi:.3f} | {med['cpu']:.3f} "
                         f"| {med['wall'] / args.new_tokens * 1e3:.1f} |")
    checks = summary["checks"]
    lines += ["", "| check | value | bar | result |", "|---|---:|---:|---|"]
    for mode in MODES:
        r = summary["ratio_dropbp_over_plain"][mode]
        lines.append(f"| {mode}: median generate wall time, dropbp / plain | {r['wall']:.3f} | <= {BAR} "
                     f"| {verdict(r['wall'] <= BAR)} |")
    for mode in MODES:
        r = summary["ratio_dropbp_over_plain"][mode]
        paired = summary["paired_ratio_dropbp_over_plain"][mode]["median"]
        lines.append(f"| {mode}: CPU time, dropbp / plain; median of per-round wall ratios "
                     f"| {r['cpu']:.3f}; {paired:.3f} | reported | - |")
    for mode in MODES:
        fc = summary["first_call"][mode]
        per_pair = ", ".join(f"{p['ratio']['wall']:.2f}" for p in fc["pairs"])
        lines.append(f"| {mode}: first generate of a fresh model, dropbp / plain: wall (pairs: {per_pair}); CPU "
                     f"| {fc['median_ratio']['wall']:.3f}; {fc['median_ratio']['cpu']:.3f} | reported | - |")
    lines += [
        f"| same tokens generated with and without DropBP (both modes) | {checks['same_tokens']} | True "
        f"| {verdict(checks['same_tokens'])} |",
        f"| masks drawn by the handles during generate (max `step_count` of {checks['handles_attached']} handles) "
        f"| {checks['step_count']} | 0 "
        f"| {verdict(checks['step_count'] == 0)} |",
        f"| branch FLOPs counted during generate (`handle.flops` not None) | {checks['branches_counted']} | 0 "
        f"| {verdict(checks['branches_counted'] == 0)} |",
        "", "First call: fresh pairs of identically initialised models, one with the handle attached when built, "
        "each timed on its first `generate` (the two run back to back); the median ratio over the pairs. It "
        "carries more noise than the timed rounds.", "",
        run.footer(), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = Run(threads=args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = smollm2_llama(args.layers, args.prompt + args.new_tokens, use_cache=True)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=generator)
    state = {"handle": None, "handles": 0, "step_count": 0, "branches_counted": 0}
    tokens = {}

    def attach(on: bool) -> None:
        handle = state["handle"]
        if on and handle is None:
            state["handle"] = dropbp.apply(model, drop_rate=args.drop_rate, seed=args.seed)
            state["handles"] += 1
        elif not on and handle is not None:
            state["step_count"] = max(state["step_count"], handle.step_count)
            state["branches_counted"] = max(state["branches_counted"], sum(f is not None for f in handle.flops))
            handle.remove()
            state["handle"] = None

    def variant(mode: str, kind: str):
        def call(_round: int) -> dict[str, float]:
            attach(kind == "dropbp")

            def generate_once() -> None:
                tokens[(mode, kind)] = generate(model, mode, prompt, args.new_tokens)
            return cpu_and_wall(generate_once)
        return call

    print(f"{args.layers} layers, {args.threads} threads, load average {os.getloadavg()}", flush=True)
    times = interleaved({f"{mode}/{kind}": variant(mode, kind) for mode in MODES for kind in KINDS}, args.rounds)
    attach(False)
    assert all(t.shape == (args.batch, args.prompt + args.new_tokens) for t in tokens.values())
    checks = {"same_tokens": all(torch.equal(tokens[(m, "plain")], tokens[(m, "dropbp")]) for m in MODES),
              "step_count": state["step_count"], "branches_counted": state["branches_counted"],
              "handles_attached": state["handles"]}
    first = first_calls(args, prompt)

    med = medians(times)
    summary = {
        "median_s": med, "spread_s": spreads(times),
        "ratio_dropbp_over_plain": {m: {p: med[f"{m}/dropbp"][p] / med[f"{m}/plain"][p] for p in PHASES}
                                    for m in MODES},
    }
    paired = {m: paired_ratios(times, f"{m}/dropbp", f"{m}/plain", "wall") for m in MODES}
    summary["paired_ratio_dropbp_over_plain"] = {m: {"median": statistics.median(r), "per_round": r}
                                                 for m, r in paired.items()}
    summary["pass"] = {m: r["wall"] <= BAR for m, r in summary["ratio_dropbp_over_plain"].items()}
    summary["bar"] = BAR
    summary["first_call"] = first
    summary["checks"] = checks
    run.finish()
    report = markdown_report(args, summary, run)
    print(report)
    record = {"command": run.command, "args": args_record(args), "machine": run.machine(),
              "runtime_s": run.runtime_s, "generated_tokens": {f"{m}/{k}": t.tolist() for (m, k), t in tokens.items()},
              "raw_generate_times_s": times, **summary}
    run.write(args.out, "generate_quick" if args.quick else "generate", record, report)


if __name__ == "__main__":
    main()
