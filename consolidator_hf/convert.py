"""Checkpoints of the paper's own code (a timm ViT fork) and plain timm ViTs -> Hugging Face.

Reading and understanding the checkpoint (its layout, docs/DESIGN.md section 4) is
:mod:`.timm_checkpoint`; this module builds Hugging Face models from the parsed
:class:`~.timm_checkpoint.TimmViT` and writes the folders. Channel shuffle is a training flag, not
in the weights: pass it.

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

import os
from typing import Callable, Dict, List, Optional, Union

import torch

from .cards import converted_card
from .io import write_folder
from .targets import (HEAD_MODULES, HF_VIT_BACKBONE_PREFIX, HF_VIT_KEYS, QKV_MODULES,
                      TIMM_VIT_LINEARS, TIMM_VIT_NORMS, rename_4_to_5)
from .timm_checkpoint import ConversionError, LinearWeights, TimmViT, load_checkpoint, parse_timm_vit

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
