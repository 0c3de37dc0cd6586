"""``DropBPPlugin``: DropBP in Axolotl fine-tuning runs, configured from the Axolotl YAML.

Enable it in an Axolotl config::

    plugins:
      - dropbp.integrations.axolotl.DropBPPlugin
    dropbp_drop_rate: 0.5        # target fraction of branch FLOPs whose backward is skipped
    dropbp_sensitivity_at: null  # e.g. 0.1: measure sensitivity after 10% of training, then allocate rates
    dropbp_max_rate: 0.9         # upper bound on any one branch's rate
    dropbp_seed: 0               # mask seed

The plugin adds a :class:`dropbp.DropBPCallback` to the Trainer that Axolotl builds, so everything
the callback does in a plain ``Trainer`` holds here too: ``dropbp/drop_rate`` and
``dropbp/backward_flops_skipped`` in every training log, its state in each checkpoint's
``trainer_state.json``, and ``resume_from_checkpoint`` continuing the masks of an uninterrupted run.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, model_validator

from dropbp.config import DropBPConfig

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # axolotl is optional: DropBPArgs and dropbp_config stay usable (and testable) without it
    BasePlugin = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from dropbp.integrations.trainer import DropBPCallback

__all__ = ["DropBPArgs", "DropBPPlugin", "dropbp_config"]

#: Axolotl config key -> DropBPConfig field. The YAML keys carry a prefix because Axolotl
#: merges every plugin's arguments into one flat config.
_KEYS = {
    "dropbp_drop_rate": "drop_rate",
    "dropbp_drop_schedule": "drop_schedule",
    "dropbp_mask": "mask",
    "dropbp_sensitivity_at": "sensitivity_at",
    "dropbp_max_rate": "max_rate",
    "dropbp_seed": "seed",
}
_YAML_KEYS = {field: key for key, field in _KEYS.items()}
_FIELD_NAMES = re.compile(r"\b(" + "|".join(_YAML_KEYS) + r")\b")


def dropbp_config(cfg: Any) -> DropBPConfig:
    """Build the :class:`~dropbp.DropBPConfig` that the ``dropbp_*`` keys of an Axolotl config describe.

    Args:
        cfg: The Axolotl config (a ``DictDefault``, a plain mapping, or any object with the
            ``dropbp_*`` attributes). Missing or ``None`` keys take DropBPConfig's defaults.

    Returns:
        The DropBP configuration.

    Raises:
        ValueError: If a setting is out of range; the one-line message names the YAML key(s).
    """
    get = cfg.get if hasattr(cfg, "get") else lambda key: getattr(cfg, key, None)
    settings = {field: get(key) for key, field in _KEYS.items()}
    # None means "use the default", except for sensitivity_at, where None is a setting of its own
    # (and also its default).
    settings = {field: value for field, value in settings.items() if value is not None}
    try:
        return DropBPConfig(**settings)
    except ValueError as error:
        # DropBPConfig's message names its fields; the user wrote the YAML keys.
        message = _FIELD_NAMES.sub(lambda match: _YAML_KEYS[match.group(0)], str(error))
        raise ValueError(f"invalid DropBP setting in the Axolotl config: {message}") from None


def _help(field: str) -> str:
    return DropBPConfig.__dataclass_fields__[field].metadata["help"]


class DropBPArgs(BaseModel):
    """The ``dropbp_*`` keys of an Axolotl config; Axolotl merges them into its config model.

    Range checks are :class:`~dropbp.DropBPConfig`'s own, run by building one, so the YAML
    accepts exactly what ``DropBPCallback`` and ``dropbp.apply`` accept.

    Raises:
        pydantic.ValidationError: On a value of the wrong type or out of range (from
            Axolotl's config validation, before any model is loaded).
    """

    dropbp_drop_rate: float = Field(default=0.5, json_schema_extra={"description": _help("drop_rate")})
    dropbp_drop_schedule: str = Field(default="constant", json_schema_extra={"description": _help("drop_schedule")})
    dropbp_mask: str = Field(default="random", json_schema_extra={"description": _help("mask")})
    dropbp_sensitivity_at: float | None = Field(
        default=None, json_schema_extra={"description": _help("sensitivity_at")}
    )
    dropbp_max_rate: float = Field(default=0.9, json_schema_extra={"description": _help("max_rate")})
    dropbp_seed: int = Field(default=0, json_schema_extra={"description": _help("seed")})

    # A distinctive name: Axolotl mixes this class into its own config model, where a
    # validator with the same name as one of Axolotl's would replace it.
    @model_validator(mode="after")
    def _check_dropbp_settings(self):
        dropbp_config({key: getattr(self, key) for key in _KEYS})
        return self


class DropBPPlugin(BasePlugin):
    """Axolotl plugin that trains with DropBP: ``plugins: [dropbp.integrations.axolotl.DropBPPlugin]``.

    Its settings are the ``dropbp_*`` keys of :class:`DropBPArgs`. Axolotl validates them
    with the rest of the config; the plugin then hands a :class:`dropbp.DropBPCallback` to the
    Trainer, which applies DropBP to the (PEFT) model at train begin.
    """

    def get_input_args(self) -> str:
        """Return the import path of the pydantic model of this plugin's config keys.

        Returns:
            ``"dropbp.integrations.axolotl.DropBPArgs"``; Axolotl imports it and mixes it
            into its config model.
        """
        return f"{__name__}.{DropBPArgs.__name__}"

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[DropBPCallback]:
        """Return the DropBP callback, passed to the Trainer's constructor.

        Before the Trainer exists rather than after: the callback is then part of the
        Trainer's callbacks from the start, like ``Trainer(callbacks=[DropBPCallback()])``,
        the setting the callback is tested in. It applies DropBP itself at train begin, to the
        model the Trainer trains, so ``model`` is not used here.

        Args:
            cfg: The validated Axolotl config.
            model: The loaded model (unused).

        Returns:
            A one-element list with a :class:`dropbp.DropBPCallback`.

        Raises:
            ValueError: If the ``dropbp_*`` settings are invalid (normally caught earlier, by
                Axolotl's config validation).
        """
        from dropbp.integrations.trainer import DropBPCallback

        return [DropBPCallback(dropbp_config(cfg))]
