"""The fast path under ``torch.compile``, in two formulations, chosen per device type by
:data:`FORMULAS` (``"ops"`` on the CPU, ``"traced"`` elsewhere):

* ``"ops"``: the eager design (:mod:`consolidator_hf.fast_path`) as two custom ops that dynamo
  and inductor treat as opaque kernels (:func:`compiled_linear`);
* ``"traced"``: the layer as plain ops with fixed shapes (:func:`traceable_linear`), no host
  work per layer and no host tensor in the graph (CUDA graphs stay possible), at the price of
  the branch products over every row as inductor kernels. Measured on a CPU only (where it is
  the slower one); it is the default on GPUs because there the ops' per-layer Python would be
  back in every step and those kernels are cheap. Unmeasured on a GPU: see the README.

Why ops and not only traceable formulas: the eager design runs one merged-weight GEMM and
corrects only the rows of the samples that dropped a branch. Which rows those are is a
data-dependent shape, so written as plain ops it either recompiles with every fresh mask or has
to correct every row; the traced formulation does the latter (the branch products over all rows
as inductor kernels) and measured 1.29x the compiled floor's step on ViT-B, CPU, against 1.15x
for the ops in the same run (README, "Fast training path"). Inside a custom op the row runs are
host data again, read from a *host* mask tensor:

* the layer draws the masks with ``torch.rand`` on the CPU inside the graph (inductor's CPU
  RNG, fresh numbers every step without a recompile); the op reads them with ``.numpy()``, a
  read of host memory, never of a device tensor, so a step on a GPU has no synchronisation;
* ``consolidator_hf::merged_linear`` is :func:`fast_path.forward_rows`;
* ``consolidator_hf::merged_linear_backward`` is :func:`fast_path.gradients`, the gradient
  assembly the eager Function's backward calls too;
* the fake implementations give shapes only, so one graph serves every mask.

The branch-weight gradient needs the layer input ``x``. Eager mode rebuilds it from what its
LayerNorm/GELU saved (:class:`input_rebuild.InputRebuild`); here the compiler's partitioner
decides, and by default it would *save* ``x`` (inductor does not recompute a value that an
opaque op reads in backward), costing 1.54x the floor's saved activations in a 2-layer
ViT-B-width model.
:func:`recompute_inputs`, a joint-graph pass, marks the pointwise/view chain that produces each
backward op's ``x`` from tensors backward keeps anyway as ``MUST_RECOMPUTE``: inductor then
rebuilds ``x`` in backward, the same trade as eager. The pass touches no graph without these
ops; it is installed (chained to any pass already configured) the first time dynamo traces one
of them.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import fast_path, grouped, union_patch
from .union_patch import autocast_off, compute_dtype
from .input_rebuild import as_rows as _rows
from .grouped import Geometry

_NS = "consolidator_hf"

#: Compiled formulation per device type (``"ops"`` or ``"traced"``); a type not listed uses
#: ``"traced"``. Change it before compiling, e.g. ``FORMULAS["cuda"] = "ops"``.
FORMULAS = {"cpu": "ops"}


def formula(device: torch.device) -> str:
    """The compiled formulation :class:`ConsolidatorLinear` uses for inputs on ``device``."""
    choice = FORMULAS.get(torch.device(device).type, "traced")
    if choice not in ("ops", "traced"):
        raise ValueError(f"compiled_path.FORMULAS[{torch.device(device).type!r}] must be "
                         f"'ops' or 'traced', got {choice!r}")
    return choice


@functools.lru_cache(maxsize=None)
def _union(shape: Tuple[int, int], geometries: Tuple[Geometry, ...], device: torch.device):
    # A pure function of the geometry: safe to keep (W0's own entries are read per call).
    return union_patch.union_index(shape, geometries, device)


def _step_inputs(x: torch.Tensor, w0: torch.Tensor, keep: Optional[torch.Tensor],
                 groups: Sequence[int], channel_shuffle: bool, row_offset: int,
                 virtual_out_features: int, drop_rate: float):
    geometries = tuple(Geometry(g, channel_shuffle, row_offset, virtual_out_features)
                       for g in groups)
    flags = None
    if keep is not None:
        if keep.device.type != "cpu":
            raise ValueError(f"{_NS}::merged_linear: the keep masks must be a host (CPU) tensor, "
                             f"got one on {keep.device} (reading it would synchronise)")
        flags = fast_path.keep_flags(keep)
    spec = fast_path.make_spec(geometries, flags, x.shape[0], drop_rate)
    union, positions = _union(tuple(w0.shape), geometries, w0.device)
    return spec, union_patch.union_state(w0, union, positions, geometries)


def _none_if_empty(biases: Sequence[torch.Tensor], n: int) -> List[Optional[torch.Tensor]]:
    return list(biases) if biases else [None] * n


# ------------------------------------------------------------------ forward
@torch.library.custom_op(f"{_NS}::merged_linear", mutates_args=())
def merged_linear(x: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor],
                  weights: List[torch.Tensor], biases: List[torch.Tensor],
                  keep: Optional[torch.Tensor], groups: List[int], channel_shuffle: bool,
                  row_offset: int, virtual_out_features: int, drop_rate: float
                  ) -> torch.Tensor:
    """:func:`fast_path.forward_rows` for ``x`` ``(batch, rows, in)`` in its compute dtype;
    ``biases`` empty when the branches have none; ``keep`` the ``(batch, K)`` host masks or
    ``None``. ``W0`` is patched and restored bit for bit inside the op (nothing else runs
    meanwhile), so to the graph it is not mutated."""
    spec, state = _step_inputs(x, w0, keep, groups, channel_shuffle, row_offset,
                               virtual_out_features, drop_rate)
    with autocast_off(x.device.type):
        y, _ = fast_path.forward_rows(spec, state, x, w0, b0, weights,
                                      _none_if_empty(biases, len(weights)), x.dtype)
    return y


@merged_linear.register_fake
def _merged_linear_fake(x, w0, b0, weights, biases, keep, groups, channel_shuffle, row_offset,
                        virtual_out_features, drop_rate):
    _install_pass()  # dynamo is tracing this op: the compile that needs the pass has begun
    return x.new_empty(*x.shape[:-1], w0.shape[0])


# ------------------------------------------------------------------ backward
@torch.library.custom_op(f"{_NS}::merged_linear_backward", mutates_args=())
def merged_linear_backward(grad: torch.Tensor, x: torch.Tensor, w0: torch.Tensor,
                           b0: Optional[torch.Tensor], weights: List[torch.Tensor],
                           biases: List[torch.Tensor], keep: Optional[torch.Tensor],
                           groups: List[int], channel_shuffle: bool, row_offset: int,
                           virtual_out_features: int, drop_rate: float, needs: List[bool]
                           ) -> List[torch.Tensor]:
    """``[grad_x, grad_w0, grad_b0, *grad_weights, *grad_biases]`` of :func:`merged_linear`;
    ``needs`` says which of the five groups are wanted (the others come back empty)."""
    need_x, need_w0, need_b0, need_w, need_c = needs
    spec, state = _step_inputs(x, w0, keep, groups, channel_shuffle, row_offset,
                               virtual_out_features, drop_rate)
    n, dtype = len(weights), x.dtype
    wanted = fast_path.Needs(need_x, need_w0, need_b0 and b0 is not None, (need_w,) * n,
                              (need_c,) * len(biases))
    with autocast_off(x.device.type):
        step = fast_path.backward_step(spec, state, w0, b0, weights, _none_if_empty(biases, n),
                                       dtype, x.shape[0])
        grads = fast_path.gradients(step, grad.to(dtype).contiguous(), w0, weights,
                                    lambda: _rows(x), wanted)
    cast = (lambda t, like: t.to(like.dtype) if t is not None else None)
    grad_x = grads.x.view(x.shape) if grads.x is not None else None
    grad_w = [cast(t, w) for t, w in zip(grads.weights, weights)]
    grad_c = [cast(t, c) for t, c in zip(grads.biases, biases)]
    grad_w0, grad_b0 = cast(grads.w0, w0), cast(grads.b0, b0)
    # A custom op's outputs may not alias each other (the bias sums can be one tensor).
    out, seen = [], set()
    for t in [grad_x, grad_w0, grad_b0, *grad_w, *grad_c]:
        if t is None:
            t = x.new_empty(0)
        elif t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return out


@merged_linear_backward.register_fake
def _merged_linear_backward_fake(grad, x, w0, b0, weights, biases, keep, groups,
                                 channel_shuffle, row_offset, virtual_out_features, drop_rate,
                                 needs):
    need_x, need_w0, need_b0, need_w, need_c = needs
    empty = x.new_empty(0)
    return [torch.empty_like(x) if need_x else empty,
            torch.empty_like(w0) if need_w0 else empty,
            torch.empty_like(b0) if need_b0 and b0 is not None else empty,
            *[torch.empty_like(w) if need_w else empty for w in weights],
            *[torch.empty_like(c) if need_c else empty for c in biases]]


def _setup_context(ctx, inputs, output) -> None:
    x, w0, b0, weights, biases, keep, *meta = inputs
    ctx.save_for_backward(x, w0, b0, keep, *weights, *biases)
    ctx.n, ctx.meta = len(weights), meta
    ctx.needs = [x.requires_grad, w0.requires_grad, b0 is not None and b0.requires_grad,
                 any(w.requires_grad for w in weights), any(c.requires_grad for c in biases)]


def _backward(ctx, grad):
    x, w0, b0, keep, *rest = ctx.saved_tensors
    n = ctx.n
    weights, biases = list(rest[:n]), list(rest[n:])
    need_x, need_w0, need_b0, need_w, need_c = ctx.needs
    out = merged_linear_backward(grad, x, w0, b0, weights, biases, keep, *ctx.meta, ctx.needs)
    grad_w = [g if need_w else None for g in out[3:3 + n]]
    grad_c = [g if need_c else None for g in out[3 + n:]]
    return (out[0] if need_x else None, out[1] if need_w0 else None,
            out[2] if need_b0 else None, grad_w, grad_c, None, None, None, None, None, None)


merged_linear.register_autograd(_backward, setup_context=_setup_context)


def compiled_linear(x: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor],
                    weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                    geometries: Sequence[Geometry], keep: Optional[torch.Tensor],
                    drop_rate: float) -> torch.Tensor:
    """:func:`fast_path.fast_linear`'s result for ``x`` ``(..., in)`` through
    :func:`merged_linear`, what the layer runs under ``torch.compile``; ``keep`` the
    ``(batch, K)`` keep masks as a host tensor (``None``: every branch kept, unscaled)."""
    geometry = geometries[0]  # the branches of one layer share all but their group count
    present = [c for c in biases if c is not None]
    if present and len(present) != len(biases):
        raise ValueError("compiled_linear: either every branch has a bias or none has")
    shape = x.shape
    dtype = compute_dtype(x)
    x3 = x.reshape(shape[0] if x.dim() > 1 else 1, -1, shape[-1]).to(dtype).contiguous()
    y = merged_linear(x3, w0, b0, list(weights), present, keep,
                      [geom.groups for geom in geometries], geometry.channel_shuffle,
                      geometry.row_offset, geometry.virtual_out_features or w0.shape[0],
                      float(drop_rate) if keep is not None else 0.0)
    return y.reshape(*shape[:-1], w0.shape[0])


# ------------------------------------------------------------------ the traced formula
def branch_product(x: torch.Tensor, weight: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """``B P x`` for ``x`` ``(n, in)`` as one broadcast multiply and a sum over each block's
    ``s = in/g`` columns: plain ops with fixed shapes that a compiler fuses into one
    memory-bound kernel per direction (no gather, so no scatter-add in backward; eager it would
    materialise ``(n, out, s)``, which is why the eager path uses the batched block matmuls).

    With ``rows = virtual_out/g``, the layer's rows ``[row_offset, row_offset + out)`` lie in
    groups ``first..last`` of the virtual layer; the weight is padded with ``lead``/``trail`` zero
    rows to whole groups, ``y[n, q, r] = sum_j w[q, r, j] x'[n, q*s + j]``, then cut back.
    """
    n, in_features = x.shape
    out_features = weight.shape[0]
    g, offset = geometry.groups, geometry.row_offset
    vout = geometry.virtual_out_features or out_features
    rows, s = vout // g, in_features // g
    first, last = offset // rows, (offset + out_features - 1) // rows + 1
    lead, trail = offset - first * rows, last * rows - (offset + out_features)
    xs = grouped.channel_shuffle(x, g) if geometry.channel_shuffle else x
    xs = xs[:, first * s:last * s].reshape(n, last - first, 1, s)
    w = F.pad(weight, (0, 0, lead, trail)) if lead or trail else weight
    y = (xs * w.reshape(last - first, rows, s)).sum(-1).reshape(n, -1)
    return y[:, lead:lead + out_features] if lead or trail else y


def traceable_linear(x: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor],
                     weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                     geometries: Sequence[Geometry], masks: Optional[torch.Tensor]
                     ) -> torch.Tensor:
    """The layer as plain differentiable ops, what runs under ``torch.compile``::

        y = x W0^T + b0 + sum_k m_k * (B_k P_k x + c_k)

    (``m_k`` the per-sample factor of ``masks[:, k]``, 1 without masks). No autograd Function,
    no in-place patch, no host read: dynamo traces it into the model's graph, AOTAutograd derives
    the backward, and its partitioner decides whether the layer input is kept or recomputed from
    what its LayerNorm/GELU saved (the eager path's :class:`InputRebuild`, done by the compiler).
    """
    y = F.linear(x, w0, b0)
    x2 = _rows(x)
    batch = x.shape[0] if x.dim() > 1 else 1
    for k, geom in enumerate(geometries):
        part = branch_product(x2, weights[k].to(x2.dtype), geom)
        if biases[k] is not None:
            part = part + biases[k].to(part.dtype)
        part = part.reshape(y.shape)
        if masks is not None:
            part = part * masks[:, k].to(part.dtype).reshape(batch, *([1] * (y.dim() - 1)))
        y = y + part.to(y.dtype)
    return y


# ------------------------------------------------------------------ the joint-graph pass
_MAX_CHAIN = 24  # longest producer chain rebuilt (a decomposed LayerNorm or GELU is ~6 nodes)


def _is_cheap(node: torch.fx.Node) -> bool:
    """A pointwise op or a view/copy of one tensor: as cheap to redo as to read back."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    return (torch.Tag.pointwise in target.tags or target.is_view
            or target in (torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default,
                          torch.ops.aten.view.default))


def recompute_inputs(graph: torch.fx.Graph) -> int:
    """Mark, for every ``merged_linear_backward`` in a joint forward+backward graph, the chain
    of cheap nodes that produces its input ``x`` from tensors the backward reads anyway (or
    graph inputs) as ``MUST_RECOMPUTE``, so the partitioner rebuilds ``x`` in backward instead
    of saving it. A chain that would need any other forward tensor is left alone (``x`` is
    then saved). Returns the number of inputs marked."""
    from torch.utils.checkpoint import CheckpointPolicy

    backward_op = torch.ops.consolidator_hf.merged_linear_backward.default
    is_backward = {n for n in graph.nodes if n.meta.get("partitioner_tag") == "is_backward"}

    def read_by_backward(node: torch.fx.Node) -> bool:
        for user in node.users:
            if user in is_backward:
                if user.target is not backward_op:
                    return True
            elif _is_cheap(user) and user.target.is_view and read_by_backward(user):
                return True
        return False

    marked = 0
    for op in [n for n in graph.nodes if n.target is backward_op]:
        x = op.args[1]
        chain, todo, ok = [], [x], True
        while todo and ok:
            node = todo.pop()
            if node in chain or node.op == "placeholder":
                continue
            if node is not x and read_by_backward(node):
                continue  # kept for backward anyway: the rebuild starts here
            if not _is_cheap(node) or len(chain) >= _MAX_CHAIN:
                ok = False
                break
            chain.append(node)
            todo.extend(node.all_input_nodes)
        if ok and chain:
            for node in chain:
                node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            marked += 1
    return marked


def _pass_uuid() -> str:
    source = inspect.getsource(recompute_inputs) + inspect.getsource(_is_cheap)
    return "consolidator_hf.recompute_inputs." + hashlib.sha256(source.encode()).hexdigest()[:16]


def _install_pass() -> None:
    """Put :func:`recompute_inputs` in inductor's ``joint_custom_pre_pass`` (ahead of a pass
    already there, which keeps running), once per configuration."""
    import torch._inductor.config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    current = inductor_config.joint_custom_pre_pass
    if getattr(current, "_consolidator_hf", False):
        return

    class _RecomputeInputs(CustomGraphPass):
        _consolidator_hf = True

        def __init__(self, after):
            self.after = after

        def __call__(self, graph: torch.fx.Graph) -> None:
            recompute_inputs(graph)
            if self.after is not None:
                self.after(graph)

        def uuid(self):
            if self.after is None:
                return _pass_uuid()
            if not hasattr(self.after, "uuid"):
                return None  # a plain callable: inductor does not cache, nor do we claim to
            after = self.after.uuid()
            return None if after is None else (_pass_uuid(), after)

    inductor_config.joint_custom_pre_pass = _RecomputeInputs(current)
