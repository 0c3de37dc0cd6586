"""A run folder's model as one folder that ``from_pretrained`` and ``pipeline`` load: the LoRA merged in."""

from __future__ import annotations

import json
from pathlib import Path

from dropbp.app.files import AtomicDir

__all__ = ["export_merged"]


def export_merged(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Merge a finished run's LoRA adapter into its base model and save both with the tokenizer.

    The base is loaded in full precision (a QLoRA run's adapter is merged into the unquantized
    weights, which is what a serving stack loads), through the run's ``config.json``. The folder is
    written under a temporary name and renamed when complete.

    Args:
        run_dir: A folder written by ``dropbp finetune`` (``config.json`` and ``adapter/``).
        output: Where to write; default ``<run_dir>/merged``.

    Returns:
        The merged model's folder (``AutoModelForCausalLM.from_pretrained`` and
        ``pipeline("text-generation")`` load it).

    Raises:
        ValueError: If ``run_dir`` is not a finished run folder, or holds a full fine-tune (its
            ``model/`` folder is already a loadable model).
    """
    from peft import PeftModel

    from dropbp.app.models import load_model

    run = Path(run_dir)
    config_file = run / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{run} is not a finished dropbp finetune run folder (no config.json); pass the run folder")
    config = json.loads(config_file.read_text())
    if config.get("method") == "full":
        raise ValueError(f"{run} holds a full fine-tune: {run / 'model'} is already a loadable model; load it directly")
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{run} has no adapter/adapter_config.json; pass the folder of a finished LoRA or QLoRA run")
    base, tokenizer = load_model(config.get("model"), "lora", revision=config.get("revision"))  # full precision, QLoRA too
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    target = Path(output) if output is not None else run / "merged"
    with AtomicDir(target) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
