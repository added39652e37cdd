"""Fine-tuning with the Hugging Face ``Trainer``: one code path for every method
(Consolidator, head only, BitFit, full, LoRA), adapter-only checkpoints that resume exactly,
and the standard artifacts (adapter, merged model, model card, ``metrics.json``).

``scripts/finetune.py`` is a thin command line over :func:`run_finetune`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ._io import atomic_save_safetensors, atomic_write_text, load_safetensors
from .config import WEIGHTS_NAME, ConsolidatorConfig
from .model import ConsolidatorModel

METHODS = ("consolidator", "linear", "bitfit", "full", "lora")
PREPROCESS = ("processor", "paper")
RECIPES = ("custom", "paper")
#: Trainable tensors of a non-Consolidator method (checkpoints and ``adapter/``).
TRAINABLE_WEIGHTS_NAME = "trainable_params.safetensors"
_TRAINABLE_FORMAT = "consolidator_hf-trainable"


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs; ``scripts/finetune.py`` flags mirror these fields.

    Data: ``task`` in the VTAB-1k on-disk format under ``data_dir`` (``num_classes`` for tasks
    that are not in the registry), trained on ``train_split``, evaluated on ``eval_split``.
    Model: ``model`` is a folder or Hub id of an image-classification backbone; ``method``
    picks what trains. Schedule: AdamW, linear warmup for ``warmup_epochs`` from
    ``warmup_start_lr`` to ``learning_rate``, then cosine down to ``min_lr``.
    ``recipe="paper"`` fills the fields left at their defaults from
    :func:`consolidator_hf.recipes.paper_recipe` (``backbone`` picks the paper's recipe set).
    ``qkv_grouping`` and ``backbone_drop_path`` (stochastic depth) go to
    :class:`ConsolidatorConfig`, as does any key of ``consolidator_kwargs``.
    """

    model: str = "google/vit-base-patch16-224-in21k"
    task: Optional[str] = None
    data_dir: str = "data/vtab-1k"
    num_classes: Optional[int] = None
    train_split: str = "train800val200"
    eval_split: str = "test"
    method: str = "consolidator"
    # Consolidator
    groups: Tuple[int, ...] = (384,)
    channel_shuffle: bool = False
    drop_rate: float = 0.0
    target_modules: Optional[List[str]] = None
    qkv_grouping: str = "separate"
    backbone_drop_path: float = 0.0
    consolidator_kwargs: Optional[Dict[str, Any]] = None
    # LoRA (needs peft)
    lora_r: int = 8
    lora_alpha: Optional[int] = None
    # optimisation
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    num_train_epochs: float = 100.0
    max_steps: int = -1
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    gradient_accumulation_steps: int = 1
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    # preprocessing
    preprocess: str = "processor"
    image_size: Optional[int] = None
    recipe: str = "custom"
    backbone: str = "vit_b16_in21k"
    # run control
    output_dir: str = "outputs/finetune"
    resume_from_checkpoint: Optional[str] = None
    save_strategy: str = "epoch"
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    logging_steps: int = 10
    use_cpu: bool = False
    dataloader_num_workers: int = 0
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if isinstance(self.groups, int):
            self.groups = (self.groups,)
        self.groups = tuple(int(g) for g in self.groups)
        choices = {"method": METHODS, "preprocess": PREPROCESS, "recipe": RECIPES,
                   "save_strategy": ("no", "epoch", "steps")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
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
        if self.consolidator_kwargs is not None and not isinstance(self.consolidator_kwargs, dict):
            raise ValueError(f"consolidator_kwargs: expected a mapping, got {self.consolidator_kwargs!r}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {self.num_classes!r}")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FinetuneConfig":
        """Build from a mapping (e.g. a YAML file); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["groups"] = list(self.groups)
        return d


# ---------------------------------------------------------------------- recipes
def apply_recipe(cfg: FinetuneConfig) -> FinetuneConfig:
    """A copy of ``cfg`` with the paper recipe filled into every field left at its default.

    The recipe's dicts are applied generically: any key naming a :class:`FinetuneConfig`
    field sets it (fields added to the recipe later flow through); other
    :class:`ConsolidatorConfig` keys go into ``consolidator_kwargs`` (keys already there win).
    """
    if cfg.recipe == "custom":
        return cfg
    if not cfg.task:
        raise ValueError("recipe='paper' needs a VTAB-1k task name (task)")
    from .recipes import paper_recipe

    recipe = paper_recipe(cfg.task, cfg.backbone)
    defaults = FinetuneConfig()
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    changes: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}
    settings = {**recipe.consolidator, **recipe.training, "preprocess": recipe.preprocess}
    for key, value in settings.items():
        if key in fields:
            if getattr(cfg, key) == getattr(defaults, key):
                changes[key] = value
        elif key in {f.name for f in dataclasses.fields(ConsolidatorConfig)}:
            extra[key] = value
        elif key == "optimizer" and str(value).lower() != "adamw":
            raise ValueError(f"paper recipe asks for optimizer {value!r}; only AdamW is implemented")
        elif key == "scheduler" and str(value).lower() != "cosine":
            raise ValueError(f"paper recipe asks for scheduler {value!r}; only cosine is implemented")
        elif key not in ("optimizer", "scheduler"):
            warnings.warn(f"paper recipe key {key!r} has no FinetuneConfig field; ignored",
                          stacklevel=2)
    if extra:
        changes["consolidator_kwargs"] = {**extra, **(cfg.consolidator_kwargs or {})}
    return dataclasses.replace(cfg, **changes)


def warmup_cosine_lambda(num_training_steps: int, warmup_steps: int, base_lr: float,
                         warmup_start_lr: float = 0.0, min_lr: float = 0.0):
    """LR multiplier for ``LambdaLR``: linear from ``warmup_start_lr`` to ``base_lr`` over
    ``warmup_steps``, then cosine from ``base_lr`` to ``min_lr`` at ``num_training_steps``
    (the paper's "cosine, 10 warmup epochs from 1e-6, min lr 1e-5")."""
    start, floor = warmup_start_lr / base_lr, min_lr / base_lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start + (1.0 - start) * step / warmup_steps
        decay = max(1, num_training_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------------- trainable state
def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DDP / DataParallel
    return model


def save_trainable_state(model: nn.Module, directory: str) -> None:
    """Write exactly the tensors training changes, never a frozen one.

    A :class:`ConsolidatorModel` writes its raw branches (``consolidate=False``: the exact
    training state); any other model writes its ``requires_grad`` parameters to
    ``trainable_params.safetensors``.
    """
    model = _unwrap(model)
    os.makedirs(directory, exist_ok=True)
    if isinstance(model, ConsolidatorModel):
        model.save_pretrained(directory, consolidate=False)
        return
    tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    atomic_save_safetensors(tensors, os.path.join(directory, TRAINABLE_WEIGHTS_NAME),
                            {"format": _TRAINABLE_FORMAT})


@torch.no_grad()
def load_trainable_state(model: nn.Module, directory: str) -> None:
    """Load what :func:`save_trainable_state` wrote into the same (wrapped) model."""
    model = _unwrap(model)
    if isinstance(model, ConsolidatorModel):
        path = os.path.join(directory, WEIGHTS_NAME)
        tensors, metadata = load_safetensors(path)
        model.load_adapter_state(tensors, metadata, source=path)
        return
    path = os.path.join(directory, TRAINABLE_WEIGHTS_NAME)
    tensors, metadata = load_safetensors(path)
    if metadata.get("format") != _TRAINABLE_FORMAT:
        raise ValueError(f"{path}: not a trainable-parameter file (format={metadata.get('format')!r})")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unknown = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unknown:
        raise ValueError(f"{path}: does not match the model's trainable parameters; missing "
                         f"{missing[:10]}, unexpected {unknown[:10]}")
    for name, value in tensors.items():
        if value.shape != params[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(params[name].shape)}")
        params[name].copy_(value.to(params[name].dtype))


class AdapterTrainer(Trainer):
    """A ``Trainer`` whose checkpoints hold only the trainable tensors (plus the optimizer,
    scheduler, RNG and trainer state the base class adds), never the frozen backbone, and
    whose scheduler is warmup-from-``warmup_start_lr`` + cosine-to-``min_lr``.

    FSDP and DeepSpeed keep the base class's own (full) checkpointing: their parameters are
    sharded, and the base class gathers them.
    """

    def __init__(self, *args: Any, warmup_epochs: float = 0.0, warmup_start_lr: float = 0.0,
                 min_lr: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup_epochs = warmup_epochs
        self.warmup_start_lr = warmup_start_lr
        self.min_lr = min_lr

    def _sharded(self) -> bool:
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if self._sharded():
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_trainable_state(self.model, output_dir)
        # The arguments as JSON (the base class pickles them; we never unpickle).
        atomic_write_text(os.path.join(output_dir, "training_args.json"), self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        if self._sharded():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trainable_state(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self._sharded():
            return super()._load_best_model()
        load_trainable_state(self.model, self.state.best_model_checkpoint)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch, as the Trainer's loop counts them."""
        n = len(self.train_dataset)
        batches = math.ceil(n / (self.args.per_device_train_batch_size * self.args.world_size))
        return max(1, batches // self.args.gradient_accumulation_steps)

    def create_scheduler(self, num_training_steps: int,
                         optimizer: Optional[torch.optim.Optimizer] = None):
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            warmup = min(num_training_steps, round(self.warmup_epochs * self.steps_per_epoch()))
            fn = warmup_cosine_lambda(num_training_steps, warmup, self.args.learning_rate,
                                      self.warmup_start_lr, self.min_lr)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
            self._created_lr_scheduler = True
        return self.lr_scheduler


# ---------------------------------------------------------------------- model building
def _freeze_all_but(model: nn.Module, keep) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name, p)))


def _head_name(model: nn.Module) -> str:
    return "classifier" if hasattr(model, "classifier") else "head"


def wrap_model(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Apply ``cfg.method`` to a freshly loaded image-classification model."""
    head = _head_name(model)
    if cfg.method == "consolidator":
        kwargs = dict(groups=cfg.groups, channel_shuffle=cfg.channel_shuffle,
                      drop_rate=cfg.drop_rate, target_modules=cfg.target_modules,
                      qkv_grouping=cfg.qkv_grouping, backbone_drop_path=cfg.backbone_drop_path,
                      modules_to_save=[head], base_model_name_or_path=cfg.model)
        kwargs.update(cfg.consolidator_kwargs or {})
        return ConsolidatorModel(model, ConsolidatorConfig(**kwargs))
    if cfg.method == "linear":
        _freeze_all_but(model, lambda n, p: n.startswith(head + "."))
    elif cfg.method == "bitfit":
        norms = {n for n, m in model.named_modules()
                 if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")}
        _freeze_all_but(model, lambda n, p: n.startswith(head + ".") or n.endswith(".bias")
                        or n.rsplit(".", 1)[0] in norms)
    elif cfg.method == "full":
        _freeze_all_but(model, lambda n, p: True)
    elif cfg.method == "lora":
        if importlib.util.find_spec("peft") is None:
            raise ImportError("method='lora' needs the optional dependency peft: pip install peft")
        from peft import LoraConfig, get_peft_model

        targets = cfg.target_modules or _lora_targets(model)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or cfg.lora_r,
                          target_modules=targets, modules_to_save=[head])
        return get_peft_model(model, lora)
    return model


def _lora_targets(model: nn.Module) -> List[str]:
    """The query and value projections, under transformers 5.x or 4.x names."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"]):
        if set(pair) <= names:
            return pair
    raise ValueError("method='lora': cannot find query/value projections; set target_modules")


def parameter_summary(model: nn.Module) -> Dict[str, int]:
    """``trainable``, ``stored`` (what the adapter file holds) and ``total`` parameter counts."""
    model = _unwrap(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(model, ConsolidatorModel):
        c = model.parameter_counts()
        return {"trainable": trainable, "stored": c["stored"], "base": c["base"]}
    total = sum(p.numel() for p in model.parameters())
    base = total - (trainable if type(model).__name__.startswith("Peft") else 0)
    return {"trainable": trainable, "stored": trainable, "base": base}


def _load_processor(cfg: FinetuneConfig, image_size: int):
    """The image processor saved with the merged model: the backbone's own for
    ``preprocess="processor"``; one describing the paper preprocessing for ``"paper"``."""
    from transformers import AutoImageProcessor

    if cfg.preprocess == "paper":
        from .hub import default_image_processor

        return default_image_processor(image_size, "paper")
    try:
        return AutoImageProcessor.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise ValueError(f"model {cfg.model!r} has no image processor (preprocessor_config.json) "
                         f"for preprocess='processor' ({e}); use preprocess='paper'") from None


# ---------------------------------------------------------------------- data
def load_splits(cfg: FinetuneConfig):
    """``(train, eval)`` datasets with ``image`` and ``label`` (ClassLabel) columns."""
    from .data import load_vtab1k

    if not cfg.task:
        raise ValueError("task: name the VTAB-1k task (folder under data_dir)")
    train = load_vtab1k(cfg.data_dir, cfg.task, cfg.train_split, num_classes=cfg.num_classes)
    evals = load_vtab1k(cfg.data_dir, cfg.task, cfg.eval_split, num_classes=cfg.num_classes)
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        evals = evals.select(range(min(cfg.max_eval_samples, len(evals))))
    return train, evals


def _compute_metrics(eval_pred) -> Dict[str, float]:
    from .metrics import Top1Accuracy

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return Top1Accuracy().compute(predictions=logits.argmax(-1), references=labels)


# ---------------------------------------------------------------------- outputs
def _model_card(cfg: FinetuneConfig, metrics: Dict[str, Any]) -> str:
    """The card of a merged baseline run (linear, bitfit, full, lora)."""
    from huggingface_hub import ModelCard, ModelCardData

    is_hub_id = not os.path.exists(cfg.model) and cfg.model.count("/") == 1
    data = ModelCardData(library_name="transformers", pipeline_tag="image-classification",
                         tags=["consolidator", "vision", "image-classification", cfg.method],
                         base_model=cfg.model if is_hub_id else None)
    acc = metrics["accuracy"]
    body = f"""---
{data.to_yaml()}
---

# {cfg.task} ({cfg.method}) on {os.path.basename(cfg.model.rstrip('/'))}

A plain `{metrics.get('architecture', 'ViTForImageClassification')}`: {cfg.method} fine-tuning
with `consolidator_hf` {'(Consolidator branches merged exactly into the linear weights, zero inference overhead)' if cfg.method == 'consolidator' else ''}.
It loads with `transformers` alone:

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained("<this folder or repo>")
processor = AutoImageProcessor.from_pretrained("<this folder or repo>")
```

| | |
| --- | --- |
| base model | `{cfg.model}` |
| task | `{cfg.task}` (train: `{cfg.train_split}`, {metrics.get('num_train_examples')} images; eval: `{cfg.eval_split}`, {metrics.get('num_eval_examples')} images) |
| method | {cfg.method}{f" (groups={list(cfg.groups)}, channel_shuffle={cfg.channel_shuffle}, drop_rate={cfg.drop_rate})" if cfg.method == 'consolidator' else ''} |
| top-1 accuracy ({cfg.eval_split}) | {100 * acc:.2f} % |
| trainable / stored parameters | {metrics['trainable_params']:,} / {metrics['stored_params']:,} |
| schedule | AdamW, lr {cfg.learning_rate:g}, weight decay {cfg.weight_decay:g}, {cfg.num_train_epochs:g} epochs, batch {cfg.batch_size}, warmup {cfg.warmup_epochs:g} epochs, cosine to {cfg.min_lr:g} |
| preprocessing | `{cfg.preprocess}` at {metrics.get('image_size')} px |
| seed | {cfg.seed} |
"""
    return str(ModelCard(body))


def _write_outputs(model: nn.Module, processor, cfg: FinetuneConfig,
                   metrics: Dict[str, Any]) -> None:
    out = cfg.output_dir
    adapter_dir, merged_dir = os.path.join(out, "adapter"), os.path.join(out, "merged")
    if isinstance(model, ConsolidatorModel):
        # One card format for every merged Consolidator model: the publishing module's.
        from .hub import RUN_DETAILS, save_adapter, save_merged

        is_hub_id = not os.path.exists(cfg.model) and cfg.model.count("/") == 1
        card_args = dict(metrics=metrics, dataset=cfg.task, epochs=cfg.num_train_epochs,
                         base_model=cfg.model if is_hub_id else None,
                         training_details={k: getattr(cfg, k) for k in RUN_DETAILS})
        metrics["architecture"] = type(model.base_model).__name__
        save_adapter(model, adapter_dir, **card_args)  # consolidated: the paper's stage-1 storage
        save_merged(model.eval(), merged_dir, image_processor=processor, **card_args)
        _write_metrics(out, metrics)
        return
    if cfg.method == "lora":
        model.save_pretrained(adapter_dir)
        merged = model.merge_and_unload()
    else:
        if cfg.method != "full":
            save_trainable_state(model, adapter_dir)
        merged = model
    metrics["architecture"] = type(merged).__name__
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    atomic_write_text(os.path.join(merged_dir, "README.md"), _model_card(cfg, metrics))
    _write_metrics(out, metrics)


def _write_metrics(out: str, metrics: Dict[str, Any]) -> None:
    atomic_write_text(os.path.join(out, "metrics.json"),
                      json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    ckpts = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpts) and not os.listdir(ckpts):  # the Trainer makes it even when not saving
        os.rmdir(ckpts)


# ---------------------------------------------------------------------- the run
def build_training_args(cfg: FinetuneConfig) -> TrainingArguments:
    report = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    return TrainingArguments(
        output_dir=os.path.join(cfg.output_dir, "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
        optim="adamw_torch", seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.bf16, fp16=cfg.fp16,
        use_cpu=cfg.use_cpu, logging_strategy="steps", logging_steps=cfg.logging_steps,
        save_strategy=cfg.save_strategy, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="no",
        remove_unused_columns=False,  # the set_transform'd columns are computed on the fly
        label_names=["labels"],  # wrappers hide `labels` from the Trainer's signature check
        dataloader_num_workers=cfg.dataloader_num_workers, report_to=report,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=None,
    )


def run_finetune(cfg: FinetuneConfig, callbacks: Optional[List[Any]] = None) -> Dict[str, Any]:
    """Fine-tune, evaluate and write ``adapter/``, ``merged/`` (with ``README.md`` and
    ``preprocessor_config.json``) and ``metrics.json`` into ``cfg.output_dir``.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects for the Trainer.
    Returns the metrics dict (also written to ``metrics.json`` by the main process only).
    """
    from transformers import AutoModelForImageClassification, set_seed

    from .data import make_transform

    cfg = apply_recipe(cfg)
    cfg.validate()
    args = build_training_args(cfg)  # sets up the process group under accelerate/torchrun
    train_ds, eval_ds = load_splits(cfg)
    label_feature = train_ds.features["label"]
    names = list(getattr(label_feature, "names", None) or
                 [str(i) for i in range(label_feature.num_classes)])
    id2label = {i: n for i, n in enumerate(names)}

    set_seed(cfg.seed)  # the new head and the branches start from the same draw on every rank
    base = AutoModelForImageClassification.from_pretrained(
        cfg.model, num_labels=len(names), id2label=id2label,
        label2id={n: i for i, n in id2label.items()}, ignore_mismatched_sizes=True)
    image_size = cfg.image_size or (224 if cfg.preprocess == "paper"
                                    else getattr(base.config, "image_size", 224))
    processor = _load_processor(cfg, image_size)
    transform = make_transform(cfg.preprocess, image_processor=processor, image_size=image_size)
    train_ds.set_transform(transform)
    eval_ds.set_transform(transform)
    model = wrap_model(base, cfg)
    counts = parameter_summary(model)

    trainer = AdapterTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        compute_metrics=_compute_metrics, warmup_epochs=cfg.warmup_epochs,
        warmup_start_lr=cfg.warmup_start_lr, min_lr=cfg.min_lr, callbacks=callbacks,
    )
    resume: Any = cfg.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        resume = True  # the newest checkpoint-N under output_dir/checkpoints
    start = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=resume)
    train_runtime = time.perf_counter() - start
    eval_out = trainer.evaluate()

    metrics: Dict[str, Any] = {
        "task": cfg.task, "method": cfg.method, "model": cfg.model,
        "accuracy": float(eval_out["eval_accuracy"]), "eval_loss": float(eval_out["eval_loss"]),
        "eval_split": cfg.eval_split, "train_split": cfg.train_split,
        "trainable_params": counts["trainable"], "stored_params": counts["stored"],
        "base_params": counts["base"], "train_runtime_s": round(train_runtime, 3),
        "train_loss": float(train_out.training_loss), "global_step": trainer.state.global_step,
        "epochs": float(trainer.state.epoch or 0.0),
        "num_train_examples": len(train_ds), "num_eval_examples": len(eval_ds),
        "image_size": image_size, "world_size": args.world_size,
        "num_processes": trainer.accelerator.num_processes,
        "parallel_mode": str(args.parallel_mode.value), "device": str(args.device),
        "loss_history": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
        "config": cfg.to_dict(), "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
    }
    if trainer.is_world_process_zero():
        _write_outputs(trainer.accelerator.unwrap_model(trainer.model), processor, cfg, metrics)
        print(f"[rank {args.process_index}] wrote {cfg.output_dir}: adapter/, merged/, metrics.json",
              flush=True)
    trainer.accelerator.wait_for_everyone()
    return metrics
