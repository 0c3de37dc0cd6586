"""make coverage's run, inside make test: no causal LM type in transformers passes apply() and then fails the check.

The full set takes about half a minute on 2 CPU cores (tiny random models), so it runs here whole.
"""

import json
import sys
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import architecture_coverage as coverage  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    from dropbp.tiny import causal_lm_types

    return coverage.run(causal_lm_types())


def test_no_type_passes_apply_and_fails_the_check(rows):
    failing = {r["model_type"]: r["reason"] for r in rows if r["status"] == coverage.FAILS}
    assert not failing
    assert sum(r["status"] == coverage.VERIFIED for r in rows) >= 150
    assert {r["model_type"] for r in rows if r["status"] == coverage.VERIFIED} >= {
        "llama", "bloom", "mpt", "opt", "gpt2", "gpt_neox", "falcon", "qwen2_moe", "phi", "gptj"}


def test_the_committed_table_is_this_run(rows):
    committed = json.loads((ROOT / "docs" / "architectures.json").read_text())
    table = (ROOT / "docs" / "architectures.md").read_text()
    if f"transformers {transformers.__version__}," not in table:
        pytest.skip(f"docs/architectures.md was made with another transformers than {transformers.__version__}")
    assert {r["model_type"]: r["status"] for r in committed} == {r["model_type"]: r["status"] for r in rows}, (
        "docs/architectures.md is out of date: run make coverage")
