"""Per-branch FLOP counting with ``torch.utils.flop_counter``.

Counting on a real forward at the actual input shape keeps attention's sequence-length
term right (the paper's code hard-codes one length, or adds where it should multiply).

torch's counter knows only the ops in its registry; anything else counts zero. This module
adds the kernels that real models reach and torch misses (the CPU flash-attention kernel,
the grouped GEMMs of Mixture-of-Experts layers), runs higher-order ops such as
``flex_attention`` instead of failing on them, and :class:`FlopMeter` warns when a branch's
count is far below what its parameters imply, so the next uncounted kernel does not pass
silently.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

try:
    from torch.utils.flop_counter import _FlopCounterMode
except ImportError:  # a torch whose FlopCounterMode is itself the dispatch mode: plain counting there
    _FlopCounterMode = None  # type: ignore[assignment,misc]

__all__ = [
    "PLAUSIBLE_FRACTION", "DropBPFlopWarning", "FlopMeter", "flop_counter", "grouped_mm_flops", "implausible_flops",
    "sdpa_forward_flops", "shape_key",
]

# Padded lengths vary per batch; a few hundred shapes cover any realistic run.
_MAX_CACHED_SHAPES = 512

#: A branch whose counted forward FLOPs are below this fraction of ``2 x parameters x tokens``
#: is reported. Dense layers count about 100% of it; Mixture-of-Experts layers count roughly
#: their active share (top-8 of 128 experts: ~6%); a kernel the counter misses counts ~0%.
PLAUSIBLE_FRACTION = 0.01


class DropBPFlopWarning(UserWarning):
    """A FLOP count DropBP relies on is probably wrong (an uncounted kernel or op)."""


# Warnings about ops (not branches) are given once per process: the same op recurs in every layer.
_warned_ops: set[str] = set()


def _warn_op_once(key: str, message: str) -> None:
    if key in _warned_ops:
        return
    _warned_ops.add(key)
    warnings.warn(message, DropBPFlopWarning, stacklevel=3)


def sdpa_forward_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one scaled-dot-product attention forward (``QK^T`` and ``AV`` matmuls).

    Handles grouped-query attention, where the key and value have fewer heads than the
    query: every query head still does a full ``Tq x Tk`` product. As in torch's own
    formula, the causal mask is not discounted.
    """
    *batch, heads, q_len, qk_dim = query_shape
    k_len = key_shape[-2]
    v_dim = value_shape[-1]
    n = heads * q_len * k_len
    for b in batch:
        n *= b
    return 2 * n * qk_dim + 2 * n * v_dim


def _used_length(offs: Any, full: int) -> int:
    """How much of a jagged dimension of length ``full`` the groups ending at ``offs`` cover.

    Elements past ``offs[-1]`` are skipped by the kernel. Reading ``offs[-1]`` synchronises with
    the device once per count; where the value cannot be read (fake or meta tensors, a shape
    given instead of a tensor), the whole dimension is assumed.
    """
    if not isinstance(offs, torch.Tensor) or offs.numel() == 0:
        return full
    try:
        return max(0, min(int(offs[-1]), full))
    except Exception:  # data-dependent value under tracing: the upper bound
        return full


def grouped_mm_flops(mat_a: Any, mat_b: Any, offs: Any = None, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one ``torch._grouped_mm(mat_a, mat_b, offs=offs)`` (``F.grouped_mm``).

    The four operand layouts, as in torch's meta function for the op (``offs[i]`` ends group
    ``i`` of the jagged dimension; elements past ``offs[-1]`` are ignored by the kernel):

    * 2D x 3D, the MoE forward: ``(M_total, K) x (G, K, N) -> (M_total, N)``, rows of
      ``mat_a`` grouped: ``2 * offs[-1] * K * N``.
    * 3D x 2D: ``(G, M, K) x (K, N_total) -> (M, N_total)``, columns of ``mat_b`` grouped:
      ``2 * M * K * offs[-1]``.
    * 2D x 2D, the MoE weight gradient: ``(M, K_total) x (K_total, N) -> (G, M, N)``, the
      contraction grouped: ``2 * M * N * offs[-1]``.
    * 3D x 3D, a batched matmul without ``offs``: ``2 * G * M * K * N``.

    Args:
        mat_a: Left operand (a tensor, or its shape).
        mat_b: Right operand (a tensor, or its shape).
        offs: The group ends (a 1D integer tensor); a shape or ``None`` counts the whole
            jagged dimension.

    Returns:
        Multiply-adds times two, like torch's ``mm`` formula.
    """
    a = tuple(mat_a.shape if isinstance(mat_a, torch.Tensor) else mat_a)
    b = tuple(mat_b.shape if isinstance(mat_b, torch.Tensor) else mat_b)
    if len(a) == 2 and len(b) == 3:
        (m, k), n = a, b[-1]
        return 2 * _used_length(offs, m) * k * n
    if len(a) == 3 and len(b) == 2:
        (_, m, k), n = a, b[-1]
        return 2 * m * k * _used_length(offs, n)
    if len(a) == 2 and len(b) == 2:
        (m, k), n = a, b[-1]
        return 2 * m * n * _used_length(offs, k)
    if len(a) == 3 and len(b) == 3:
        (g, m, k), n = a, b[-1]
        return 2 * g * m * k * n
    raise ValueError(f"grouped_mm takes 2D or 3D operands, got shapes {a} and {b}")


def _grouped_mm_flop(mat_a, mat_b, offs=None, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return grouped_mm_flops(mat_a, mat_b, kwargs.get("offs", offs))


def _scaled_grouped_mm_flop(mat_a, mat_b, scale_a=None, scale_b=None, offs=None, *args: Any, out_val: Any = None,
                            **kwargs: Any) -> int:
    return grouped_mm_flops(mat_a, mat_b, kwargs.get("offs", offs))


# Formulas that read ``offs`` need the tensors themselves, not their shapes.
_grouped_mm_flop._get_raw = True  # type: ignore[attr-defined]
_scaled_grouped_mm_flop._get_raw = True  # type: ignore[attr-defined]


def _extra_ops() -> dict[Any, Any]:
    """Ops torch's registry misses, looked up each time: a library may register one later."""
    ops: dict[Any, Any] = {}
    # The CPU flash kernel that F.scaled_dot_product_attention dispatches to on CPU (also with
    # enable_gqa=True); torch's registry covers the CUDA kernels only.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        ops[op] = sdpa_forward_flops
    # Grouped GEMMs: transformers' default MoE experts kernel (``grouped_mm``) calls
    # torch._grouped_mm / F.grouped_mm, and its fallback a custom op that loops over torch.mm
    # where the counter cannot see it (a custom op's body runs below the dispatch mode).
    for op, formula in (
        (getattr(torch.ops.aten, "_grouped_mm", None), _grouped_mm_flop),
        (getattr(torch.ops.aten, "_scaled_grouped_mm", None), _scaled_grouped_mm_flop),
        (_custom_op("transformers", "grouped_mm_fallback"), _grouped_mm_flop),
    ):
        if op is not None:
            ops[op] = formula
    # FlexAttention's op (a higher-order op, which :class:`_SafeCounter` runs); recent torch has a formula.
    flex = _flex_attention_hop()
    if flex is not None and flex not in flop_registry:
        ops[flex] = sdpa_forward_flops
    return ops


def _custom_op(namespace: str, name: str) -> Any:
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):  # not registered (the library is not imported)
        return None


def _flex_attention_hop() -> Any:
    try:
        from torch._higher_order_ops.flex_attention import flex_attention
    except Exception:  # an older torch without FlexAttention
        return None
    return flex_attention


class _SafeCounter(FlopCounterMode):
    """torch's counter made unable to break a forward.

    * A higher-order op torch's mode does not handle (``flex_attention``: torch registers its
      formula but its mode returns NotImplemented, and the forward fails with "no implementation
      found for 'torch.ops.higher_order.flex_attention'") runs below the mode, counted by its
      formula where one is registered, else uncounted with one :class:`DropBPFlopWarning`.
    * A formula that raises counts zero, with one warning, instead of failing the op.

    Nothing is registered with torch: the behaviour lives in this subclass's dispatch mode.
    """

    def __enter__(self) -> _SafeCounter:
        # FlopCounterMode.__enter__ with our dispatch mode in place of torch's.
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        _force_eager()
        self.mode = _SafeMode(self)
        try:
            self.mode.__enter__()
        except BaseException:
            _restore_stance()
            raise
        return self

    def __exit__(self, *args: Any) -> Any:
        try:
            return super().__exit__(*args)
        finally:
            _restore_stance()

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super()._count_flops(func_packet, out, args, kwargs)
        except Exception as error:  # the op already ran: keep its output, lose only its count
            _warn_op_once(
                f"formula:{func_packet}",
                f"DropBP: the FLOP formula for {func_packet} failed ({type(error).__name__}: {error}); its FLOPs "
                "count as 0, so drop-rate allocation and backward_flops_skipped will be low for the branches using it",
            )
            return out


# Counts open in any thread, and the stance to restore when the last one closes.
_stance_lock = threading.Lock()
_stance_users = 0
_stance_saved: Any = None


def _force_eager() -> None:
    """Run ``torch.compile``-d functions eagerly while a count is open (in any thread).

    Under a non-infra dispatch mode such as the counter's, Dynamo compiles nothing anyway and runs
    every frame eagerly, but a ``fullgraph=True`` function that ran with no compiled frame then
    raises "torch.compile with fullgraph=True found no compiled frames" after it succeeded.
    ``flex_attention`` compiles its op that way, so without this the counted forward fails. The
    stance is process-wide, so it is reference-counted across threads (another thread's compiled
    functions also run eagerly while a count is open). Setting it loads Dynamo where nothing has
    loaded it yet (once per process, about a second): FlexAttention calls ``torch.compile`` for the
    first time inside the forward.
    """
    global _stance_users, _stance_saved
    with _stance_lock:
        if _stance_users == 0:
            try:
                _stance_saved = torch.compiler.set_stance("force_eager")  # set now; its __exit__ restores
            except Exception:  # torch before set_stance, no Dynamo on this Python, or inside a compiled region
                _stance_saved = None
        _stance_users += 1


def _restore_stance() -> None:
    global _stance_users, _stance_saved
    with _stance_lock:
        _stance_users -= 1
        if _stance_users == 0 and _stance_saved is not None:
            saved, _stance_saved = _stance_saved, None
            saved.__exit__(None, None, None)


def _hop_name(func: Any) -> str:
    name = getattr(func, "name", None)
    return name() if callable(name) else str(func)


if _FlopCounterMode is not None:

    class _SafeMode(_FlopCounterMode):  # type: ignore[valid-type,misc]
        """torch's dispatch mode for the counter, running the higher-order ops it returns NotImplemented for.

        For those, torch's mode hands NotImplemented back as the op's result (``invoke_subgraph``)
        or the op fails (``flex_attention``).
        """

        def _handle_higher_order_ops(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
            result = super()._handle_higher_order_ops(func, types, args, kwargs)
            if result is not NotImplemented:
                return result
            # HigherOrderOperator.dispatch popped this mode before calling it: the op runs below it.
            out = func(*args, **kwargs)
            if func in self.counter.flop_registry:
                return self.counter._count_flops(func, out, args, kwargs)
            _warn_op_once(
                f"hop:{_hop_name(func)}",
                f"DropBP: torch.utils.flop_counter cannot count the higher-order op {_hop_name(func)!r}; it runs "
                "uncounted, so drop-rate allocation and backward_flops_skipped will be low for the branches using it",
            )
            return out


def flop_counter() -> FlopCounterMode:
    """Return a silent ``FlopCounterMode`` that also counts CPU attention and grouped-GEMM kernels.

    Higher-order ops (``flex_attention``) run instead of failing, and a formula that raises
    counts zero instead of failing the forward; either warns once (:class:`DropBPFlopWarning`).

    Returns:
        A context manager; read ``get_total_flops()`` after leaving it.
    """
    kind = _SafeCounter if _FlopCounterMode is not None else FlopCounterMode
    counter = kind(display=False, custom_mapping=_extra_ops())
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _TotalOnly()
    return counter


class _TotalOnly:
    """Stands in for FlopCounterMode's per-module tracker: every FLOP goes to the total.

    The tracker hooks every module call and registers gradient hooks on its inputs that
    require grad. Inside a dropped branch (run under ``no_grad``) a view of a grad-requiring
    tensor, such as a MoE router's ``hidden_states.view(-1, dim)``, requires grad but has no
    ``grad_fn``, and registering the hook fails ("Expected gradient function to be set").
    DropBP reads only the total, so per-module attribution is not needed.
    """

    parents = frozenset({"Global"})
    is_bw = False

    def __enter__(self) -> _TotalOnly:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """Shapes of the tensor inputs (one level into tuples): FLOPs change only with these."""
    key = [tuple(t.shape) for a in args for t in _tensors(a)]
    key += [(k, tuple(t.shape)) for k, v in kwargs.items() for t in _tensors(v)]
    return tuple(key)


def _tokens(args: tuple, kwargs: dict) -> int:
    """Tokens in a call: the first tensor input's elements over its last dimension (0 if none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[-1] == 0:
                return 0
            return value.numel() // value.shape[-1]
    return 0


def implausible_flops(flops: int, params: int, tokens: int) -> bool:
    """Whether a branch's counted forward FLOPs are far too low for its parameters.

    Every parameter of a dense layer takes part in one multiply-add per token, so a forward
    costs about ``2 x params x tokens`` (attention adds a sequence-length term on top). A
    Mixture-of-Experts layer runs only its routed experts: top-8 of 128 counts about 6% of
    that. Below :data:`PLAUSIBLE_FRACTION` (1%), the branch's main kernel was almost surely
    not counted (a fused or grouped GEMM outside ``torch.utils.flop_counter``'s registry).

    Args:
        flops: Counted forward FLOPs of one call.
        params: Parameter elements of the branch.
        tokens: Tokens in the call.

    Returns:
        True if the count is implausibly low; False when there is nothing to compare
        (no parameters or no tokens).
    """
    expected = 2 * params * tokens
    return expected > 0 and flops < PLAUSIBLE_FRACTION * expected


class FlopMeter:
    """Forward FLOPs per branch and input shape, counted once per shape on training forwards.

    Counting runs the forward under a Python dispatch mode, which is slow, so it happens on
    the first training call at each new input shape only. Eval, ``no_grad`` and
    ``generate`` never reach the meter: their shapes (one token per decode step) would
    otherwise cost a count each and replace the training FLOPs the allocation needs.

    A new count far below ``2 x parameters x tokens`` (see :func:`implausible_flops`) warns
    once per branch with a :class:`DropBPFlopWarning`.

    Args:
        num_branches: How many branches are metered.
        param_counts: Parameter elements of each branch, for the plausibility check; None
            (or a 0 entry) skips the check.
        names: Branch names for the warning; None names them by index.
    """

    def __init__(self, num_branches: int, param_counts: list[int] | None = None, names: list[str] | None = None):
        self.flops: list[int | None] = [None] * num_branches
        self._by_shape: list[dict[tuple, int]] = [{} for _ in range(num_branches)]
        self._params = list(param_counts) if param_counts is not None else [0] * num_branches
        self._names = list(names) if names is not None else [f"#{i}" for i in range(num_branches)]
        if len(self._params) != num_branches or len(self._names) != num_branches:
            raise ValueError(f"param_counts and names need one entry per branch ({num_branches})")
        self.implausible: set[int] = set()  # branches whose count was implausibly low (warned once each)

    def start(self, index: int, args: tuple, kwargs: dict) -> tuple | None:
        """Before a training call of branch ``index``: a count to :meth:`stop`, or None if known."""
        key = shape_key(args, kwargs)
        known = self._by_shape[index].get(key)
        if known is not None:
            self.flops[index] = known
            return None
        counter = flop_counter()
        counter.__enter__()
        return counter, key, _tokens(args, kwargs)

    def stop(self, index: int, count: tuple, completed: bool) -> None:
        """After the call: close the count, and keep it if the forward completed."""
        counter, key, tokens = count
        counter.__exit__(None, None, None)
        if not completed:
            return
        cache = self._by_shape[index]
        if len(cache) >= _MAX_CACHED_SHAPES:
            cache.pop(next(iter(cache)))
        flops = cache[key] = self.flops[index] = int(counter.get_total_flops())
        self._check(index, flops, tokens)

    def _check(self, index: int, flops: int, tokens: int) -> None:
        params = self._params[index]
        if index in self.implausible or not implausible_flops(flops, params, tokens):
            return
        self.implausible.add(index)
        warnings.warn(
            f"DropBP: branch {self._names[index]!r} counted {flops:,} forward FLOPs for {tokens:,} tokens, but its "
            f"{params:,} parameters imply about {2 * params * tokens:,} (2 x parameters x tokens); its kernel is "
            "probably not counted by torch.utils.flop_counter, so drop-rate allocation and backward_flops_skipped "
            "will be wrong for this branch",
            DropBPFlopWarning,
            stacklevel=2,
        )
