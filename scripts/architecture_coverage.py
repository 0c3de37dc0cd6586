"""Run ``dropbp.check`` over every causal LM type in the installed transformers.

For each ``model_type`` in transformers' causal-LM auto mapping: build a tiny random model
from its shrunken default config (:func:`dropbp.tiny.tiny_causal_lm`), see whether it runs a
training step at all, then whether ``dropbp.apply`` accepts it, and if so run the full check.
Each type ends in one of:

- ``verified``: ``apply`` accepts it and every check passes;
- ``refused``: ``apply`` (or, for fallback branches, the first-batch verification that
  ``DropBPCallback`` and ``dropbp finetune`` run) refuses it with a one-line reason;
- ``not built``: the tiny model cannot be built or trained here (the reason says why);
- ``FAILS CHECK``: ``apply`` accepts it but a check fails. The target is none.

Usage::

    python scripts/architecture_coverage.py                      # all types -> docs/architectures.md
    python scripts/architecture_coverage.py --types llama bloom   # a sample, printed only
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import dropbp
from dropbp.app.files import write_text
from dropbp.errors import DropBPError
from dropbp.tiny import causal_lm_types, example_batch, tiny_causal_lm
from dropbp.verify import require_sound_branches

VERIFIED, REFUSED, NOT_BUILT, FAILS = "verified", "refused", "not built", "FAILS CHECK"
TIME_LIMIT_S = 60


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]


def classify(model_type: str) -> dict:
    """The coverage outcome of one model type: status, branch source and count, and why."""
    row: dict = {"model_type": model_type}
    try:
        model = tiny_causal_lm(model_type)
        batch = example_batch(model)
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    except _Timeout:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to build or train here is the outcome
        return {**row, "status": NOT_BUILT, "reason": _one_line(error)}
    try:
        handle = dropbp.apply(model)
    except (ValueError, DropBPError) as error:
        return {**row, "status": REFUSED, "reason": f"apply: {_one_line(error)}"}
    row.update(source=handle.branch_source, branches=len(handle.branches))
    try:
        if handle.branch_source == "fallback":
            require_sound_branches(model, handle, batch)
    except DropBPError as error:
        handle.remove()
        return {**row, "status": REFUSED, "reason": f"first batch: {_one_line(error)}"}
    handle.remove()
    try:
        report = dropbp.check(model, inputs=batch)
    except Exception as error:  # noqa: BLE001 - the check itself crashing counts against DropBP
        return {**row, "status": FAILS, "reason": f"check raised {_one_line(error)}"}
    if report.ok:
        skipped = [r.name for r in report.results if r.passed is None]
        note = f"not applicable: {', '.join(skipped)}" if skipped else ""
        return {**row, "status": VERIFIED, "reason": note}
    failure = report.failures[0]
    return {**row, "status": FAILS, "reason": f"{failure.name}: {failure.detail}"}


def run(types: list[str]) -> list[dict]:
    rows = []
    signal.signal(signal.SIGALRM, _alarm)
    for model_type in types:
        start = time.perf_counter()
        signal.alarm(TIME_LIMIT_S)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row = classify(model_type)
        except _Timeout:
            row = {"model_type": model_type, "status": NOT_BUILT, "reason": f"took over {TIME_LIMIT_S} s on this CPU"}
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        print(f"{model_type:32s} {row['status']:12s} {row.get('source', ''):9s} {row['reason'][:110]}", flush=True)
    return rows


def markdown(rows: list[dict], seconds: float) -> str:
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    counts = {s: sum(r["status"] == s for r in rows) for s in (VERIFIED, REFUSED, NOT_BUILT, FAILS)}
    lines = [
        "# Architecture coverage: `dropbp.check` on every causal LM in transformers",
        "",
        f"Command: `make coverage` (`python scripts/architecture_coverage.py`), commit `{commit.strip()}`, "
        f"transformers {transformers.__version__}, torch {torch.__version__}, {platform.machine()} CPU; "
        f"{len(rows)} model types in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {seconds:.0f} s in all.",
        "",
        f"**{counts[VERIFIED]} verified, {counts[REFUSED]} refused with a reason, {counts[NOT_BUILT]} cannot be built "
        f"here, {counts[FAILS]} accepted by `apply()` but failing the check.**",
        "",
        "Each type is built as a tiny random model from its default config, shrunk by `dropbp.tiny.shrink_config` "
        "(hidden size 64, 2 layers, 4 heads, 4 experts, vocab 256), and must first run a training step without "
        "DropBP. Then `dropbp.apply(model)` with the branches it finds itself (`table`: a `BRANCH_PATTERNS` row; "
        "`fallback`: the generic rule, which `DropBPCallback` and `dropbp finetune` verify on the first batch), "
        "and `dropbp.check` (see the README, \"Verify any model\"). *verified*: every check passed. *refused*: "
        "`apply` or the first-batch verification refused, with the reason shown. *not built*: the tiny model "
        "cannot be built or trained on this machine, with the reason. Encoder models in the mapping (BERT and "
        "friends used as decoders) and encoder-decoder decoders are included as transformers lists them.",
        "",
        "| model_type | status | branches | reason or note |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        branches = f"{r['branches']} ({r['source']})" if "branches" in r else ""
        reason = r["reason"].replace("|", "\\|")
        lines.append(f"| {r['model_type']} | {r['status']} | {branches} | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", help="only these model types (printed, nothing written)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "architectures.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = run(args.types or causal_lm_types())
    seconds = time.perf_counter() - start
    failing = [r["model_type"] for r in rows if r["status"] == FAILS]
    if not args.types:
        write_text(args.output, markdown(rows, seconds))
        write_text(args.output.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.output} and {args.output.with_suffix('.json')}")
    print(f"{len(rows)} types in {seconds:.0f} s; accepted by apply() but failing the check: {failing or 'none'}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
