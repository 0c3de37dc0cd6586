"""The branch table: the residual branches of one model, in execution order, and what lies around them.

Built once from the resolved :class:`~dropbp.architectures.BranchSpec` list; the engine
(:mod:`dropbp.forwards`, :mod:`dropbp.hooks`) and the handle read it, nothing changes it but
the rates (which live in the :class:`~dropbp.masks.MaskStream`) and the FLOPs a training
forward counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dropbp.architectures import BranchSpec
from dropbp.masks import MaskStream

__all__ = ["Branch", "BranchTable"]


@dataclass(eq=False)
class Branch:
    """One residual branch (an attention or MLP sub-block).

    Attributes:
        name: Qualified module name in the model DropBP was applied to
            (``"<first>..<last>"`` for a span of sibling modules, such as OPT's MLP).
        module: The branch module itself (the first module of a span).
        index: Position in execution order.
        end_module: The module whose forward ends the branch (``module`` unless a span).
        modules: Every module of the branch (the siblings a span covers).
        flops: Forward FLOPs of this branch at the last training input shape, counted with
            ``torch.utils.flop_counter``; ``None`` until a training forward has run it.
    """

    name: str
    module: nn.Module
    index: int
    end_module: nn.Module | None = None
    modules: tuple[nn.Module, ...] = ()
    flops: int | None = None
    stream: MaskStream | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.end_module is None:
            self.end_module = self.module
        if not self.modules:
            self.modules = (self.module,) if self.end_module is self.module else (self.module, self.end_module)

    def parameters(self) -> list[nn.Parameter]:
        """The branch's own parameters (each once)."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.modules:
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    @property
    def drop_rate(self) -> float:
        """Probability that this branch's backward is skipped in a step (held by the mask stream)."""
        return self.stream.rates[self.index] if self.stream is not None else 0.0

    @drop_rate.setter
    def drop_rate(self, value: float) -> None:
        if self.stream is None:
            raise ValueError(f"branch {self.name!r} belongs to no mask stream; set rates through its handle")
        self.stream.set_rate(self.index, value, self.name)

    def __repr__(self) -> str:
        return f"Branch(name={self.name!r}, drop_rate={self.drop_rate:.3f}, flops={self.flops})"


class BranchTable:
    """The branches of ``model`` and the structure around them that the engine needs.

    Args:
        model: The module DropBP is applied to.
        specs: The resolved branches, in execution order.
        stream: The mask stream that holds the branches' rates.

    Attributes:
        branches: One :class:`Branch` per spec.
        entry_modules: ``model`` and each module inside it that holds every branch, outermost
            first: a training forward may start at any of them (``model.model(...)`` runs a
            causal LM's decoder body; PEFT's ``merge_and_unload()`` hands back the model
            inside a ``PeftModel``).
        owners: Per branch, the innermost module around it with a Hugging Face
            ``gradient_checkpointing`` switch (None for spans and where there is none).
        later_in_layer: Per branch, the branches after it under the same parent module.
        covers: (module, branch indices) for every module around or beside a branch: the
            modules whose inputs link a checkpoint recompute to its forward.
    """

    def __init__(self, model: nn.Module, specs: list[BranchSpec], stream: MaskStream):
        self.branches = [_make_branch(model, spec, i, stream) for i, spec in enumerate(specs)]
        self.all_indices = tuple(range(len(specs)))
        self.entry_modules = _entry_modules(model, specs)
        # Spans (OPT's fc1..fc2) start and end in different modules: one forward cannot be shadowed.
        self.owners = [_checkpointing_owner(model, spec.start) if spec.start == spec.end else None for spec in specs]
        parents = [spec.start.rpartition(".")[0] for spec in specs]
        self.later_in_layer = [
            tuple(j for j in range(i + 1, len(specs)) if parents[j] == parents[i]) for i in range(len(specs))
        ]
        covers: dict[int, tuple[nn.Module, set[int]]] = {}
        for i, spec in enumerate(specs):
            parts = spec.start.split(".")
            around = [model.get_submodule(".".join(parts[:k])) for k in range(1, len(parts))]
            beside = list((around[-1] if around else model).children())
            for module in (*around, *beside):
                covers.setdefault(id(module), (module, set()))[1].add(i)
        self.covers = [(module, tuple(sorted(indices))) for module, indices in covers.values()]

    def __len__(self) -> int:
        return len(self.branches)

    def __getitem__(self, index: int) -> Branch:
        return self.branches[index]


def _checkpointing_owner(model: nn.Module, name: str) -> nn.Module | None:
    """The innermost module around a branch with a Hugging Face ``gradient_checkpointing`` switch.

    transformers 5 sets it on each decoder layer (``every_n_layers`` leaves some off) and on
    the model body; older versions on the body only. When it is on, the branch is
    recomputed in backward.
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:i]))
        if hasattr(module, "gradient_checkpointing"):
            return module
    return None


def _entry_modules(model: nn.Module, specs: list[BranchSpec]) -> list[nn.Module]:
    """``model`` and each module inside it that holds every branch, outermost first."""
    paths = [spec.start.split(".")[:-1] for spec in specs]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return [model] + [model.get_submodule(".".join(common[:k])) for k in range(1, len(common) + 1)]


def _make_branch(model: nn.Module, spec: BranchSpec, index: int, stream: MaskStream) -> Branch:
    start, end = model.get_submodule(spec.start), model.get_submodule(spec.end)
    if start is end:
        return Branch(name=spec.name, module=start, index=index, stream=stream)
    parent = model.get_submodule(spec.start.rpartition(".")[0]) if "." in spec.start else model
    children = list(parent.children())
    first, last = children.index(start), children.index(end)
    return Branch(name=spec.name, module=start, index=index, end_module=end, modules=tuple(children[first : last + 1]),
                  stream=stream)
