"""Reading the paper's checkpoints (a timm ViT fork) and plain timm ViTs: the file, then what
it holds. :func:`load_checkpoint` reads the tensors (safetensors, or a torch pickle with
``weights_only=True``); :func:`parse_timm_vit` understands them as a :class:`TimmViT` or raises
one :class:`ConversionError` that lists every problem. Building and writing Hugging Face folders
from a :class:`TimmViT` is :mod:`.convert`'s job.

The paper's layout (docs/DESIGN.md section 4): ``cls_token (1,1,D)``, ``pos_embed (1,1+N,D)``,
``patch_embed.proj.{weight,bias}``, ``blocks.{i}.norm1/norm2``, and for each of
``attn.qkv`` (3D x D, rows ``[q; k; v]``), ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` either a plain
``{weight,bias}`` or a Consolidator layer: ``fc_origin.{weight (out,in,1),bias}`` plus
``fc_rep_branches.{k}.group_fc.{weight (out,in/g,1),bias}`` (1x1 grouped Conv1d; ``g = in /
weight.shape[1]``); then ``norm``, ``head``. Channel shuffle is a training flag, not in the
weights: it is passed to :meth:`LinearWeights.merged`. A plain timm ViT (e.g. MoCo v3,
``module.base_encoder.`` prefixes, no head) has only plain layers.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from . import grouped
from .targets import TIMM_VIT_LINEARS

__all__ = ["ConversionError", "LinearWeights", "TimmViT", "load_checkpoint", "parse_timm_vit"]

PathLike = Union[str, os.PathLike]

_MOCO_PREFIX = "module.base_encoder."


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message lists every problem found."""


@dataclass
class LinearWeights:
    """One timm linear layer: frozen ``weight (out, in)``/``bias`` and its branches
    ``[(groups, compact weight (out, in/g), bias or None)]`` (empty for a plain layer)."""

    weight: torch.Tensor
    bias: torch.Tensor
    branches: List[Tuple[int, torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=list)

    def merged(self, shuffle: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W0 + sum_k D_k, b0 + sum_k c_k)`` in fp32: :func:`grouped.merged_linear`."""
        in_features = self.weight.shape[1]
        return grouped.merged_linear(
            self.weight, self.bias,
            [grouped.grouped_to_dense(bw.float(), in_features, g, shuffle)
             for g, bw, _ in self.branches],
            [bb for _, _, bb in self.branches])


@dataclass
class TimmViT:
    """What :func:`parse_timm_vit` understood of a checkpoint."""

    hidden_size: int
    depth: int
    mlp_size: int
    patch_size: int
    image_size: int
    num_channels: int
    num_labels: int  # 0: no classification head (a backbone)
    embeddings: Dict[str, torch.Tensor]  # cls_token, pos_embed, patch_weight, patch_bias
    norms: Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # "blocks.{i}.norm1", ..., "norm"
    linears: Dict[str, LinearWeights]  # "blocks.{i}.attn.qkv", ...
    head: Optional[Tuple[torch.Tensor, torch.Tensor]]
    dropped_keys: List[str] = field(default_factory=list)

    @property
    def has_branches(self) -> bool:
        return any(l.branches for l in self.linears.values())

    def branch_summary(self) -> Dict[str, List[int]]:
        """``{layer: [groups of each branch]}`` for the adapted layers."""
        return {n: [g for g, _, _ in l.branches] for n, l in self.linears.items() if l.branches}


# ---------------------------------------------------------------------- reading

def load_checkpoint(path: PathLike) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The model state dict of a checkpoint file and the keys set aside, prefixes stripped.

    Reads ``.safetensors`` or a torch pickle with ``torch.load(weights_only=True)`` (never
    executes code from the file). The state dict may sit under ``model``, ``state_dict`` or at
    the top level (other entries, e.g. the optimizer state or the training ``args`` Namespace,
    are ignored). ``module.`` prefixes are stripped; in a MoCo v3 training checkpoint only the
    ``module.base_encoder.`` weights are kept (the momentum encoder, the predictor and the
    encoder's projection MLP ``head.<n>.*`` are set aside and returned as the second item).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from .io import load_safetensors

        obj: object = load_safetensors(path)[0]
    else:
        try:
            # Training scripts (the paper's, DeiT's, MoCo's) save their argparse.Namespace
            # beside the weights; it is a plain attribute bag, safe to allow.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConversionError(
                f"{path}: refused to load: the file needs arbitrary code execution to unpickle "
                f"(torch.load(weights_only=True) rejected it): {str(e).splitlines()[0]}. "
                "Load it yourself only if you trust it, and save the state dict with "
                "torch.save(state_dict) or safetensors."
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise ConversionError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                  ) from None
    state = _find_state_dict(obj, path)
    return _strip_prefixes(state)


def _find_state_dict(obj: object, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict (a state dict or {{'model': state_dict}}), "
                              f"got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: no state dict found: entries {bad[:8]} are not tensors "
                              "(looked under 'model', 'state_dict' and the top level)")
    if not obj:
        raise ConversionError(f"{path}: the state dict is empty")
    return dict(obj)


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    dropped: List[str] = []
    if any(k.startswith(_MOCO_PREFIX) for k in state):
        kept = {}
        for k, v in state.items():
            name = k[len(_MOCO_PREFIX):] if k.startswith(_MOCO_PREFIX) else None
            if name is None or re.match(r"head\.\d+\.", name):
                dropped.append(k)  # momentum encoder, predictor, SSL projection MLP
            else:
                kept[name] = v
        return kept, dropped
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}, dropped


# ---------------------------------------------------------------------- parsing

class _Reader:
    """Takes keys out of a state dict, recording missing keys and shape mismatches."""

    def __init__(self, state: Dict[str, torch.Tensor]) -> None:
        self.state = state
        self.used: set = set()
        self.missing: List[str] = []
        self.shape_errors: List[str] = []

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: Optional[Tuple[int, ...]] = None) -> Optional[torch.Tensor]:
        if key not in self.state:
            self.missing.append(key)
            return None
        self.used.add(key)
        t = self.state[key]
        if shape is not None and tuple(t.shape) != tuple(shape):
            self.shape_errors.append(f"{key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
            return None
        return t

    def unknown(self) -> List[str]:
        return sorted(set(self.state) - self.used)


def _conv_to_linear(t: torch.Tensor) -> torch.Tensor:
    """A 1x1 Conv1d weight ``(out, in, 1)`` as ``(out, in)``."""
    return t[..., 0] if t.dim() == 3 and t.shape[-1] == 1 else t


def _read_linear(r: _Reader, prefix: str, out_f: int, in_f: int) -> Optional[LinearWeights]:
    if r.has(f"{prefix}.fc_origin.weight"):
        w = r.take(f"{prefix}.fc_origin.weight", (out_f, in_f, 1))
        b = r.take(f"{prefix}.fc_origin.bias", (out_f,))
        branches = []
        k = 0
        while r.has(f"{prefix}.fc_rep_branches.{k}.group_fc.weight"):
            key = f"{prefix}.fc_rep_branches.{k}.group_fc.weight"
            bw = r.take(key)
            ok = (bw.dim() == 3 and bw.shape[0] == out_f and bw.shape[2] == 1 and bw.shape[1] > 0
                  and in_f % bw.shape[1] == 0 and out_f % (in_f // bw.shape[1]) == 0)
            if not ok:
                r.shape_errors.append(
                    f"{key}: shape {tuple(bw.shape)}, expected ({out_f}, {in_f}/g, 1) for a group "
                    f"count g dividing in={in_f} and out={out_f}")
                k += 1
                continue
            bkey = f"{prefix}.fc_rep_branches.{k}.group_fc.bias"
            bb = r.take(bkey, (out_f,)) if r.has(bkey) else None
            branches.append((in_f // bw.shape[1], _conv_to_linear(bw), bb))
            k += 1
        if w is None or b is None:
            return None
        return LinearWeights(_conv_to_linear(w), b, branches)
    w = r.take(f"{prefix}.weight", (out_f, in_f))
    b = r.take(f"{prefix}.bias", (out_f,))
    return None if w is None or b is None else LinearWeights(w, b)


def _first_shape(state: Dict[str, torch.Tensor], keys: List[str]) -> Optional[Tuple[int, ...]]:
    for k in keys:
        if k in state:
            return tuple(state[k].shape)
    return None


def parse_timm_vit(state: Dict[str, torch.Tensor], source: str = "checkpoint",
                   dropped_keys: Optional[List[str]] = None) -> TimmViT:
    """Understand a timm-layout ViT state dict (with or without Consolidator branches).

    Infers depth, hidden/MLP size, patch and image size (square position grid), branch group
    counts and the number of labels. Raises :class:`ConversionError` listing every unknown key,
    missing key and shape mismatch.
    """
    patch_shape = _first_shape(state, ["patch_embed.proj.weight"])
    if patch_shape is None or len(patch_shape) != 4 or patch_shape[2] != patch_shape[3]:
        raise ConversionError(
            f"{source}: not a timm ViT: 'patch_embed.proj.weight' "
            f"{'is missing' if patch_shape is None else f'has shape {patch_shape}, expected (D, C, P, P)'}"
            f"; keys start with {sorted(state)[:8]}")
    D, C, P = patch_shape[0], patch_shape[1], patch_shape[2]
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))),
                    default=-1)
    if depth == 0:
        raise ConversionError(f"{source}: no 'blocks.<i>.' keys: not a timm ViT")
    fc1 = _first_shape(state, ["blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.fc_origin.weight"])
    if fc1 is None:
        raise ConversionError(f"{source}: missing keys: ['blocks.0.mlp.fc1.weight'] (needed to "
                              "infer the MLP size)")
    M = fc1[0]
    pos = _first_shape(state, ["pos_embed"])
    grid = int(round(((pos[1] - 1) if pos and len(pos) == 3 else 0) ** 0.5))
    if pos is None or len(pos) != 3 or pos[1] - 1 != grid * grid or grid == 0:
        raise ConversionError(
            f"{source}: 'pos_embed' {'is missing' if pos is None else f'has shape {pos}'}: expected "
            f"(1, 1 + N, {D}) with a square grid of N patches after the CLS token")
    sizes = {"D": D, "M": M, "3D": 3 * D}

    r = _Reader(state)
    emb = {
        "cls_token": r.take("cls_token", (1, 1, D)),
        "pos_embed": r.take("pos_embed", (1, 1 + grid * grid, D)),
        "patch_weight": r.take("patch_embed.proj.weight", (D, C, P, P)),
        "patch_bias": r.take("patch_embed.proj.bias", (D,)),
    }
    norms: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    linears: Dict[str, LinearWeights] = {}

    def norm(name: str) -> None:
        w, b = r.take(f"{name}.weight", (D,)), r.take(f"{name}.bias", (D,))
        if w is not None and b is not None:
            norms[name] = (w, b)

    for i in range(depth):
        norm(f"blocks.{i}.norm1")
        norm(f"blocks.{i}.norm2")
        for timm_name, (_, shape) in TIMM_VIT_LINEARS.items():
            out_f, in_f = (sizes[s] for s in shape.split(","))
            lin = _read_linear(r, f"blocks.{i}.{timm_name}", out_f, in_f)
            if lin is not None:
                linears[f"blocks.{i}.{timm_name}"] = lin
    norm("norm")
    head = None
    if r.has("head.weight") or r.has("head.bias"):
        hw = r.take("head.weight")
        hb = r.take("head.bias")
        if hw is not None and (hw.dim() != 2 or hw.shape[1] != D):
            r.shape_errors.append(f"head.weight: shape {tuple(hw.shape)}, expected (num_labels, {D})")
        elif hw is not None and hb is not None and tuple(hb.shape) != (hw.shape[0],):
            r.shape_errors.append(f"head.bias: shape {tuple(hb.shape)}, expected ({hw.shape[0]},)")
        elif hw is not None and hb is not None:
            head = (hw, hb)
    problems = []
    if r.unknown():
        problems.append(f"unknown keys: {r.unknown()}")
    if r.missing:
        problems.append(f"missing keys: {r.missing}")
    if r.shape_errors:
        problems.append("shape mismatches: " + "; ".join(r.shape_errors))
    if problems:
        raise ConversionError(
            f"{source}: cannot convert (a timm ViT with depth={depth}, hidden={D}, mlp={M}, "
            f"patch={P} was expected): " + " | ".join(problems))
    return TimmViT(hidden_size=D, depth=depth, mlp_size=M, patch_size=P, image_size=grid * P,
                   num_channels=C, num_labels=0 if head is None else head[0].shape[0],
                   embeddings=emb, norms=norms, linears=linears, head=head,
                   dropped_keys=list(dropped_keys or []))
