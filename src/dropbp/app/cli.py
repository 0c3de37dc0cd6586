"""The ``dropbp`` command: ``finetune`` (the main job), ``compare``, ``sensitivity`` and ``check``.

Options are generated from the fields of :class:`dropbp.app.finetune.FinetuneConfig` and
:class:`dropbp.DropBPConfig`, so the CLI, the Python API and the Trainer callback share
one set of names, defaults and help texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from typing import Any

from dropbp.app.finetune import FinetuneConfig, Interrupted
from dropbp.config import DropBPConfig
from dropbp.errors import DropBPError

# DropBPConfig fields offered on the command line (the rest are Python-only).
_DROPBP_OPTIONS = (
    "drop_rate", "drop_schedule", "max_rate", "sensitivity_at", "sensitivity_batches", "sensitivity_examples",
    "allocation", "mask",
)
# FinetuneConfig fields that are not plain options.
_SPECIAL = {"dropbp", "use_dropbp", "overwrite"}


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, default: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    hint = typing.get_type_hints(FinetuneConfig if f.name in _FINETUNE_FIELDS else DropBPConfig)[f.name]
    help_text = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
    kwargs: dict[str, Any] = {"default": default, "help": help_text, "dest": f.name}
    if typing.get_origin(hint) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(hint))
    elif f.name == "sensitivity_at":
        kwargs["type"] = _optional_float
        kwargs["metavar"] = "FRACTION|none"
    elif f.name == "sensitivity_examples":
        kwargs["type"] = _optional_int
        kwargs["metavar"] = "N|all"
    elif hint is bool:
        kwargs["action"] = "store_true"
    elif hint in (int, float):
        kwargs["type"] = hint
    elif int in typing.get_args(hint):
        kwargs["type"] = int
    parser.add_argument(flag, **kwargs)


_FINETUNE_FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)}
# Every key some command's --config takes (to tell "not for this command" from "unknown").
_RUN_SETTINGS = _FINETUNE_FIELDS | {f.name for f in dataclasses.fields(DropBPConfig)} | {"no_dropbp"}


def _add_run_options(parser: argparse.ArgumentParser, fields: Sequence[str] | None = None) -> None:
    run_defaults = FinetuneConfig()
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in _SPECIAL or (fields is not None and f.name not in fields):
            continue
        _add_field(parser, f, getattr(run_defaults, f.name))
    drop_defaults = DropBPConfig()
    for f in dataclasses.fields(DropBPConfig):
        if f.name in _DROPBP_OPTIONS and (fields is None or f.name in fields):
            _add_field(parser, f, getattr(drop_defaults, f.name))
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of settings: the keys are the flag names (max_steps or max-steps), "
                             "flags given here override them; a run folder's config.json repeats that run.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dropbp`` command."""
    parser = argparse.ArgumentParser(
        prog="dropbp", description="DropBP: fine-tune faster by skipping the backward of random residual branches."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    parser.commands = commands.choices  # type: ignore[attr-defined]  # name -> sub-parser, for --config
    finetune = commands.add_parser(
        "finetune", help="Fine-tune (LoRA by default) the bundled or a local model; the main job."
    )
    _add_run_options(finetune)
    finetune.add_argument("--no-dropbp", action="store_true", help="Run the plain baseline without DropBP.")
    finetune.add_argument("--resume", metavar="RUN_DIR",
                          help="Continue the interrupted run in RUN_DIR (its --output-dir) from its last checkpoint, "
                               "with the settings it was started with; other options are ignored.")
    compare = commands.add_parser("compare", help="Run the baseline and DropBP side by side and print a table.")
    _add_run_options(compare)
    sensitivity = commands.add_parser("sensitivity", help="Print and plot each branch's sensitivity and rate.")
    _add_run_options(
        sensitivity,
        fields=("model", "revision", "data", "data_split", "data_config", "data_format", "data_columns", "method", "seq_len", "batch_size", "seed", "output_dir", "drop_rate", "max_rate",
                "allocation", "sensitivity_examples"),
    )
    export = commands.add_parser(
        "export", help="Merge a finished LoRA/QLoRA run's adapter into its base model: one folder to load or serve.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run folder dropbp finetune wrote")
    export.add_argument("--output", metavar="DIR", help="where to write (default: RUN_DIR/merged)")
    check = commands.add_parser(
        "check", help="Verify that DropBP trains a model exactly (on a tiny random copy unless --real-weights).",
        description="Runs dropbp.check on a tiny random-weight model built from the config (seconds on CPU): "
                    "one line per check; exit status 2 if any fails.")
    check.add_argument("model", nargs="?", default=None,
                       help="a local model folder or .gguf file, a Hub id (owner/name), or a transformers model_type such as 'bloom' "
                            "(default: the bundled SmolLM2-135M-Instruct)")
    check.add_argument("--branches", nargs="+", metavar="PATTERN",
                       help="fnmatch patterns of the branch modules (default: found as dropbp.apply finds them)")
    check.add_argument("--real-weights", action="store_true",
                       help="load the model folder's full weights instead of a tiny random copy of its config")
    check.add_argument("--seed", type=int, default=0, help="seed of the random masks and inputs (default: 0)")
    return parser


def _check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dropbp.app.models import load_config, load_weights
    from dropbp.tiny import tiny_causal_lm
    from dropbp.verify import check

    # A model_type ("bloom") has no slash; a local path exists; anything else is a Hub id.
    is_path = args.model is None or Path(args.model).exists() or "/" in args.model
    if args.real_weights:
        if not is_path:
            raise ValueError(f"--real-weights needs a local model folder, got {args.model!r}")
        model = load_weights(args.model)
        what = "real weights"
    else:
        model = tiny_causal_lm(load_config(args.model) if is_path else args.model, seed=args.seed)
        what = "tiny random copy of the config"
    report = check(model, args.branches, seed=args.seed)
    report.model = f"{report.model}, {what}"
    print(report)
    return 0 if report.ok else 2


def _read_config_file(path: str, command: argparse.ArgumentParser) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings of a ``--config`` file: (defaults for ``command``'s options, other DropBPConfig fields).

    Keys are flag names with ``-`` or ``_``; a run folder's ``config.json`` (its ``dropbp`` section
    nested, ``use_dropbp`` for ``--no-dropbp``) reads back as the run it describes.

    Raises:
        ValueError: One line, on a missing or unreadable file, a file that is not a mapping, or an
            unknown key (naming the closest valid one).
    """
    import difflib
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - a parse error of either format, reported in one line
        raise ValueError(f"--config {path} is not valid {'JSON' if file.suffix.lower() == '.json' else 'YAML'}: "
                         f"{' '.join(str(error).split())}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path} must hold a mapping of settings, got a {type(raw).__name__}")
    flat: dict[str, Any] = {}
    nested = raw.get("dropbp")
    if isinstance(nested, dict):  # a run folder's config.json
        flat.update({str(k).replace("-", "_"): v for k, v in nested.items() if k != "seed"})
    flat.update({str(k).replace("-", "_"): v for k, v in raw.items() if k != "dropbp"})
    options = {a.dest for a in command._actions if a.dest not in ("help", "config", "resume")}
    if "use_dropbp" in flat:
        use = flat.pop("use_dropbp")
        if "no_dropbp" in options or not use:
            flat["no_dropbp"] = not use
    extra_fields = {f.name for f in dataclasses.fields(DropBPConfig)} - options - {"seed"}
    for key in flat:
        if key not in options and key not in extra_fields:
            if key in _RUN_SETTINGS:
                raise ValueError(f"--config {path}: {key!r} is not a setting of dropbp {command.prog.split()[-1]}")
            close = difflib.get_close_matches(key, sorted(options | extra_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--config {path}: unknown key {key!r}{hint}")
    return ({k: v for k, v in flat.items() if k in options}, {k: v for k, v in flat.items() if k in extra_fields})


def _configs(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> FinetuneConfig:
    values = vars(args)
    drop = {name: values[name] for name in _DROPBP_OPTIONS if name in values}
    dropbp_config = DropBPConfig(seed=values.get("seed", 0), **drop, **(extra or {}))
    run = {name: values[name] for name in _FINETUNE_FIELDS - _SPECIAL if name in values}
    return FinetuneConfig(**run, overwrite=values["overwrite"], use_dropbp=not values.get("no_dropbp", False),
                          dropbp=dropbp_config)


def _finetune(cfg: FinetuneConfig, resume: str | None = None) -> None:
    from dropbp.app.finetune import resume_config, run_finetune

    result = run_finetune(resume_config(resume), resume=True) if resume else run_finetune(cfg)
    s = result.summary
    accuracy = ("" if s["after"]["accuracy"] is None else
                f"held-out accuracy {s['before']['accuracy']:.3f} -> {s['after']['accuracy']:.3f}, ")
    print(f"{accuracy}held-out loss {s['before']['heldout_loss']:.3f} -> {s['after']['heldout_loss']:.3f}")
    print(f"median step {s['median_step_time_s']:.2f}s, {s['tokens_per_s']:.0f} tokens/s, "
          f"backward FLOPs skipped {s['mean_backward_flops_skipped']:.2f}")
    print(f"run folder: {result.output_dir}")


def _compare(cfg: FinetuneConfig) -> None:
    from dropbp.app.finetune import format_table, run_compare

    result = run_compare(cfg)
    print(format_table(result["rows"]))
    print(f"step-time speed-up: {result['speedup_step_time']:.2f}x")
    ratio = result["time_to_quality_ratio"]
    print("DropBP's training clock to the baseline's final held-out loss: "
          + ("not reached" if ratio is None else f"{ratio:.2f}x the baseline's whole run (evaluation excluded)"))


def _sensitivity(cfg: FinetuneConfig) -> None:
    from dropbp.app.finetune import run_sensitivity

    rows, folder = run_sensitivity(cfg)
    width = max(len(r["branch"]) for r in rows)
    print(f"{'branch':<{width}}  {'sensitivity':>12}  {'flops':>12}  {'rate':>5}")
    for r in rows:
        print(f"{r['branch']:<{width}}  {r['sensitivity']:>12.4g}  {r['flops']:>12.4g}  {r['drop_rate']:>5.3f}")
    print(f"run folder: {folder}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dropbp`` command.

    Returns:
        The exit status: 0 on success, 2 on bad input (one line on stderr, no traceback).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return _check(args)
        if args.command == "export":
            from dropbp.app.export import export_merged

            print(f"merged model: {export_merged(args.run_dir, args.output)}")
            return 0
        extra: dict[str, Any] = {}
        if args.config:
            command = parser.commands[args.command]  # type: ignore[attr-defined]
            defaults, extra = _read_config_file(args.config, command)
            command.set_defaults(**defaults)
            args = parser.parse_args(argv)  # flags on the command line win over the file
        cfg = _configs(args, extra)
        if args.command == "finetune":
            _finetune(cfg, resume=args.resume)
        else:
            {"compare": _compare, "sensitivity": _sensitivity}[args.command](cfg)
    except (ValueError, OSError, DropBPError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"dropbp {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Interrupted as interrupted:
        print(f"dropbp {args.command}: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"dropbp {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
