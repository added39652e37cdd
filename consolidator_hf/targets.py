"""Per-architecture knowledge, in one table: which linear layers Consolidator adapts.

transformers 5.x renamed the ViT-family modules (``attention.q_proj``, ``mlp.fc1``...)
while 4.x used ``attention.attention.query``, ``intermediate.dense``, ... Both schemes are
listed; injection uses whichever the installed model actually has. ``RENAMES_4_TO_5``
maps adapter keys written under one scheme onto the other.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

# model_type -> naming scheme -> dot-bounded module-name suffixes
TARGET_MODULES: Dict[str, Dict[str, List[str]]] = {
    "vit": {
        "5.x": ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                "mlp.fc1", "mlp.fc2"],
        "4.x": ["attention.attention.query", "attention.attention.key", "attention.attention.value",
                "attention.output.dense", "intermediate.dense", "output.dense"],
    },
    "dinov2": {
        "5.x": ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                "mlp.fc1", "mlp.fc2"],
        "4.x": ["attention.attention.query", "attention.attention.key", "attention.attention.value",
                "attention.output.dense", "mlp.fc1", "mlp.fc2"],
    },
}
# Same layer layout as ViT.
for _alias in ("deit", "vit_msn", "vit_mae"):
    TARGET_MODULES[_alias] = TARGET_MODULES["vit"]

# The attention projections that the paper's fused qkv layer covers, in [q; k; v] order.
QKV_MODULES: Dict[str, List[str]] = {
    "5.x": ["attention.q_proj", "attention.k_proj", "attention.v_proj"],
    "4.x": ["attention.attention.query", "attention.attention.key", "attention.attention.value"],
}

# Where the frozen backbone's residual branches end, for stochastic depth: model_type ->
# naming scheme -> (the ModuleList of blocks, [module paths inside one block whose output is
# a residual branch's value, just before it is added to the residual stream]).
# 5.x ViTLayer adds both residuals itself: the branch values are the outputs of
# ``attention`` (a tuple; its first item) and ``mlp``. 4.x ViTLayer adds the attention
# residual itself, but ViTOutput adds the MLP residual inside its own forward, right after
# its dropout: the output of ``output.dropout`` is that branch's value.
RESIDUAL_BRANCHES: Dict[str, Dict[str, Tuple[str, List[str]]]] = {
    "vit": {
        "5.x": ("layers", ["attention", "mlp"]),
        "4.x": ("encoder.layer", ["attention", "output.dropout"]),
    },
}
for _alias in ("deit", "vit_msn", "vit_mae"):
    RESIDUAL_BRANCHES[_alias] = RESIDUAL_BRANCHES["vit"]

# model_type -> [(4.x pattern, 5.x replacement)] applied to module paths, in order.
_ATTENTION_4_TO_5: List[Tuple[str, str]] = [
    (r"\.attention\.attention\.query\b", ".attention.q_proj"),
    (r"\.attention\.attention\.key\b", ".attention.k_proj"),
    (r"\.attention\.attention\.value\b", ".attention.v_proj"),
    (r"\.attention\.output\.dense\b", ".attention.o_proj"),
]
RENAMES_4_TO_5: Dict[str, List[Tuple[str, str]]] = {
    "vit": [(r"\.encoder\.layer\.(\d+)\.", r".layers.\1.")] + _ATTENTION_4_TO_5 + [
        (r"\.intermediate\.dense\b", ".mlp.fc1"),
        (r"\.layers\.(\d+)\.output\.dense\b", r".layers.\1.mlp.fc2"),
    ],
    "dinov2": list(_ATTENTION_4_TO_5),  # 5.x keeps encoder.layer and mlp.fc1/fc2
}
for _alias in ("deit", "vit_msn", "vit_mae"):
    RENAMES_4_TO_5[_alias] = RENAMES_4_TO_5["vit"]


def name_matches(name: str, pattern: str) -> bool:
    """Dot-bounded suffix match: ``name == pattern`` or ``name.endswith('.' + pattern)``."""
    return name == pattern or name.endswith("." + pattern)


def linear_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def default_target_modules(model: nn.Module) -> List[str]:
    """The table's entry for ``model.config.model_type``, in the scheme the model uses."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TARGET_MODULES:
        raise ValueError(
            f"no default target_modules for model_type={model_type!r}; known: "
            f"{sorted(TARGET_MODULES)}. Pass target_modules explicitly."
        )
    names = linear_names(model)
    best: Optional[List[str]] = None
    for scheme, targets in TARGET_MODULES[model_type].items():
        if all(any(name_matches(n, t) for n in names) for t in targets):
            best = targets
            break
    if best is None:
        raise ValueError(
            f"model_type={model_type!r}: the model's linear layers match neither naming scheme "
            f"({', '.join(TARGET_MODULES[model_type])}); pass target_modules explicitly"
        )
    return list(best)


def qkv_modules(names: Iterable[str]) -> List[str]:
    """The q/k/v suffixes (in [q; k; v] order) of whichever scheme ``names`` use."""
    names = list(names)
    for targets in QKV_MODULES.values():
        if all(any(name_matches(n, t) for n in names) for t in targets):
            return list(targets)
    raise ValueError("the model has no q/k/v projections under either naming scheme "
                     f"({QKV_MODULES})")


def rename_4_to_5(key: str, model_type: str) -> str:
    """Map a transformers 4.x module path of a ``model_type`` model onto the 5.x one."""
    key = "." + key
    for pattern, repl in RENAMES_4_TO_5.get(model_type, []):
        key = re.sub(pattern, repl, key)
    return key[1:]


def residual_branches(model: nn.Module) -> List[List[nn.Module]]:
    """Per block, in depth order, the modules whose outputs are its residual branches."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in RESIDUAL_BRANCHES:
        raise ValueError(
            f"backbone stochastic depth: no residual-branch table for model_type={model_type!r}; "
            f"known: {sorted(RESIDUAL_BRANCHES)}"
        )
    modules = dict(model.named_modules())
    for scheme, (blocks_name, branch_paths) in RESIDUAL_BRANCHES[model_type].items():
        lists = [m for n, m in modules.items()
                 if name_matches(n, blocks_name) and isinstance(m, nn.ModuleList)]
        if len(lists) != 1 or not len(lists[0]):
            continue
        try:
            return [[block.get_submodule(p) for p in branch_paths] for block in lists[0]]
        except AttributeError:
            continue
    raise ValueError(
        f"model_type={model_type!r}: found no blocks with residual branches under either naming "
        f"scheme ({RESIDUAL_BRANCHES[model_type]})"
    )


# model_type -> the classification head's module name on the ...ForImageClassification model
# (trained in full and saved beside the adapter: ``modules_to_save``).
HEAD_MODULES: Dict[str, str] = {"vit": "classifier", "dinov2": "classifier"}
# model_type -> naming scheme -> the LoRA default targets: the query and value projections
# (as in the LoRA paper and PEFT's own ViT examples).
LORA_TARGET_MODULES: Dict[str, Dict[str, List[str]]] = {
    "vit": {"5.x": ["q_proj", "v_proj"], "4.x": ["query", "value"]},
    "dinov2": {"5.x": ["q_proj", "v_proj"], "4.x": ["query", "value"]},
}
for _alias in ("deit", "vit_msn", "vit_mae"):
    HEAD_MODULES[_alias] = HEAD_MODULES["vit"]
    LORA_TARGET_MODULES[_alias] = LORA_TARGET_MODULES["vit"]


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def head_module_name(model: nn.Module) -> str:
    """The classification head's module name for ``model.config.model_type``."""
    model_type = _model_type(model)
    if model_type not in HEAD_MODULES:
        raise ValueError(f"no head module known for model_type={model_type!r}; known: "
                         f"{sorted(HEAD_MODULES)} (targets.HEAD_MODULES)")
    name = HEAD_MODULES[model_type]
    if not isinstance(getattr(model, name, None), nn.Module):
        raise ValueError(f"model_type={model_type!r}: the model has no head module {name!r} "
                         f"(a {type(model).__name__}; expected an ...ForImageClassification model)")
    return name


def lora_target_modules(model: Union[nn.Module, str], scheme: Optional[str] = None) -> List[str]:
    """LoRA's default ``target_modules`` for ``model`` (the query and value projections), in
    the naming scheme the model uses; ``model`` may also be a model_type name, with ``scheme``
    ("5.x" / "4.x") then required."""
    model_type = _model_type(model) if isinstance(model, nn.Module) else model
    if scheme is None and not isinstance(model, nn.Module):
        raise ValueError("lora_target_modules: a model_type name needs scheme='5.x' or '4.x'")
    if model_type not in LORA_TARGET_MODULES:
        raise ValueError(f"method='lora': no default target_modules for model_type={model_type!r}; "
                         f"known: {sorted(LORA_TARGET_MODULES)}. Set target_modules")
    table = LORA_TARGET_MODULES[model_type]
    if scheme is not None:
        if scheme not in table:
            raise ValueError(f"unknown naming scheme {scheme!r}; expected one of {sorted(table)}")
        return list(table[scheme])
    names = {n.rsplit(".", 1)[-1] for n in linear_names(model)}
    for targets in table.values():
        if set(targets) <= names:
            return list(targets)
    raise ValueError(f"method='lora': cannot find the query/value projections of this "
                     f"model_type={model_type!r} model under either naming scheme ({table}); "
                     "set target_modules")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a LayerNorm: ``nn.LayerNorm``, a subclass, or a look-alike whose
    class name ends in ``LayerNorm`` (e.g. Dinov2's); what ``train_layernorm`` trains."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


# The timm ViT layout (the paper's checkpoints, plain timm ViTs) against Hugging Face ViT under
# transformers 5.x names; modules of a 4.x model are found through RENAMES_4_TO_5.
# timm linear -> (HF module inside a block, shape in D = hidden, M = MLP size); "attention.qkv"
# is the fused [q; k; v] layer, split into QKV_MODULES["5.x"].
TIMM_VIT_LINEARS: Dict[str, Tuple[str, str]] = {
    "attn.qkv": ("attention.qkv", "3D,D"),
    "attn.proj": ("attention.o_proj", "D,D"),
    "mlp.fc1": ("mlp.fc1", "M,D"),
    "mlp.fc2": ("mlp.fc2", "D,M"),
}
TIMM_VIT_NORMS: Dict[str, str] = {"norm1": "layernorm_before", "norm2": "layernorm_after"}
HF_VIT_KEYS: Dict[str, str] = {  # timm tensor -> HF name below the backbone prefix (5.x)
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_weight": "embeddings.patch_embeddings.projection.weight",
    "patch_bias": "embeddings.patch_embeddings.projection.bias",
    "norm": "layernorm",
    "blocks": "layers",
}
HF_VIT_BACKBONE_PREFIX = "vit."  # ViTForImageClassification's backbone attribute
