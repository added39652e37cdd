"""The fast training path of :class:`~consolidator_hf.layer.ConsolidatorLinear`.

The reference forward computes ``W0 x`` and then every branch ``B_k P_k x`` on its own (the
paper's grouped 1x1 convolutions). Here the branches are folded into the frozen weight
instead, so a layer costs one GEMM, like a plain ``nn.Linear``::

    y = x W^T + b,   W = W0 + s sum_k D_k,   b = b0 + s sum_k c_k

with ``s = 1/(1-p)`` in training with drop (1 otherwise). A sample that dropped branch ``k``
then has that branch taken back out of its rows, ``y[rows] -= s (B_k P_k x[rows] + c_k)``,
through the block structure (:func:`grouped.grouped_forward_blocks`: a few small matmuls on
those rows only), so the drop semantics hold per sample and per branch (a dropped row is
``x W^T - s B_k P_k x`` rather than ``x W0^T``: equal up to fp32 rounding) and the big GEMM is
never split.

``W`` differs from ``W0`` only on the union of the branches' supports (``out * in/g``
entries per branch), so it is never built as a new dense matrix: the values ``W`` takes
there are formed in fp32 (then cast), written into ``W0`` in place, the GEMM runs, and the
original entries are written back bit for bit. Under autocast the weight is cast to the
compute dtype anyway; the patch then goes into that copy and ``W0`` is not touched. The patched
values (a vector of ``out * in/g`` numbers) are kept for backward, which patches again for
the input gradient instead of keeping a dense weight per layer alive.

Gradients (``g`` the output gradient, ``m_k`` the per-sample mask, ``1/(1-p)`` or 0):

* input: ``g W`` (the same GEMM a frozen ``nn.Linear`` pays), minus
  ``s (B_k P_k)^T g[rows]`` on the rows that dropped branch ``k``
  (:func:`grouped.grouped_input_grad`);
* branch weight ``k``: :func:`grouped.grouped_weight_grad` over the rows that kept branch
  ``k``, times ``s``: batched matmuls over the groups, never a dense ``(out, in)`` gradient;
* base bias: ``sum_n g``; branch bias ``k``: ``sum_n m_k[n] g[n]``;
* ``W0`` (only if someone unfroze it): the dense ``g^T x``.

The branch-weight gradient needs the layer input ``x``, which a frozen ``nn.Linear`` never
keeps. When ``x`` is the direct output of a LayerNorm or a GELU (q/k/v and fc1 read a
LayerNorm, fc2 reads the GELU: most of a ViT's adapted inputs), that op has already saved what
rebuilds ``x`` exactly, so :class:`InputRebuild` keeps references to those tensors (no new
memory) and rebuilds ``x`` in backward. Other inputs are saved as they are (the attention
output that o_proj reads is a view of a tensor the attention kernel saved anyway).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import grouped

if TYPE_CHECKING:  # pragma: no cover
    from .layer import ConsolidatorLinear, UnionState

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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _autocast_off(device_type: str):
    """Autocast disabled for a block (the fast path picks its dtypes itself); entering the
    context costs more than the small ops it would wrap, so it is skipped when already off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


# ------------------------------------------------------------------ rebuilding the input
class InputRebuild:
    """Rebuilds a layer input in backward from what the op that produced it saved anyway.

    Supported producers: LayerNorm (``x = (u - mean) * rstd * w + b`` from the saved ``u``,
    ``mean``, ``rstd``, ``w``, ``b``) and GELU (``x = gelu(u)`` from the saved ``u``). The
    references it holds share storage with the producer's saved tensors, so keeping them costs
    nothing; each reader also saves them with ``save_for_backward``, so an in-place change
    between forward and backward raises autograd's usual error.

    A tensor read by one layer (fc1, fc2) is rebuilt a chunk of rows at a time inside the
    weight-gradient sum, so it never exists whole again. A tensor read by several layers
    (q, k, v) is rebuilt whole once, kept from the first reader's backward until the last
    reader's, and shared.
    """

    _ATTR = "_consolidator_rebuild"
    _warned = False  # the missing-attributes warning is given once per process

    def __init__(self, kind: str, tensors: Tuple[Optional[torch.Tensor], ...],
                 approximate: str, dtype: torch.dtype) -> None:
        self.kind, self.tensors, self.approximate, self.dtype = kind, tensors, approximate, dtype
        self.readers = 0  # forwards that registered and whose backward has not run yet
        self._shared: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, x: torch.Tensor) -> Optional["InputRebuild"]:
        """How to rebuild ``x`` (one more reader registered), or ``None`` when ``x`` has to be
        saved: it is a view, was changed in place since, or its producer is not a known op."""
        node = x.grad_fn
        if node is None or x._is_view() or x.output_nr != 0:
            return None
        rebuild = getattr(x, cls._ATTR, None)
        if rebuild is None:
            rebuild = cls._from_node(node, x)
            if rebuild is None:
                return None
            setattr(x, cls._ATTR, rebuild)
        rebuild.readers += 1
        return rebuild

    @classmethod
    def _from_node(cls, node, x: torch.Tensor) -> Optional["InputRebuild"]:
        name = type(node).__name__
        try:
            if name == "NativeLayerNormBackward0":
                tensors = (node._saved_input, node._saved_result1, node._saved_result2,
                           node._saved_weight, node._saved_bias)
                kind, approximate = "layer_norm", ""
            elif name == "GeluBackward0":
                tensors, kind, approximate = (node._saved_self,), "gelu", node._saved_approximate
            else:
                return None
        except (AttributeError, RuntimeError):  # another torch build's node layout
            if not cls._warned:
                cls._warned = True
                warnings.warn(
                    f"consolidator_hf: this torch ({torch.__version__}) does not expose what "
                    f"{name} saved, so the fast path keeps adapted layers' inputs for backward "
                    "instead of rebuilding them (same results, more activation memory)",
                    RuntimeWarning, stacklevel=2)
            return None
        if tensors[0].shape != x.shape:
            return None
        return cls(kind, tensors, approximate, x.dtype)

    def _row_function(self, tensors: Sequence[Optional[torch.Tensor]]
                      ) -> Callable[[int, int], torch.Tensor]:
        if self.kind == "gelu":
            u = _rows(tensors[0])
            return lambda a, b: F.gelu(u[a:b], approximate=self.approximate)
        u, mean, rstd, weight, bias = tensors
        u, mean, rstd = _rows(u), mean.reshape(-1, 1), rstd.reshape(-1, 1)
        shift = -mean * rstd  # (u - mean) * rstd = u * rstd + shift: one pass over u

        def layer_norm_rows(a: int, b: int) -> torch.Tensor:
            # mean/rstd are fp32 for low-precision inputs: compute there and round once, as
            # the LayerNorm kernel does.
            x = torch.addcmul(shift[a:b], u[a:b].to(rstd.dtype), rstd[a:b])
            if weight is not None and bias is not None:
                return torch.addcmul(bias, x, weight, out=x)
            if weight is not None:
                return x.mul_(weight)
            return x.add_(bias) if bias is not None else x

        return layer_norm_rows

    def rows(self, tensors: Sequence[Optional[torch.Tensor]], dtype: torch.dtype
             ) -> Callable[[int, int], torch.Tensor]:
        """``(start, stop) -> rows of x`` in ``dtype`` for one reader's backward, built from
        ``tensors`` (this object's tensors as the reader's ``ctx.saved_tensors`` unpacked them)."""
        fn = self._row_function(tensors)
        out_dtype = self.dtype
        shared = self.readers > 1 or self._shared is not None
        self.readers -= 1
        if not shared:
            return lambda a, b: fn(a, b).to(out_dtype).to(dtype)
        x = self._shared
        if x is None:
            x = fn(0, _rows(tensors[0]).shape[0]).to(out_dtype)
        # Kept until the last registered reader has taken it.
        self._shared = x if self.readers > 0 else None
        x = x.to(dtype)
        return lambda a, b: x[a:b]

    def release(self) -> None:
        """A registered reader that will never ask (it needs no weight gradient)."""
        self.readers -= 1
        if self.readers <= 0:
            self._shared = None


# ------------------------------------------------------------------ the patched weight
def patched_values(layer: "ConsolidatorLinear", state: "UnionState", scale: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """``W0 + scale * sum_k D_k`` on the union of the supports (fp32 sum, cast to ``dtype``), in
    the order of ``state.union`` (``state = layer._union_state()``)."""
    values = state.original
    for k, branch in enumerate(layer.branches):
        w = branch.weight.detach().reshape(-1)
        if state.positions[k] is None:  # this branch's entries are the union, in order
            values = torch.add(values, w, alpha=scale)
        else:
            values = values.index_add(0, state.positions[k], w.float(), alpha=scale)
    return values.to(dtype)


@contextmanager
def patched_weight(layer: "ConsolidatorLinear", state: "UnionState", values: torch.Tensor,
                   dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """``W0`` with ``values`` written on the union support, in ``dtype``, for a ``with`` block.

    When ``dtype`` is the base weight's dtype the base weight itself is patched and restored
    exactly on exit (no dense copy); otherwise the patch goes into the cast copy the GEMM needs
    anyway.
    """
    w0 = layer.base_layer.weight
    in_place = w0.dtype == dtype and w0.is_contiguous()
    if not in_place:
        target = w0.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        target.view(-1).index_copy_(0, state.union, values)
        yield target
        return
    # Through .data: the original entries are back before anything else can read W0, so the
    # patch must not bump the version counter autograd checks on W0 (a frozen weight saved by
    # some other op would otherwise raise on backward).
    flat = w0.data.view(-1)
    flat.index_copy_(0, state.union, values)
    try:
        yield w0.detach()
    finally:
        flat.index_copy_(0, state.union, state.native)


def _merged_bias(layer: "ConsolidatorLinear", scale: float,
                 dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``b0 + scale * sum_k c_k`` (fp32 sum, then cast), or ``None`` when there is no bias."""
    b0 = layer.base_layer.bias
    terms = [b.bias for b in layer.branches if b.bias is not None]
    if b0 is None and not terms:
        return None
    bias = b0.detach().float() if b0 is not None else torch.zeros(
        layer.out_features, dtype=torch.float32, device=layer.base_layer.weight.device)
    for c in terms:
        bias = torch.add(bias, c.detach().float(), alpha=scale)
    return bias.to(dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(rows, features)``: a view."""
    return t.reshape(-1, t.shape[-1])


# Inputs of _MergedBranchLinear.apply, in order: layer, masks, rebuild, x, w0, b0, weights..., biases...
_X, _W0, _B0, _BRANCHES = 3, 4, 5, 6


class _MergedBranchLinear(torch.autograd.Function):
    """Autograd for the fast path; see the module docstring for the gradients."""

    @staticmethod
    def forward(ctx, layer, masks, rebuild, x, w0, b0, *branch_params):  # noqa: D401
        n_branches = len(layer.branches)
        scale = 1.0 / (1.0 - layer.drop_rate) if masks is not None else 1.0
        dtype = _compute_dtype(x)
        # Per branch, the runs of samples that kept it and that dropped it (no masks: all kept).
        if masks is None:
            kept = [[(0, x.shape[0])] for _ in range(n_branches)]
            dropped = [[] for _ in range(n_branches)]
        else:
            columns = (masks > 0).t().tolist()  # masks live on the CPU: no device sync
            kept = [_runs(column) for column in columns]
            dropped = [_runs([not keep for keep in column]) for column in columns]
        with _autocast_off(x.device.type):
            xc = x.to(dtype).contiguous()
            state = layer._union_state()
            values = patched_values(layer, state, scale, dtype)
            with patched_weight(layer, state, values, dtype) as w:
                y = F.linear(xc, w, _merged_bias(layer, scale, dtype))
            for k, runs in enumerate(dropped):
                branch = layer.branches[k]
                for a, b in runs:  # take branch k back out of the samples that dropped it
                    y_rows = _rows(y[a:b])
                    part = grouped.grouped_forward_blocks(
                        _rows(xc[a:b]), branch.weight.detach().to(dtype), branch.groups,
                        branch.shuffle, row_offset=branch.row_offset,
                        virtual_out=branch.virtual_out)
                    if branch.bias is not None:
                        part = part + branch.bias.detach().to(dtype)
                    y_rows.sub_(part, alpha=scale)
        needs = ctx.needs_input_grad
        need_x = needs[_W0] or any(needs[_BRANCHES:_BRANCHES + n_branches])
        if not need_x and rebuild is not None:
            rebuild.release()
            rebuild = None
        # x itself is saved only when it is needed and cannot be rebuilt.
        saved_x = xc if need_x and rebuild is None else None
        ctx.save_for_backward(saved_x, masks, *(rebuild.tensors if rebuild is not None else ()))
        ctx.layer, ctx.scale, ctx.dtype, ctx.kept, ctx.dropped = layer, scale, dtype, kept, dropped
        ctx.patch, ctx.rebuild = values, rebuild
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.weight_dtypes = [w.dtype for w in branch_params[:n_branches]]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        layer, scale, dtype, dropped = ctx.layer, ctx.scale, ctx.dtype, ctx.dropped
        saved_x, masks, *rebuild_tensors = ctx.saved_tensors
        n_branches = len(layer.branches)
        needs = ctx.needs_input_grad
        grad_x = grad_w0 = grad_b0 = None
        grad_weights: List[Optional[torch.Tensor]] = [None] * n_branches
        grad_biases: List[Optional[torch.Tensor]] = [None] * n_branches
        batch = ctx.x_shape[0]
        with _autocast_off(grad_out.device.type):
            g = grad_out.to(dtype).contiguous()
            g2 = _rows(g)
            tokens = g2.shape[0] // batch  # rows per sample
            in_f, out_f = layer.in_features, layer.out_features
            if needs[_X]:
                with patched_weight(layer, layer._union_state(), ctx.patch, dtype) as w:
                    grad_x = torch.mm(g2, w)
                for k, runs in enumerate(dropped):
                    branch = layer.branches[k]
                    for a, b in runs:
                        rows = slice(a * tokens, b * tokens)
                        part = grouped.grouped_input_grad(
                            g2[rows], branch.weight.detach().to(dtype), in_f, branch.groups,
                            branch.shuffle, row_offset=branch.row_offset,
                            virtual_out=branch.virtual_out)
                        grad_x[rows].sub_(part, alpha=scale)
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
            need_bias = needs[_B0] or any(needs[_BRANCHES + n_branches:])
            if need_bias:
                if masks is None:
                    total = g2.sum(0, dtype=torch.float32)
                else:
                    # Per-sample sums: the base bias sees every sample, a branch bias its kept ones.
                    per_sample = g.reshape(batch, -1, out_f).sum(1, dtype=torch.float32)
                    total = per_sample.sum(0)
                if needs[_B0]:
                    grad_b0 = total.to(layer.base_layer.bias.dtype)
                if any(needs[_BRANCHES + n_branches:]):
                    # Branch k's bias sums the samples that kept it, times the 1/(1-p) scale.
                    sums = [total] * n_branches if masks is None else \
                        masks.t().to(per_sample) @ per_sample
                for k in range(n_branches):
                    if needs[_BRANCHES + n_branches + k]:
                        grad_biases[k] = sums[k].to(layer.branches[k].bias.dtype)
            need_w = needs[_W0] or any(needs[_BRANCHES:_BRANCHES + n_branches])
            if need_w:
                x_rows = _rows(saved_x.to(dtype)) if ctx.rebuild is None else \
                    ctx.rebuild.rows(rebuild_tensors, dtype)
            for k in range(n_branches):
                if not needs[_BRANCHES + k]:
                    continue
                branch = layer.branches[k]
                # The rows of the samples that kept branch k.
                ranges = [(a * tokens, b * tokens) for a, b in ctx.kept[k]]
                if ranges == []:
                    gw = torch.zeros(branch.weight.shape, dtype=torch.float32, device=g.device)
                else:
                    gw = grouped.grouped_weight_grad(
                        g2, x_rows, branch.groups, branch.shuffle, row_offset=branch.row_offset,
                        virtual_out=branch.virtual_out, row_ranges=ranges, in_features=in_f)
                    if scale != 1.0:
                        gw = gw.to(torch.float32).mul_(scale)  # a fresh tensor: scaled in place
                grad_weights[k] = gw.to(ctx.weight_dtypes[k])
            if needs[_W0]:
                x2 = x_rows if ctx.rebuild is None else x_rows(0, g2.shape[0])
                grad_w0 = (g2.t() @ x2).to(layer.base_layer.weight.dtype)
        return (None, None, None, grad_x, grad_w0, grad_b0, *grad_weights, *grad_biases)


def merged_branch_linear(layer: "ConsolidatorLinear", x: torch.Tensor,
                         masks: Optional[torch.Tensor]) -> torch.Tensor:
    """The fast forward of ``layer`` on ``x`` (``(..., in)``) with keep ``masks`` ``(batch, K)``."""
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    base = layer.base_layer
    params = [b.weight for b in layer.branches] + [b.bias for b in layer.branches]
    rebuild = None
    if torch.is_grad_enabled() and (base.weight.requires_grad or
                                    any(b.weight.requires_grad for b in layer.branches)):
        rebuild = InputRebuild.of(x)
    y = _MergedBranchLinear.apply(layer, masks, rebuild, x, base.weight, base.bias, *params)
    return y.squeeze(0) if squeeze else y
