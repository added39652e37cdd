"""The Consolidator math, written once.

A frozen linear layer ``y = W0 x + b0`` (``W0``: out x in) gets K parallel branches.
Branch k has ``g_k`` groups, an optional channel shuffle ``P_k``, a block-diagonal
weight ``B_k`` and a bias ``c_k``::

    y = W0 x + b0 + sum_k m_k * (B_k P_k x + c_k)

Conventions used by every function here (DESIGN.md section 1):

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
  ``virtual_out`` rows (this is how one grouped qkv layer of ``3D x D`` is spread
  over separate q, k and v projections). Grouping is then defined on the virtual
  layer: row ``o`` of this layer is virtual row ``row_offset + o``, in group
  ``(row_offset + o) // (virtual_out/g)``. With ``row_offset=0`` and
  ``virtual_out=out`` this is the plain case above.
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

from typing import Optional, Sequence

import torch

__all__ = [
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
    "keep_mask",
]


def check_groups(
    in_features: int,
    out_features: int,
    groups: int,
    *,
    row_offset: int = 0,
    virtual_out: Optional[int] = None,
    name: str = "layer",
) -> None:
    """Raise ``ValueError`` naming the layer, its shape and the group if ``groups`` is unusable.

    A group count must divide ``in`` and the (virtual) ``out``; a row slice must lie inside
    its virtual layer.
    """
    vout = out_features if virtual_out is None else virtual_out
    shape = f"(out={out_features}, in={in_features})"
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{name} {shape}: group count must be a positive int, got {groups!r}")
    if in_features % groups:
        raise ValueError(
            f"{name} {shape}: groups={groups} does not divide in_features={in_features}"
        )
    if vout % groups:
        what = "out_features" if virtual_out is None else "virtual out_features"
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


def row_groups(
    out_features: int, groups: int, *, row_offset: int = 0, virtual_out: Optional[int] = None,
    device=None,
) -> torch.Tensor:
    """Group index of every row of the layer: ``(row_offset + o) // (virtual_out / g)``."""
    vout = out_features if virtual_out is None else virtual_out
    rows = torch.arange(row_offset, row_offset + out_features, device=device)
    return rows // (vout // groups)


def support_index(
    in_features: int,
    out_features: int,
    groups: int,
    shuffle: bool,
    *,
    row_offset: int = 0,
    virtual_out: Optional[int] = None,
    device=None,
) -> torch.Tensor:
    """Flat dense indices ``(out, s)`` of a branch's compact weight entries.

    ``idx[o, j] = o*in + col(o, j)`` with ``col = q*s + j`` (no shuffle) or
    ``col = perm[q*s + j]`` (shuffle), ``q`` the group of row ``o``.
    """
    s = in_features // groups
    q = row_groups(out_features, groups, row_offset=row_offset, virtual_out=virtual_out,
                   device=device)
    cols = q[:, None] * s + torch.arange(s, device=device)[None, :]
    if shuffle:
        cols = shuffle_permutation(in_features, groups, device=device)[cols]
    rows = torch.arange(out_features, device=device)[:, None] * in_features
    return rows + cols


def grouped_to_dense(
    weight: torch.Tensor, in_features: int, groups: int, shuffle: bool, *,
    row_offset: int = 0, virtual_out: Optional[int] = None,
) -> torch.Tensor:
    """The dense ``(out, in)`` matrix ``D`` of one branch's compact ``(out, s)`` weight."""
    out_features = weight.shape[0]
    idx = support_index(in_features, out_features, groups, shuffle, row_offset=row_offset,
                        virtual_out=virtual_out, device=weight.device)
    dense = weight.new_zeros(out_features * in_features)
    dense.index_put_((idx.reshape(-1),), weight.reshape(-1))
    return dense.view(out_features, in_features)


def dense_to_grouped(
    dense: torch.Tensor, groups: int, shuffle: bool, *,
    row_offset: int = 0, virtual_out: Optional[int] = None,
) -> torch.Tensor:
    """Inverse of :func:`grouped_to_dense` on the branch's support: the compact ``(out, s)``."""
    out_features, in_features = dense.shape
    idx = support_index(in_features, out_features, groups, shuffle, row_offset=row_offset,
                        virtual_out=virtual_out, device=dense.device)
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


def grouped_forward_reference(
    x: torch.Tensor, weight: torch.Tensor, groups: int, shuffle: bool, *,
    row_offset: int = 0, virtual_out: Optional[int] = None,
) -> torch.Tensor:
    """``B P x`` read literally off the formulas (the oracle, not the fast path).

    Shuffle the input, cut it into ``g`` slices of ``s``, and give row ``o`` the slice of
    its group: ``y[..., o] = sum_j weight[o, j] * x'[..., q(o)*s + j]``.
    """
    in_features = x.shape[-1]
    s = in_features // groups
    xs = channel_shuffle(x, groups) if shuffle else x
    slices = xs.unflatten(-1, (groups, s))  # (..., g, s)
    q = row_groups(weight.shape[0], groups, row_offset=row_offset, virtual_out=virtual_out,
                   device=x.device)
    per_row = slices[..., q, :]  # (..., out, s): the slice each output row reads
    return (per_row * weight).sum(-1)


_ROW_CHUNK = 256


def grouped_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, groups: int, shuffle: bool, *,
    row_offset: int = 0, virtual_out: Optional[int] = None,
) -> torch.Tensor:
    """Gradient of a branch's compact ``(out, s)`` weight from its block structure.

    For ``y = B P x`` over ``n`` rows, ``grad[o, j] = sum_n grad_out[n, o] * x'[n, q(o)*s + j]``:
    per group ``q`` this is ``grad_out[:, rows_q]^T @ x'[:, q*s:(q+1)*s]``, computed as one
    batched matmul over the groups the layer's rows touch. It equals the dense weight
    gradient ``grad_out^T @ x`` read on the support (:func:`dense_to_grouped`), without ever
    forming that ``(out, in)`` matrix. ``grad_out``: ``(n, out)``; ``x``: ``(n, in)``.
    """
    n, out_features = grad_out.shape
    in_features = x.shape[-1]
    s = in_features // groups
    vout = out_features if virtual_out is None else virtual_out
    rows_per_group = vout // groups
    # Groups covering rows [row_offset, row_offset + out) of the virtual layer; a slice that
    # starts or ends inside a group is padded with zero rows to whole groups.
    first = row_offset // rows_per_group
    last = (row_offset + out_features - 1) // rows_per_group + 1
    lead = row_offset - first * rows_per_group
    trail = last * rows_per_group - (row_offset + out_features)
    if lead or trail:
        grad_out = torch.nn.functional.pad(grad_out, (lead, trail))
    xs = channel_shuffle(x, groups) if shuffle else x
    n_groups = last - first
    # Batch c neighbouring groups per matmul and keep only the c diagonal blocks of each
    # (c*rows x c*s) product: c*min(rows, s) >= 16 floats makes every row read a whole cache
    # line instead of 2 floats of it (c times the FLOPs of the blocks, still far below a
    # dense weight gradient, and much faster than one tiny matmul per group on CPU).
    c = next((d for d in range(1, n_groups + 1)
              if n_groups % d == 0 and d * min(rows_per_group, s) >= 16), n_groups)
    batches = n_groups // c
    x_blocks = xs.reshape(n, groups * s)[:, first * s:last * s].reshape(n, batches, c * s)
    g_blocks = grad_out.reshape(n, batches, c * rows_per_group)
    g_blocks, x_blocks = g_blocks.permute(1, 2, 0), x_blocks.permute(1, 0, 2)
    # Sum over the rows in chunks that stay in cache while every group reads them (one
    # pass over all rows per group is bound by strided memory traffic instead).
    full = torch.bmm(g_blocks[:, :, :_ROW_CHUNK], x_blocks[:, :_ROW_CHUNK])  # (b, c*rows, c*s)
    for start in range(_ROW_CHUNK, n, _ROW_CHUNK):
        full.baddbmm_(g_blocks[:, :, start:start + _ROW_CHUNK], x_blocks[:, start:start + _ROW_CHUNK])
    blocks = full.view(batches, c, rows_per_group, c, s).diagonal(dim1=1, dim2=3)  # (b,rows,s,c)
    blocks = blocks.permute(0, 3, 1, 2)  # (b, c, rows, s): group first + b*c + i
    return blocks.reshape(-1, s)[lead:lead + out_features]
