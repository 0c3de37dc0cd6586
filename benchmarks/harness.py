"""The harness every benchmark shares: interleaved timing, medians and ratios, machine info, results.

Follows DESIGN.md ("Measuring on shared, noisy machines"): configurations are compared inside one
process, interleaved A B C A B C ... after an untimed warm-up, summarised by their medians and
quoted as ratios to a baseline; the run records what could change its times (load, threads,
allocator environment, which dropbp was measured) next to them.

API
    ``interleaved(variants, rounds, warmup=1, log=say, label="round")``
        Runs ``warmup`` + ``rounds`` rounds; each round calls every variant once, in order. A
        variant is ``fn(round_index) -> None | float | {phase: float}``: ``None`` means the harness
        times the call (``gc.collect()`` first, then ``time.perf_counter`` around it); a number or a
        mapping of numbers is a time the variant measured itself (e.g. after a barrier, or forward
        and backward apart). ``round_index`` counts from 0 including the warm-up rounds, so a variant
        can draw round-dependent data. Returns the timed rounds' raw times per variant: a list, or
        ``{phase: list}`` for variants that return mappings.
    ``medians(times)``, ``spreads(times)``, ``ratios(values, baseline)``, ``summarise(times, baseline)``
        Median per variant (per phase), ``[min, max]``, ``value / value[baseline]``; ``summarise``
        returns ``{"median_s", "spread_s", "ratio_to_<baseline>"}``.
    ``paired_ratios(times, variant, baseline, phase=None)``
        Per round, the variant's time over the baseline's (a noise check on the ratio of medians).
    ``cpu_and_wall(fn)``
        ``{"wall": s, "cpu": s}`` of one call: a variant returns it to record process CPU time too.
    ``Run(threads=None)``
        One benchmark run: sets ``torch.set_num_threads`` when given; records the start time, the load
        average and the command line (prefixed with the ``MALLOC_*`` variables set, as ``make bench``
        runs it). ``run.finish()`` stops the clock; ``run.machine()`` is the machine and environment
        record (torch, threads, CPUs, platform, load average at start and end, git commit and dirty
        state of the checkout and of ``src/dropbp``, timing-relevant environment variables);
        ``run.footer(...)`` is the report's closing line; ``run.write(out, stem, record, report)``
        writes ``<stem>.json`` and ``<stem>.md`` atomically (``write_result``: ``dropbp.app.files``'s
        ``atomic_path``, the files readable as if written in place).
    ``smollm2_llama(layers, seq, use_cache=False)``, ``layer_of(branch_name)``
        The random-weight SmolLM2-shaped model the single-process benchmarks share.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import dropbp
from dropbp.app.files import write_text

__all__ = [
    "ENV_PREFIXES", "REPO", "RESULTS", "Run", "args_record", "command_line", "cpu_and_wall", "dropbp_source",
    "git_state", "interleaved", "layer_of", "medians", "paired_ratios", "ratios", "say", "smollm2_llama", "spreads",
    "summarise", "timing_env", "verdict", "write_result",
]

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# Environment variables that change timings; recorded with every result.
ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "OMP_", "MKL_", "KMP_", "PYTORCH_")
COMMAND_PREFIXES = ("MALLOC_",)  # set by ``make bench``; written into the command line


# ---------------------------------------------------------------------------------- timing
def cpu_and_wall(fn: Callable[[], Any]) -> dict[str, float]:
    """Run ``fn()``; its wall time and this process's CPU time (all threads), in seconds.

    CPU time barely moves when other processes compete for the cores (with one torch thread it
    is the work done); a variant can return this mapping to be recorded as two phases.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def _run_variant(fn: Callable[[int], Any], round_: int) -> float | dict[str, float]:
    gc.collect()
    start = time.perf_counter()
    result = fn(round_)
    elapsed = time.perf_counter() - start
    if result is None:
        return elapsed
    if isinstance(result, Mapping):
        return {k: float(v) for k, v in result.items()}
    return float(result)


def _show(t: float | dict[str, float]) -> str:
    if isinstance(t, dict):
        return "+".join(f"{v:.2f}" for v in t.values()) + "s"
    return f"{t:.3f}s"


def say(line: str) -> None:
    """Print a progress line at once (stdout may be a pipe)."""
    print(line, flush=True)


def interleaved(
    variants: Mapping[str, Callable[[int], Any]], rounds: int, *, warmup: int = 1,
    log: Callable[[str], None] | None = say, label: str = "round",
) -> dict[str, Any]:
    """Untimed warm-up rounds, then ``rounds`` rounds A B C A B C ...; the raw times per variant.

    Args:
        variants: Name -> ``fn(round_index)``, called in this order in every round. It returns
            ``None`` (the harness times the call) or the time(s) it measured itself: a number, or a
            mapping phase -> seconds.
        rounds: Timed rounds.
        warmup: Rounds run first and discarded.
        log: Called with one line per round (``None``: silent).
        label: How the log lines name a round.

    Returns:
        Name -> list of the timed rounds' seconds, or name -> {phase: list} for mapping results.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError("need rounds >= 1 and warmup >= 0")
    times: dict[str, Any] = {}
    for round_ in range(warmup + rounds):
        row = {name: _run_variant(fn, round_) for name, fn in variants.items()}
        if round_ >= warmup:
            for name, t in row.items():
                if isinstance(t, dict):
                    slot = times.setdefault(name, {k: [] for k in t})
                    for k, v in t.items():
                        slot[k].append(v)
                else:
                    times.setdefault(name, []).append(t)
        if log is not None:
            log(f"  {label} {round_}{' (warm-up)' if round_ < warmup else ''}: "
                + "  ".join(f"{name} {_show(t)}" for name, t in row.items()))
    return times


def _per_leaf(times: Any, f: Callable[[list[float]], Any]) -> Any:
    return {k: _per_leaf(v, f) for k, v in times.items()} if isinstance(times, Mapping) else f(times)


def medians(times: Mapping[str, Any]) -> dict[str, Any]:
    """Median of every variant (of every phase, for variants with phases)."""
    return _per_leaf(times, statistics.median)


def spreads(times: Mapping[str, Any]) -> dict[str, Any]:
    """``[min, max]`` of every variant (of every phase)."""
    return _per_leaf(times, lambda v: [min(v), max(v)])


def ratios(values: Mapping[str, float], baseline: str) -> dict[str, float]:
    """``value / values[baseline]`` for every entry."""
    return {k: v / values[baseline] for k, v in values.items()}


def paired_ratios(times: Mapping[str, Any], variant: str, baseline: str, phase: str | None = None) -> list[float]:
    """Per timed round, ``variant``'s time / ``baseline``'s (neighbours in time share the machine's load)."""
    pick = (lambda v: v) if phase is None else (lambda v: v[phase])  # noqa: E731
    return [t / b for t, b in zip(pick(times[variant]), pick(times[baseline]), strict=True)]


def summarise(times: Mapping[str, list[float]], baseline: str) -> dict[str, dict]:
    """``{"median_s", "spread_s", "ratio_to_<baseline>"}`` of single-phase raw times."""
    med = medians(times)
    return {"median_s": med, "spread_s": spreads(times), f"ratio_to_{baseline}": ratios(med, baseline)}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------------- machine and run
def _git(*args: str, cwd: Path) -> str:
    # --no-optional-locks: never take the index lock (others may be using this checkout).
    return subprocess.run(["git", "--no-optional-locks", "-C", str(cwd), *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def git_state(path: Path = REPO) -> dict[str, Any]:
    """Commit and dirty state of the checkout holding ``path`` (empty if it is not one)."""
    try:
        changed = _git("status", "--porcelain", cwd=path).splitlines()
        return {"commit": _git("rev-parse", "HEAD", cwd=path), "dirty": bool(changed), "changed_paths": len(changed)}
    except (OSError, subprocess.SubprocessError):
        return {}


def dropbp_source() -> dict[str, Any]:
    """Which dropbp was measured: its path and version, and the git commit and dirty state of its folder."""
    src = Path(dropbp.__file__).resolve().parent
    info: dict[str, Any] = {"path": str(src), "version": dropbp.__version__}
    try:
        info["commit"] = _git("rev-parse", "HEAD", cwd=src)
        info["dirty_src"] = bool(_git("status", "--porcelain", "--", ".", cwd=src))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def timing_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables that change timings (allocator, threading)."""
    return {k: v for k, v in (os.environ if environ is None else environ).items() if k.startswith(ENV_PREFIXES)}


def command_line(argv: list[str] | None = None) -> str:
    """``MALLOC_...=... python benchmarks/x.py ...``: how to run this again, environment included."""
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(COMMAND_PREFIXES))
    return (env + " python " + shlex.join(sys.argv if argv is None else argv)).strip()


def args_record(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed arguments as JSON values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip}


class Run:
    """One benchmark run: clock, load average, command line, machine record, result files.

    Args:
        threads: ``torch.set_num_threads`` for the whole run (``None``: leave it).
    """

    def __init__(self, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.started = time.perf_counter()
        self.load_start = os.getloadavg()
        self.load_end: tuple[float, float, float] | None = None
        self.runtime_s: float | None = None
        self.command = command_line()
        self.env = timing_env()

    def finish(self) -> float:
        """Stop the clock (and read the load average); returns the run time in seconds."""
        self.runtime_s = time.perf_counter() - self.started
        self.load_end = os.getloadavg()
        return self.runtime_s

    def machine(self, *, threads: bool = True, env: bool = True) -> dict[str, Any]:
        """Machine and environment of the run (call :meth:`finish` first)."""
        if self.load_end is None:
            self.finish()
        info: dict[str, Any] = {"torch": torch.__version__}
        if threads:
            info["threads"] = torch.get_num_threads()
        info.update({
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor(), "load_average_start": self.load_start,
            "load_average_end": self.load_end, "dropbp": dropbp_source(), "git": git_state(),
        })
        if env:
            info["env"] = self.env
        return info

    def footer(self, env: Mapping[str, str] | None = None, *, env_label: str = "allocator environment",
               read: str = "the ratios, not the absolute seconds") -> str:
        """The report's last line: load average at start and end, the environment, how to read it."""
        if self.load_end is None:
            self.finish()
        env = self.env if env is None else env
        return (f"Load average (1 min) at start / end: {self.load_start[0]:.2f} / {self.load_end[0]:.2f}; "
                f"{env_label}: {dict(env) or 'default'}. Times are from a shared machine: read {read}.")

    @staticmethod
    def write(out: Path, stem: str, record: dict, report: str) -> tuple[Path, Path]:
        """``<out>/<stem>.json`` (everything measured) and ``<stem>.md`` (the report), each atomically."""
        paths = Path(out) / f"{stem}.json", Path(out) / f"{stem}.md"
        write_result(paths[0], json.dumps(record, indent=2) + "\n")
        write_result(paths[1], report)
        return paths


def write_result(path: Path, text: str) -> None:
    """Write ``text`` atomically (``dropbp.app.files.write_text``)."""
    write_text(path, text)


# ---------------------------------------------------------------------------------- shared model
def smollm2_llama(layers: int, seq: int, *, use_cache: bool = False):
    """Random-weight SmolLM2-135M-shaped Llama in training mode, all parameters trainable, fp32, sdpa.

    Hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied embeddings; ``layers`` of the real 30.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, num_hidden_layers=layers, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=max(2048, seq), attention_dropout=0.0,
        use_cache=use_cache, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float().train()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def layer_of(branch_name: str) -> int:
    """Decoder-layer index of a branch name such as ``model.layers.3.mlp``."""
    return int(branch_name.split(".layers.")[1].split(".")[0])
