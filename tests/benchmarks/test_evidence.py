"""benchmarks/evidence.py: its pure pieces, the forward-LayerDrop baseline, and ``--quick`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import evidence  # noqa: E402

from conftest import tiny_llama  # noqa: E402


@pytest.mark.parametrize("branches,p", [(60, 0.5), (60, 0.875), (60, 0.0), (7, 0.75), (4, 0.875)])
def test_spread_mask_drops_the_same_share_of_attention_and_mlp(branches, p):
    mask = evidence.spread_mask(branches, p)
    assert len(mask) == branches
    for kind in (mask[0::2], mask[1::2]):  # attention, MLP
        assert sum(kind) == round(p * len(kind))
    if (branches, p) == (60, 0.5):  # every layer keeps one of its two branches
        assert all(mask[2 * i] != mask[2 * i + 1] for i in range(30))


@pytest.mark.parametrize("limit", [256, 257, 300, 511, 1000, 4095, 4096, 9999])
def test_longest_fitting_finds_the_limit_by_bisection(limit):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= limit

    longest, measured = evidence.longest_fitting(fits, start=256, cap=4096, resolution=8)
    assert measured == len(calls)
    if limit >= 4096:
        assert longest == 4096
    else:
        assert longest <= limit < longest + 8
        assert all(n <= 4096 for n in calls)


def test_layerdrop_rate_saves_what_dropbp_saves():
    split = {"step": 300, "branch_forward": 100, "branch_backward": 200}
    q = evidence.layerdrop_rate(split, 0.5)
    # DropBP at p skips p of the branches' backward; LayerDrop at q skips q of their forward and backward
    assert q * (split["branch_forward"] + split["branch_backward"]) == pytest.approx(0.5 * split["branch_backward"])


def test_flop_split_counts_the_branches_backward():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    split = evidence.flop_split(model, ids)
    assert torch.equal(torch.get_rng_state(), state)
    assert 0 < split["branch_backward"] < split["step"] and 0 < split["branch_forward"] < split["step"]
    # full fine-tuning: a linear layer's backward is twice its forward (input and weight gradients)
    assert 1.5 < split["branch_backward"] / split["branch_forward"] < 2.5
    assert all(p.grad is None for p in model.parameters())
    assert not hasattr(model.model.layers[0].mlp, "_forward_hooks") or not model.model.layers[0].mlp._forward_hooks


def _logits(model, ids):
    return model(input_ids=ids).logits


def test_forward_layerdrop_at_rate_zero_and_in_eval_is_the_model():
    model = tiny_llama(layers=2).train()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    reference = _logits(model, ids)
    dropper = evidence.ForwardLayerDrop(model, 0.0, seed=0)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=0)
    dropper.remove()
    dropper = evidence.ForwardLayerDrop(model, 0.7, seed=0)
    model.eval()
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=0)
    dropper.remove()
    model.train()
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=0)  # remove() restored the forwards


def test_forward_layerdrop_skips_branches_and_scales_the_kept_ones():
    model = tiny_llama(layers=2).train()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    dropper = evidence.ForwardLayerDrop(model, 0.999999, seed=0)  # every branch skipped
    inner = model.model
    only_residual = model.lm_head(inner.norm(inner.embed_tokens(ids)))
    torch.testing.assert_close(_logits(model, ids), only_residual)
    assert dropper.skipped == dropper.calls == 4
    dropper.remove()

    # A kept branch's output is scaled by 1 / (1 - q): the skip draws follow the seeded generator.
    q = 0.5
    draws = torch.Generator().manual_seed(3)
    skips = [torch.rand((), generator=draws).item() < q for _ in range(4)]
    expected = _manual_layerdrop(model, ids, skips, q)
    evidence.ForwardLayerDrop(model, q, seed=3)
    torch.testing.assert_close(_logits(model, ids), expected)


def _manual_layerdrop(model, ids, skips, q):
    """The model's forward with branch i replaced by zeros where skips[i], else scaled by 1/(1-q)."""
    originals = []
    branches = [m for layer in model.model.layers for m in (layer.self_attn, layer.mlp)]
    for module, skip in zip(branches, skips, strict=True):
        forward = module.forward

        def run(*args, _forward=forward, _skip=skip, **kwargs):
            out = _forward(*args, **kwargs)
            if isinstance(out, tuple):
                return ((torch.zeros_like(out[0]) if _skip else out[0] / (1 - q)), *out[1:])
            return torch.zeros_like(out) if _skip else out / (1 - q)

        module.forward = run
        originals.append(module)
    try:
        return _logits(model, ids)
    finally:
        for module in originals:
            del module.forward


def test_quick_mode_runs_every_section_and_writes_the_report(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "evidence.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                              "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "evidence.md").read_text()
    record = json.loads((out / "evidence.json").read_text())
    assert {"speed", "memory", "convergence"} <= set(record)
    for claim in ("Full fine-tuning: training time 57% lower", "LoRA: training time 48% lower",
                  "QLoRA: training time 44% lower", "1.5x faster", "7.1x longer sequences", "6.2x longer sequences",
                  "forward LayerDrop at equal FLOPs", "sensitivity-based rates beat uniform"):
        assert claim in report
    verdicts = report.split("## Verdict")[1].split("## 1.")[0]
    assert verdicts.count("| **") == 8 and "not tested" not in verdicts
    for name in ("speed", "memory", "convergence", "accuracy"):
        png = out / f"evidence_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(evidence_{name}.png)" in report
    speed = record["speed"]["rows"]
    assert {r["method"] for r in speed.values()} == {"full", "lora", "qlora"}
    assert all(r["ratio_to_p0"] == 1.0 for r in speed.values() if r["p"] == 0.0)
    memory = record["memory"]["rows"]
    assert all(r["held_ratio_to_p0"] == 1.0 and r["seq_factor"] == 1.0 for r in memory.values() if r["p"] == 0.0)
    assert all(r["held_ratio_to_p0"] < 1.0 for r in memory.values() if r["p"] > 0.0)
    arms = {r["arm"] for r in record["convergence"]["rows"].values()}
    assert arms == {"baseline", "uniform", "sensitivity", "layerdrop"}
    layerdrop = json.loads((out / "runs" / "lora_layerdrop_p0.5_s0" / "layerdrop.json").read_text())
    assert 0 < layerdrop["layerdrop_rate"] < 0.5 and layerdrop["skipped_fraction"] > 0
