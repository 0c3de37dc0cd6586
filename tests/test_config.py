import pytest

from dropbp import DropBPConfig


def test_defaults_round_trip():
    config = DropBPConfig()
    assert DropBPConfig(**config.to_dict()) == config


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
