"""Rebuilding an adapted layer's input in backward from what the op that produced it saved
anyway, so the fast path's branch-weight gradient keeps no extra activation
(:class:`InputRebuild`; used by :mod:`consolidator_hf.fast_path`).

Under ``torch.compile`` the same trade is made by the compiler
(:func:`consolidator_hf.compiled_path.recompute_inputs`).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(rows, features)``: a view (``t`` itself when it already is: a reshape to the
    same shape would still cost a dispatch, and the fast path calls this on every step)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def take_samples(t: Union[torch.Tensor, "RowFunction"], samples: torch.Tensor, batch: int
                 ) -> torch.Tensor:
    """The rows of the given samples of ``t`` (``(rows, f)`` or ``(batch, ..., f)``, every sample
    the same number of rows), as ``(len(samples) * rows per sample, f)``: one ``index_select``
    whatever the samples are (``samples``: a long tensor on ``t``'s device). A
    :class:`RowFunction` builds just those rows from the same rows of its parts."""
    if isinstance(t, RowFunction):
        return t.gather(samples, batch)
    # (a reshape only where dim 0 is not the samples: each is a dispatch)
    picked = (t if t.shape[0] == batch else t.reshape(batch, -1)).index_select(0, samples)
    return picked if picked.dim() == 2 and picked.shape[-1] == t.shape[-1] \
        else picked.view(-1, t.shape[-1])


class RowFunction:
    """Rows of a tensor built from per-row parts on demand: ``f(a, b)`` its rows ``[a, b)``,
    ``f.gather(samples, batch)`` the rows of the given samples (:func:`take_samples`), each
    computed from the same rows of ``parts`` only."""

    __slots__ = ("_build", "_parts", "_n")

    def __init__(self, build: Callable[..., torch.Tensor],
                 parts: Sequence[torch.Tensor]) -> None:
        self._build, self._parts, self._n = build, tuple(parts), parts[0].shape[0]

    def __call__(self, a: int, b: int) -> torch.Tensor:
        # no slices for all rows (each is a dispatch)
        if (a, b) == (0, self._n):
            return self._build(*self._parts)
        return self._build(*(p[a:b] for p in self._parts))

    def gather(self, samples: torch.Tensor, batch: int) -> torch.Tensor:
        return self._build(*(take_samples(p, samples, batch) for p in self._parts))


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

    def _row_function(self, tensors: Sequence[Optional[torch.Tensor]], finish
                      ) -> RowFunction:
        """Rows of ``x`` rebuilt from ``tensors``, each passed through ``finish`` (a cast)."""
        if self.kind == "gelu":
            approximate = self.approximate
            return RowFunction(lambda u: finish(F.gelu(u, approximate=approximate)),
                               (as_rows(tensors[0]),))
        u, mean, rstd, weight, bias = tensors
        u, mean, rstd = as_rows(u), mean.reshape(-1, 1), rstd.reshape(-1, 1)
        shift = -mean * rstd  # (u - mean) * rstd = u * rstd + shift: one pass over u
        wide = rstd.dtype

        def layer_norm_rows(ua: torch.Tensor, sh: torch.Tensor, rs: torch.Tensor) -> torch.Tensor:
            # mean/rstd are fp32 for low-precision inputs: compute there and round once, as
            # the LayerNorm kernel does (chunk by chunk, so no wide copy of u exists whole)
            x = torch.addcmul(sh, ua if ua.dtype == wide else ua.to(wide), rs)
            if weight is not None and bias is not None:
                x = torch.addcmul(bias, x, weight, out=x)
            elif weight is not None:
                x = x.mul_(weight)
            elif bias is not None:
                x = x.add_(bias)
            return finish(x)

        return RowFunction(layer_norm_rows, (u, shift, rstd))

    def rows(self, tensors: Sequence[Optional[torch.Tensor]], dtype: torch.dtype
             ) -> RowFunction:
        """The rows of ``x`` in ``dtype`` for one reader's backward (:class:`RowFunction`),
        built from ``tensors`` (this object's tensors as the reader's ``ctx.saved_tensors``
        unpacked them)."""
        out_dtype = self.dtype
        shared = self.readers > 1 or self._shared is not None
        self.readers -= 1
        if not shared:
            # rounded to the input's dtype, then cast to the compute dtype
            return self._row_function(
                tensors, lambda r: r if r.dtype == out_dtype == dtype else
                r.to(out_dtype).to(dtype))
        x = self._shared
        if x is None:
            x = self._row_function(
                tensors, lambda r: r if r.dtype == out_dtype else r.to(out_dtype))(
                0, as_rows(tensors[0]).shape[0])
        # Kept until the last registered reader has taken it.
        self._shared = x if self.readers > 0 else None
        return RowFunction(lambda r: r, (x if x.dtype == dtype else x.to(dtype),))

    def release(self) -> None:
        """A registered reader that will never ask (it needs no weight gradient)."""
        self.readers -= 1
        if self.readers <= 0:
            self._shared = None
