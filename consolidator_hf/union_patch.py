"""The patched weight of the fast training path: where the branches sit in ``W0`` and how
``W = W0 + s sum_k D_k`` is used without building it.

``W`` differs from ``W0`` only on the union of the branches' supports (``out * in/g``
entries per branch), so it is never built as a new dense matrix: the values ``W`` takes
there are formed in fp32 (then cast), written into ``W0`` in place, the GEMM runs, and the
original entries are written back bit for bit. ``W0``'s entries on the union are read on every
call (one ``index_select``), never cached: a write the cache cannot see (``W0.data.copy_(...)``
bumps no version counter of ``W0``) then reaches the output and is not reverted by a restore of
stale values. Under autocast the weight is cast to the
compute dtype anyway; the patch then goes into that copy and ``W0`` is not touched. The patched
values (a vector of ``out * in/g`` numbers) are kept for backward, which patches again for
the input gradient instead of keeping a dense weight per layer alive.

:class:`UnionCache` keeps one layer's :class:`UnionState` (the union indices, the branches'
block plans, the flat view the patch writes through) until ``W0`` moves or is replaced.
Used by :mod:`consolidator_hf.fast_path` (eager) and :mod:`consolidator_hf.compiled_path`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import grouped
from .grouped import Geometry


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def autocast_off(device_type: str):
    """Autocast disabled for a block (the fast path picks its dtypes itself); entering the
    context costs more than the small ops it would wrap, so it is skipped when already off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


# ------------------------------------------------------------------ the union of the supports
class UnionState(NamedTuple):
    """Where the branches sit in ``W0``.

    ``union``: flat indices of ``W0`` covered by any branch (a single branch's support in its
    own order, so its compact weight maps onto it without a gather); ``positions[k]``: where
    branch ``k``'s entries sit in ``union`` (``None`` when they are ``union`` itself);
    ``plans[k]``: branch ``k``'s
    :class:`~consolidator_hf.grouped.BlockPlan` (asked for once here, not on every call);
    ``flat``: ``W0.data`` as a flat view, what the patch writes through (``None`` when ``W0`` is
    not contiguous).
    """

    union: torch.Tensor
    positions: List[Optional[torch.Tensor]]
    plans: Tuple[grouped.BlockPlan, ...]
    flat: Optional[torch.Tensor]


class UnionCache:
    """One layer's :class:`UnionState`, rebuilt when ``W0`` moves or is replaced (its device,
    dtype, shape, storage object or data pointer differ from the cached key). The state holds
    no values of ``W0``, so an in-place change needs no rebuild. The state's ``flat`` view keeps
    the cached storage alive, so a new storage cannot take its address and pass for it."""

    __slots__ = ("_key", "_state")

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._state: Optional[UnionState] = None

    def get(self, w0: torch.Tensor, geometries: Sequence[Geometry]) -> UnionState:
        # untyped_storage()._cdata: the storage object's identity, read without a dispatch
        key = (w0.device, w0.dtype, w0.shape, w0.untyped_storage()._cdata, w0.data_ptr())
        if self._state is None or self._key != key:
            union, positions = union_index(tuple(w0.shape), tuple(geometries), w0.device)
            self._key, self._state = key, union_state(w0, union, positions, geometries)
        return self._state


def union_index(shape: Tuple[int, int], geometries: Tuple[Geometry, ...], device
                ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """``(union, positions)`` of :class:`UnionState` for a ``(out, in)`` weight."""
    out_f, in_f = shape
    idxs = [grouped.support_index(in_f, out_f, **geom._asdict(), device=device).reshape(-1)
            for geom in geometries]
    if len(idxs) == 1:
        return idxs[0], [None]
    union = grouped.union_support(idxs)
    return union, [torch.searchsorted(union, i) for i in idxs]


def union_state(w0: torch.Tensor, union: torch.Tensor, positions: List[Optional[torch.Tensor]],
                geometries: Sequence[Geometry]) -> UnionState:
    """:class:`UnionState` for ``W0``'s shape and storage (none of its values are read)."""
    out_f, in_f = w0.shape
    plans = tuple(grouped.block_plan(in_f, out_f, g.groups, row_offset=g.row_offset,
                                     virtual_out_features=g.virtual_out_features)
                  for g in geometries)
    # Through .data: the patch must not bump the version counter autograd checks on W0
    # (see patched_matmul).
    flat = w0.data.view(-1) if w0.is_contiguous() else None
    return UnionState(union, positions, plans, flat)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; a no-op ``.to`` still costs a dispatch, and the fast path's host
    time per layer is made of such calls."""
    return t if t.dtype == dtype else t.to(dtype)


# ------------------------------------------------------------------ the patched weight
def read_union(w0: torch.Tensor, state: UnionState) -> torch.Tensor:
    """``W0``'s entries on the union support as they are now, in ``W0``'s dtype (one
    ``index_select``; read on every call so that no write to ``W0`` goes unseen)."""
    flat = state.flat if state.flat is not None else w0.detach().reshape(-1)
    return flat.index_select(0, state.union)


def patch_values(state: UnionState, w0: torch.Tensor, b0: Optional[torch.Tensor],
                 weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                 scale: float, dtype: torch.dtype
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``(values, bias, native)``: ``W0 + scale * sum_k D_k`` on the union of the supports (in
    the order of ``state.union``) and ``b0 + scale * sum_k c_k`` (:func:`grouped.merged_linear`
    in fp32, cast to ``dtype``), and ``W0``'s entries there as read (:func:`read_union`, what
    :func:`patched_matmul` restores). Like everything below, called only where autograd records
    nothing (inside the Function's forward/backward or a custom op), so no ``detach`` is
    needed."""
    native = read_union(w0, state)
    values, bias = grouped.merged_linear(
        native, b0, weights, biases,
        scale=scale, positions=state.positions)
    return (as_dtype(values, dtype), (as_dtype(bias, dtype) if bias is not None else None),
            native)


def patched_matmul(fn: Callable[[torch.Tensor], torch.Tensor], w0: torch.Tensor,
                   state: UnionState, values: torch.Tensor, dtype: torch.dtype,
                   native: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fn(W)`` for ``W``: ``W0`` with ``values`` written on the union support, in ``dtype``.

    When ``dtype`` is the base weight's dtype the base weight itself is patched and restored
    exactly afterwards (no dense copy) to ``native``, ``W0``'s entries there (read now when not
    given: backward keeps the patched values, not a second copy of ``W0``'s); otherwise the
    patch goes into the cast copy the GEMM needs anyway.
    """
    flat = state.flat
    if w0.dtype != dtype or flat is None:
        target = w0.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        target.view(-1).index_copy_(0, state.union, values)
        return fn(target)
    if flat.untyped_storage()._cdata != w0.untyped_storage()._cdata:
        # not expected (the cache key holds the storage): a safety net
        state = state._replace(flat=w0.data.view(-1))
        flat, native = state.flat, None
    if native is None:
        native = read_union(w0, state)
    # Through W0.data: the original entries are back before anything else can read W0, so the
    # patch must not bump the version counter autograd checks on W0 (a frozen weight saved by
    # some other op would otherwise raise on backward).
    flat.index_copy_(0, state.union, values)
    try:
        return fn(w0)
    finally:
        flat.index_copy_(0, state.union, native)
