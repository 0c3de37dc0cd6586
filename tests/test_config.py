import pytest

from dropbp import DropBPConfig


def test_every_field_has_help_and_survives_json():
    import dataclasses
    import json

    config = DropBPConfig(drop_rate=0.3, seed=9, max_rate=0.8, sensitivity_at=None, sensitivity_batches=2,
                          branches="*.mlp", auto_step=False, replay=False, allocation="greedy",
                          sensitivity_metric="grad_norm_diff")
    assert config.branches == ["*.mlp"]
    assert DropBPConfig(**json.loads(json.dumps(config.to_dict()))) == config
    assert all(f.metadata.get("help") for f in dataclasses.fields(DropBPConfig))


def test_the_callback_applies_every_setting_of_the_config(tmp_path):
    """Fields the callback must pass on to apply() reach the handle (auto_step was once ignored)."""
    from conftest import tiny_llama
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dropbp import DropBPCallback

    callback = DropBPCallback(drop_rate=0.3, seed=9, auto_step=False, replay=False, sensitivity_at=None,
                              branches=["*.layers.*.mlp"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=tiny_llama())
    handle = callback.handle
    assert (handle.seed, handle.auto_step, handle.replay) == (9, False, False)
    assert handle.drop_rates == [0.3] * 3 and all(b.name.endswith(".mlp") for b in handle.branches)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"drop_rate": float("nan")}, "drop_rate"),
        ({"drop_rate": 0.95}, "exceeds max_rate"),
        ({"max_rate": 1.0}, "max_rate"),
        ({"sensitivity_at": 1.5}, "sensitivity_at"),
        ({"sensitivity_batches": 0}, "sensitivity_batches"),
        ({"allocation": "best"}, "allocation"),
        ({"sensitivity_metric": "x"}, "sensitivity_metric"),
    ],
)
def test_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DropBPConfig(**kwargs)


EXAMPLES = r"^sensitivity_examples must be an integer >= 1 or None \(the whole batch\), got "


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": 1.5}, r"^seed must be an integer, got 1\.5$"),
        ({"seed": 2.0}, r"^seed must be an integer, got 2\.0$"),
        ({"seed": True}, r"^seed must be an integer \(not a bool\), got True$"),
        ({"seed": "1"}, r"^seed must be an integer, got '1'$"),
        ({"seed": None}, r"^seed must be an integer, got None$"),
        ({"sensitivity_batches": 2.5}, r"^sensitivity_batches must be an integer >= 1, got 2\.5$"),
        ({"sensitivity_batches": 2.0}, r"^sensitivity_batches must be an integer >= 1, got 2\.0$"),
        ({"sensitivity_batches": True}, r"^sensitivity_batches must be an integer >= 1 \(not a bool\), got True$"),
        ({"sensitivity_batches": 0}, r"^sensitivity_batches must be an integer >= 1, got 0$"),
        ({"sensitivity_examples": 2.5}, EXAMPLES + r"2\.5$"),
        ({"sensitivity_examples": 2.0}, EXAMPLES + r"2\.0$"),
        ({"sensitivity_examples": True}, EXAMPLES + r"True$"),
        ({"sensitivity_examples": 0}, EXAMPLES + r"0$"),
    ],
)
def test_integer_fields_refuse_non_integers_at_construction(kwargs, message):
    """A fractional count once failed mid-training, and a fractional seed was silently truncated."""
    with pytest.raises(ValueError, match=message) as info:
        DropBPConfig(**kwargs)
    assert "\n" not in str(info.value) and info.value.__cause__ is None


def test_integer_fields_take_numpy_integers_as_plain_ints():
    import json

    import numpy as np

    config = DropBPConfig(seed=np.int64(-3), sensitivity_batches=np.int32(2), sensitivity_examples=np.int64(4))
    assert (config.seed, config.sensitivity_batches, config.sensitivity_examples) == (-3, 2, 4)
    assert all(type(v) is int for v in (config.seed, config.sensitivity_batches, config.sensitivity_examples))
    json.dumps(config.to_dict())
    assert DropBPConfig(sensitivity_examples=None).sensitivity_examples is None


@pytest.mark.parametrize(
    "at, max_steps, step",
    [(0.07, 100, 7), (0.29, 100, 29), (0.1, 60, 6), (0.1, 61, 7), (0.5, 1, 1), (0.0, 100, 1), (0.01, 1, 1),
     (0.99, 2000, 1980), (0.3, 10, 3), (0.07, 100.0, 7)],
)
def test_sensitivity_step_examples(at, max_steps, step):
    assert DropBPConfig(sensitivity_at=at).sensitivity_step(max_steps) == step


def test_sensitivity_step_is_the_exact_ceiling_of_the_written_fraction():
    """ceil(0.07 * 100) is 8 in floats (290 such pairs here); the step is ceil(k * n / 100) for k/100."""
    wrong = [
        (k, n)
        for k in range(1, 100)
        for config in [DropBPConfig(sensitivity_at=k / 100)]
        for n in range(1, 2001)
        if config.sensitivity_step(n) != max(1, -(-k * n // 100))
    ]
    assert wrong == []
    assert DropBPConfig().sensitivity_step(100) is None
