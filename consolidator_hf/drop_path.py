"""Stochastic depth ("drop path") on the residual branches of a frozen backbone.

The paper's timm ViT trains with ``drop_path_rate=0.1``: block ``i`` of ``L`` drops each of its
two residual branches (attention, MLP) per sample with probability ``p_i = p * i / (L - 1)``
(``torch.linspace(0, p, L)``, as timm), and scales a kept branch by ``1 / (1 - p_i)``. In eval it
is the identity. Hugging Face ViT has no drop path, so it is added here with forward hooks on
the modules whose outputs are the branch values (which modules: :mod:`consolidator_hf.targets`).
Hooks leave module names and state dicts untouched, so they combine freely with Consolidator
injection, saving and merging.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from .grouped import keep_mask
from .targets import residual_branches

__all__ = ["drop_path_rates", "BackboneDropPath", "add_backbone_drop_path"]


def drop_path_rates(rate: float, depth: int) -> List[float]:
    """``rate * i / (depth - 1)`` for ``i < depth`` (0 for the first block, ``rate`` for the last)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]


class _DropBranch:
    """Forward hook: scale a residual branch's value by a per-sample keep mask in training."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        m = keep_mask(x.shape[0], self.rate, device=x.device, dtype=x.dtype)
        return x * m.view(-1, *([1] * (x.dim() - 1)))

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training or self.rate <= 0.0:
            return None  # identity: keep the output as it is
        if isinstance(output, tuple):  # (branch value, attention weights, ...)
            return (self._drop(output[0]),) + tuple(output[1:])
        return self._drop(output)


class BackboneDropPath:
    """The hooks added by :func:`add_backbone_drop_path`; ``remove()`` takes them off again."""

    def __init__(self, rates: List[float], handles: List[Any]) -> None:
        self.rates = rates
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __repr__(self) -> str:
        return f"BackboneDropPath(rates={[round(r, 6) for r in self.rates]})"


def add_backbone_drop_path(model: nn.Module, rate: float) -> Optional[BackboneDropPath]:
    """Give every residual branch of ``model``'s blocks stochastic depth, linear over depth.

    Works with any model whose ``model_type`` is in ``targets.RESIDUAL_BRANCHES`` (ViT, DeiT,
    ViT-MSN, ViT-MAE; transformers 5.x and 4.x module layouts). Returns ``None`` for
    ``rate == 0``.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"backbone_drop_path: must be in [0, 1), got {rate!r}")
    if rate == 0.0:
        return None
    blocks = residual_branches(model)
    rates = drop_path_rates(float(rate), len(blocks))
    handles = [branch.register_forward_hook(_DropBranch(r))
               for branches, r in zip(blocks, rates) for branch in branches]
    return BackboneDropPath(rates, handles)
