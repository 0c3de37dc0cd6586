"""Training data: the bundled data set, reading a user's data in its format, tokenization and evaluation.

The package ships ``train.jsonl`` (2,400 examples) and ``heldout.jsonl`` (240 examples),
written deterministically by :mod:`dropbp.app.data.generate`. A user's data goes through the
same functions. Three modules, lowest first:

* :mod:`~dropbp.app.data.loading`: sources (JSONL, JSON, CSV and Parquet files, folders saved
  with ``save_to_disk``, Hub dataset ids) and formats (prompt/response, chat messages, Alpaca,
  ShareGPT, text), checked row by row into one internal representation;
* :mod:`~dropbp.app.data.prompts`: the token ids and labels (chat template, loss on the
  response only, or text packed into blocks with loss on every token);
* :mod:`~dropbp.app.data.evaluation`: greedy exact-match accuracy and the held-out loss.

Importing this package needs only the standard library; torch, transformers and datasets are
imported inside the functions that use them.
"""

from __future__ import annotations

from dropbp.app.data.evaluation import (
    DEFAULT_MAX_NEW_TOKENS,
    exact_match_accuracy,
    generate_answers,
    heldout_loss,
    is_exact_match,
    normalize_answer,
)
from dropbp.app.data.loading import (
    DATA_FORMATS,
    SPLITS,
    DataError,
    bundled_data_path,
    is_text_data,
    load_examples,
    parse_columns,
)
from dropbp.app.data.prompts import (
    IGNORE_INDEX,
    collate,
    pack_texts,
    prompt_token_ids,
    tokenize_example,
    tokenize_examples,
)

__all__ = [
    "DATA_FORMATS",
    "DEFAULT_MAX_NEW_TOKENS",
    "IGNORE_INDEX",
    "SPLITS",
    "DataError",
    "bundled_data_path",
    "collate",
    "exact_match_accuracy",
    "generate_answers",
    "heldout_loss",
    "is_exact_match",
    "is_text_data",
    "load_examples",
    "normalize_answer",
    "pack_texts",
    "parse_columns",
    "prompt_token_ids",
    "tokenize_example",
    "tokenize_examples",
]
