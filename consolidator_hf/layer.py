"""``ConsolidatorLinear``: one frozen ``nn.Linear`` with K grouped branches beside it.

The math lives in :mod:`consolidator_hf.grouped`; this module holds parameters and state
(merged or not) and calls it.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import grouped
from ._fast import merged_branch_linear
from .config import IMPLS  # "fast" (one merged-weight GEMM, default) | "reference" (the oracle)


class ConsolidatorBranch(nn.Module):
    """One branch: compact grouped weight ``(out, in/g)`` and optional bias ``(out,)``."""

    def __init__(self, in_features: int, out_features: int, groups: int, shuffle: bool,
                 bias: bool, init_range: float, row_offset: int, virtual_out: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.groups = groups
        self.shuffle = shuffle
        self.row_offset = row_offset
        self.virtual_out = virtual_out
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters(init_range)

    def reset_parameters(self, init_range: float) -> None:
        nn.init.uniform_(self.weight, -init_range, init_range)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -init_range, init_range)

    def support_index(self, device=None) -> torch.Tensor:
        return grouped.support_index(
            self.in_features, self.weight.shape[0], self.groups, self.shuffle,
            row_offset=self.row_offset, virtual_out=self.virtual_out,
            device=device if device is not None else self.weight.device,
        )

    def dense(self) -> torch.Tensor:
        """Dense fp32 ``D_k`` (merges are computed in fp32, then cast)."""
        return grouped.grouped_to_dense(
            self.weight.float(), self.in_features, self.groups, self.shuffle,
            row_offset=self.row_offset, virtual_out=self.virtual_out,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B_k P_k x + c_k``, literally (reference)."""
        y = grouped.grouped_forward_reference(
            x, self.weight, self.groups, self.shuffle,
            row_offset=self.row_offset, virtual_out=self.virtual_out,
        )
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"out={self.weight.shape[0]}, in={self.in_features}, groups={self.groups}, "
                f"shuffle={self.shuffle}, bias={self.bias is not None}")


class UnionState(NamedTuple):
    """Where the branches sit in ``W0``, for the fast path.

    ``union``: flat indices of ``W0`` covered by any branch (a single branch's support in its
    own order, so its compact weight maps onto it without a gather); ``positions[k]``: where
    branch ``k``'s entries sit in ``union`` (``None`` when they are ``union`` itself);
    ``original``: ``W0`` read on ``union`` in fp32; ``native``: the same in ``W0``'s dtype, to
    restore it bit for bit.
    """

    union: torch.Tensor
    positions: List[Optional[torch.Tensor]]
    original: torch.Tensor
    native: torch.Tensor


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
            grouped.check_groups(in_f, out_f, g, row_offset=row_offset, virtual_out=vout,
                                 name=name)
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
        w = base_layer.weight
        self.branches = nn.ModuleList(
            ConsolidatorBranch(in_f, out_f, g, channel_shuffle, branch_bias, init_range,
                               row_offset, vout, device=w.device, dtype=w.dtype)
            for g in self.groups
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.impl == "fast":
            return self.forward_fast(x)
        return self.forward_reference(x)

    def draw_masks(self, batch: int) -> Optional[torch.Tensor]:
        """Per-sample keep masks ``(batch, K)`` (``1/(1-p)`` or 0) on the CPU, or ``None`` when
        nothing drops.

        The same numbers as K consecutive :func:`grouped.keep_mask` draws, one per branch in
        order (what the reference path draws), so both paths see identical masks under the same
        seed. They come from the CPU generator on every device: the fast path needs to know on
        the host which samples dropped a branch, and reading that back from a GPU would
        synchronise once per layer.
        """
        if not (self.training and self.drop_rate > 0):
            return None
        return grouped.keep_masks(batch, len(self.branches), self.drop_rate)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Same result as :meth:`forward_reference` through one merged-weight GEMM.

        Samples sharing a keep pattern share one weight ``W0 + sum_{k kept} D_k / (1-p)``;
        the backward pass computes branch-weight gradients from the block structure
        (see :mod:`consolidator_hf._fast`).
        """
        return merged_branch_linear(self, x, self.draw_masks(x.shape[0] if x.dim() > 1 else 1))

    def _union_state(self) -> "UnionState":
        """The cached :class:`UnionState` of the fast path, rebuilt when ``W0`` moves, is
        replaced or changes in place."""
        w0 = self.base_layer.weight
        key = (w0.device, w0.dtype, w0.data_ptr(), w0._version)
        cache = getattr(self, "_union_cache", None)
        if cache is None or cache[0] != key:
            idxs = [b.support_index(device=w0.device).reshape(-1) for b in self.branches]
            if len(idxs) == 1:
                union, positions = idxs[0], [None]
            else:
                union = grouped.union_support(idxs)
                positions = [torch.searchsorted(union, i) for i in idxs]
            native_values = w0.detach().reshape(-1).index_select(0, union)
            cache = (key, UnionState(union, positions, native_values.float(), native_values))
            self._union_cache = cache
        return cache[1]

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """DESIGN.md section 1 literally: base, plus each branch times its per-sample mask."""
        y = self.base_layer(x)
        masks = self.draw_masks(x.shape[0])
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
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the branches into the base layer (fp32 sum, then cast to the base dtype).

        With ``safe_merge`` the result is checked for NaN/inf before the base is touched.
        """
        if self.merged:
            return
        if self.disabled:
            raise ValueError(f"{self.name}: cannot merge inside disable_adapter()")
        w = self.base_layer.weight
        new_w = (w.float() + self.delta_weight()).to(w.dtype)
        db = self.delta_bias()
        new_b = None
        if db is not None:
            b = self.base_layer.bias
            new_b = db if b is None else b.float() + db
        if safe_merge:
            bad = not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all())
            if bad:
                raise ValueError(f"{self.name}: merge would produce NaN or inf weights; "
                                 "the layer was left unmerged")
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
        """Subtract the branches again: the base layer is restored (up to fp rounding)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        db = self.delta_bias()
        if db is not None:
            if self._merged_bias_added:
                self.base_layer.bias = None
                self._merged_bias_added = False
            else:
                b = self.base_layer.bias
                b.copy_((b.float() - db).to(b.dtype))
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
