"""``ConsolidatorConfig``: what to adapt and how, saved as ``consolidator_config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from .io import atomic_write_text, resolve_file

CONFIG_NAME = "consolidator_config.json"
IMPLS = ("fast", "reference")
WEIGHTS_NAME = "consolidator_model.safetensors"
FORMAT_VERSION = 1
QKV_GROUPINGS = ("separate", "fused")


@dataclass
class ConsolidatorConfig:
    """Configuration of a Consolidator adapter (PEFT-like).

    Args:
        groups: one branch per entry, each the group count of that branch's grouped
            connection. ``(384,)`` is the paper's ViT-B/16 setting (blocks of 2 channels).
        channel_shuffle: shuffle each branch's input channels (off in the paper's VTAB scripts).
        drop_rate: per-sample probability of dropping a branch in training.
        branch_bias: give each branch a bias ``c_k``.
        init_range: branch weights and biases start uniform in ``[-init_range, init_range]``.
        target_modules: names or dot-bounded suffixes of the ``nn.Linear`` layers to adapt, or a
            regex string matched against full module names. ``None``: the per-``model_type``
            table in :mod:`consolidator_hf.targets`.
        exclude_modules: names/suffixes (or a regex string) never adapted.
        modules_to_save: modules trained in full and saved in the adapter (the new head).
        train_bias: train the biases of the adapted linear layers.
        train_layernorm: train every LayerNorm.
        qkv_grouping: ``"separate"`` groups each of q, k and v on its own; ``"fused"`` groups
            them as the paper's single qkv layer (``3D x D``, rows ``[q; k; v]``): a group of
            ``3D/g`` rows may span q and k, or k and v. Same parameter count, the paper's
            sparsity pattern. Group counts must then divide ``3D``.
        backbone_drop_path: stochastic depth on the frozen backbone's residual branches,
            rising linearly over depth (layer ``i`` of ``L``: ``p * i / (L - 1)``, as timm);
            training only. The paper trains with 0.1.
        base_model_name_or_path, revision: the base model the adapter belongs to.
        impl: forward implementation of the adapted layers: ``"fast"`` (one merged-weight
            GEMM with a block-structured backward; default) or ``"reference"`` (the formula
            literally, the oracle the fast path is tested against). Same results either way.
    """

    groups: Tuple[int, ...] = (384,)
    channel_shuffle: bool = False
    drop_rate: float = 0.0
    branch_bias: bool = True
    init_range: float = 1e-3
    target_modules: Optional[Union[List[str], str]] = None
    exclude_modules: Optional[Union[List[str], str]] = None
    modules_to_save: Optional[List[str]] = field(default_factory=lambda: ["classifier"])
    train_bias: bool = True
    train_layernorm: bool = True
    qkv_grouping: str = "separate"
    backbone_drop_path: float = 0.0
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    impl: str = "fast"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        groups = self.groups
        if isinstance(groups, int) and not isinstance(groups, bool):
            groups = (groups,)
        if not isinstance(groups, (list, tuple)) or not groups:
            raise ValueError(f"groups: expected a non-empty tuple of ints, got {self.groups!r}")
        for g in groups:
            if not isinstance(g, int) or isinstance(g, bool) or g < 1:
                raise ValueError(f"groups: every entry must be a positive int, got {self.groups!r}")
        self.groups = tuple(groups)
        for name in ("channel_shuffle", "branch_bias", "train_bias", "train_layernorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if isinstance(self.drop_rate, bool) or not isinstance(self.drop_rate, (int, float)) \
                or not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate: must be in [0, 1), got {self.drop_rate!r}")
        if self.qkv_grouping not in QKV_GROUPINGS:
            raise ValueError(f"qkv_grouping: must be one of {QKV_GROUPINGS}, got {self.qkv_grouping!r}")
        if isinstance(self.backbone_drop_path, bool) or not isinstance(
                self.backbone_drop_path, (int, float)) or not 0.0 <= self.backbone_drop_path < 1.0:
            raise ValueError(f"backbone_drop_path: must be in [0, 1), got {self.backbone_drop_path!r}")
        if isinstance(self.init_range, bool) or not isinstance(self.init_range, (int, float)) \
                or not math.isfinite(self.init_range) or not self.init_range > 0.0:
            raise ValueError(f"init_range: must be a finite number > 0, got {self.init_range!r}")
        for name in ("target_modules", "exclude_modules"):
            self._check_module_spec(name, getattr(self, name))
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise ValueError(
                    f"modules_to_save: expected a list of module names, got {self.modules_to_save!r}"
                )
            self.modules_to_save = list(self.modules_to_save)
        if self.impl not in IMPLS:
            raise ValueError(f"impl: must be one of {IMPLS}, got {self.impl!r}")
        for name in ("base_model_name_or_path", "revision"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{name}: expected a string or None, got {v!r}")

    def _check_module_spec(self, name: str, spec: Any) -> None:
        if spec is None:
            return
        if isinstance(spec, str):
            try:
                re.compile(spec)
            except re.error as e:
                raise ValueError(f"{name}: invalid regex {spec!r}: {e}") from None
            return
        if not isinstance(spec, (list, tuple)) or not spec or not all(
            isinstance(t, str) and t for t in spec
        ):
            raise ValueError(f"{name}: expected a non-empty list of module names or a regex "
                             f"string, got {spec!r}")
        setattr(self, name, list(spec))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["groups"] = list(self.groups)
        d["format_version"] = FORMAT_VERSION
        d["adapter_type"] = "CONSOLIDATOR"
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ConsolidatorConfig":
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        d.pop("adapter_type", None)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"format_version: expected an integer >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"format_version: {version!r} is newer than this library "
                             f"understands ({FORMAT_VERSION}); upgrade consolidator_hf")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"ConsolidatorConfig: ignoring unknown keys {unknown}", stacklevel=2)
        kwargs = {k: v for k, v in d.items() if k in known}
        if isinstance(kwargs.get("groups"), list):
            kwargs["groups"] = tuple(kwargs["groups"])
        return cls(**kwargs)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write ``consolidator_config.json`` into ``save_directory`` (atomically)."""
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_pretrained(
        cls, path_or_repo: Union[str, os.PathLike], *, revision: Optional[str] = None,
        token: Optional[str] = None,
    ) -> "ConsolidatorConfig":
        """Read ``consolidator_config.json`` from a folder or a Hub repo id."""
        path = resolve_file(path_or_repo, CONFIG_NAME, revision=revision, token=token)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_recipe(cls, name: str, task: str, *, backbone: str = "vit_b16_in21k",
                    **overrides: Any) -> "ConsolidatorConfig":
        """The adapter settings of a named training recipe, e.g. ``from_recipe("paper",
        task="cifar100")``: the paper's groups, shuffle, fused qkv grouping, backbone
        stochastic depth and the task's drop rate (read from the registry). ``overrides``
        replace single fields (``target_modules``, ``modules_to_save``...)."""
        from .recipes import get_recipe  # recipes imports the registry; keep config light

        return cls(**{**get_recipe(name, task, backbone).consolidator, **overrides})

    def replace(self, **changes: Any) -> "ConsolidatorConfig":
        return dataclasses.replace(self, **changes)

