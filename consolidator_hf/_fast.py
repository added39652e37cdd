"""The fast training path of :class:`~consolidator_hf.layer.ConsolidatorLinear`.

The reference forward computes ``W0 x`` and then every branch ``B_k P_k x`` on its own (the
paper's grouped 1x1 convolutions). Here the branches are folded into the frozen weight
instead, so a layer costs one GEMM, like a plain ``nn.Linear``::

    y[rows of pattern P] = x W_P^T + b_P,   W_P = W0 + sum_{k in P} s D_k,   b_P = b0 + sum_{k in P} s c_k

where ``P`` is a per-sample keep pattern (which branches survive drop; all of them in eval or
with ``drop_rate=0``) and ``s = 1/(1-p)`` (1 without drop). Samples sharing a pattern share one
weight, so the drop semantics are exact.

``W_P`` differs from ``W0`` only on the union of the branches' supports (``out * in/g``
entries per branch), so it is never built as a new dense matrix: the support entries of ``W0``
are patched in place (merged in fp32, then cast), the GEMM runs, and the original entries are
written back bit for bit. Under autocast the weight is cast to the compute dtype anyway; the
patch then goes into that copy and ``W0`` is not touched. Backward repeats the patch for the
input gradient instead of keeping a dense weight per layer alive between forward and backward.

Gradients (``g`` the output gradient, ``m_k`` the per-sample mask):

* input: ``g W_P`` per pattern (the same GEMM a frozen ``nn.Linear`` pays);
* branch weight ``k``: :func:`grouped.grouped_weight_grad` on the rows that keep branch ``k``,
  times ``s``: a batched matmul over the groups, never a dense ``(out, in)`` gradient;
* base bias: ``sum_n g``; branch bias ``k``: ``sum_n m_k[n] g[n]``;
* ``W0`` (only if someone unfroze it): the dense ``g^T x``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import torch

from . import grouped

if TYPE_CHECKING:  # pragma: no cover
    from .layer import ConsolidatorLinear

Pattern = Tuple[Tuple[int, ...], List[Tuple[int, int]]]  # (kept branches, runs of samples)


def _runs(flags: List[bool]) -> List[Tuple[int, int]]:
    """``[start, stop)`` of every maximal run of ``True`` in ``flags``."""
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def keep_patterns(masks: Optional[torch.Tensor], n_branches: int, batch: int) -> List[Pattern]:
    """Partition the samples by which branches they keep.

    ``masks``: ``(batch, K)`` keep masks, or ``None`` (every sample keeps every branch).
    Returns ``(kept branch ids, runs)`` per distinct pattern, ``runs`` the ``[start, stop)``
    ranges of consecutive samples with that pattern: slicing runs needs no gather copy (on
    this CPU a gather of the activations costs more than a few smaller GEMMs).
    """
    if masks is None:
        return [(tuple(range(n_branches)), [(0, batch)])]
    keep = (masks > 0).tolist()
    codes = [sum(1 << k for k in range(n_branches) if row[k]) for row in keep]
    patterns = []
    for code in sorted(set(codes)):
        kept = tuple(k for k in range(n_branches) if code >> k & 1)
        patterns.append((kept, _runs([c == code for c in codes])))
    return patterns


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@contextmanager
def merged_weight(layer: "ConsolidatorLinear", kept: Sequence[int], scale: float,
                  dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """``W0 + sum_{k in kept} scale * D_k`` in ``dtype`` for the duration of a ``with`` block.

    The sum is formed in fp32 on the union of the supports only. When ``dtype`` is the base
    weight's dtype the base weight itself is patched and restored exactly on exit (no dense
    copy); otherwise the patch goes into the cast copy the GEMM needs anyway.
    """
    w0 = layer.base_layer.weight
    if not kept:
        yield w0 if w0.dtype == dtype else w0.to(dtype)
        return
    union, positions = layer._union_positions()
    # index_select/index_copy_, not x[idx]/x[idx] = v: on CPU those advanced-indexing
    # kernels are ~1000x slower on a large tensor.
    delta = torch.zeros(union.numel(), dtype=torch.float32, device=w0.device)
    for k in kept:
        delta.index_add_(0, positions[k], layer.branches[k].weight.detach().float().reshape(-1),
                         alpha=scale)
    with torch.no_grad():
        in_place = w0.dtype == dtype and w0.is_contiguous()
        target = w0 if in_place else w0.to(dtype=dtype, memory_format=torch.contiguous_format,
                                              copy=True)
        flat = target.view(-1)
        original = w0.detach().reshape(-1).index_select(0, union)
        flat.index_copy_(0, union, (original.float() + delta).to(dtype))
    try:
        yield target.detach()
    finally:
        if in_place:
            with torch.no_grad():
                flat.index_copy_(0, union, original)


def _merged_bias(layer: "ConsolidatorLinear", kept: Sequence[int], scale: float,
                 dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``b0 + sum_{k in kept} scale * c_k`` (fp32 sum, then cast), or ``None``."""
    b0 = layer.base_layer.bias
    terms = [layer.branches[k].bias for k in kept if layer.branches[k].bias is not None]
    if b0 is None and not terms:
        return None
    bias = b0.detach().float() if b0 is not None else torch.zeros(
        layer.out_features, dtype=torch.float32, device=layer.base_layer.weight.device)
    for c in terms:
        bias = bias + scale * c.detach().float()
    return bias.to(dtype)


def _rows(t: torch.Tensor, run: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Samples ``[start, stop)`` of ``t`` (all when ``None``) as ``(rows, features)``: a view."""
    if run is not None:
        t = t[run[0]:run[1]]
    return t.reshape(-1, t.shape[-1])


class _MergedBranchLinear(torch.autograd.Function):
    """Autograd for the fast path; see the module docstring for the gradients."""

    @staticmethod
    def forward(ctx, layer, masks, x, w0, b0, *branch_params):  # noqa: D401
        n_branches = len(layer.branches)
        scale = 1.0 / (1.0 - layer.drop_rate) if masks is not None else 1.0
        dtype = _compute_dtype(x)
        patterns = keep_patterns(masks, n_branches, x.shape[0])
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype).contiguous()
            y = xc.new_empty(*x.shape[:-1], layer.out_features)
            for kept, runs in patterns:
                bias = _merged_bias(layer, kept, scale, dtype)
                with merged_weight(layer, kept, scale, dtype) as w:
                    for run in runs:
                        # GEMM straight into the run's rows of y: no gather, no scatter.
                        x_rows, y_rows = _rows(xc, run), _rows(y, run)
                        if bias is not None:
                            torch.addmm(bias, x_rows, w.t(), out=y_rows)
                        else:
                            torch.mm(x_rows, w.t(), out=y_rows)
        weights = branch_params[:n_branches]
        need_x = any(ctx.needs_input_grad[5 + k] for k in range(n_branches)) or \
            ctx.needs_input_grad[3]
        # x is saved only when a weight gradient needs it; the rest is recomputed.
        ctx.save_for_backward(xc if need_x else None, masks)
        ctx.layer, ctx.scale, ctx.dtype, ctx.patterns = layer, scale, dtype, patterns
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.weight_dtypes = [w.dtype for w in weights]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        layer, scale, dtype = ctx.layer, ctx.scale, ctx.dtype
        xc, masks = ctx.saved_tensors
        n_branches = len(layer.branches)
        needs = ctx.needs_input_grad
        grad_x = grad_w0 = grad_b0 = None
        grad_weights: List[Optional[torch.Tensor]] = [None] * n_branches
        grad_biases: List[Optional[torch.Tensor]] = [None] * n_branches
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(dtype).contiguous()
            out_f = layer.out_features
            if needs[2]:
                grad_x = g.new_empty(ctx.x_shape)
                for kept, runs in ctx.patterns:
                    with merged_weight(layer, kept, scale, dtype) as w:
                        for run in runs:
                            torch.mm(_rows(g, run), w, out=_rows(grad_x, run))
                grad_x = grad_x.to(ctx.x_dtype)
            need_bias = needs[4] or any(needs[5 + n_branches + k] for k in range(n_branches))
            if need_bias:
                # Per-sample sums: the base bias sees every sample, a branch bias its kept ones.
                per_sample = g.reshape(g.shape[0], -1, out_f).sum(1, dtype=torch.float32)
                total = per_sample.sum(0)
                if needs[4]:
                    grad_b0 = total.to(layer.base_layer.bias.dtype)
                for k in range(n_branches):
                    if needs[5 + n_branches + k]:
                        c = total if masks is None else masks[:, k].float() @ per_sample
                        grad_biases[k] = c.to(layer.branches[k].bias.dtype)
            for k in range(n_branches):
                if not needs[5 + k]:
                    continue
                branch = layer.branches[k]
                runs = [(0, g.shape[0])] if masks is None else \
                    _runs((masks[:, k] > 0).tolist())
                gw = torch.zeros(branch.weight.shape, dtype=torch.float32, device=g.device)
                for run in runs:  # the samples that kept branch k
                    gw += grouped.grouped_weight_grad(
                        _rows(g, run), _rows(xc, run), branch.groups, branch.shuffle,
                        row_offset=branch.row_offset, virtual_out=branch.virtual_out,
                    ).float()
                if scale != 1.0:
                    gw = gw * scale
                grad_weights[k] = gw.to(ctx.weight_dtypes[k])
            if needs[3]:
                w0 = layer.base_layer.weight
                grad_w0 = (_rows(g, None).t() @ _rows(xc, None)).to(w0.dtype)
        return (None, None, grad_x, grad_w0, grad_b0, *grad_weights, *grad_biases)


def merged_branch_linear(layer: "ConsolidatorLinear", x: torch.Tensor,
                         masks: Optional[torch.Tensor]) -> torch.Tensor:
    """The fast forward of ``layer`` on ``x`` (``(..., in)``) with keep ``masks`` ``(batch, K)``."""
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    base = layer.base_layer
    params = [b.weight for b in layer.branches] + [b.bias for b in layer.branches]
    y = _MergedBranchLinear.apply(layer, masks, x, base.weight, base.bias, *params)
    return y.squeeze(0) if squeeze else y
