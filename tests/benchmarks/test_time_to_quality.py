"""benchmarks/bench_time_to_quality.py: its pure measures, and ``--quick`` end to end on a tiny model."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_time_to_quality as quality  # noqa: E402


def test_value_at_interpolates_between_evaluations():
    curve = [(10.0, 1.0), (20.0, 0.6), (30.0, 0.5)]
    assert quality.value_at(curve, 15.0) == pytest.approx(0.8)
    assert quality.value_at(curve, 5.0) == 1.0 and quality.value_at(curve, 40.0) == 0.5


def history(losses, step_time):
    return [{"step": 5 * (i + 1), "wall_time_s": 5 * (i + 1) * step_time, "heldout_loss": loss}
            for i, loss in enumerate(losses)]


def test_measure_reports_time_to_targets_clock_and_step_worth():
    base = {"history": history([1.0, 0.8, 0.6, 0.5], 1.0),
            "summary": {"train_time_s": 20.0, "after": {"accuracy": 0.3}, "median_step_time_s": 1.0}}
    # Half the step time, and a step worth half a baseline step: the same loss at the same clock.
    arm = {"history": history([1.1, 1.0, 0.9, 0.8], 0.5),
           "summary": {"train_time_s": 10.0, "after": {"accuracy": 0.2}, "median_step_time_s": 0.5}}
    m = quality.measure(arm, base)
    assert m["targets"] == {"0.5": 0.8, "0.75": 0.6, "1.0": 0.5}  # at steps 10, 15 and 20 of 20
    assert m["time_to_target_ratio"]["0.5"] == pytest.approx(1.0)  # 10 s against the baseline's 10 s
    assert m["time_to_target_ratio"]["1.0"] is None
    assert m["step_worth"] == pytest.approx(10 / 20)
    assert m["heldout_at_clock"]["0.5"] == pytest.approx(0.8)
    assert m["heldout_at_clock"]["1.0"] == pytest.approx(0.8)  # it ended at 10 s: read at its end
    assert quality.measure(base, base)["time_to_target_ratio"] == {"0.5": 1.0, "0.75": 1.0, "1.0": 1.0}


def test_mean_rate_of_a_schedule():
    assert quality.mean_rate(0.5, "constant", 10) == 0.5
    assert quality.mean_rate(0.5, "linear:0.5:0", 11) == pytest.approx(0.25)


def test_quick_run_writes_the_table_and_the_plot(tmp_path):
    arms = "baseline,p0.5,cooldown,structured0.5,checkpointing,micro-batches4"
    record = quality.main(["--quick", "--seeds", "0", "--arms", arms, "--fit-budget", "--out", str(tmp_path)])
    assert record["written"] == ["time_to_quality.json", "time_to_quality.md", "time_to_quality.png"]
    assert set(record["measures"]) == {"baseline", "p0.5", "cooldown", "structured0.5", "checkpointing",
                                       "micro-batches4", "p0.5@budget", "cooldown@budget", "structured0.5@budget"}
    assert set(record["speed"]["speedup"]) == {"0.5", "0.5 structured", "checkpointing", "micro-batches4"}
    # The memory arms hold fewer activations than the baseline and train the same examples per step.
    activations = {name: per_seed[0]["activation_bytes"] for name, per_seed in record["measures"].items()}
    assert activations["checkpointing"] < activations["baseline"]
    assert activations["micro-batches4"] < activations["baseline"]
    assert record["speed"]["arm_s"].keys() == {"checkpointing", "micro-batches4"}
    assert record["measures"]["structured0.5"][0]["steps"] == 4
    line = record["speed"]["line"]  # the budget run's length follows the measured line (timing: not asserted > 4)
    expected = max(4, round(4 * line["t0_s"] / (line["t0_s"] + line["slope_s"] * 0.5)))
    assert record["measures"]["p0.5@budget"][0]["steps"] == expected
    text = (tmp_path / "time_to_quality.md").read_text()
    assert "| cooldown |" in text and "speedup" in text


def test_the_modelled_clock_times_every_step_by_the_interleaved_line():
    steps = [{"step": 1, "drop_rate": 0.0, "wall_time_s": 9.0}, {"step": 2, "drop_rate": 0.5, "wall_time_s": 30.0}]
    clock = [r["wall_time_s"] for r in quality.modelled(steps, {"t0_s": 2.0, "slope_s": -1.0})]
    assert clock == [2.0, 3.5]


def test_the_report_is_rewritten_from_the_json_and_the_runs(tmp_path):
    out, runs = tmp_path / "results", tmp_path / "runs"
    first = quality.main(["--quick", "--seeds", "0", "--arms", "baseline,p0.5", "--out", str(out),
                          "--runs-dir", str(runs)])
    again = quality.main(["--report-only", "--out", str(out), "--runs-dir", str(runs)])
    assert again["measures"]["p0.5"][0]["final_heldout"] == first["measures"]["p0.5"][0]["final_heldout"]
    assert "On the modelled clock" in (out / "time_to_quality.md").read_text()
