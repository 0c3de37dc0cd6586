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
