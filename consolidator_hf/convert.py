"""Checkpoints of the paper's own code (a timm ViT fork) and plain timm ViTs -> Hugging Face.

The paper's layout (docs/DESIGN.md section 4): ``cls_token (1,1,D)``, ``pos_embed (1,1+N,D)``,
``patch_embed.proj.{weight,bias}``, ``blocks.{i}.norm1/norm2``, and for each of
``attn.qkv`` (3D x D, rows ``[q; k; v]``), ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` either a plain
``{weight,bias}`` or a Consolidator layer: ``fc_origin.{weight (out,in,1),bias}`` plus
``fc_rep_branches.{k}.group_fc.{weight (out,in/g,1),bias}`` (1x1 grouped Conv1d; ``g = in /
weight.shape[1]``); then ``norm``, ``head``. Channel shuffle is a training flag, not in the
weights: pass it. A plain timm ViT (e.g. MoCo v3, ``module.base_encoder.`` prefixes, no head) has
only plain layers.

Outputs are standard folders written by ``save_pretrained``:

* merged (default): ``ViTForImageClassification`` (``ViTModel`` when the checkpoint has no head)
  whose linear weights are ``W0 + sum_k D_k``, biases ``b0 + sum_k c_k``; loads anywhere
  transformers does, no consolidator_hf needed.
* ``adapter=True``: the frozen base as a standard ViT plus, in the same folder, an unmerged
  Consolidator adapter (``consolidator_config.json``, ``consolidator_model.safetensors``;
  ``qkv_grouping="fused"`` so the paper's qkv branches map one-to-one) for
  ``ConsolidatorModel.from_pretrained``, ready to train further.

Both come with the paper's ``preprocessor_config.json`` and a model card. Nothing is written
unless the whole checkpoint is understood: unknown keys, missing keys and wrong shapes are
reported together, and the folder appears only once complete (temp dir + rename).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import grouped
from .cards import converted_card
from .io import write_folder
from .targets import (HEAD_MODULES, HF_VIT_BACKBONE_PREFIX, HF_VIT_KEYS, QKV_MODULES,
                      TIMM_VIT_LINEARS, TIMM_VIT_NORMS, rename_4_to_5)

__all__ = [
    "ConversionError",
    "LinearWeights",
    "TimmViT",
    "load_checkpoint",
    "parse_timm_vit",
    "convert_checkpoint",
    "paper_image_processor",
]

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


# ---------------------------------------------------------------------- building HF models

def _vit_config(vit: TimmViT, num_heads: Optional[int]):
    from transformers import ViTConfig

    heads = num_heads if num_heads is not None else max(vit.hidden_size // 64, 1)
    if not isinstance(heads, int) or heads < 1 or vit.hidden_size % heads:
        raise ConversionError(f"num_heads={heads} does not divide the hidden size {vit.hidden_size}"
                              " (pass --num-heads)")
    labels = {"num_labels": vit.num_labels} if vit.head is not None else {}
    return ViTConfig(
        hidden_size=vit.hidden_size, num_hidden_layers=vit.depth, num_attention_heads=heads,
        intermediate_size=vit.mlp_size, image_size=vit.image_size, patch_size=vit.patch_size,
        num_channels=vit.num_channels, qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **labels,
    )


def _hf_state_dict(vit: TimmViT, merge: bool, shuffle: bool, prefix: str) -> Dict[str, torch.Tensor]:
    """HF ViT tensors under transformers 5.x names (``prefix`` is ``"vit."`` or ``""``)."""
    e, k = vit.embeddings, HF_VIT_KEYS
    sd = {f"{prefix}{k[name]}": e[name]
          for name in ("cls_token", "pos_embed", "patch_weight", "patch_bias")}
    sd[f"{prefix}{k['norm']}.weight"], sd[f"{prefix}{k['norm']}.bias"] = vit.norms["norm"]
    D = vit.hidden_size
    for i in range(vit.depth):
        blk = f"{prefix}{k['blocks']}.{i}."
        for timm_norm, hf_norm in TIMM_VIT_NORMS.items():
            w, b = vit.norms[f"blocks.{i}.{timm_norm}"]
            sd[f"{blk}{hf_norm}.weight"], sd[f"{blk}{hf_norm}.bias"] = w, b
        for timm_name, (hf_name, _) in TIMM_VIT_LINEARS.items():
            lin = vit.linears[f"blocks.{i}.{timm_name}"]
            w, b = lin.merged(shuffle) if merge else (lin.weight, lin.bias)
            if hf_name == "attention.qkv":  # rows [q; k; v]
                for j, proj in enumerate(QKV_MODULES["5.x"]):
                    sd[f"{blk}{proj}.weight"] = w[j * D:(j + 1) * D]
                    sd[f"{blk}{proj}.bias"] = b[j * D:(j + 1) * D]
            else:
                sd[f"{blk}{hf_name}.weight"], sd[f"{blk}{hf_name}.bias"] = w, b
    if vit.head is not None:
        head = HEAD_MODULES["vit"]
        sd[f"{head}.weight"], sd[f"{head}.bias"] = vit.head
    return sd


def _load_into(model: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """Load 5.x-named tensors into ``model`` (whichever naming scheme it uses), strictly."""
    model_keys = list(model.state_dict())
    canon = {rename_4_to_5(k, "vit"): k for k in model_keys}
    mapped = {canon.get(k, k): v.detach().to(torch.float32).contiguous() for k, v in sd.items()}
    missing = sorted(set(model_keys) - set(mapped))
    unexpected = sorted(set(mapped) - set(model_keys))
    if missing or unexpected:  # a bug in this module, not in the user's file
        raise RuntimeError(f"internal key mapping mismatch: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(mapped, strict=True)


def build_hf_model(vit: TimmViT, *, num_heads: Optional[int] = None, merge: bool = True,
                   channel_shuffle: bool = False) -> torch.nn.Module:
    """``ViTForImageClassification`` (or ``ViTModel`` without a head) holding the checkpoint.

    ``merge=True`` folds the branches in; ``merge=False`` gives the frozen base ``W0, b0``.
    """
    from transformers import ViTForImageClassification, ViTModel

    config = _vit_config(vit, num_heads)
    if vit.head is not None:
        model = ViTForImageClassification(config)
        prefix = HF_VIT_BACKBONE_PREFIX
    else:
        model = ViTModel(config, add_pooling_layer=False)
        prefix = ""
    _load_into(model, _hf_state_dict(vit, merge, channel_shuffle, prefix))
    return model.eval()


def _adapter_model(vit: TimmViT, base: torch.nn.Module, channel_shuffle: bool):
    """Wrap ``base`` with Consolidator branches holding the checkpoint's branch weights."""
    from .config import ConsolidatorConfig
    from .model import ConsolidatorModel

    adapted = vit.branch_summary()
    if not adapted:
        raise ConversionError("adapter=True needs Consolidator branches; the checkpoint has none "
                              "(convert it without --adapter)")
    signatures = {(tuple(g), tuple(b is not None for _, _, b in vit.linears[n].branches))
                  for n, g in adapted.items()}
    if len(signatures) != 1:
        raise ConversionError(
            "adapter=True needs the same branches (group counts, biases) on every adapted layer; "
            f"found {sorted({(n, tuple(g)) for n, g in adapted.items()}, key=str)[:8]}")
    (groups, has_bias), = signatures
    if len(set(has_bias)) != 1:
        raise ConversionError("adapter=True needs all branches with a bias or all without")
    all_adapted = len(adapted) == vit.depth * len(TIMM_VIT_LINEARS)
    # Module names of the wrapped model, found from the 5.x names whichever scheme it uses.
    canon = {rename_4_to_5(n, "vit"): n for n, _ in base.named_modules()}
    prefix = HF_VIT_BACKBONE_PREFIX if vit.head is not None else ""

    def hf_names(timm_name: str) -> List[str]:
        i, kind = timm_name.split(".", 2)[1:]
        hf = TIMM_VIT_LINEARS[kind][0]
        subs = QKV_MODULES["5.x"] if hf == "attention.qkv" else [hf]
        return [canon[f"{prefix}{HF_VIT_KEYS['blocks']}.{i}.{s}"] for s in subs]

    targets = None if all_adapted else [h for n in sorted(adapted) for h in hf_names(n)]
    config = ConsolidatorConfig(
        groups=groups, channel_shuffle=channel_shuffle, branch_bias=has_bias[0],
        qkv_grouping="fused", target_modules=targets,
        modules_to_save=[HEAD_MODULES["vit"]] if vit.head is not None else None,
    )
    model = ConsolidatorModel(base, config)
    layers = dict(model.consolidator_layers())
    with torch.no_grad():
        for timm_name in adapted:
            names = hf_names(timm_name)
            rows = 0
            for hf in names:
                layer = layers[hf]
                for branch, (_, bw, bb) in zip(layer.branches, vit.linears[timm_name].branches):
                    branch.weight.copy_(bw[rows:rows + layer.out_features])
                    if bb is not None:
                        branch.bias.copy_(bb[rows:rows + layer.out_features])
                rows += layer.out_features
    return model


# ---------------------------------------------------------------------- writing

def paper_image_processor(image_size: int = 224):
    """The paper's preprocessing as a ``ViTImageProcessor``: bicubic resize to ``image_size``,
    ImageNet mean/std (the ``"paper"`` preset of :mod:`consolidator_hf.processors`)."""
    from .processors import default_image_processor

    return default_image_processor(image_size, "paper")


def _model_card(vit: TimmViT, source: str, merged: bool, shuffle: bool, heads: int) -> str:
    is_classifier = vit.head is not None
    cls = "ViTForImageClassification" if is_classifier else "ViTModel"
    branches = vit.branch_summary()
    group_sets = sorted({tuple(g) for g in branches.values()})
    if branches:
        what = (f"Consolidator branches (group counts per branch: {', '.join(map(str, group_sets))}, "
                f"channel shuffle {'on' if shuffle else 'off'}) on {len(branches)} linear layers, "
                + ("**merged** into the linear weights: a plain ViT, no inference overhead."
                   if merged else "kept **unmerged** as a consolidator_hf adapter beside the frozen base."))
    else:
        what = "a plain timm ViT (no Consolidator branches)."
    origin = ("a checkpoint of the Consolidator paper's code (Hao et al., ICLR 2023; a timm ViT)"
              if branches else "a timm-format ViT checkpoint")
    load = (f"```python\nfrom transformers import {cls}, ViTImageProcessor\n"
            f"model = {cls}.from_pretrained(PATH)\nprocessor = ViTImageProcessor.from_pretrained(PATH)\n```")
    if not merged:
        load = (f"```python\nfrom transformers import {cls}\nfrom consolidator_hf import ConsolidatorModel\n"
                f"model = ConsolidatorModel.from_pretrained({cls}.from_pretrained(PATH), PATH, is_trainable=True)\n"
                "merged = model.merge_and_unload()  # or keep training the branches\n```")
    rows = [("depth", vit.depth), ("hidden size", vit.hidden_size), ("MLP size", vit.mlp_size),
            ("attention heads", heads), ("patch / image size", f"{vit.patch_size} / {vit.image_size}"),
            ("labels", vit.num_labels if is_classifier else "none (backbone)"),
            ("LayerNorm eps", "1e-6 (timm)")]
    preprocessing = (f"Preprocessing (`preprocessor_config.json`): the paper's, bicubic resize straight to "
                     f"{vit.image_size}x{vit.image_size}, ImageNet mean/std."
                     + (" Label names were not stored in the checkpoint (`LABEL_i`)." if is_classifier else ""))
    return str(converted_card(
        class_name=cls, source=source, origin=origin, what=what, rows=rows,
        preprocessing=preprocessing, usage=load,
        tags=["vision", "vit", "consolidator" if branches else "timm-converted", "converted"],
        pipeline_tag="image-classification" if is_classifier else "image-feature-extraction"))


def _check_output_outside_input(checkpoint: str, output: str) -> None:
    """Replacing ``output`` must never delete the checkpoint being read (or anything beside it
    that the conversion did not write)."""
    src, out = os.path.realpath(checkpoint), os.path.realpath(output)
    if os.path.commonpath([src, out]) == out:
        raise ConversionError(f"{output}: the output folder contains the input {checkpoint}; "
                              "choose an output folder outside it")


def _check_finite(state: Dict[str, torch.Tensor], source: str) -> None:
    """A NaN/inf anywhere (a diverged branch, a corrupt head) would convert into a model that
    gives NaN logits: refuse it, naming the tensors."""
    bad = [k for k, v in state.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConversionError(f"{source}: {len(bad)} tensor(s) hold NaN or inf values: "
                              f"{bad[:10]}{' ...' if len(bad) > 10 else ''}")


def convert_checkpoint(
    checkpoint: PathLike, output: PathLike, *, num_heads: Optional[int] = None,
    channel_shuffle: bool = False, adapter: bool = False, overwrite: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> TimmViT:
    """Convert a checkpoint of the paper's code (or a plain timm ViT) into an HF folder.

    Args:
        checkpoint: ``.pth``/``.pt``/``.safetensors`` file.
        output: folder to create (must not exist or be empty, unless ``overwrite``).
        num_heads: attention heads (not in the weights); default ``hidden_size // 64``.
        channel_shuffle: the branches were trained with channel shuffle (not in the weights).
        adapter: write the frozen base plus an unmerged adapter instead of a merged model.

    Returns what was understood of the checkpoint.
    """
    checkpoint = os.fspath(checkpoint)
    _check_output_outside_input(checkpoint, os.fspath(output))
    state, dropped = load_checkpoint(checkpoint)
    _check_finite(state, checkpoint)
    vit = parse_timm_vit(state, source=checkpoint, dropped_keys=dropped)
    heads = num_heads if num_heads is not None else max(vit.hidden_size // 64, 1)
    if dropped:
        log(f"set aside {len(dropped)} keys outside the MoCo v3 base encoder (e.g. {dropped[:3]})")
    # Build everything in memory first: any error leaves the disk untouched.
    if adapter:
        base = build_hf_model(vit, num_heads=heads, merge=False)
        wrapped = _adapter_model(vit, build_hf_model(vit, num_heads=heads, merge=False),
                                 channel_shuffle)
    else:
        base = build_hf_model(vit, num_heads=heads, merge=True, channel_shuffle=channel_shuffle)
        wrapped = None
    processor = paper_image_processor(vit.image_size)
    card = _model_card(vit, checkpoint, merged=not adapter, shuffle=channel_shuffle, heads=heads)
    with write_folder(output, overwrite=overwrite) as tmp:
        base.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if wrapped is not None:
            wrapped.save_pretrained(tmp, consolidate=False)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
    log(f"wrote {'base + adapter' if adapter else 'merged model'} to {output}: depth={vit.depth}, "
        f"hidden={vit.hidden_size}, mlp={vit.mlp_size}, heads={heads}, patch={vit.patch_size}, "
        f"image={vit.image_size}, labels={vit.num_labels or 'none'}, "
        f"adapted layers={len(vit.branch_summary())}")
    return vit
