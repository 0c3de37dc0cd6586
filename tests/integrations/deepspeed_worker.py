"""Worker for test_deepspeed.py, launched by torchrun with 2 gloo processes (not a test module itself).

Modes:
    engine     for each setting in ``--settings`` (JSON list), DropBP under ``deepspeed.initialize``
               for a few optimizer steps; rank 0 saves the gathered weights.
    untouched  bf16 settings, one mask per optimizer step: per step and branch, whether it was dropped and
               whether its parameters moved.
    refusals   the settings DropBP refuses; each rank saves the error messages it got.
    sensitivity
               sensitivity under ZeRO-2 on each rank's own batch (averaged over ranks).
    second-engine
               the ``--settings`` setting (JSON dict) twice over one model and one DropBP handle: engine 1 trains a
               step and is destroyed, then engine 2 trains STEPS steps from the initial weights and mask 0; rank 0
               saves the weights, whether engine 2's ZeRO optimizer had DropBP's zeroing step after each training
               forward, and whether engine 2 reused engine 1's id().
    trainer    the HF Trainer with a ``deepspeed`` dict (``--stage``, ``--sensitivity-at``, ``--checkpointing``):
               DropBPCallback, SGD, no clipping; rank 0 saves the weights and rates, every rank the batches it
               trained on (or the DropBPError it got).

Every engine uses ``gradient_clipping`` 0 (DeepSpeed's own default clips at 1.0), so the
single-process reference in the test can be exact.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_llama  # noqa: E402

import dropbp  # noqa: E402
from dropbp.errors import DropBPError  # noqa: E402

STEPS, PER_RANK, LENGTH, SEED = 4, 2, 12, 7


def global_batch(step: int, micro: int) -> torch.Tensor:
    """Micro-batch ``micro`` of optimizer step ``step``, for both ranks (rank r takes rows r*PER_RANK...)."""
    generator = torch.Generator().manual_seed(100 + 10 * step + micro)
    return torch.randint(0, 64, (2 * PER_RANK, LENGTH), generator=generator)


def engine_config(stage: int, ga: int, offload: bool = False, bf16: bool = False) -> dict:
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": ga, "gradient_clipping": 0.0,
        "zero_optimization": zero, "zero_allow_untested_optimizer": True,
        # offload with torch's SGD instead of DeepSpeedCPUAdam (a C++ build on first use)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
    }


def gathered_state(engine, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    state = {}
    for name, p in engine.module.named_parameters():
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                state[name] = p.detach().clone()
        else:
            state[name] = p.detach().clone()
    return state


def build(setting: dict):
    """The model, DropBP handle and engine of one setting (apply before or after deepspeed.initialize)."""
    import deepspeed

    model = tiny_llama()
    model.train()
    if setting.get("checkpointing"):
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": setting["checkpointing"] == "reentrant"})
    apply = dict(drop_rate=0.5, seed=SEED, auto_step=setting.get("auto_step", True))
    handle = dropbp.apply(model, **apply) if setting.get("order", "before") == "before" else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    config = engine_config(setting["stage"], setting.get("ga", 1), setting.get("offload", False),
                           setting.get("bf16", False))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if setting.get("guard") == "explicit":  # dropbp.zero.guard right after initialize, before any forward
        from dropbp.zero import _ZeroingStep

        dropbp.zero.guard(engine, auto_step=apply["auto_step"])
        assert isinstance(engine.optimizer.__dict__.get("step"), _ZeroingStep), "guard() installed no zeroing step"
    if handle is None:
        handle = dropbp.apply(engine.module, **apply)
    return model, handle, engine


def train(setting: dict, rank: int) -> tuple[dict[str, torch.Tensor], dropbp.DropBPHandle, object]:
    """STEPS optimizer steps on this rank's share of the global batches; the gathered weights, handle and engine."""
    model, handle, engine = build(setting)
    for step in range(STEPS):
        if not handle.auto_step:
            handle.step()
        for micro in range(setting.get("ga", 1)):
            local = global_batch(step, micro)[rank * PER_RANK : (rank + 1) * PER_RANK]
            engine.backward(engine(local, labels=local).loss)
            engine.step()  # DeepSpeed steps the optimizer at the end of each accumulation window
    return gathered_state(engine, setting["stage"]), handle, engine


def run_engine(args, rank: int) -> None:
    results = []
    for setting in json.loads(args.settings):
        state, handle, engine = train(setting, rank)
        results.append({"setting": setting, "state": state, "masks": handle.step_count})
        handle.remove()
        assert "step" not in vars(engine.optimizer), "remove() must restore the ZeRO optimizer's own step"
    if rank == 0:
        torch.save(results, args.out / "engine.pt")


def run_untouched(args, rank: int) -> None:
    """One mask per optimizer step; per step, whether each branch's parameters moved (gathered under ZeRO-3)."""
    results = []
    for setting in json.loads(args.settings):
        model, handle, engine = build({**setting, "auto_step": False})
        named = {name: p for name, p in engine.module.named_parameters()}
        branches = [[name for name in named if name.startswith(f"{b.name}.")] for b in handle.branches]
        moved = []
        for step in range(STEPS):
            mask = handle.step()
            before = gathered_state(engine, setting["stage"])
            for micro in range(setting.get("ga", 1)):
                local = global_batch(step, micro)[rank * PER_RANK : (rank + 1) * PER_RANK]
                engine.backward(engine(local, labels=local).loss)
                engine.step()
            after = gathered_state(engine, setting["stage"])
            moved.append([(dropped, any(not torch.equal(before[n], after[n]) for n in names))
                          for dropped, names in zip(mask, branches)])
        results.append({"setting": setting, "moved": moved})
    if rank == 0:
        torch.save(results, args.out / "untouched.pt")


def run_refusals(args, rank: int) -> None:
    messages = {}
    for name, setting in json.loads(args.settings).items():
        try:
            if setting.get("sensitivity"):
                model, handle, engine = build(setting)
                local = global_batch(0, 0)[rank * PER_RANK : (rank + 1) * PER_RANK]
                handle.sensitivity(lambda: model(local, labels=local).loss)
            else:
                train(setting, rank)
        except DropBPError as error:
            messages[name] = str(error)
        else:
            messages[name] = None
    (args.out / f"refusals-{rank}.json").write_text(json.dumps(messages))


def run_sensitivity(args, rank: int) -> None:
    model, handle, engine = build({"stage": 2})
    local = global_batch(0, 0)[rank * PER_RANK : (rank + 1) * PER_RANK]
    try:  # DeepSpeed would take the measurement's backwards for training backwards
        handle.sensitivity(lambda: engine(local, labels=local).loss)
    except DropBPError as error:
        (args.out / f"through-engine-{rank}.txt").write_text(str(error))
    values = handle.sensitivity(lambda: model(local, labels=local).loss)
    # and training still works after it: one step, then the weights
    loss = engine(local, labels=local).loss
    engine.backward(loss)
    engine.step()
    if rank == 0:
        torch.save({"sensitivities": values, "state": gathered_state(engine, 2)}, args.out / "sensitivity.pt")


def run_second_engine(args, rank: int) -> None:
    """One handle, two engines in turn: the second must get its own zeroing guard (the once-per-engine check was
    keyed by id(), which an engine built after another was freed can reuse)."""
    import gc
    import weakref

    import deepspeed

    from dropbp.zero import _ZeroingStep

    setting = json.loads(args.settings)
    model = tiny_llama()
    model.train()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    handle = dropbp.apply(model, drop_rate=0.5, seed=SEED)
    config = engine_config(setting["stage"], 1, setting.get("offload", False))
    local = [global_batch(step, 0)[rank * PER_RANK : (rank + 1) * PER_RANK] for step in range(STEPS)]

    engine, optimizer, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=config)
    engine.backward(engine(local[0], labels=local[0]).loss)
    engine.step()
    assert isinstance(engine.optimizer.__dict__.get("step"), _ZeroingStep), "engine 1 got no zeroing guard"
    first_id, first = id(engine), weakref.ref(engine)
    engine.destroy()  # removes its gradient hooks from the model's parameters, which engine 2 reuses
    del engine, optimizer
    gc.collect()

    with torch.no_grad():  # start over, so that the single-process reference applies
        for name, p in model.named_parameters():
            p.copy_(initial[name])
    handle.load_state_dict({**handle.state_dict(), "step": 0})
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=config)
    same_id, freed = id(engine) == first_id, first() is None
    guarded = []
    for batch in local:
        loss = engine(batch, labels=batch).loss
        guarded.append(isinstance(engine.optimizer.__dict__.get("step"), _ZeroingStep))
        engine.backward(loss)
        engine.step()
    print(f"rank {rank}: engine 1 freed: {freed}, id(engine 2) == id(engine 1): {same_id}", flush=True)
    state = gathered_state(engine, setting["stage"])
    if rank == 0:
        torch.save({"state": state, "masks": handle.step_count, "guarded": guarded, "same_id": same_id,
                    "freed": freed}, args.out / "second-engine.pt")


class Batches(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (64, LENGTH), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_trainer(args, rank: int) -> None:
    from transformers import Trainer, TrainingArguments

    seen = []  # this rank's training micro-batches (the sensitivity measurement's forwards take 1 example)

    def record(module, positional, keywords):
        if module.training and len(keywords["input_ids"]) == PER_RANK:
            seen.append(keywords["input_ids"].clone())

    model = tiny_llama()
    model.register_forward_pre_hook(record, with_kwargs=True)
    training = TrainingArguments(
        output_dir=str(args.out / f"trainer-{args.stage}"), max_steps=STEPS, per_device_train_batch_size=PER_RANK,
        gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, dataloader_num_workers=0, disable_tqdm=True, ddp_find_unused_parameters=True,
        gradient_checkpointing=args.checkpointing,
        deepspeed={"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "gradient_clipping": "auto", "zero_optimization": {"stage": args.stage},
                   "zero_allow_untested_optimizer": True},
    )
    callback = dropbp.DropBPCallback(drop_rate=0.5, seed=SEED, sensitivity_at=args.sensitivity_at)
    trainer = Trainer(model=model, args=training, train_dataset=Batches(), callbacks=[callback])
    try:
        trainer.train()
    except DropBPError as error:
        (args.out / f"trainer-error-{rank}.txt").write_text(str(error))
        return
    state = gathered_state(trainer.model_wrapped, args.stage)
    torch.save(seen, args.out / f"trainer-batches-{rank}.pt")
    if rank == 0:
        torch.save({"state": state, "masks": callback.handle.step_count, "rates": callback.handle.drop_rates},
                   args.out / "trainer.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True,
                        choices=["engine", "untouched", "refusals", "sensitivity", "second-engine", "trainer"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", default="[]")
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--sensitivity-at", type=float, default=None)
    parser.add_argument("--checkpointing", action="store_true", help="HF gradient checkpointing (non-reentrant)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed("gloo")
    rank = dist.get_rank()
    modes = {"engine": run_engine, "untouched": run_untouched, "refusals": run_refusals,
             "sensitivity": run_sensitivity, "second-engine": run_second_engine, "trainer": run_trainer}
    modes[args.mode](args, rank)
    dist.barrier()


if __name__ == "__main__":
    main()
