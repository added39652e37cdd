"""``FinetuneConfig``: everything one fine-tuning run needs, with the adapter settings nested
as a :class:`~consolidator_hf.config.ConsolidatorConfig`.

Each field's help text (and its choices) lives in the field's metadata; ``scripts/finetune.py``
builds its flags from them. The six adapter settings a run usually changes (``groups``,
``channel_shuffle``, ``drop_rate``, ``target_modules``, ``qkv_grouping``,
``backbone_drop_path``) are also flat fields, so that YAML configs and flags stay flat: those
fields are *views* of the nested config (reading or setting ``cfg.groups`` reads or replaces
``cfg.consolidator.groups``), never a second copy. Defaults and validation of the adapter
settings are ``ConsolidatorConfig``'s.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..config import QKV_GROUPINGS, ConsolidatorConfig
from ..processors import PREPROCESSING

METHODS = ("consolidator", "linear", "bitfit", "full", "lora")
PREPROCESS = PREPROCESSING  # "paper" | "processor" (consolidator_hf.processors)
RECIPES = ("custom", "paper")
SAVE_STRATEGIES = ("no", "epoch", "steps")


class _Unset:
    """The default of a flat adapter field: the nested ``ConsolidatorConfig`` value stands."""

    def __repr__(self) -> str:
        return "<ConsolidatorConfig's>"


_UNSET = _Unset()


def _help(text: str, choices: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
    return {"help": text, "choices": choices} if choices else {"help": text}


def _adapter_field(text: str, choices: Optional[Tuple[str, ...]] = None) -> Any:
    """A flat view of the same-named ``ConsolidatorConfig`` field (see the module docstring)."""
    return field(default=_UNSET, metadata={**_help(text, choices), "adapter": True})


class _AdapterView:
    """Data descriptor: ``cfg.<name>`` reads ``cfg.consolidator.<name>``; setting it replaces
    the nested config by a validated copy (never mutates one another config may share)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return _UNSET
        return getattr(_nested(obj), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if value is _UNSET:
            return
        obj.consolidator = _nested(obj).replace(**{self.name: value})


def _nested(obj: "FinetuneConfig") -> ConsolidatorConfig:
    adapter = obj.__dict__.get("consolidator")
    if isinstance(adapter, Mapping):
        adapter = obj.__dict__["consolidator"] = _adapter_from_mapping(adapter)
    if not isinstance(adapter, ConsolidatorConfig):
        raise ValueError(f"consolidator: expected a ConsolidatorConfig or a mapping of its "
                         f"fields, got {adapter!r}")
    return adapter


def _adapter_from_mapping(d: Mapping[str, Any]) -> ConsolidatorConfig:
    known = {f.name for f in dataclasses.fields(ConsolidatorConfig)}
    unknown = sorted(set(d) - known - {"format_version", "adapter_type"})
    if unknown:
        raise ValueError(f"consolidator: unknown ConsolidatorConfig fields {unknown}; "
                         f"known: {sorted(known)}")
    return ConsolidatorConfig.from_dict(dict(d))


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs; ``scripts/finetune.py`` flags mirror these fields.

    Data: ``task`` in the VTAB-1k on-disk format under ``data_dir``, trained on ``train_split``,
    evaluated on ``eval_split``. Model: ``model`` is a folder or Hub id of an
    image-classification backbone; ``method`` picks what trains; ``consolidator`` holds the
    adapter settings of ``method="consolidator"`` (its ``modules_to_save`` left at the default
    becomes the model's head, its ``base_model_name_or_path`` left unset becomes ``model``).
    Schedule: AdamW, linear warmup for ``warmup_epochs`` from ``warmup_start_lr`` to
    ``learning_rate``, then cosine down to ``min_lr``. ``recipe="paper"`` fills the fields left
    at their defaults from :func:`consolidator_hf.recipes.paper_recipe`.
    """

    model: str = field(default="google/vit-base-patch16-224-in21k", metadata=_help(
        "backbone: a folder or Hub id (the default is a Hub id: it needs the network or the "
        "Hugging Face cache)"))
    task: Optional[str] = field(default=None, metadata=_help(
        "VTAB-1k task (training or folder name) under --data-dir"))
    data_dir: str = field(default="data/vtab-1k", metadata=_help(
        "the vtab-1k folder (<data-dir>/<task>/{train800,val200,train800val200,test}.txt)"))
    num_classes: Optional[int] = field(default=None, metadata=_help(
        "class count, for tasks that are not in the VTAB-1k registry"))
    train_split: str = field(default="train800val200", metadata=_help("the split trained on"))
    eval_split: str = field(default="test", metadata=_help("the split evaluated after training"))
    method: str = field(default="consolidator", metadata=_help("what trains", METHODS))
    # The adapter settings; declared before their flat views, which __init__ then applies.
    consolidator: ConsolidatorConfig = field(default_factory=ConsolidatorConfig, metadata=_help(
        "more ConsolidatorConfig fields as a JSON object, e.g. '{\"init_range\": 0.01}'"))
    groups: Tuple[int, ...] = _adapter_field(
        "Consolidator group count per branch (one branch per value)")
    channel_shuffle: bool = _adapter_field("shuffle each branch's input channels")
    drop_rate: float = _adapter_field("per-sample probability of dropping a branch in training")
    target_modules: Optional[List[str]] = _adapter_field(
        "linear layers to adapt (names or dot-bounded suffixes; default: the model type's table)")
    qkv_grouping: str = _adapter_field(
        "fused: group q, k, v as one fused qkv layer, as the paper's timm ViT", QKV_GROUPINGS)
    backbone_drop_path: float = _adapter_field(
        "stochastic depth on the backbone's residual branches (paper: 0.1)")
    # LoRA (needs peft)
    lora_r: int = field(default=8, metadata=_help("LoRA rank (method lora)"))
    lora_alpha: Optional[int] = field(default=None, metadata=_help(
        "LoRA alpha (method lora; default: the rank)"))
    # optimisation
    learning_rate: float = field(default=1e-3, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay"))
    num_train_epochs: float = field(default=100.0, metadata=_help("training epochs"))
    max_steps: int = field(default=-1, metadata=_help(
        "stop after this many optimizer steps (overrides the epochs; -1: off)"))
    batch_size: int = field(default=64, metadata=_help("per-device training batch size"))
    eval_batch_size: Optional[int] = field(default=None, metadata=_help(
        "per-device evaluation batch size (default: the training one)"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "batches accumulated per optimizer step"))
    warmup_epochs: float = field(default=10.0, metadata=_help(
        "linear warmup length in epochs (converted to steps; clamped, with a warning, to half "
        "the run when longer)"))
    warmup_start_lr: float = field(default=0.0, metadata=_help("learning rate at the first step"))
    min_lr: float = field(default=0.0, metadata=_help("learning rate the cosine decays to"))
    seed: int = field(default=42, metadata=_help("seed of the head, the branches and the data order"))
    bf16: bool = field(default=False, metadata=_help("bfloat16 mixed precision"))
    fp16: bool = field(default=False, metadata=_help("float16 mixed precision"))
    torch_compile: bool = field(default=False, metadata=_help(
        "compile the model with torch.compile (the Trainer's torch_compile, inductor backend; "
        "the first steps pay the compilation)"))
    torch_compile_backend: str = field(default="inductor", metadata=_help(
        "torch.compile backend with --torch-compile (the Trainer's torch_compile_backend; "
        "'aot_eager' traces forward and backward without generating kernels: a quick check)"))
    # preprocessing
    preprocess: str = field(default="processor", metadata=_help(
        "the backbone's image processor, or the paper's bicubic resize + ImageNet mean/std",
        PREPROCESS))
    image_size: Optional[int] = field(default=None, metadata=_help(
        "input size in pixels (default: the model's own image size, for both preprocessings)"))
    recipe: str = field(default="custom", metadata=_help(
        "'paper' fills the options you do not give from the paper's per-task recipe", RECIPES))
    backbone: str = field(default="vit_b16_in21k", metadata=_help(
        "which paper recipe set: vit_b16_in21k or mocov3_vit_b16"))
    # run control
    output_dir: str = field(default="outputs/finetune", metadata=_help(
        "run folder: adapter/, merged/, metrics.json, checkpoints/"))
    resume_from_checkpoint: Optional[str] = field(default=None, metadata=_help(
        "a checkpoint folder, or 'last' for the newest under <output-dir>/checkpoints"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "clear an output folder that holds another run first (without it, such a folder is "
        "refused before any work)"))
    allow_partial_resume: bool = field(default=False, metadata=_help(
        "resume from a checkpoint that lacks optimizer.pt, scheduler.pt or rng_state.pth "
        "(with a warning; the run then does not continue exactly). Off: such a checkpoint "
        "is refused"))
    save_strategy: str = field(default="epoch", metadata=_help(
        "when to write a checkpoint", SAVE_STRATEGIES))
    save_steps: int = field(default=500, metadata=_help("checkpoint interval for --save-strategy steps"))
    save_total_limit: Optional[int] = field(default=2, metadata=_help("checkpoints kept"))
    logging_steps: int = field(default=10, metadata=_help("log the loss every this many steps"))
    use_cpu: bool = field(default=False, metadata=_help(
        "train on the CPU (needed for multi-process CPU runs: accelerate launch --multi_gpu "
        "--num_processes 2 ... --use-cpu)"))
    dataloader_num_workers: int = field(default=0, metadata=_help("data-loading worker processes"))
    max_train_samples: Optional[int] = field(default=None, metadata=_help(
        "use only the first N training images"))
    max_eval_samples: Optional[int] = field(default=None, metadata=_help(
        "use only the first N evaluation images"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field (the adapter's fields are
        validated by ``ConsolidatorConfig`` whenever they are set)."""
        _nested(self)
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name}: expected one of {allowed}, got {getattr(self, f.name)!r}")
        for name in ("learning_rate", "batch_size", "gradient_accumulation_steps", "lora_r"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "warmup_epochs", "warmup_start_lr", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError("num_train_epochs: must be > 0 (or set max_steps)")
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16: choose one")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {self.num_classes!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FinetuneConfig":
        """Build from a mapping (e.g. a YAML file); unknown keys are an error naming them.

        ``consolidator`` may be a mapping of ``ConsolidatorConfig`` fields; the key
        ``consolidator_kwargs`` (the command line's ``--consolidator-kwargs``) is merged over it.
        """
        d = dict(d)
        extra = d.pop("consolidator_kwargs", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields {unknown}; known: {sorted(known)}")
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise ValueError(f"consolidator_kwargs: expected a mapping, got {extra!r}")
            base = d.get("consolidator") or {}
            if isinstance(base, ConsolidatorConfig):
                base = adapter_dict(base)
            d["consolidator"] = {**base, **extra}
        if isinstance(d.get("consolidator"), Mapping):
            d["consolidator"] = _adapter_from_mapping(d["consolidator"])
        if isinstance(d.get("groups"), list):
            d["groups"] = tuple(d["groups"])
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        """Flat fields (the adapter views included) plus ``consolidator``: the nested config's
        other fields. ``from_dict`` reads it back."""
        # overwrite_output_dir is what to do with the folder, not a setting of the run
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("consolidator", "overwrite_output_dir")}
        d["groups"] = list(self.groups)
        views = adapter_view_names()
        d["consolidator"] = {k: v for k, v in adapter_dict(self.consolidator).items()
                             if k not in views}
        return d


def adapter_view_names() -> Tuple[str, ...]:
    """The flat ``FinetuneConfig`` fields that are views of ``ConsolidatorConfig`` fields."""
    return tuple(f.name for f in dataclasses.fields(FinetuneConfig) if f.metadata.get("adapter"))


def adapter_dict(adapter: ConsolidatorConfig) -> Dict[str, Any]:
    """A ``ConsolidatorConfig``'s fields as a plain dict (no file-format keys)."""
    d = dataclasses.asdict(adapter)
    d["groups"] = list(adapter.groups)
    return d


for _name in adapter_view_names():
    setattr(FinetuneConfig, _name, _AdapterView(_name))


# ---------------------------------------------------------------------- recipes
def apply_recipe(cfg: FinetuneConfig) -> FinetuneConfig:
    """A copy of ``cfg`` with the paper recipe filled into every field left at its default.

    The recipe's dicts are applied generically: a key naming a :class:`FinetuneConfig` field
    sets it, any other :class:`ConsolidatorConfig` key sets the nested config's field (fields
    added to the recipe later flow through); in both cases a value given explicitly wins.
    """
    if cfg.recipe == "custom":
        return cfg
    if not cfg.task:
        raise ValueError("recipe='paper' needs a VTAB-1k task name (task)")
    from ..recipes import paper_recipe

    recipe = paper_recipe(cfg.task, cfg.backbone)
    defaults = FinetuneConfig()
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"consolidator"}
    adapter_fields = {f.name for f in dataclasses.fields(ConsolidatorConfig)}
    changes: Dict[str, Any] = {}
    adapter_changes: Dict[str, Any] = {}
    settings = {**recipe.consolidator, **recipe.training, "preprocess": recipe.preprocess}
    for key, value in settings.items():
        if key in fields:
            if getattr(cfg, key) == getattr(defaults, key):
                changes[key] = value
        elif key in adapter_fields:
            if getattr(cfg.consolidator, key) == getattr(defaults.consolidator, key):
                adapter_changes[key] = value
        elif key == "optimizer" and str(value).lower() != "adamw":
            raise ValueError(f"paper recipe asks for optimizer {value!r}; only AdamW is implemented")
        elif key == "scheduler" and str(value).lower() != "cosine":
            raise ValueError(f"paper recipe asks for scheduler {value!r}; only cosine is implemented")
        elif key not in ("optimizer", "scheduler"):
            warnings.warn(f"paper recipe key {key!r} has no FinetuneConfig field; ignored",
                          stacklevel=2)
    out = dataclasses.replace(cfg, **changes)
    if adapter_changes:  # after replace(): it re-applies the flat views of the old config
        out.consolidator = out.consolidator.replace(**adapter_changes)
    return out
