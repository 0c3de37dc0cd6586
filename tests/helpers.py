"""Helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import socket

import torch

__all__ = [
    "assert_same_grads", "detach_reference_grads", "hub_cache", "parameter_grads", "put_dataset_in_hub_cache",
    "run_cli", "torchrun",
]


# ------------------------------------------------------------------ gradients


def parameter_grads(model, *, trainable_only: bool = False, present_only: bool = False) -> dict:
    """Each parameter's ``.grad``, cloned: None where it has none (or left out with ``present_only``)."""
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad or not trainable_only}
    return {n: g for n, g in grads.items() if g is not None} if present_only else grads


def detach_reference_grads(model, mask, loss_of) -> dict:
    """The paper code's reference: a copy without DropBP whose dropped branches' outputs are detached.

    Args:
        model: A model DropBP is applied to (it is not changed).
        mask: One bool per branch of its handle: True detaches that branch's output.
        loss_of: Runs the copy and returns the loss.

    Returns:
        The trainable parameters' gradients (:func:`parameter_grads`). Where every branch that
        carries gradient is detached the loss has no graph: the plain model could not run that
        backward, and no parameter gets a gradient.
    """
    import copy

    import dropbp
    from dropbp.reference import detach_branches

    reference = copy.deepcopy(model)
    handle = dropbp.find_handle(reference)
    modules = [b.module for b in handle.branches]
    handle.remove()
    reference.train()
    reference.zero_grad(set_to_none=True)
    with detach_branches(modules, mask):
        loss = loss_of(reference)
    if loss.requires_grad:
        loss.backward()
    return parameter_grads(reference, trainable_only=True)


def assert_same_grads(got: dict, expected: dict, rtol: float | None = None, atol: float | None = None) -> None:
    """The same parameters, each with a gradient in both or in neither, and the gradients close."""
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        assert (want is None) == (got[name] is None), name
        if want is not None:
            torch.testing.assert_close(got[name], want, rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------ processes


def torchrun(worker: Path, *args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the script ``worker`` in ``processes`` gloo processes under torchrun, on a free local port, and wait."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(worker), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ the Hugging Face cache


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
