"""Reading training data: where it comes from (a file, a saved dataset, the Hub) and its format.

Sources, all read by :func:`load_examples`:

* a JSONL file: read here, line by line, so that a bad line is named by its line number;
* a JSON (an array of objects or JSON lines), CSV or Parquet file: read with ``datasets``;
* a folder written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, or a
  folder of data files: read with ``datasets``;
* a Hub dataset id (``owner/name``, with a split and a config): read with ``datasets``, through
  the standard Hugging Face cache, so a dataset fetched once also loads offline.

Formats (the names of Axolotl's and LLaMA-Factory's dataset types where they have one), told
apart by their fields unless one is named:

========== ============================================== ====================================
format     fields                                         trained on
========== ============================================== ====================================
prompt     ``prompt``, ``response`` (or TRL's             the response
           ``completion``)
chat       ``messages``: ``[{role, content}, ...]``        the last (assistant) message
alpaca     ``instruction``, ``input`` (optional),          the output
           ``output``, ``system`` (optional)
sharegpt   ``conversations``: ``[{from, value}, ...]``,    the last (``gpt``) turn
           ``system`` (optional)
text       ``text``                                       every token (continued pre-training)
========== ============================================== ====================================

Every format becomes the one internal representation of :mod:`dropbp.app.data`: a dict with
``"prompt"`` (a string, or the list of chat messages before the answer) and ``"response"``;
or, for the text format, a dict with ``"text"``. The row's other fields are kept.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_FORMATS",
    "DataError",
    "bundled_data_path",
    "is_text_data",
    "load_examples",
    "parse_columns",
]

SPLITS = ("train", "heldout")
ROLES = ("system", "user", "assistant")
#: "auto" tells the format from the fields; the others name it.
DATA_FORMATS = ("auto", "prompt", "chat", "alpaca", "sharegpt", "text")
# The fields each format reads; --data-columns may map a column of the data to any of them.
_FIELDS = {
    "prompt": ("prompt", "response", "completion"),
    "chat": ("messages",),
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations", "system"),
    "text": ("text",),
}
FIELDS = tuple(dict.fromkeys(f for fields in _FIELDS.values() for f in fields))
# ShareGPT speakers and the chat roles they are (FastChat's and LLaMA-Factory's names).
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_KINDS = {
    "prompt": '"prompt"/"response"',
    "chat": 'chat ("messages")',
    "alpaca": 'Alpaca ("instruction"/"output")',
    "sharegpt": 'ShareGPT ("conversations")',
    "text": '"text"',
}
_EXPECTED = {
    "prompt": 'with "prompt" and "response"',
    "chat": 'with "messages"',
    "alpaca": 'with "instruction" and "output"',
    "sharegpt": 'with "conversations"',
    "text": 'with "text"',
    None: 'with "prompt" and "response" or with "messages"',
}
_NO_FORMAT = (
    'missing "prompt" (give "prompt" and "response", or "messages" for the chat format), or the fields of '
    'another format: "instruction"/"output" (Alpaca), "conversations" (ShareGPT) or "text"; '
    "name other columns with --data-columns, e.g. prompt=question,response=answer"
)
_DATA_FILES = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DataError(ValueError):
    """A data source or example is unusable. The message is a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def bundled_data_path(split: str) -> Path:
    """Path of the bundled ``"train"`` or ``"heldout"`` JSONL file."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(map(repr, SPLITS))}")
    return Path(__file__).resolve().parent / f"{split}.jsonl"


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Parse a column mapping ``"prompt=question,response=answer"`` (field=column).

    Args:
        spec: The mapping as ``--data-columns`` takes it, a dict of field -> column, or None.

    Returns:
        Field name -> the data's column name (empty for None).

    Raises:
        DataError: On an entry without ``=``, an empty name, a field no format reads (the
            message names the closest one), or a field or column given twice.
    """
    if spec is None or spec == "":
        return {}
    items = list(spec.items()) if isinstance(spec, Mapping) else [
        tuple(part.split("=", 1)) if "=" in part else (part, None) for part in str(spec).split(",")
    ]
    mapping: dict[str, str] = {}
    for field, column in items:
        field = str(field).strip()
        if column is None:
            raise DataError(f"--data-columns entry {field!r} needs the form FIELD=COLUMN, e.g. prompt=question")
        column = str(column).strip()
        if not field or not column:
            raise DataError(f"--data-columns entry {field}={column} has an empty name; use FIELD=COLUMN")
        if field not in FIELDS:
            close = difflib.get_close_matches(field, FIELDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataError(f"--data-columns: no format reads a field {field!r}; {hint}the fields are "
                            f"{', '.join(FIELDS)}")
        if field in mapping:
            raise DataError(f"--data-columns gives the field {field!r} twice")
        if column in mapping.values():
            raise DataError(f"--data-columns maps the column {column!r} twice")
        mapping[field] = column
    return mapping


def is_text_data(examples: Iterable[Mapping[str, Any]]) -> bool:
    """True for examples of the text format (no prompt/response: every token is trained on)."""
    first = next(iter(examples), None)
    return first is not None and "text" in first and "response" not in first


def load_examples(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    config: str | None = None,
    data_format: str = "auto",
    columns: str | Mapping[str, str] | None = None,
    revision: str | None = None,
) -> list[dict[str, Any]]:
    """Read examples from a file, a saved dataset folder or a Hub dataset id, in any supported format.

    Every row is checked before anything trains: the first bad one raises, naming its line
    (JSONL) or row (1-based, other sources) and the field.

    Args:
        source: A ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file; a folder saved with
            ``save_to_disk`` or holding data files; or a Hub dataset id (``owner/name``).
        split: The split of a Hub dataset, a saved ``DatasetDict`` or a folder of data
            files (default ``"train"``); a single file or a saved ``Dataset`` is one split, read whole.
        config: The Hub dataset's configuration (subset), if it has several.
        data_format: ``"auto"`` (from the fields) or one of :data:`DATA_FORMATS`.
        columns: Field -> column mapping (see :func:`parse_columns`), applied before the
            format is told.
        revision: The Hub dataset's branch, tag or commit.

    Returns:
        One example dict per row, in order; see the module docstring for its keys.

    Raises:
        DataError: With a one-line message naming the source and, for a bad row, the row:
            ``data.jsonl line 3: missing "response"``, ``data.parquet row 7: "output" must be
            a string, got null``, ``data.jsonl: file not found``, a Hub id that is neither
            on disk nor in the cache, and so on.
    """
    if data_format not in DATA_FORMATS:
        raise DataError(f"unknown data format {data_format!r}; use one of {', '.join(DATA_FORMATS)}")
    mapping = parse_columns(columns)
    name = os.fspath(source)
    path = Path(source)
    if path.is_file() and path.suffix.lower() not in _DATA_FILES:
        rows = _read_jsonl(path, name)
        where = "line"
    else:
        if not path.exists() and (path.suffix.lower() in _DATA_FILES or path.suffix.lower() == ".jsonl"
                                  or not _HUB_ID.match(name)):
            raise DataError(f"{name}: file not found")
        rows = _read_with_datasets(path, name, split, config, revision)
        where = "row"
    examples: list[dict[str, Any]] = []
    file_format: str | None = None if data_format == "auto" else data_format
    first = 0
    for number, row in rows:
        at = f"{name} {where} {number}"
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected a JSON object {_EXPECTED[file_format]}, got {_json_type(row)}")
        row = _rename(row, mapping, at)
        row_format = file_format if data_format != "auto" else (_detect(row) or file_format)
        if row_format is None:
            raise DataError(f"{at}: {_NO_FORMAT}")
        if file_format is None:
            file_format, first = row_format, number
        elif row_format != file_format:
            raise DataError(
                f"{at}: a {_KINDS[row_format]} example in a file of {_KINDS[file_format]} examples "
                f"({where} {first} is one); use one format for every {where} of a file"
            )
        examples.append(_CONVERT[row_format](row, at))
    if not examples:
        raise DataError(f"{name}: no examples ({rows.empty_reason})")
    return examples


# ----------------------------------------------------------------------------- sources


class _Rows(list):
    """(number, row) pairs, and why there are none when empty."""

    empty_reason = "it has no rows"


def _read_jsonl(file: Path, name: str) -> _Rows:
    try:
        data = file.read_bytes()
    except OSError as error:
        raise DataError(f"{name}: cannot read ({error.strerror or error})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows = _Rows()
    rows.empty_reason = "the file is empty" if not data else "only blank lines"
    # Split on b"\n" only: JSON strings cannot hold a raw newline, but str.splitlines would
    # also split on characters such as U+2028 that may appear inside a JSON string.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{name} line {number}: not valid UTF-8 (byte {error.start + 1})") from None
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{name} line {number}: invalid JSON ({error.msg} at column {error.colno})") from None
    return rows


def _read_with_datasets(path: Path, name: str, split: str | None, config: str | None,
                        revision: str | None) -> _Rows:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: reading anything but JSONL needs the datasets package; "
                        "pip install 'dropbp[hf]'") from None
    from datasets.utils import logging as datasets_logging

    # The cache and progress notices of datasets are not about the run: silence them while reading.
    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = datasets_logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets_logging.set_verbosity_error()
    try:
        data = _open_dataset(datasets, path, name, split, config, revision)
    finally:
        datasets_logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()
    rows = _Rows(enumerate(data.to_list(), start=1))
    rows.empty_reason = f"split {split or 'train'!r} has no rows" if not path.is_file() else "the file has no rows"
    return rows


def _open_dataset(datasets: Any, path: Path, name: str, split: str | None, config: str | None,
                  revision: str | None) -> Any:
    """The rows of one split as a ``datasets.Dataset``."""
    if path.is_file():
        builder = _DATA_FILES[path.suffix.lower()]
        options = _csv_options(datasets, path, name) if builder == "csv" else {}
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except Exception as error:  # pyarrow and pandas raise many kinds; the message is what helps
            raise DataError(f"{name}: cannot read as {builder.upper()} ({_one_line(error)})") from error
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            try:
                saved = datasets.load_from_disk(str(path))
            except Exception as error:
                raise DataError(f"{name}: cannot read the saved dataset ({_one_line(error)})") from error
            # a saved Dataset, like a single file, is one split: the split names a DatasetDict's only
            return _pick_split(saved, name, split) if isinstance(saved, datasets.DatasetDict) else saved
        if not any(p.suffix.lower() in (*_DATA_FILES, ".jsonl") for p in path.rglob("*") if p.is_file()):
            raise DataError(f"{name}: is a folder without a saved dataset (save_to_disk) or data files "
                            f"(.jsonl, .json, .csv, .parquet)")
    split = split or "train"
    try:
        return datasets.load_dataset(str(path) if path.is_dir() else name, config, split=split, revision=revision)
    except Exception as error:
        reason = _one_line(error)
        if "unknown split" in reason.lower():
            raise DataError(f"{name}: {reason} (pass one with --data-split or --eval-split)") from error
        if path.is_dir():
            raise DataError(f"{name}: cannot read the folder's data files ({reason})") from error
        raise DataError(_hub_problem(name, config, reason)) from error


def _csv_options(datasets: Any, path: Path, name: str) -> dict[str, Any]:
    """CSV has no types: every column is read as text, as written ("42" stays an answer, "NA" is not a null)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            header = next(csv.reader(file), None)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{name}: cannot read as CSV ({error})") from None
    if not header:
        raise DataError(f"{name}: no examples (the file is empty)")
    features = datasets.Features({column: datasets.Value("string") for column in header})
    return {"features": features, "keep_default_na": False}


def _pick_split(splits: Mapping[str, Any], name: str, split: str | None) -> Any:
    split = split or "train"
    if split not in splits:
        raise DataError(f"{name} has no split {split!r}; its splits are {', '.join(map(repr, splits))} "
                        f"(pass one with --data-split or --eval-split)")
    return splits[split]


def _hub_problem(name: str, config: str | None, reason: str) -> str:
    from huggingface_hub import constants

    low = reason.lower()
    if "config" in low and any(word in low for word in ("available", "missing", "multiple", "pick one")):
        if config:
            return f"dataset {name!r} has no configuration {config!r} ({reason}); pass one of its own with --data-config"
        return f"dataset {name!r} has several configurations; pass one with --data-config ({reason})"
    fetch = (f"fetch it once with network access: python -c \"import datasets; datasets.load_dataset('{name}'"
             + (f", '{config}'" if config else "") + ")\"")
    where = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "the Hub could not give it"
    return (f"dataset {name!r} is not a local file or folder and is not in the Hugging Face cache, and {where} "
            f"({reason}); check the name or path, or {fetch}")


def _one_line(error: Exception) -> str:
    """The error's message on one line (datasets puts the useful part, e.g. the configurations, on a second)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------- formats


def _detect(row: Mapping[str, Any]) -> str | None:
    """The format a row's fields say, or None.

    A complete prompt/response pair wins; then the chat fields (UltraChat rows carry a lone
    "prompt" besides their "messages"); then Alpaca (tatsu-lab/alpaca rows carry a "text" too).
    """
    if "prompt" in row and ("response" in row or "completion" in row):
        return "prompt"
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row or "response" in row or "completion" in row:
        return "prompt"
    if "text" in row:
        return "text"
    return None


def _rename(row: dict[str, Any], mapping: Mapping[str, str], at: str) -> dict[str, Any]:
    if not mapping:
        return row
    row = dict(row)
    for field, column in mapping.items():
        if column not in row:
            raise DataError(f"{at}: no column {column!r} (--data-columns maps it to {field!r}); "
                            f"the columns are {', '.join(map(repr, row))}")
        value = row.pop(column)
        row.pop(field, None)  # the mapped column replaces a field of the same name
        row[field] = value
    return row


def _text_field(row: Mapping[str, Any], key: str, at: str, *, optional: bool = False) -> str:
    if key not in row or (optional and row[key] is None):
        if optional:
            return ""
        raise DataError(f'{at}: missing "{key}"')
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f'{at}: "{key}" must be a string, got {_json_type(value)}')
    if not optional and not value.strip():
        raise DataError(f'{at}: "{key}" is empty')
    return value


def _prompt_example(row: dict[str, Any], at: str) -> dict[str, Any]:
    answer = "completion" if "response" not in row and "completion" in row else "response"
    _text_field(row, "prompt", at)
    response = _text_field(row, answer, at)
    return row if answer == "response" else {**row, "response": response}


def _chat_example(row: dict[str, Any], at: str) -> dict[str, Any]:
    if "messages" not in row:
        raise DataError(f'{at}: missing "messages" (a list of {{"role", "content"}} objects)')
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if isinstance(messages, list) else _json_type(messages)
        raise DataError(
            f'{at}: "messages" must be a non-empty array of {{"role": ..., "content": ...}} objects, got {got}'
        )
    for index, message in enumerate(messages, start=1):
        problem = message_problem(index, message)
        if problem:
            raise DataError(f"{at}: {problem}")
    last = messages[-1]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f'{at}: no assistant message; end the conversation with {{"role": "assistant", "content": ...}}, '
            f"the answer to train on"
        )
    if last["role"] != "assistant":
        raise DataError(
            f'{at}: the last message is from "{last["role"]}"; the last message must be the assistant\'s '
            f"answer to train on (remove the messages after it or add the answer)"
        )
    if not last["content"].strip():
        raise DataError(f'{at}: the last (assistant) message is empty; give the answer to train on as its "content"')
    if len(messages) == 1:
        raise DataError(f"{at}: the conversation is only the assistant's answer; add the user message it answers "
                        f"before it")
    # Only the fields a message is made of: Arrow-backed sources fill absent struct fields with None.
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {**row, "messages": messages, "prompt": messages[:-1], "response": last["content"]}


def _alpaca_example(row: dict[str, Any], at: str) -> dict[str, Any]:
    instruction = _text_field(row, "instruction", at)
    extra = _text_field(row, "input", at, optional=True)
    output = _text_field(row, "output", at)
    system = _text_field(row, "system", at, optional=True)
    # As LLaMA-Factory renders Alpaca: the input follows the instruction in the one user turn.
    question = instruction + ("\n\n" + extra if extra.strip() else "")
    prompt: Any = question if not system.strip() else [{"role": "system", "content": system},
                                                       {"role": "user", "content": question}]
    return {**row, "prompt": prompt, "response": output}


def _sharegpt_example(row: dict[str, Any], at: str) -> dict[str, Any]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        got = "it is missing" if "conversations" not in row else (
            "an empty array" if isinstance(turns, list) else _json_type(turns))
        raise DataError(f'{at}: "conversations" must be a non-empty array of {{"from": ..., "value": ...}} '
                        f"objects ({got})")
    messages = []
    system = _text_field(row, "system", at, optional=True)
    if system.strip():
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns, start=1):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("from"), str) or \
                not isinstance(turn.get("value"), str):
            raise DataError(f'{at}: conversations turn {index} must be an object with string "from" and "value"')
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(f'{at}: conversations turn {index} is from "{turn["from"]}"; use "system", '
                            f'"human" or "gpt"')
        messages.append({"role": role, "content": turn["value"]})
    return _chat_example({**row, "messages": messages}, at)


def _text_example(row: dict[str, Any], at: str) -> dict[str, Any]:
    _text_field(row, "text", at)
    return row


_CONVERT = {"prompt": _prompt_example, "chat": _chat_example, "alpaca": _alpaca_example,
            "sharegpt": _sharegpt_example, "text": _text_example}


def message_problem(index: int, message: Any) -> str | None:
    """What is wrong with chat message number ``index`` (1-based), or None."""
    if not isinstance(message, Mapping):
        return f'message {index} must be an object with "role" and "content", got {_json_type(message)}'
    role = message.get("role")
    if not isinstance(role, str):
        got = "it is missing" if "role" not in message else f"got {_json_type(role)}"
        return f'message {index} needs a string "role" ({got}); use "system", "user" or "assistant"'
    if role not in ROLES:
        return f'message {index} has unknown role "{role}"; use "system", "user" or "assistant"'
    content = message.get("content")
    if not isinstance(content, str):
        got = "it is missing" if "content" not in message else f"got {_json_type(content)}"
        return f'message {index} needs a string "content" ({got}); give the message text as a string'
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
