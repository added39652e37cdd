"""``ConsolidatorLinear``: one frozen ``nn.Linear`` with K grouped branches beside it.

The math lives in :mod:`consolidator_hf.grouped`; this module holds parameters and state
(merged or not) and calls it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import grouped
from . import compiled_path
from .fast_path import fast_linear
from .grouped import Geometry
from .union_patch import UnionCache
from .config import IMPLS  # "fast" (one merged-weight GEMM, default) | "reference" (the oracle)


def merge_is_finite(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether a merged weight (and bias) hold no NaN or inf: the safe-merge check."""
    return bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))


class ConsolidatorBranch(nn.Module):
    """One branch: compact grouped weight ``(out, in/g)`` and optional bias ``(out,)``."""

    def __init__(self, in_features: int, out_features: int, geometry: Geometry,
                 bias: bool, init_range: float, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.geometry = geometry
        groups = geometry.groups
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters(init_range)

    def reset_parameters(self, init_range: float) -> None:
        nn.init.uniform_(self.weight, -init_range, init_range)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -init_range, init_range)

    @property
    def groups(self) -> int:
        return self.geometry.groups

    @property
    def channel_shuffle(self) -> bool:
        return self.geometry.channel_shuffle

    def support_index(self, device=None) -> torch.Tensor:
        return grouped.support_index(
            self.in_features, self.weight.shape[0], **self.geometry._asdict(),
            device=device if device is not None else self.weight.device,
        )

    def dense(self) -> torch.Tensor:
        """Dense fp32 ``D_k`` (merges are computed in fp32, then cast)."""
        return grouped.grouped_to_dense(self.weight.float(), self.in_features,
                                        **self.geometry._asdict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B_k P_k x + c_k``, literally (reference)."""
        y = grouped.grouped_forward_reference(x, self.weight, **self.geometry._asdict())
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"out={self.weight.shape[0]}, in={self.in_features}, groups={self.groups}, "
                f"channel_shuffle={self.channel_shuffle}, bias={self.bias is not None}")


class ConsolidatorLinear(nn.Module):
    """A frozen ``nn.Linear`` plus Consolidator branches::

        y = W0 x + b0 + sum_k m_k * (B_k P_k x + c_k)

    ``m_k`` is the per-sample drop mask (training only). After :meth:`merge` the base
    layer holds ``W0 + sum_k D_k`` and ``b0 + sum_k c_k`` and forward uses it alone.

    ``row_offset``/``virtual_out_features`` let the layer own a row slice of a larger
    virtual grouped layer (see :mod:`consolidator_hf.grouped`).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        groups: Sequence[int] = (384,),
        *,
        channel_shuffle: bool = False,
        drop_rate: float = 0.0,
        branch_bias: bool = True,
        init_range: float = 1e-3,
        row_offset: int = 0,
        virtual_out_features: Optional[int] = None,
        impl: str = "fast",
        name: str = "layer",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{name}: ConsolidatorLinear wraps nn.Linear, got "
                            f"{type(base_layer).__name__}")
        if impl not in IMPLS:
            raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"{name}: drop_rate must be in [0, 1), got {drop_rate}")
        out_f, in_f = base_layer.out_features, base_layer.in_features
        vout = out_f if virtual_out_features is None else virtual_out_features
        for g in groups:
            grouped.check_groups(in_f, out_f, g, row_offset=row_offset,
                                 virtual_out_features=vout, name=name)
        self.base_layer = base_layer
        self.name = name
        self.in_features, self.out_features = in_f, out_f
        self.groups: Tuple[int, ...] = tuple(groups)
        self.channel_shuffle = channel_shuffle
        self.drop_rate = drop_rate
        self.row_offset = row_offset
        self.virtual_out_features = vout
        self.impl = impl
        self.merged = False
        self.disabled = False  # ConsolidatorModel.disable_adapter: forward through the base alone
        self._merged_bias_added = False
        # (union support, W0 on it, b0) saved by merge() for an exact unmerge()
        self._unmerge_state: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None
        w = base_layer.weight
        self.geometries: Tuple[Geometry, ...] = tuple(
            Geometry(g, channel_shuffle, row_offset, vout) for g in self.groups)
        self.branches = nn.ModuleList(
            ConsolidatorBranch(in_f, out_f, geom, branch_bias, init_range, device=w.device,
                               dtype=w.dtype)
            for geom in self.geometries
        )
        self._union_cache = UnionCache()  # the fast path's view of where the branches sit in W0

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.impl == "fast":
            return self.forward_fast(x)
        return self.forward_reference(x)

    @property
    def drops(self) -> bool:
        """Whether this forward draws branch drop masks (training with ``drop_rate > 0``)."""
        return self.training and self.drop_rate > 0

    def draw_masks(self, batch: int, device=None) -> Optional[torch.Tensor]:
        """Per-sample keep masks ``(batch, K)`` (``1/(1-p)`` or 0) on ``device``, or ``None``
        when nothing drops.

        The same numbers as K consecutive :func:`grouped.keep_mask` draws, one per branch in
        order, so the reference and the fast path see identical masks under the same seed.
        Eager: drawn on the host (the CPU generator) and copied to ``device`` without a
        synchronisation. Under ``torch.compile``: drawn on ``device`` as part of the graph
        (what the traced compiled formula multiplies every row by).
        """
        if not self.drops:
            return None
        k = len(self.branches)
        if torch.compiler.is_compiling():
            return grouped.keep_masks(batch, k, self.drop_rate, device=device)
        masks = self.host_masks(batch)
        if device is not None and torch.device(device).type != "cpu":
            if torch.device(device).type == "cuda":
                masks = masks.pin_memory()  # so the copy below does not wait for the GPU
            masks = masks.to(device, non_blocking=True)
        return masks

    def host_masks(self, batch: int) -> Optional[torch.Tensor]:
        """:meth:`draw_masks`'s numbers as a host (CPU) tensor, what the fast path reads: which
        samples dropped is then host knowledge, never a read of a device tensor (under
        ``torch.compile`` the draw is part of the graph, on the CPU)."""
        if not self.drops:
            return None
        return grouped.keep_masks(batch, len(self.branches), self.drop_rate)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Same result as :meth:`forward_reference` through one merged-weight GEMM plus the
        drop corrections on the rows of the samples that dropped a branch, and a
        block-structured backward: :func:`fast_path.fast_linear` in eager mode; under
        ``torch.compile`` the same functions as custom ops, or the traced formula, by device
        (:mod:`consolidator_hf.compiled_path`)."""
        base = self.base_layer
        batch = x.shape[0] if x.dim() > 1 else 1
        weights, biases = [b.weight for b in self.branches], [b.bias for b in self.branches]
        if torch.compiler.is_compiling():
            if compiled_path.formula(x.device) == "traced":
                return compiled_path.traceable_linear(
                    x, base.weight, base.bias, weights, biases, self.geometries,
                    self.draw_masks(batch, x.device))
            return compiled_path.compiled_linear(x, base.weight, base.bias, weights, biases,
                                                 self.geometries, self.host_masks(batch),
                                                 self.drop_rate)
        keep = None
        if self.drops:
            # host_masks' draw, read as host flags straight away (no mask tensor built)
            # (host memory: numpy, not Tensor.tolist, which reads a tensor's value)
            keep = grouped.keep_draw(batch, len(self.branches), self.drop_rate).numpy().tolist()
        return fast_linear(x, base.weight, base.bias, weights, biases, self.geometries, keep,
                           self.drop_rate, self._union_cache)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """docs/DESIGN.md section 1 literally: base, plus each branch times its per-sample mask."""
        y = self.base_layer(x)
        masks = self.draw_masks(x.shape[0], x.device)
        for k, branch in enumerate(self.branches):
            out = branch(x)
            if masks is not None:
                m = masks[:, k].to(device=x.device, dtype=out.dtype)
                out = out * m.view(-1, *([1] * (out.dim() - 1)))
            y = y + out
        return y

    # ------------------------------------------------------------------ deltas
    def delta_weight(self) -> torch.Tensor:
        """``sum_k D_k`` as a dense fp32 ``(out, in)`` matrix."""
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float32,
                            device=self.base_layer.weight.device)
        for branch in self.branches:
            delta = delta + branch.dense()
        return delta

    def delta_bias(self) -> Optional[torch.Tensor]:
        """``sum_k c_k`` in fp32, or ``None`` when the branches have no bias."""
        biases = [b.bias.float() for b in self.branches if b.bias is not None]
        return torch.stack(biases).sum(0) if biases else None

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merged_values(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What :meth:`merge` writes: ``W0 + sum_k D_k`` (:func:`grouped.merged_linear`, fp32,
        cast to the base dtype) and ``b0 + sum_k c_k`` in fp32 (``None`` when the branches
        have no bias: the base bias is then left as it is)."""
        base = self.base_layer
        w, b = grouped.merged_linear(base.weight, base.bias, [br.dense() for br in self.branches],
                                     [br.bias for br in self.branches])
        has_branch_bias = any(br.bias is not None for br in self.branches)
        return w.to(base.weight.dtype), (b if has_branch_bias else None)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False,
              merged_values: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
              ) -> None:
        """Fold the branches into the base layer (fp32 sum, then cast to the base dtype).

        With ``safe_merge`` the result is checked for NaN/inf before the base is touched.
        ``merged_values``: :meth:`merged_values` already computed (and checked) by the caller,
        so that a checked merge forms the merged weight once.
        """
        if self.merged:
            return
        if self.disabled:
            raise ValueError(f"{self.name}: cannot merge inside disable_adapter()")
        new_w, new_b = self.merged_values() if merged_values is None else merged_values
        if safe_merge and not merge_is_finite(new_w, new_b):
            raise ValueError(f"{self.name}: merge would produce NaN or inf weights; "
                             "the layer was left unmerged")
        w = self.base_layer.weight
        # What unmerge() writes back, bit for bit: W0 on the union of the supports (the only
        # entries the merge changes; small: out * in / g per branch) and b0. Subtracting the
        # deltas again would not give W0 back after a bf16/fp16 cast, nor next to huge deltas.
        union = grouped.union_support(self.support_indices())
        self._unmerge_state = (union, w.detach().reshape(-1)[union].clone(),
                               None if self.base_layer.bias is None
                               else self.base_layer.bias.detach().clone())
        w.copy_(new_w)
        if new_b is not None:
            if self.base_layer.bias is None:
                # A merged branch bias needs a bias slot; remember to remove it on unmerge.
                self.base_layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=False)
                self._merged_bias_added = True
            else:
                self.base_layer.bias.copy_(new_b.to(self.base_layer.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base layer exactly: the ``W0`` entries and ``b0`` saved by :meth:`merge`
        are written back (bit-identical in every dtype). A layer merged without that record
        (its merged state set by hand) subtracts the branches again (the merge formula with
        scale -1), exact up to fp rounding."""
        if not self.merged:
            return
        base = self.base_layer
        removes_bias = self._merged_bias_added
        saved = self._unmerge_state
        if saved is not None:
            union, w0, b0 = saved
            flat = base.weight.view(-1) if base.weight.is_contiguous() else None
            if flat is not None:
                flat[union] = w0
                if removes_bias:
                    base.bias = None
                    self._merged_bias_added = False
                elif b0 is not None:
                    base.bias.copy_(b0)
                self._unmerge_state = None
                self.merged = False
                return
        w, b = grouped.merged_linear(base.weight, None if removes_bias else base.bias,
                                     [br.dense() for br in self.branches],
                                     [br.bias for br in self.branches], scale=-1.0)
        base.weight.copy_(w.to(base.weight.dtype))
        if any(br.bias is not None for br in self.branches):
            if removes_bias:
                base.bias = None
                self._merged_bias_added = False
            else:
                base.bias.copy_(b.to(base.bias.dtype))
        self._unmerge_state = None
        self.merged = False

    # ------------------------------------------------------------------ storage
    def support_indices(self) -> List[torch.Tensor]:
        return [b.support_index() for b in self.branches]

    def consolidated(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: ``(union, values)``: ``sum_k D_k`` on the sorted union of the supports."""
        idxs = self.support_indices()
        union = grouped.union_support(idxs)
        values = self.delta_weight().reshape(-1)[union]
        return union, values

    def stored_numel(self) -> int:
        """Number of delta values stored after consolidation (size of the union support)."""
        return int(grouped.union_support(self.support_indices()).numel())

    @torch.no_grad()
    def load_consolidated(self, values: torch.Tensor) -> None:
        """Stage 2 for a layer that keeps training: split a stored delta back into the branches.

        Branch biases are zeroed: the stored bias already includes them.
        """
        idxs = self.support_indices()
        union = grouped.union_support(idxs)
        if values.shape != union.shape:
            raise ValueError(
                f"{self.name}: stored delta has {values.numel()} values, but groups={self.groups} "
                f"(shuffle={self.channel_shuffle}) on a layer of shape "
                f"({self.out_features}, {self.in_features}) has a support of {union.numel()}: "
                "the adapter does not belong to this base model / config"
            )
        parts = grouped.split_union(values.float().to(union.device), union, idxs,
                                    self.out_features * self.in_features)
        for branch, w in zip(self.branches, parts):
            branch.weight.copy_(w.to(branch.weight.dtype))
            if branch.bias is not None:
                branch.bias.zero_()

    def extra_repr(self) -> str:
        extra = f"groups={self.groups}, shuffle={self.channel_shuffle}, drop_rate={self.drop_rate}"
        if self.virtual_out_features != self.out_features:
            extra += f", rows=[{self.row_offset}, {self.row_offset + self.out_features}) of {self.virtual_out_features}"
        return extra + f", merged={self.merged}"
