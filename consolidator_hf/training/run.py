"""One fine-tuning run: :func:`run_finetune` and the run-folder layout it writes.

    <output_dir>/adapter/      what training changed (Consolidator: the consolidated adapter;
                               linear/bitfit: trainable_params.safetensors; lora: PEFT's files)
    <output_dir>/merged/       a plain transformers model (config, weights, image processor, card)
    <output_dir>/metrics.json  accuracy, parameter counts, the loss curve, the config
    <output_dir>/checkpoints/  the Trainer's adapter-only checkpoints (removed when empty)

``scripts/finetune.py`` is a thin command line over :func:`run_finetune`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from transformers import TrainingArguments

from .._io import atomic_write_text
from ..model import ConsolidatorModel
from .config import FinetuneConfig, apply_recipe
from .methods import parameter_summary, wrap_model
from .trainer import AdapterTrainer, save_trainable_state, unused_trainable_parameters


def _load_processor(cfg: FinetuneConfig, image_size: int):
    """The image processor saved with the merged model: the backbone's own for
    ``preprocess="processor"``; one describing the paper preprocessing for ``"paper"``."""
    from transformers import AutoImageProcessor

    if cfg.preprocess == "paper":
        from ..hub import default_image_processor

        return default_image_processor(image_size, "paper")
    try:
        return AutoImageProcessor.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise ValueError(f"model {cfg.model!r} has no image processor (preprocessor_config.json) "
                         f"for preprocess='processor' ({e}); use preprocess='paper'") from None


# ---------------------------------------------------------------------- data
def load_splits(cfg: FinetuneConfig):
    """``(train, eval)`` datasets with ``image`` and ``label`` (ClassLabel) columns."""
    from ..data import load_vtab1k

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
    from ..metrics import Top1Accuracy

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
        from ..hub import RUN_DETAILS, save_adapter, save_merged

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
        torch_compile=cfg.torch_compile,
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

    from ..data import make_transform

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
    if args.world_size > 1:
        # DDP's default (find_unused_parameters=True) walks the graph every step and warns when
        # nothing is unused; ask the model instead: one forward + backward on one training image.
        example = {"pixel_values": train_ds[0]["pixel_values"].unsqueeze(0)}
        args.ddp_find_unused_parameters = bool(unused_trainable_parameters(model, example))

    trainer = AdapterTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        compute_metrics=_compute_metrics, warmup_epochs=cfg.warmup_epochs,
        warmup_start_lr=cfg.warmup_start_lr, min_lr=cfg.min_lr, callbacks=callbacks,
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        # accelerate 1.15 applies its FSDP plugin to GPU-type runs only; CPU ranks would
        # silently train plain DDP under an FSDP config.
        raise ValueError(
            f"FSDP was requested (accelerate config distributed_type: FSDP) but accelerate does "
            f"not apply it to this run ({trainer.accelerator.distributed_type}; CPU ranks are "
            "never sharded by accelerate): use GPUs, or for data-parallel CPU ranks "
            "`accelerate launch --multi_gpu --num_processes N scripts/finetune.py ... --use-cpu`")
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
