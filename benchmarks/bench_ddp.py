"""DDP overhead of DropBP: step time and allreduce volume with 2 gloo processes on CPU.

What it measures
    DropBP leaves dropped branches' parameters without gradients, which
    ``DistributedDataParallel`` only accepts with ``find_unused_parameters=True``; that flag makes
    DDP walk the autograd graph after every forward and allreduce a per-parameter "used" map.
    This benchmark separates the costs. ``--nproc`` processes (default 2) are launched with
    ``python -m torch.distributed.run`` and the gloo backend, each with ``torch.set_num_threads(1)``,
    on a random-weight Llama-architecture ``LlamaForCausalLM`` built from a ``LlamaConfig``
    (``--hidden``/``--layers``/``--vocab``..., fp32, full fine-tuning, sdpa, AdamW lr 1e-5).
    Every variant has its own copy of the same initial weights and its own optimizer:

    * ``ddp``             DDP(find_unused_parameters=False), no DropBP: what users run today
    * ``ddp_fu``          DDP(find_unused_parameters=True), no DropBP: the cost of the flag alone
    * ``ddp_fu_p0``       DDP(find_unused_parameters=True) + DropBP drop_rate 0: the hooks' cost
    * ``ddp_fu_p05``      DDP(find_unused_parameters=True) + DropBP drop_rate 0.5
    * ``local``           no DDP, no DropBP: each process trains alone on its own shard
    * ``local_p05``       no DDP, DropBP drop_rate 0.5: the same-config single-rank step of ``ddp_fu_p05``

    The ``local`` variants run on all ranks at once, so they see the same CPU contention as the
    DDP ones; the difference between ``ddp`` and ``local`` (``ddp_fu_p05`` and ``local_p05``) is
    what data parallelism costs without (with) DropBP. All DropBP variants use the same seed
    and step together, so in each round they drop the same branches.

How
    A step is forward with labels, ``loss.backward()``, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)``, timed on every rank after a barrier; a round's step time is
    the slowest rank's. Round r uses global batch r (the same for every variant; each rank takes
    its ``--batch`` rows). ``--warmup`` untimed rounds (DDP rebuilds its buckets after the first
    backward), then ``--rounds`` interleaved rounds in the order above (``harness.interleaved``);
    medians, ratios to ``ddp``.

    Allreduce volume, in separate untimed steps on fresh copies: a DDP communication hook that
    records each gradient bucket's bytes before the usual allreduce, and a profiler pass that
    records every collective gloo runs (``gloo:all_reduce`` ranges with their shapes), which also
    catches the "used parameters" allreduce of ``find_unused_parameters=True``. It also counts
    the parameters left with ``grad is None`` after the backward (AdamW skips those).

Noise: run with ``MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184`` as
``make bench`` does (recorded in the JSON). Results go to ``benchmarks/results/ddp.{md,json}``
(``ddp_quick.*`` with ``--quick``). Usage: ``python benchmarks/bench_ddp.py [--rounds 20] [--quick] ...``
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dropbp.app.files import write_json

from harness import RESULTS, Run, args_record, dropbp_source, interleaved, medians, ratios, spreads, timing_env

VARIANTS = ("ddp", "ddp_fu", "ddp_fu_p0", "ddp_fu_p05", "local", "local_p05")
# variant -> (DDP find_unused_parameters or None for no DDP, DropBP drop rate or None)
SETUP = {"ddp": (False, None), "ddp_fu": (True, None), "ddp_fu_p0": (True, 0.0), "ddp_fu_p05": (True, 0.5),
         "local": (None, None), "local_p05": (None, 0.5)}
DDP_VARIANTS = tuple(v for v in VARIANTS if SETUP[v][0] is not None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688, help="MLP width (Llama: about 8/3 x hidden)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="rows per rank")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds (>= 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--volume-steps", type=int, default=3, help="untimed steps per DDP variant for the volume count")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks), one thread each")
    p.add_argument("--seed", type=int, default=0, help="weights, batches and the DropBP masks")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 layers, hidden 128, batch 2 x seq 64, 3 rounds, writes ddp_quick.*")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)  # set by the launcher: run as a rank
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.batch, args.seq = 2, 128, 344, 2, 64
        args.rounds, args.warmup, args.volume_steps = 3, 1, 2
    if args.rounds < 3 or args.warmup < 1 or args.volume_steps < 1:
        p.error("need --rounds >= 3, --warmup >= 1 and --volume-steps >= 1")
    return args


# ---------------------------------------------------------------------------------- worker (one rank)
def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, num_hidden_layers=args.layers, vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq), attention_dropout=0.0, use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).float().train()


def local_batch(args, round_: int, rank: int, world: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed * 100_003 + round_)
    batch = torch.randint(0, args.vocab, (world * args.batch, args.seq), generator=generator)
    return batch[rank * args.batch : (rank + 1) * args.batch]


def make_variant(base, name: str, args, comm_hook=None):
    """(module to call, inner model, optimizer, DropBP handle or None) for one variant."""
    import dropbp
    from torch.nn.parallel import DistributedDataParallel

    find_unused, rate = SETUP[name]
    model = copy.deepcopy(base)
    handle = None if rate is None else dropbp.apply(model, drop_rate=rate, seed=args.seed)
    wrapper = model
    if find_unused is not None:
        wrapper = DistributedDataParallel(model, find_unused_parameters=find_unused)
        if comm_hook is not None:
            wrapper.register_comm_hook(*comm_hook)
    return wrapper, model, torch.optim.AdamW(model.parameters(), lr=1e-5), handle


def train_step(wrapper, optimizer, input_ids) -> float:
    """One step, timed on this rank after a barrier (the harness collects garbage before it)."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    loss = wrapper(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def collectives_in(trace_path: str) -> list[dict]:
    """Collectives gloo ran in a profiler trace (``gloo:<name>`` ranges recorded with shapes)."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    out = []
    for e in events:
        name, a = str(e.get("name")), e.get("args", {})
        if e.get("ph") == "X" and name.startswith("gloo:") and name != "gloo:barrier":
            elements = sum(math.prod(d) for d in a.get("Input Dims", []) if isinstance(d, list))
            dtype = (a.get("Input type") or ["?"])[0]
            out.append({"collective": name, "elements": elements, "dtype": dtype,
                        "bytes": elements * DTYPE_BYTES.get(dtype, 0)})
    return out


DTYPE_BYTES = {"float": 4, "int": 4, "long int": 8, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "bool": 1,
               "unsigned char": 1}


def measure_volume(base, name: str, args, rank: int, world: int) -> dict:
    """Untimed steps on a fresh copy: bucket bytes per step (comm hook), all collectives of the last
    step (profiler), parameters without gradient after the backward."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.profiler import ProfilerActivity, profile

    buckets: list[int] = []

    def counting_hook(state, bucket):
        buffer = bucket.buffer()
        buckets.append(buffer.numel() * buffer.element_size())
        return allreduce_hook(state, bucket)

    wrapper, model, optimizer, handle = make_variant(base, name, args, comm_hook=(None, counting_hook))
    steps = []
    for step in range(args.volume_steps):
        buckets.clear()
        ids = local_batch(args, 10_000 + step, rank, world)
        dist.barrier()
        last = step == args.volume_steps - 1
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            if last:
                prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                prof.__enter__()
            loss = wrapper(input_ids=ids, labels=ids).loss
            loss.backward()
            if last:
                prof.__exit__(None, None, None)
                prof.export_chrome_trace(trace)
                collectives = collectives_in(trace)
        params = list(model.parameters())
        none = sum(p.grad is None for p in params)
        none_numel = sum(p.numel() for p in params if p.grad is None)
        dropped = sum(handle.mask) if handle is not None else 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append({"bucket_bytes": list(buckets), "bucket_bytes_total": sum(buckets),
                      "params_grad_none": none, "params_grad_none_elements": none_numel,
                      "branches_dropped": dropped})
    by_kind: dict[str, dict] = {}
    for c in collectives:
        k = by_kind.setdefault(c["collective"], {"calls": 0, "bytes": 0, "sizes": []})
        k["calls"] += 1
        k["bytes"] += c["bytes"]
        k["sizes"].append([c["elements"], c["dtype"]])
    return {"steps": steps, "last_step_collectives": by_kind,
            "param_count": sum(p.numel() for p in model.parameters()),
            "param_tensors": len(list(model.parameters()))}


def worker(args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = build_model(args)
    variants = {name: make_variant(base, name, args) for name in VARIANTS}
    probe = variants["local_p05"][3]
    with probe.paused():  # a training forward counts branch FLOPs; paused: the mask stream stays put
        variants["local_p05"][1](input_ids=local_batch(args, 0, rank, world))

    def step(variant: tuple):
        wrapper, _, optimizer, _ = variant
        return lambda round_: train_step(wrapper, optimizer, local_batch(args, round_, rank, world))

    times = interleaved({name: step(variants[name]) for name in VARIANTS}, args.rounds, warmup=args.warmup,
                        log=(lambda line: print(line, flush=True)) if rank == 0 else None)
    masks_agree = len({tuple(variants[v][3].mask) for v in ("ddp_fu_p05", "local_p05")}) == 1
    stats = variants["ddp_fu_p05"][3].drop_statistics(reset=False)
    flops = probe.flops
    del variants
    gc.collect()
    volume = {name: measure_volume(base, name, args, rank, world) for name in DDP_VARIANTS}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"times": times, "volume": volume})
    if rank == 0:
        record = {"per_rank": gathered, "world_size": world, "masks_agree": masks_agree,
                  "drop_statistics_p05": stats, "branch_forward_flops": flops,
                  "branches": [b.name for b in probe.branches],
                  "param_count": sum(p.numel() for p in base.parameters()),
                  "param_tensors": len(list(base.parameters())),
                  "threads": torch.get_num_threads(), "dropbp": dropbp_source(), "env": timing_env()}
        write_json(args.worker_result, record, dumps=json.dumps)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- launcher and report
def launch(args, argv: list[str]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), str(Path(__file__).resolve()),
                   *argv, "--worker-result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default, set here to silence its warning
        completed = subprocess.run(command, env=env)
        if completed.returncode != 0 or not result.exists():
            raise SystemExit(f"torchrun failed with exit code {completed.returncode}")
        return json.loads(result.read_text())


def summarise(raw: dict) -> dict:
    per_rank = [r["times"] for r in raw["per_rank"]]
    steps = {v: [max(r[v][i] for r in per_rank) for i in range(len(per_rank[0][v]))] for v in VARIANTS}
    med = medians(steps)
    vol0 = raw["per_rank"][0]["volume"]
    volume = {}
    for v in DDP_VARIANTS:
        steps_v = vol0[v]["steps"]
        coll = vol0[v]["last_step_collectives"]
        volume[v] = {
            "bucket_bytes_per_step": [s["bucket_bytes_total"] for s in steps_v],
            "buckets_per_step": [len(s["bucket_bytes"]) for s in steps_v],
            "params_grad_none_per_step": [s["params_grad_none"] for s in steps_v],
            "params_grad_none_elements_per_step": [s["params_grad_none_elements"] for s in steps_v],
            "branches_dropped_per_step": [s["branches_dropped"] for s in steps_v],
            "collectives_last_step": coll,
            "allreduce_bytes_last_step": sum(k["bytes"] for name, k in coll.items() if "all_reduce" in name),
        }
    base_bytes = volume["ddp"]["bucket_bytes_per_step"][-1]
    return {
        "step_times_s": steps,
        "median_s": med,
        "spread_s": spreads(steps),
        "ratio_to_ddp": ratios(med, "ddp"),
        "ddp_cost_s": {"no_dropbp": med["ddp"] - med["local"], "dropbp_p05": med["ddp_fu_p05"] - med["local_p05"]},
        "ratios": {
            "find_unused_flag": med["ddp_fu"] / med["ddp"],
            "hooks_p0_vs_flag": med["ddp_fu_p0"] / med["ddp_fu"],
            "p05_vs_ddp": med["ddp_fu_p05"] / med["ddp"],
            "ddp_p05_vs_local_p05": med["ddp_fu_p05"] / med["local_p05"],
            "ddp_vs_local": med["ddp"] / med["local"],
            "local_p05_vs_local": med["local_p05"] / med["local"],
        },
        "volume": volume,
        "bucket_bytes_same_with_dropbp": all(b == base_bytes for v in DDP_VARIANTS
                                             for b in volume[v]["bucket_bytes_per_step"]),
    }


def markdown_report(args, raw, s, run: Run) -> str:
    r = s["ratios"]
    mb = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    flops = raw["branch_forward_flops"]
    lines = [
        "# DropBP under DistributedDataParallel: overhead and allreduce volume", "",
        f"Command: `{run.command}`  ",
        f"Model: random Llama (LlamaConfig: hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, "
        f"{args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab}; {raw['param_count'] / 1e6:.2f} M parameters, "
        f"{len(raw['branches'])} branches, {sum(flops) / 1e9:.2f} GFLOP branch forward per rank step), fp32, full "
        f"fine-tuning, AdamW, sdpa. {raw['world_size']} gloo processes x {raw['threads']} thread on {os.cpu_count()} "
        f"CPUs, batch {args.batch} x seq {args.seq} per rank, torch {torch.__version__}. {args.warmup} warm-up + "
        f"{args.rounds} interleaved timed rounds; a round's step time is the slowest rank's; total run "
        f"{run.runtime_s:.0f}s.", "",
        "| variant | DDP | DropBP | median step (s) | min..max (s) | ratio to ddp |",
        "|---|---|---|---:|---:|---:|",
    ]
    for v in VARIANTS:
        fu, rate = SETUP[v]
        ddp = "no (each rank alone)" if fu is None else f"find_unused={fu}"
        lo, hi = s["spread_s"][v]
        lines.append(f"| {v} | {ddp} | {'-' if rate is None else rate} | {s['median_s'][v]:.3f} "
                     f"| {lo:.3f}..{hi:.3f} | {s['ratio_to_ddp'][v]:.3f} |")
    stats = raw["drop_statistics_p05"]
    lines += [
        "", "| comparison | ratio |", "|---|---:|",
        f"| find_unused_parameters=True alone: ddp_fu / ddp | {r['find_unused_flag']:.3f} |",
        f"| DropBP hooks at rate 0: ddp_fu_p0 / ddp_fu | {r['hooks_p0_vs_flag']:.3f} |",
        f"| DropBP 0.5 under DDP vs today's DDP: ddp_fu_p05 / ddp | {r['p05_vs_ddp']:.3f} |",
        f"| DropBP 0.5 without DDP vs no DropBP without DDP: local_p05 / local | {r['local_p05_vs_local']:.3f} |",
        f"| data parallelism, no DropBP: ddp / local | {r['ddp_vs_local']:.3f} |",
        f"| data parallelism, DropBP 0.5: ddp_fu_p05 / local_p05 | {r['ddp_p05_vs_local_p05']:.3f} |",
        "", f"DDP's cost per step (median DDP step - median same-config step without DDP): "
        f"{s['ddp_cost_s']['no_dropbp'] * 1e3:.0f} ms without DropBP, {s['ddp_cost_s']['dropbp_p05'] * 1e3:.0f} ms "
        f"with DropBP 0.5. DropBP 0.5 dropped {stats['drop_rate']:.3f} of the branches over the timed steps "
        f"({stats['backward_flops_skipped']:.3f} of branch backward FLOPs); the DDP and local DropBP variants drew "
        f"the same masks: {raw['masks_agree']}.", "",
        "## Allreduce volume (rank 0, untimed steps on fresh copies)", "",
        "| variant | gradient buckets per step | bucket bytes per step (MiB) | all allreduces, last step "
        "(calls / MiB) | params with grad None after backward (tensors / elements) | branches dropped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in DDP_VARIANTS:
        vol = s["volume"][v]
        coll = vol["collectives_last_step"]
        calls = sum(k["calls"] for name, k in coll.items() if "all_reduce" in name)
        lines.append(
            f"| {v} | {'/'.join(map(str, vol['buckets_per_step']))} "
            f"| {'/'.join(mb(b) for b in vol['bucket_bytes_per_step'])} "
            f"| {calls} / {mb(vol['allreduce_bytes_last_step'])} "
            f"| {'/'.join(map(str, vol['params_grad_none_per_step']))} / "
            f"{'/'.join(map(str, vol['params_grad_none_elements_per_step']))} "
            f"| {'/'.join(map(str, vol['branches_dropped_per_step']))} |")
    same = s["bucket_bytes_same_with_dropbp"]
    others = "; ".join(f"{name} {k['calls']} calls, {k['bytes']} bytes"
                       for name, k in s["volume"]["ddp_fu_p05"]["collectives_last_step"].items())
    fu_extra = s["volume"]["ddp_fu"]["allreduce_bytes_last_step"] - s["volume"]["ddp"]["allreduce_bytes_last_step"]
    fu_sizes = [size for size in s["volume"]["ddp_fu"]["collectives_last_step"].get("gloo:all_reduce", {}).get("sizes", [])
                if size[1] != "float"]
    lines += [
        "", "Values separated by `/` are the volume steps in order (the first one is before DDP rebuilds its "
        "buckets).", "",
        f"Bucket bytes are the same in every variant and step: {same}. With find_unused_parameters=True DDP "
        "marks a parameter that got no gradient as ready and allreduces its slot of the bucket (zeros) with the "
        "rest, so dropping branches does not shrink the traffic; after the reduction it leaves the gradient of a "
        "parameter that no rank used as None, so AdamW still skips it. The flag adds one allreduce of the "
        f"per-parameter 'used' map per step ({fu_extra} bytes more than `ddp` here; its non-float allreduces "
        f"[elements, dtype]: {fu_sizes}; the model has {raw['param_tensors']} parameter tensors). Every collective "
        f"of the last `ddp_fu_p05` volume step: {others}.", "",
        run.footer(raw["env"], env_label="environment"), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker_result is not None:
        worker(args)
        return
    run = Run()
    raw = launch(args, argv)
    summary = summarise(raw)
    run.finish()
    report = markdown_report(args, raw, summary, run)
    print(report)
    machine = {**run.machine(threads=False, env=False), "dropbp": raw.pop("dropbp"), "worker_env": raw["env"],
               "threads_per_rank": raw["threads"]}
    record = {"command": run.command, "args": args_record(args, skip=("worker_result",)),
              "optimizer": "AdamW(lr=1e-5)", "machine": machine, "runtime_s": run.runtime_s,
              "world_size": raw["world_size"], "param_count": raw["param_count"], "branches": raw["branches"],
              "branch_forward_flops": raw["branch_forward_flops"], "drop_statistics_p05": raw["drop_statistics_p05"],
              "masks_agree": raw["masks_agree"],
              "raw_step_times_per_rank_s": [r["times"] for r in raw["per_rank"]],
              "raw_volume_per_rank": [r["volume"] for r in raw["per_rank"]], **summary}
    run.write(args.out, "ddp_quick" if args.quick else "ddp", record, report)


if __name__ == "__main__":
    main()
