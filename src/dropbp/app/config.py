"""Settings and results of a fine-tuning run: one dataclass feeds ``dropbp finetune``, ``compare`` and ``sensitivity``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dropbp.config import DropBPConfig

__all__ = ["FinetuneConfig", "RunResult"]


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run. Every field has CLI help in its metadata.

    Raises:
        ValueError: From ``__post_init__`` on an out-of-range value.
    """

    model: str | None = field(default=None, metadata={
        "help": "A local model folder or .gguf file, or a Hugging Face Hub id (owner/name, from the Hugging Face "
                "cache or downloaded into it); default: the bundled SmolLM2-135M-Instruct."})
    revision: str | None = field(default=None, metadata={"help": "The Hub id's branch, tag or commit; default: main."})
    data: str | None = field(default=None, metadata={
        "help": "Training data: a .jsonl, .json, .csv or .parquet file, a folder saved with datasets' save_to_disk, "
                "or a Hub dataset id (owner/name); default: the bundled data."})
    eval_data: str | None = field(default=None, metadata={
        "help": "Held-out data, as --data; default: the bundled held-out set, or 10%% of --data."})
    data_split: str = field(default="train", metadata={
        "help": "The split of --data to train on (a Hub dataset, a saved DatasetDict or a folder of data files)."})
    eval_split: str = field(default="test", metadata={"help": "The split of --eval-data, as --data-split."})
    data_config: str | None = field(default=None, metadata={
        "help": "The configuration (subset) of a Hub dataset with several; applies to --data and --eval-data."})
    data_format: Literal["auto", "prompt", "chat", "alpaca", "sharegpt", "text"] = field(default="auto", metadata={
        "help": "auto: told from the columns. prompt: {prompt, response|completion}; chat: {messages}; "
                "alpaca: {instruction, input, output}; sharegpt: {conversations: [{from, value}]}; "
                "text: {text}, loss on every token, packed into --seq-len blocks."})
    data_columns: str | None = field(default=None, metadata={
        "help": "Columns under other names, as FIELD=COLUMN pairs, e.g. prompt=question,response=answer; "
                "applies to --data and --eval-data."})
    method: Literal["lora", "qlora", "full"] = field(default="lora", metadata={"help": "What to train."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps."})
    seq_len: int = field(default=96, metadata={"help": "Maximum tokens per example (prompt + response)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, LoRA init and DropBP masks."})
    eval_size: int = field(default=120, metadata={"help": "Held-out examples evaluated before and after (0: all)."})
    output_dir: str | None = field(default=None, metadata={"help": "Run folder; default: runs/<command>-<time>."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output folder."})
    use_dropbp: bool = field(default=True, metadata={"help": "False runs the plain baseline."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; default: torch's choice."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches of --batch-size per optimizer step."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward (Hugging Face, non-reentrant)."}
    )
    lr_schedule: Literal["cosine", "constant"] = field(
        default="cosine", metadata={"help": "Learning-rate schedule after the linear warm-up."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of --max-steps spent in linear warm-up."})
    eval_every: int = field(
        default=10,
        metadata={"help": "Held-out loss on a fixed subset every N optimizer steps, off the training clock (0: off)."},
    )
    eval_subset: int = field(default=48, metadata={"help": "Held-out examples in the periodic held-out loss."})
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "auto: CUDA when torch sees a GPU, else CPU."}
    )
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "auto: bfloat16 autocast on CUDA, float32 on CPU."}
    )
    save_every: int = field(
        default=0, metadata={"help": "Write a resumable checkpoint every N optimizer steps (0: only on Ctrl-C)."}
    )
    merge: bool = field(
        default=False,
        metadata={"help": "After a LoRA or QLoRA run, also write <run>/merged: the adapter merged into the base model, "
                          "with the tokenizer (what dropbp export does)."},
    )
    dropbp: DropBPConfig = field(default_factory=DropBPConfig)

    def __post_init__(self) -> None:
        if isinstance(self.dropbp, dict):
            self.dropbp = DropBPConfig(**self.dropbp)
        for name in ("max_steps", "seq_len", "batch_size", "grad_accum", "eval_subset"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_size", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        for name, allowed in (("lr_schedule", ("cosine", "constant")), ("device", ("auto", "cpu", "cuda")),
                              ("dtype", ("auto", "float32", "bfloat16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.method not in ("lora", "qlora", "full"):
            raise ValueError(f"method must be lora, qlora or full, got {self.method!r}")
        from dropbp.app.data.loading import DATA_FORMATS, parse_columns

        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data-format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        parse_columns(self.data_columns)  # a bad mapping fails here, before the model loads
        if self.merge and self.method == "full":
            raise ValueError("--merge merges a LoRA adapter; a full fine-tune's model/ folder is already a loadable "
                             "model, so drop --merge")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (written to the run folder as config.json)."""
        return asdict(self)


@dataclass
class RunResult:
    """What a run measured; also written to summary.json."""

    output_dir: str
    history: list[dict[str, Any]]
    summary: dict[str, Any]
