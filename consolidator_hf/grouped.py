"""The Consolidator math, written once.

A frozen linear layer ``y = W0 x + b0`` (``W0``: out x in) gets K parallel branches.
Branch k has ``g_k`` groups, an optional channel shuffle ``P_k``, a block-diagonal
weight ``B_k`` and a bias ``c_k``::

    y = W0 x + b0 + sum_k m_k * (B_k P_k x + c_k)

Conventions used by every function here (docs/DESIGN.md section 1):

* **Grouping.** A branch with ``g`` groups over a layer of ``in`` inputs and ``out``
  outputs has blocks of ``out/g`` rows and ``s = in/g`` columns. Output row ``o``
  belongs to group ``q = o // (out/g)``; group ``q`` reads the input slice
  ``[q*s, (q+1)*s)`` of the (shuffled) input. The branch weight is stored compactly
  as a matrix of shape ``(out, s)``: ``weight[o, j]`` multiplies shuffled input
  ``q*s + j``.
* **Channel shuffle** (on the input, with the branch's ``g``):
  ``x'[j*g + i] = x[i*s + j]`` for ``i < g``, ``j < s``; in torch
  ``x.view(..., g, s).transpose(-1, -2).reshape(..., in)``. The dense matrix of a
  shuffled branch is ``D[:, i*s + j] = B[:, j*g + i]``.
* **Row slices of a virtual layer.** A layer may own only the rows
  ``[row_offset, row_offset + out)`` of a larger *virtual* layer of
  ``virtual_out_features`` rows (this is how one grouped qkv layer of ``3D x D`` is spread
  over separate q, k and v projections). Grouping is then defined on the virtual
  layer: row ``o`` of this layer is virtual row ``row_offset + o``, in group
  ``(row_offset + o) // (virtual_out_features/g)``. With ``row_offset=0`` and
  ``virtual_out_features=out`` this is the plain case above.
* **Drop.** In training each sample keeps branch k with probability ``1 - p``
  (independently per branch) and a kept branch is scaled by ``1/(1 - p)``.
* **Merge.** ``W = W0 + sum_k D_k``, ``b = b0 + sum_k c_k``.
* **Storage consolidation.** The K branches collapse into one delta
  ``D = sum_k D_k`` stored only on the union of the branches' supports.

Everything reduces to one primitive, :func:`support_index`: the flat index into the
dense ``(out, in)`` matrix of every entry of a branch's compact ``(out, s)`` weight.
It is a bijection between a branch's parameters and its support.
"""

from __future__ import annotations

import functools
import warnings
from functools import lru_cache
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "Geometry",
    "merged_linear",
    "sum_dtype",
    "check_groups",
    "shuffle_permutation",
    "channel_shuffle",
    "row_groups",
    "support_index",
    "grouped_to_dense",
    "dense_to_grouped",
    "union_support",
    "split_union",
    "grouped_forward_reference",
    "grouped_weight_grad",
    "grouped_forward_blocks",
    "grouped_input_grad",
    "block_plan",
    "BlockPlan",
    "forward_blocks",
    "input_grad_blocks",
    "weight_grad_blocks",
    "keep_mask",
    "keep_masks",
    "keep_draw",
    "block_diagonal",
]


class Geometry(NamedTuple):
    """Where a branch sits: its group count, whether it shuffles its input, and the rows
    ``[row_offset, row_offset + out)`` it owns of a ``virtual_out_features``-row virtual layer
    (``None``: the layer itself). The field names are the keyword names of every function
    here, so ``f(..., **geometry._asdict())`` passes them all."""

    groups: int
    channel_shuffle: bool = False
    row_offset: int = 0
    virtual_out_features: Optional[int] = None


def _accepts_virtual_out(fn):
    """Accept the pre-0.x keyword ``virtual_out=`` for ``virtual_out_features=`` (deprecated)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "virtual_out" in kwargs:
            warnings.warn(f"grouped.{fn.__name__}: 'virtual_out' is deprecated, use "
                          "'virtual_out_features'", DeprecationWarning, stacklevel=2)
            kwargs["virtual_out_features"] = kwargs.pop("virtual_out")
        return fn(*args, **kwargs)

    return wrapper


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the sums here run: fp32, or float64 for float64 weights (what
    ``torch.promote_types(dtype, torch.float32)`` gives for the float dtypes, without its
    dispatch: the fast path asks on every step)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merged_linear(
    w0: torch.Tensor, b0: Optional[torch.Tensor], weight_deltas: Sequence[torch.Tensor],
    bias_deltas: Sequence[Optional[torch.Tensor]], *, scale: float = 1.0,
    positions: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The merge formula, the one place it is written: ``(W0 + scale * sum_k D_k,
    b0 + scale * sum_k c_k)``, summed in fp32 (or in ``W0``'s dtype when that is wider, so
    float64 stays exact) and returned in that dtype (callers cast once, so a low-precision
    model merges without drift).

    ``w0`` and every ``D_k`` have one shape (dense ``(out, in)`` matrices, or ``W0`` read on
    a support); ``positions[k]``, when given and not ``None``, says ``D_k`` holds only the
    entries at those flat indices of ``w0`` (the fast path patches ``W0`` on the union of the
    supports this way). ``b0`` may be ``None``; the bias is ``None`` only when ``b0`` is
    ``None`` and no branch has a bias.
    """
    acc = sum_dtype(w0.dtype)
    # (``.to`` only where the dtype differs: the fast path calls this on every step, and a
    # no-op cast still costs a dispatch)
    w = w0 if w0.dtype == acc else w0.to(acc)
    for k, d in enumerate(weight_deltas):
        pos = positions[k] if positions is not None else None
        d = d if d.dtype == acc else d.to(acc)
        if pos is None:
            w = torch.add(w, d if d.shape == w.shape else d.reshape(w.shape), alpha=scale)
        else:
            w = w.reshape(-1).index_add(0, pos, d.reshape(-1), alpha=scale).view(w.shape)
    biases = [c for c in bias_deltas if c is not None]
    if b0 is None and not biases:
        return w, None
    if b0 is not None:
        b = b0 if b0.dtype == acc else b0.to(acc)
    else:
        b = torch.zeros(w0.shape[0] if w0.dim() == 2 else biases[0].shape[0], dtype=acc,
                        device=w0.device)
    for c in biases:
        b = torch.add(b, c if c.dtype == acc else c.to(acc), alpha=scale)
    return w, b


@_accepts_virtual_out
def check_groups(
    in_features: int,
    out_features: int,
    groups: int,
    *,
    row_offset: int = 0,
    virtual_out_features: Optional[int] = None,
    name: str = "layer",
) -> None:
    """Raise ``ValueError`` naming the layer, its shape and the group if ``groups`` is unusable.

    A group count must divide ``in`` and the (virtual) ``out``; a row slice must lie inside
    its virtual layer.
    """
    vout = out_features if virtual_out_features is None else virtual_out_features
    shape = f"(out={out_features}, in={in_features})"
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{name} {shape}: group count must be a positive int, got {groups!r}")
    if in_features % groups:
        raise ValueError(
            f"{name} {shape}: groups={groups} does not divide in_features={in_features}"
        )
    if vout % groups:
        what = "out_features" if virtual_out_features is None else "virtual out_features"
        raise ValueError(f"{name} {shape}: groups={groups} does not divide {what}={vout}")
    if row_offset < 0 or row_offset + out_features > vout:
        raise ValueError(
            f"{name} {shape}: rows [{row_offset}, {row_offset + out_features}) fall outside "
            f"the virtual layer of {vout} rows"
        )


def shuffle_permutation(in_features: int, groups: int, device=None) -> torch.Tensor:
    """``perm`` with ``x' = x[..., perm]``: ``perm[j*g + i] = i*s + j`` (``s = in/g``)."""
    s = in_features // groups
    return torch.arange(in_features, device=device).view(groups, s).t().reshape(-1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x'[..., j*g + i] = x[..., i*s + j]``: view as (g, s), transpose, flatten."""
    n = x.shape[-1]
    return x.unflatten(-1, (groups, n // groups)).transpose(-1, -2).reshape(x.shape)


# Functions below take a ``channel_shuffle`` flag, which shadows the function inside them.
_shuffle_channels = channel_shuffle


@_accepts_virtual_out
def row_groups(
    out_features: int, groups: int, *, row_offset: int = 0, virtual_out_features: Optional[int] = None,
    device=None,
) -> torch.Tensor:
    """Group index of every row of the layer: ``(row_offset + o) // (virtual_out_features / g)``."""
    vout = out_features if virtual_out_features is None else virtual_out_features
    rows = torch.arange(row_offset, row_offset + out_features, device=device)
    return rows // (vout // groups)


@_accepts_virtual_out
def support_index(
    in_features: int,
    out_features: int,
    groups: int,
    channel_shuffle: bool,
    *,
    row_offset: int = 0,
    virtual_out_features: Optional[int] = None,
    device=None,
) -> torch.Tensor:
    """Flat dense indices ``(out, s)`` of a branch's compact weight entries.

    ``idx[o, j] = o*in + col(o, j)`` with ``col = q*s + j`` (no shuffle) or
    ``col = perm[q*s + j]`` (shuffle), ``q`` the group of row ``o``.
    """
    s = in_features // groups
    q = row_groups(out_features, groups, row_offset=row_offset, virtual_out_features=virtual_out_features,
                   device=device)
    cols = q[:, None] * s + torch.arange(s, device=device)[None, :]
    if channel_shuffle:
        cols = shuffle_permutation(in_features, groups, device=device)[cols]
    rows = torch.arange(out_features, device=device)[:, None] * in_features
    return rows + cols


@_accepts_virtual_out
def grouped_to_dense(
    weight: torch.Tensor, in_features: int, groups: int, channel_shuffle: bool, *,
    row_offset: int = 0, virtual_out_features: Optional[int] = None,
) -> torch.Tensor:
    """The dense ``(out, in)`` matrix ``D`` of one branch's compact ``(out, s)`` weight."""
    out_features = weight.shape[0]
    idx = support_index(in_features, out_features, groups, channel_shuffle, row_offset=row_offset,
                        virtual_out_features=virtual_out_features, device=weight.device)
    dense = weight.new_zeros(out_features * in_features)
    dense.index_put_((idx.reshape(-1),), weight.reshape(-1))
    return dense.view(out_features, in_features)


@_accepts_virtual_out
def dense_to_grouped(
    dense: torch.Tensor, groups: int, channel_shuffle: bool, *,
    row_offset: int = 0, virtual_out_features: Optional[int] = None,
) -> torch.Tensor:
    """Inverse of :func:`grouped_to_dense` on the branch's support: the compact ``(out, s)``."""
    out_features, in_features = dense.shape
    idx = support_index(in_features, out_features, groups, channel_shuffle, row_offset=row_offset,
                        virtual_out_features=virtual_out_features, device=dense.device)
    return dense.reshape(-1)[idx]


def union_support(indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sorted flat indices of the union of several branches' supports (stage-1 storage)."""
    return torch.unique(torch.cat([i.reshape(-1) for i in indices]), sorted=True)


def split_union(
    values: torch.Tensor, union: torch.Tensor, indices: Sequence[torch.Tensor], numel: int
) -> list:
    """Exact inverse of consolidation: compact branch weights summing to the stored delta.

    ``values`` are the delta on the sorted flat ``union`` of a dense matrix of ``numel``
    entries. Each position goes to the first branch whose support holds it; later
    branches hold zero there. A branch's entries map one-to-one onto its support, so
    ``sum_k D_k`` equals the stored delta exactly, and every branch stays trainable.
    """
    dense = values.new_zeros(numel)
    dense[union] = values
    taken = torch.zeros(numel, dtype=torch.bool, device=values.device)
    out = []
    for idx in indices:
        flat = idx.reshape(-1)
        out.append(torch.where(taken[flat], 0.0, dense[flat]).to(values.dtype).view(idx.shape))
        taken[flat] = True
    return out


def keep_mask(
    batch: int, drop_rate: float, *, device=None, dtype=torch.float32,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-sample branch mask ``m``: ``1/(1-p)`` with probability ``1-p``, else 0. Shape ``(batch,)``."""
    keep = torch.rand(batch, device=device, generator=generator) >= drop_rate
    return keep.to(dtype) / (1.0 - drop_rate)


def keep_masks(batch: int, branches: int, drop_rate: float, *, device=None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``branches`` per-sample masks at once, ``(batch, branches)`` fp32 on ``device`` (default
    the CPU): column ``k`` holds the numbers of the ``k``-th of as many consecutive
    :func:`keep_mask` draws on that device."""
    keep = keep_draw(batch, branches, drop_rate, device=device, generator=generator)
    return keep.t().to(torch.float32) / (1.0 - drop_rate)


def keep_draw(batch: int, branches: int, drop_rate: float, *, device=None,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The draw behind :func:`keep_masks`: ``(branches, batch)`` booleans, row ``k`` whether
    each sample keeps branch ``k`` (what the eager fast path reads as host flags)."""
    # generator=None is not passed on: that overload of rand rejects a symbolic batch size
    # (torch.compile with dynamic shapes, e.g. a smaller last batch).
    shape = (branches, batch)
    return (torch.rand(shape, device=device) if generator is None else
            torch.rand(shape, device=device, generator=generator)) >= drop_rate


@_accepts_virtual_out
def grouped_forward_reference(
    x: torch.Tensor, weight: torch.Tensor, groups: int, channel_shuffle: bool, *,
    row_offset: int = 0, virtual_out_features: Optional[int] = None,
) -> torch.Tensor:
    """``B P x`` read literally off the formulas (the oracle, not the fast path).

    Shuffle the input, cut it into ``g`` slices of ``s``, and give row ``o`` the slice of
    its group: ``y[..., o] = sum_j weight[o, j] * x'[..., q(o)*s + j]``.
    """
    in_features = x.shape[-1]
    s = in_features // groups
    xs = _shuffle_channels(x, groups) if channel_shuffle else x
    slices = xs.unflatten(-1, (groups, s))  # (..., g, s)
    q = row_groups(weight.shape[0], groups, row_offset=row_offset, virtual_out_features=virtual_out_features,
                   device=x.device)
    per_row = slices[..., q, :]  # (..., out, s): the slice each output row reads
    return (per_row * weight).sum(-1)


#: Input columns one batched block product reads per row at least (:func:`block_plan`).
BLOCK_COLUMNS = 16


class BlockPlan(NamedTuple):
    """How a branch's groups are batched for the block-structured (fast-path) products.

    ``c`` neighbouring groups go in one matmul of ``(c*rows) x (c*s)`` whose ``c`` diagonal
    blocks are the groups' ``rows x s`` blocks; ``batches * c`` groups cover rows
    ``[row_offset, row_offset + out)`` of the virtual layer (``first``..``last``), padded with
    ``lead``/``trail`` zero rows when the slice starts or ends inside a group.
    """

    s: int
    rows: int
    first: int
    last: int
    lead: int
    trail: int
    c: int
    batches: int


@_accepts_virtual_out
@lru_cache(maxsize=None)  # a few shapes per model, asked for on every forward and backward
def block_plan(in_features: int, out_features: int, groups: int, *, row_offset: int = 0,
               virtual_out_features: Optional[int] = None) -> BlockPlan:
    """The :class:`BlockPlan` of a branch with ``groups`` groups over rows
    ``[row_offset, row_offset + out_features)`` of a ``virtual_out_features``-row layer."""
    vout = out_features if virtual_out_features is None else virtual_out_features
    rows, s = vout // groups, in_features // groups
    first = row_offset // rows
    last = (row_offset + out_features - 1) // rows + 1
    lead = row_offset - first * rows
    trail = last * rows - (row_offset + out_features)
    n_groups = last - first
    # The smallest c with c*s >= BLOCK_COLUMNS: each row of a batch then reads a whole 64-byte
    # line of the input (16 fp32, one AVX-512 register) and the matmuls' narrow side is that
    # wide (c times the FLOPs of the blocks, still far below a dense product). Measured against
    # every divisor c on the ViT-B/16 shapes at groups 48-384 (docs/block_plan/divisors.py,
    # README "Block batching"): the fastest c for all 12, the weight gradient up to 4.6x
    # faster than with the previous rule c*min(rows, s) >= 8 (q/k/v/o at groups 384).
    c = next((d for d in range(1, n_groups + 1)
              if n_groups % d == 0 and d * s >= BLOCK_COLUMNS), n_groups)
    return BlockPlan(s, rows, first, last, lead, trail, c, n_groups // c)


def _input_blocks(x: torch.Tensor, groups: int, channel_shuffle: bool, plan: BlockPlan
                  ) -> torch.Tensor:
    """``(batches, n, c*s)`` view of the (shuffled) input slices the plan's groups read."""
    n, s = x.shape[0], plan.s
    xs = _shuffle_channels(x, groups) if channel_shuffle else x
    if plan.first != 0 or plan.last != groups:
        xs = xs[:, plan.first * s:plan.last * s]
    return xs.reshape(n, plan.batches, plan.c * s).transpose(0, 1)


def block_diagonal(weight: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``(batches, c*s, c*rows)``: each batch's c blocks ``B_q^T`` on the diagonal, zeros off it."""
    b, c, r, s = plan.batches, plan.c, plan.rows, plan.s
    w = torch.nn.functional.pad(weight, (0, 0, plan.lead, plan.trail)) if plan.lead or plan.trail \
        else weight
    blocks = weight.new_zeros(b, c, s, c, r)
    blocks.diagonal(dim1=1, dim2=3).copy_(w.reshape(b, c, r, s).permute(0, 3, 2, 1))
    return blocks.view(b, c * s, c * r)


@_accepts_virtual_out
def grouped_forward_blocks(
    x: torch.Tensor, weight: torch.Tensor, groups: int, channel_shuffle: bool, *,
    row_offset: int = 0, virtual_out_features: Optional[int] = None,
) -> torch.Tensor:
    """``B P x`` for ``x`` of shape ``(n, in)``, as batched block-diagonal matmuls.

    The same numbers as :func:`grouped_forward_reference` (the oracle), at the cost of a few
    small matmuls: the fast path uses it on the few rows whose sample dropped the branch.
    """
    plan = block_plan(x.shape[-1], weight.shape[0], groups, row_offset=row_offset,
                      virtual_out_features=virtual_out_features)
    return forward_blocks(x, block_diagonal(weight, plan), weight.shape[0], plan, groups,
                          channel_shuffle)


def forward_blocks(x: torch.Tensor, diagonal: torch.Tensor, out_features: int, plan: BlockPlan,
                   groups: int, channel_shuffle: bool) -> torch.Tensor:
    """:func:`grouped_forward_blocks` with its :class:`BlockPlan` and the weight's
    :func:`block_diagonal` given (the fast path forms them once for a forward and its
    backward instead of on every call)."""
    n = x.shape[0]
    y = torch.bmm(_input_blocks(x, groups, channel_shuffle, plan), diagonal)
    y = y.transpose(0, 1).reshape(n, -1)
    return y[:, plan.lead:plan.lead + out_features] if y.shape[1] != out_features else y


@_accepts_virtual_out
def grouped_input_grad(
    grad_out: torch.Tensor, weight: torch.Tensor, in_features: int, groups: int,
    channel_shuffle: bool,
    *, row_offset: int = 0, virtual_out_features: Optional[int] = None,
) -> torch.Tensor:
    """``(B P)^T grad_out = P^T B^T grad_out``: the input gradient of ``B P x``, ``(n, in)``.

    ``grad[:, q*s + j] (shuffled) = sum_{o in group q} grad_out[:, o] * weight[o, j]``, then the
    shuffle is undone (shuffling with ``s`` groups inverts shuffling with ``g``).
    """
    plan = block_plan(in_features, weight.shape[0], groups, row_offset=row_offset,
                      virtual_out_features=virtual_out_features)
    return input_grad_blocks(grad_out, block_diagonal(weight, plan), in_features, plan,
                             channel_shuffle)


def input_grad_blocks(grad_out: torch.Tensor, diagonal: torch.Tensor, in_features: int,
                      plan: BlockPlan, channel_shuffle: bool) -> torch.Tensor:
    """:func:`grouped_input_grad` with its :class:`BlockPlan` and the weight's
    :func:`block_diagonal` given."""
    n, s = grad_out.shape[0], plan.s
    g = grad_out
    if plan.lead or plan.trail:
        g = torch.nn.functional.pad(g, (plan.lead, plan.trail))
    g_blocks = g.reshape(n, plan.batches, plan.c * plan.rows).transpose(0, 1)
    part = torch.bmm(g_blocks, diagonal.transpose(1, 2))  # (b, n, c*s)
    part = part.transpose(0, 1).reshape(n, -1)
    if plan.first != 0 or plan.last * s != in_features:
        full = grad_out.new_zeros(n, in_features)
        full[:, plan.first * s:plan.last * s] = part
        part = full
    return _shuffle_channels(part, s) if channel_shuffle else part


# Rows per step of the weight-gradient sum: about 4 MiB of grad_out and x rows together, so a
# step stays in cache while every group reads it (one pass over all rows per group is bound by
# strided memory traffic instead), and a rebuilt input never exists whole.
_CHUNK_BYTES = 4 << 20

RowSource = Union[torch.Tensor, Callable[[int, int], torch.Tensor]]


@_accepts_virtual_out
def grouped_weight_grad(
    grad_out: torch.Tensor, x: RowSource, groups: int, channel_shuffle: bool, *,
    row_offset: int = 0, virtual_out_features: Optional[int] = None,
    row_ranges: Optional[Sequence[Tuple[int, int]]] = None, in_features: Optional[int] = None,
) -> torch.Tensor:
    """Gradient of a branch's compact ``(out, s)`` weight from its block structure.

    For ``y = B P x`` over ``n`` rows, ``grad[o, j] = sum_n grad_out[n, o] * x'[n, q(o)*s + j]``:
    per group ``q`` this is ``grad_out[:, rows_q]^T @ x'[:, q*s:(q+1)*s]``, computed as
    batched matmuls over the groups the layer's rows touch (:class:`BlockPlan`), keeping the
    diagonal blocks. It equals the dense weight gradient ``grad_out^T @ x`` read on the
    support (:func:`dense_to_grouped`), without ever forming that ``(out, in)`` matrix.

    ``grad_out``: ``(n, out)``. ``x``: ``(n, in)``, or a function returning its rows
    ``[start, stop)`` (then ``in_features`` is required; a caller that rebuilds ``x`` never
    holds all of it). ``row_ranges``: the ``[start, stop)`` row ranges the sum runs over
    (default: all ``n`` rows; a drop mask leaves out the samples that dropped the branch).
    """
    n, out_features = grad_out.shape
    if isinstance(x, torch.Tensor):
        in_features = x.shape[-1]
    elif in_features is None:
        raise ValueError("grouped_weight_grad: in_features is required when x is a function")
    plan = block_plan(in_features, out_features, groups, row_offset=row_offset,
                      virtual_out_features=virtual_out_features)
    return weight_grad_blocks(grad_out, x, plan, groups, channel_shuffle, in_features,
                              row_ranges)


def weight_grad_blocks(grad_out: torch.Tensor, x: RowSource, plan: BlockPlan, groups: int,
                       channel_shuffle: bool, in_features: int,
                       row_ranges: Optional[Sequence[Tuple[int, int]]] = None,
                       minus: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """:func:`grouped_weight_grad` with its :class:`BlockPlan` given. ``minus``: ``(grad_out
    rows, x rows)`` of rows whose products are taken out of the sum again (``grad`` over the
    row ranges minus ``grad`` over those rows: the kept samples' sum as all rows minus the
    dropped ones, two passes however the kept samples are spread)."""
    n, out_features = grad_out.shape
    if isinstance(x, torch.Tensor):
        tensor = x
        x = lambda a, b: tensor if (a, b) == (0, n) else tensor[a:b]  # noqa: E731
    b, c, r, s = plan.batches, plan.c, plan.rows, plan.s

    def blocks_of(gs: torch.Tensor, xs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if plan.lead or plan.trail:
            gs = torch.nn.functional.pad(gs, (plan.lead, plan.trail))
        return (gs.reshape(gs.shape[0], b, c * r).permute(1, 2, 0),
                _input_blocks(xs, groups, channel_shuffle, plan))

    chunk = max(1, _CHUNK_BYTES // (grad_out.element_size() * (in_features + out_features)))
    full = None
    for start, stop in ([(0, n)] if row_ranges is None else row_ranges):
        for a in range(start, stop, chunk):
            e = min(a + chunk, stop)
            g_blocks, x_blocks = blocks_of(grad_out if (a, e) == (0, n) else grad_out[a:e],
                                           x(a, e))
            if full is None:
                full = torch.bmm(g_blocks, x_blocks)
            else:
                full.baddbmm_(g_blocks, x_blocks)
    if minus is not None and minus[0].shape[0]:
        g_blocks, x_blocks = blocks_of(*minus)
        if full is None:
            full = torch.bmm(g_blocks, x_blocks).neg_()
        else:
            full.baddbmm_(g_blocks, x_blocks, alpha=-1)
    if full is None:  # no rows
        full = grad_out.new_zeros(b, c * r, c * s)
    blocks = full.view(b, c, r, c, s).diagonal(dim1=1, dim2=3)  # (b, rows, s, c)
    blocks = blocks.permute(0, 3, 1, 2)  # (b, c, rows, s): group first + b*c + i
    blocks = blocks.reshape(-1, s)
    return blocks[plan.lead:plan.lead + out_features] if blocks.shape[0] != out_features \
        else blocks
