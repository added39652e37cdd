"""The fast training path of :class:`~consolidator_hf.layer.ConsolidatorLinear`.

This module knows tensors and :class:`~consolidator_hf.grouped.Geometry` records, not the
layer: :func:`fast_linear` takes the layer's tensors, its branches' geometries and a
:class:`UnionCache`, and the autograd Function keeps for backward only what forward saw.

The reference forward computes ``W0 x`` and then every branch ``B_k P_k x`` on its own (the
paper's grouped 1x1 convolutions). Here the branches are folded into the frozen weight
instead, so a layer costs one GEMM, like a plain ``nn.Linear``::

    y = x W^T + b,   W = W0 + s sum_k D_k,   b = b0 + s sum_k c_k

with ``s = 1/(1-p)`` in training with drop (1 otherwise). A sample that dropped branch ``k``
then has that branch taken back out of its rows, ``y[rows] -= s (B_k P_k x[rows] + c_k)``,
through the block structure (:func:`grouped.grouped_forward_blocks`: a few small matmuls on
those rows only, about ``p`` of the batch), so the drop semantics hold per sample and per
branch (a dropped row is ``x W^T - s B_k P_k x`` rather than ``x W0^T``: equal up to fp32
rounding) and the big GEMM is never split. Dropped samples in one run are corrected through
slices (views); in several runs (:data:`GATHER_RUNS`; about six per branch at batch 64 and drop
0.1) through one gather of all of them (``index_select``, the block product, ``index_add_``),
so the host work per layer does not grow with the batch. Which samples dropped is host knowledge, not a read
of a device tensor: the layer draws the masks on the host (:meth:`ConsolidatorLinear.host_masks`)
and hands :func:`fast_linear` only their keep flags (host booleans); no mask tensor reaches the
device. Correcting every row by ``(m_k - s)`` instead (fixed shapes, what the traced compiled
formulation does) measured 1.49x the eager floor's step on ViT-B/16 (batch 8, 2 CPU threads)
against 1.05x for these row runs (README, "Fast training path").

``W`` differs from ``W0`` only on the union of the branches' supports, so it is never built as a
new dense matrix: :mod:`consolidator_hf.union_patch` writes the values ``W`` takes there into
``W0`` in place for the GEMM and restores them bit for bit (module docstring there).

Gradients (``g`` the output gradient, ``m_k`` the per-sample mask, ``1/(1-p)`` or 0):

* input: ``g W`` (the same GEMM a frozen ``nn.Linear`` pays), minus
  ``s (B_k P_k)^T g[rows]`` on the rows that dropped branch ``k``
  (:func:`grouped.grouped_input_grad`);
* branch weight ``k``: :func:`grouped.grouped_weight_grad` over the rows that kept branch
  ``k``, times ``s``: batched matmuls over the groups, never a dense ``(out, in)`` gradient
  (kept samples in several runs with the dropped ones gathered: all rows minus the dropped
  samples' rows, two passes however the kept samples are spread);
* base bias: ``sum_n g``; branch bias ``k``: ``sum_n m_k[n] g[n]``;
* ``W0`` (only if someone unfroze it): the dense ``g^T x``.

The branch-weight gradient needs the layer input ``x``, which a frozen ``nn.Linear`` never
keeps. When ``x`` is the direct output of a LayerNorm or a GELU (q/k/v and fc1 read a
LayerNorm, fc2 reads the GELU: most of a ViT's adapted inputs), that op has already saved what
rebuilds ``x`` exactly, so :class:`InputRebuild` keeps references to those tensors (no new
memory) and rebuilds ``x`` in backward. Other inputs are saved as they are (the attention
output that o_proj reads is a view of a tensor the attention kernel saved anyway).

Under ``torch.compile`` the autograd Function cannot run (it reads autograd nodes and data
pointers): :mod:`consolidator_hf.compiled_path` wraps the same functions (:func:`forward_rows`,
:func:`gradients`) in two custom ops, so the
compiled step computes exactly this design, and leaves rebuilding the input to the compiler.
"""

from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import grouped
from .grouped import Geometry
from .input_rebuild import InputRebuild, RowFunction, take_samples
from .input_rebuild import as_rows as _rows
from .union_patch import (UnionCache, UnionState, as_dtype, autocast_off, compute_dtype,
                          patch_values, patched_matmul)


# ------------------------------------------------------------------ the autograd Function
Runs = Tuple[Tuple[int, int], ...]

#: A branch whose dropped samples form at least this many runs is corrected through one gather
#: of those samples (``index_select``/``index_add_``, a fixed number of dispatches) instead of
#: run by run (slices are views: cheaper for a single run). At drop 0.1 a batch of 8 rarely has
#: two runs, a batch of 64 has about six per branch.
GATHER_RUNS = 2


class _Spec(NamedTuple):
    """What the computation needs besides tensors: the branches' geometries, the drop scale
    ``s`` (``1/(1-p)`` with masks, else 1), and per branch the ``[start, stop)`` runs of
    samples that kept it and that dropped it, and the dropped samples' ids when they are
    gathered (:data:`GATHER_RUNS`; else ``None``) (host data)."""

    geometries: Tuple[Geometry, ...]
    scale: float
    kept: Tuple[Runs, ...]
    dropped: Tuple[Runs, ...]
    gathered: Tuple[Optional[Tuple[int, ...]], ...]


def sample_runs(flags: Sequence[bool]) -> Runs:
    """``[start, stop)`` of every maximal run of ``True`` in ``flags`` (host booleans)."""
    runs, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return tuple(runs)


def keep_flags(masks: torch.Tensor) -> List[List[bool]]:
    """``keep[k][n]`` host booleans of ``(batch, K)`` keep masks held in host memory."""
    return (masks > 0).t().numpy().tolist()


def make_spec(geometries: Sequence[Geometry], keep: Optional[Sequence[Sequence[bool]]],
              batch: int, drop_rate: float) -> _Spec:
    """The :class:`_Spec` of a step: ``keep[k][n]`` the host keep flags (``None``: no drop, every
    branch kept and unscaled)."""
    n = len(geometries)
    if keep is None:
        return _Spec(tuple(geometries), 1.0, (((0, batch),),) * n, ((),) * n, (None,) * n)
    dropped = tuple(sample_runs([not v for v in f]) for f in keep)
    gathered = tuple(tuple(i for i, v in enumerate(f) if not v)
                     if len(runs) >= GATHER_RUNS else None for f, runs in zip(keep, dropped))
    return _Spec(tuple(geometries), 1.0 / (1.0 - drop_rate),
                 tuple(sample_runs(f) for f in keep), dropped, gathered)


def _sample_index(ids: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The host ids as a long tensor on ``device``. On a GPU through pinned memory and a
    non-blocking copy: a copy from pageable memory would synchronise the step."""
    index = torch.tensor(ids, dtype=torch.long)
    if device.type == "cpu":
        return index
    if device.type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


class _Step(NamedTuple):
    """What backward needs of a forward besides saved tensors: the spec, where the branches sit
    in ``W0``, the patched values, the compute dtype, the batch size, per branch that some
    sample dropped its :func:`grouped.block_diagonal` in the compute dtype (else ``None``), and
    per branch whose dropped samples are gathered their ids on the device (else ``None``);
    ``native``: ``W0``'s entries on the union as read for ``patch`` when the step is rebuilt in
    backward (what the input gradient's patch restores), ``None`` for a forward's step (which
    keeps no copy of them until backward: backward reads them again)."""

    spec: _Spec
    state: UnionState
    patch: torch.Tensor
    dtype: torch.dtype
    batch: int
    diagonals: Tuple[Optional[torch.Tensor], ...]
    index: Tuple[Optional[torch.Tensor], ...]
    native: Optional[torch.Tensor] = None


def _diagonals(spec: _Spec, state: UnionState, weights: Sequence[torch.Tensor],
               dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], ...]:
    """The block diagonals of the branches some sample dropped (what the corrections multiply
    by), formed once for a forward and its backward."""
    return tuple(grouped.block_diagonal(as_dtype(weights[k], dtype), state.plans[k]) if runs else None
                 for k, runs in enumerate(spec.dropped))


def _indices(spec: _Spec, device: torch.device) -> Tuple[Optional[torch.Tensor], ...]:
    return tuple(_sample_index(ids, device) if ids is not None else None
                 for ids in spec.gathered)


def _take_out(target: torch.Tensor, source: torch.Tensor, runs: Runs,
              index: Optional[torch.Tensor], batch: int, scale: float,
              correction: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``target[rows] -= scale * correction(source[rows])`` on the rows of the samples in
    ``runs`` (``source`` and ``target`` ``(rows, f)`` or ``(batch, ..., f)``, the same rows per
    sample; ``correction`` maps ``(rows, f)`` to ``(rows, f')``): through one gather when
    ``index`` holds those samples, else run by run through slices."""
    if index is not None:
        part = correction(take_samples(source, index, batch))
        # index_add_ on dim 0 as the samples; no reshape where it already is (each is a dispatch)
        samples = target if target.shape[0] == batch else target.view(batch, -1)
        samples.index_add_(0, index, part.view(index.shape[0], *samples.shape[1:]), alpha=-scale)
        return
    source, target = _rows(source), _rows(target)
    tokens = source.shape[0] // batch  # rows per sample
    for a, b in runs:
        rows = slice(a * tokens, b * tokens)
        target[rows].sub_(correction(source[rows]), alpha=scale)


def forward_rows(spec: _Spec, state: UnionState, xc: torch.Tensor, w0: torch.Tensor,
                 b0: Optional[torch.Tensor], weights: Sequence[torch.Tensor],
                 biases: Sequence[Optional[torch.Tensor]], dtype: torch.dtype
                 ) -> Tuple[torch.Tensor, _Step]:
    """``y = x W^T + b`` through the patched weight, then every dropped sample's branches taken
    back out of its rows; ``xc`` is ``(batch, ..., in)`` in ``dtype``, contiguous."""
    values, bias, native = patch_values(state, w0, b0, weights, biases, spec.scale, dtype)
    y = patched_matmul(lambda w: F.linear(xc, w, bias), w0, state, values, dtype, native)
    diagonals = _diagonals(spec, state, weights, dtype)
    index = _indices(spec, xc.device)
    batch = xc.shape[0]

    def correction(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        geom, c_k = spec.geometries[k], biases[k]

        def rows(x_rows: torch.Tensor) -> torch.Tensor:
            part = grouped.forward_blocks(x_rows, diagonals[k], w0.shape[0], state.plans[k],
                                          geom.groups, geom.channel_shuffle)
            return part + as_dtype(c_k, dtype) if c_k is not None else part
        return rows

    # take branch k back out of the samples that dropped it
    for k, runs in enumerate(spec.dropped):
        if runs:
            _take_out(y, xc, runs, index[k], batch, spec.scale, correction(k))
    return y, _Step(spec, state, values, dtype, batch, diagonals, index)


def backward_step(spec: _Spec, state: UnionState, w0: torch.Tensor, b0: Optional[torch.Tensor],
                  weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                  dtype: torch.dtype, batch: int) -> _Step:
    """The :class:`_Step` :func:`forward_rows` returned, rebuilt from the same inputs (the
    compiled ops keep no Python state between forward and backward)."""
    values, _, native = patch_values(state, w0, b0, weights, biases, spec.scale, dtype)
    return _Step(spec, state, values, dtype, batch, _diagonals(spec, state, weights, dtype),
                 _indices(spec, state.union.device), native)


def input_grad(step: _Step, g: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """``g W`` through the patched weight, minus ``s (B_k P_k)^T g`` on the rows of the
    samples that dropped branch ``k`` (the transpose of the forward's correction):
    ``(rows, in)``."""
    spec, dtype = step.spec, step.dtype
    g2 = _rows(g)
    grad_x = patched_matmul(lambda w: torch.mm(g2, w), w0, step.state, step.patch, dtype,
                            step.native)
    for k, runs in enumerate(spec.dropped):
        if runs:
            _take_out(grad_x, g2, runs, step.index[k], step.batch, spec.scale,
                      functools.partial(grouped.input_grad_blocks, diagonal=step.diagonals[k],
                                        in_features=w0.shape[1], plan=step.state.plans[k],
                                        channel_shuffle=spec.geometries[k].channel_shuffle))
    return grad_x


def bias_grads(step: _Step, g: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(sum_n g, [s sum_n m_k[n] g[n] for each branch k])`` summed in fp32 (or wider): the
    base bias sees every sample, a branch bias the samples that kept it (the total minus the
    dropped samples' rows, from the host's runs: no mask tensor needed)."""
    spec = step.spec
    acc = grouped.sum_dtype(g.dtype)
    total = _rows(g).sum(0, dtype=acc)
    if not any(spec.dropped):
        return total, [total if spec.scale == 1.0 else total * spec.scale] * len(spec.dropped)
    per_sample = g.reshape(step.batch, -1, g.shape[-1])
    per_branch = []
    for k, runs in enumerate(spec.dropped):
        kept = total
        if step.index[k] is not None:
            kept = kept - per_sample.index_select(0, step.index[k]).sum((0, 1), dtype=acc)
        else:
            for a, b in runs:
                kept = kept - per_sample[a:b].sum((0, 1), dtype=acc)
        per_branch.append(kept * spec.scale)
    return total, per_branch


def branch_weight_grad(step: _Step, g2: torch.Tensor, x_rows: Union[torch.Tensor, RowFunction],
                       k: int, shape: torch.Size, in_features: int) -> torch.Tensor:
    """Branch ``k``'s compact weight gradient over the rows of the samples that kept it,
    times ``s`` (:func:`grouped.grouped_weight_grad`); ``x_rows`` the layer input as
    ``(rows, in)`` or a :class:`~consolidator_hf.input_rebuild.RowFunction` (rebuilt).
    Kept samples in several runs, dropped ones gathered: the sum over all rows minus the
    dropped samples' rows (two passes instead of one per kept run)."""
    tokens = g2.shape[0] // step.batch
    kept, index = step.spec.kept[k], step.index[k]
    if not kept:
        return torch.zeros(shape, dtype=grouped.sum_dtype(g2.dtype), device=g2.device)
    geom = step.spec.geometries[k]
    ranges, minus = [(a * tokens, b * tokens) for a, b in kept], None
    if index is not None and len(kept) > 1:
        ranges = None
        minus = (take_samples(g2, index, step.batch), take_samples(x_rows, index, step.batch))
    gw = grouped.weight_grad_blocks(g2, x_rows, step.state.plans[k], geom.groups,
                                    geom.channel_shuffle, in_features, ranges, minus)
    if step.spec.scale != 1.0:
        # a fresh tensor, scaled in place, in fp32 or wider
        gw = as_dtype(gw, grouped.sum_dtype(gw.dtype)).mul_(step.spec.scale)
    return gw


class Needs(NamedTuple):
    """Which gradients are wanted, by input (the Function reads them off
    ``ctx.needs_input_grad``, the compiled ops off their inputs' ``requires_grad``)."""

    x: bool
    w0: bool
    b0: bool
    weights: Tuple[bool, ...]
    biases: Tuple[bool, ...]

    @property
    def x_rows(self) -> bool:
        """Whether backward needs the layer input (for a weight gradient)."""
        return self.w0 or any(self.weights)


class Grads(NamedTuple):
    """The layer's gradients, ``None`` where not needed, in the compute dtype (the input's)
    or fp32 (sums), before the caller casts them to its inputs' dtypes."""

    x: Optional[torch.Tensor]
    w0: Optional[torch.Tensor]
    b0: Optional[torch.Tensor]
    weights: List[Optional[torch.Tensor]]
    biases: List[Optional[torch.Tensor]]


def gradients(step: _Step, g: torch.Tensor, w0: torch.Tensor, weights: Sequence[torch.Tensor],
              x_rows: Callable[[], object], needs: Needs) -> Grads:
    """Every gradient of the layer from the output gradient ``g`` (compute dtype, contiguous):
    :func:`input_grad`, :func:`bias_grads`, :func:`branch_weight_grad` and, for an unfrozen
    ``W0``, the dense ``g^T x``. ``x_rows()`` gives the layer input as ``(rows, in)`` or a
    :class:`~consolidator_hf.input_rebuild.RowFunction`; it is called only when a weight
    gradient needs it."""
    n = len(weights)
    g = _rows(g)  # once for every reader below (each reshape is a dispatch)
    grad_x = input_grad(step, g, w0) if needs.x else None
    grad_b0, grad_c = None, [None] * len(needs.biases)
    if needs.b0 or any(needs.biases):
        total, per_branch = bias_grads(step, g)
        grad_b0 = total if needs.b0 else None
        grad_c = [per_branch[k] if need else None for k, need in enumerate(needs.biases)]
    grad_w, grad_w0 = [None] * n, None
    if needs.x_rows:
        x = x_rows()
        grad_w = [branch_weight_grad(step, g, x, k, weights[k].shape, w0.shape[1])
                  if needs.weights[k] else None for k in range(n)]
        if needs.w0:
            grad_w0 = g.t() @ (x if isinstance(x, torch.Tensor) else x(0, g.shape[0]))
    return Grads(grad_x, grad_w0, grad_b0, grad_w, grad_c)


# Leading non-tensor inputs of _MergedBranchLinear.apply: spec, state, rebuild.
_N_META = 3


def _needs(ctx, n_branches: int) -> Needs:
    flags = ctx.needs_input_grad[_N_META:]
    return Needs(flags[0], flags[1], flags[2], tuple(flags[3:3 + n_branches]),
                  tuple(flags[3 + n_branches:3 + 2 * n_branches]))


class _MergedBranchLinear(torch.autograd.Function):
    """Autograd for the fast path; see the module docstring for the gradients."""

    @staticmethod
    def forward(ctx, spec: _Spec, state: UnionState, rebuild: Optional[InputRebuild],
                x: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor],
                *branch_params: Optional[torch.Tensor]):
        n = len(spec.geometries)
        weights, biases = branch_params[:n], branch_params[n:]
        dtype = compute_dtype(x)
        with autocast_off(x.device.type):
            xc = as_dtype(x, dtype).contiguous()
            y, step = forward_rows(spec, state, xc, w0, b0, weights, biases, dtype)
        needs = _needs(ctx, n)
        if not needs.x_rows and rebuild is not None:
            rebuild.release()
            rebuild = None
        # x itself is saved only when it is needed and cannot be rebuilt.
        saved_x = xc if needs.x_rows and rebuild is None else None
        ctx.save_for_backward(saved_x, w0, *weights,
                              *(rebuild.tensors if rebuild is not None else ()))
        ctx.step, ctx.rebuild = step, rebuild
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.grad_dtypes = (w0.dtype, b0.dtype if b0 is not None else None,
                           [w.dtype for w in weights],
                           [c.dtype if c is not None else None for c in biases])
        return y

    @staticmethod
    @once_differentiable  # backward's in-place patch has no derivative of its own
    def backward(ctx, grad_out):
        step = ctx.step
        n = len(step.spec.geometries)
        saved_x, w0, *rest = ctx.saved_tensors
        weights, rebuild_tensors = rest[:n], rest[n:]
        needs = _needs(ctx, n)
        w0_dtype, b0_dtype, weight_dtypes, bias_dtypes = ctx.grad_dtypes

        def x_rows():
            if ctx.rebuild is None:
                return _rows(as_dtype(saved_x, step.dtype))
            return ctx.rebuild.rows(rebuild_tensors, step.dtype)

        with autocast_off(grad_out.device.type):
            g = as_dtype(grad_out, step.dtype).contiguous()
            grads = gradients(step, g, w0, weights, x_rows, needs)
        grad_x = as_dtype(grads.x.view(ctx.x_shape), ctx.x_dtype) if grads.x is not None else None
        grad_w0 = as_dtype(grads.w0, w0_dtype) if grads.w0 is not None else None
        grad_b0 = as_dtype(grads.b0, b0_dtype) if grads.b0 is not None else None
        grad_weights = [as_dtype(t, weight_dtypes[k]) if t is not None else None
                        for k, t in enumerate(grads.weights)]
        grad_biases = [as_dtype(t, bias_dtypes[k]) if t is not None else None
                       for k, t in enumerate(grads.biases)]
        return (None,) * _N_META + (grad_x, grad_w0, grad_b0, *grad_weights, *grad_biases)


def fast_linear(x: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor],
                weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                geometries: Sequence[Geometry], keep: Optional[Sequence[Sequence[bool]]],
                drop_rate: float, cache: UnionCache) -> torch.Tensor:
    """``x W0^T + b0 + sum_k m_k (B_k P_k x + c_k)`` through one merged-weight GEMM (eager),
    for ``x`` of shape ``(..., in)``. ``keep[k][n]``: whether sample ``n`` kept branch ``k``,
    as host booleans (the layer drew the masks on the host); ``None``: every branch kept,
    unscaled (``m_k = 1``), else ``m_k = keep / (1 - drop_rate)``. ``cache`` holds the union of
    the supports of this ``W0``. Under ``torch.compile`` the layer calls
    :func:`consolidator_hf.compiled_path.compiled_linear` instead."""
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    batch, n = x.shape[0], len(geometries)
    if keep is not None and (len(keep) != n or any(len(f) != batch for f in keep)):
        raise ValueError(f"fast_linear: keep flags must be {n} host lists of {batch} booleans "
                         f"(one per branch, one flag per sample), got "
                         f"{[len(f) for f in keep]} lists' lengths")
    spec = make_spec(geometries, keep, batch, drop_rate)
    rebuild = None
    if torch.is_grad_enabled() and (w0.requires_grad or any(w.requires_grad for w in weights)):
        rebuild = InputRebuild.of(x)
    y = _MergedBranchLinear.apply(spec, cache.get(w0, spec.geometries), rebuild, x, w0, b0,
                                  *weights, *biases)
    return y.squeeze(0) if squeeze else y
