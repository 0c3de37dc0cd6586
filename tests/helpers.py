"""Helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["hub_cache", "put_dataset_in_hub_cache", "run_cli"]


def hub_cache(root, repo="tiny-org/tiny-chat", revisions=(("main", "a" * 40, 2), ("v1", "b" * 40, 3))):
    """A Hugging Face cache under ``root`` in the documented layout (hub/models--org--name/{refs,snapshots}),
    holding a tiny chat model as ``repo`` at each (ref, commit, layers): what ``hf download`` leaves there."""
    from dropbp.testing import save_tiny_chat_model

    folder = root / "hub" / f"models--{repo.replace('/', '--')}"
    for ref, commit, layers in revisions:
        save_tiny_chat_model(folder / "snapshots" / commit, layers=layers)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return root


def run_cli(env_root, *argv, offline=True):
    """Run ``python *argv`` with ``HF_HOME=env_root`` (and offline unless told), as a user's shell would."""
    env = {**os.environ, "HF_HOME": str(env_root), "HF_HUB_ETAG_TIMEOUT": "3", "HF_HUB_DOWNLOAD_TIMEOUT": "3"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=600)


def put_dataset_in_hub_cache(root: Path, repo: str, rows: list[dict], config: str = "default") -> Path:
    """Write ``rows`` where ``datasets.load_dataset(repo)`` finds a dataset fetched earlier, with ``HF_HOME=root``.

    The layout is the one ``datasets`` writes on a first download from the Hub:
    ``<root>/datasets/<owner>___<name>/<config>/0.0.0/<commit>/`` holding ``<name>-train.arrow``
    and ``dataset_info.json``; both files come from ``datasets``' own JSON builder.

    Returns:
        ``root``.
    """
    from datasets.packaged_modules.json.json import Json

    owner, name = repo.split("/")
    work = root / "scratch" / name / config
    work.mkdir(parents=True)
    source = work / f"{name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    builder = Json(cache_dir=str(work / "build"), dataset_name=name, config_name=config,
                   data_files={"train": str(source)})
    builder.download_and_prepare()
    target = root / "datasets" / f"{owner}___{name}" / config / "0.0.0" / ("c" * 40)
    target.mkdir(parents=True)
    for file in (f"{name}-train.arrow", "dataset_info.json"):
        shutil.copy(Path(builder.cache_dir) / file, target / file)
    return root
