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
from transformers import AutoConfig, AutoImageProcessor, TrainingArguments

from ..cards import CARD_NAME, baseline_card, load_metrics
from ..hub import check_can_upload, push_merged
from ..io import PathLike, atomic_write_text, is_hub_id, write_folder
from ..model import ConsolidatorModel
from ..publish import load_for_publishing, save_adapter, save_merged
from .checks import (
    check_model_source,
    clamp_warmup,
    clean_failed_run,
    hub_unreachable_message,
    looks_like_path,
    prepare_output_dir,
    write_run_metadata,
)
from .config import FinetuneConfig, apply_recipe
from .methods import parameter_summary, wrap_model
from .trainer import AdapterTrainer, save_trainable_state, unused_trainable_parameters


def _load_processor(cfg: FinetuneConfig, image_size: int):
    """The image processor saved with the merged model: the backbone's own for
    ``preprocess="processor"``; one describing the paper preprocessing for ``"paper"``."""
    from transformers import AutoImageProcessor

    if cfg.preprocess == "paper":
        from ..processors import default_image_processor

        return default_image_processor(image_size, "paper")
    try:  # the PIL backend, chosen: torchvision is not a dependency (no fallback warning)
        return AutoImageProcessor.from_pretrained(cfg.model, backend="pil")
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
    # the first call checked all four list files of the task
    evals = load_vtab1k(cfg.data_dir, cfg.task, cfg.eval_split, num_classes=cfg.num_classes,
                        validate_all_splits=False)
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
def _write_outputs(model: nn.Module, processor, cfg: FinetuneConfig,
                   metrics: Dict[str, Any]) -> None:
    out = cfg.output_dir
    adapter_dir, merged_dir = os.path.join(out, "adapter"), os.path.join(out, "merged")
    if isinstance(model, ConsolidatorModel):
        # One card format for every merged Consolidator model: the publishing module's.
        card_args = dict(metrics=metrics, dataset=cfg.task, epochs=cfg.num_train_epochs,
                         base_model=cfg.model if is_hub_id(cfg.model) else None,
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
    with write_folder(merged_dir) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        baseline_card(cfg, metrics, local_path=merged_dir).save(os.path.join(tmp, CARD_NAME))
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
        torch_compile_backend=cfg.torch_compile_backend if cfg.torch_compile else None,
        use_cpu=cfg.use_cpu, logging_strategy="steps", logging_steps=cfg.logging_steps,
        save_strategy=cfg.save_strategy, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="no",
        remove_unused_columns=False,  # the set_transform'd columns are computed on the fly
        label_names=["labels"],  # wrappers hide `labels` from the Trainer's signature check
        dataloader_num_workers=cfg.dataloader_num_workers, report_to=report,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=None,
    )


class _DropLoadReport:
    """A ``logging`` filter dropping transformers' state-dict load report (see load_backbone)."""

    def filter(self, record) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def load_backbone(model: str, id2label: Dict[int, str]) -> nn.Module:
    """``AutoModelForImageClassification`` from ``model`` with a fresh head for ``id2label``.

    The labels are passed as ``id2label``/``label2id`` only (a backbone saved with other labels
    then gets no ``num_labels`` mismatch warning). transformers' load-report table is held back
    for this one call: a missing or resized head is what fine-tuning expects; any *other*
    weight that the checkpoint lacks is reported here, as one warning.
    """
    import logging
    import warnings

    from transformers import AutoModelForImageClassification

    from ..targets import head_module_name

    # A filter, not a level: transformers checks this logger's level to decide on other warnings.
    report_logger = logging.getLogger("transformers.modeling_utils")
    hold_report = _DropLoadReport()
    report_logger.addFilter(hold_report)
    try:
        base, info = AutoModelForImageClassification.from_pretrained(
            model, id2label=id2label, label2id={n: i for i, n in id2label.items()},
            # VTAB tasks are single-label; set up front, transformers would set it in the first
            # forward, and under torch.compile that change recompiles the whole model once more
            problem_type="single_label_classification",
            ignore_mismatched_sizes=True, output_loading_info=True)
    except OSError as e:
        if not looks_like_path(model) and "connect" in str(e).lower():
            raise ValueError(hub_unreachable_message(
                model, model == FinetuneConfig.model, "no network")) from None
        raise
    finally:
        report_logger.removeFilter(hold_report)
    head = head_module_name(base)
    mismatched = [k[0] if isinstance(k, (tuple, list)) else k
                  for k in info.get("mismatched_keys", [])]
    fresh = [k for k in list(info.get("missing_keys", [])) + mismatched
             if not k.startswith(head + ".")]
    if fresh:
        warnings.warn(f"model {model!r}: {len(fresh)} weights besides the head are not in the "
                      f"checkpoint and start from random values: {sorted(fresh)[:8]}",
                      UserWarning, stacklevel=2)
    return base


def run_finetune(cfg: FinetuneConfig, callbacks: Optional[List[Any]] = None) -> Dict[str, Any]:
    """Fine-tune, evaluate and write ``adapter/``, ``merged/`` (with ``README.md`` and
    ``preprocessor_config.json``) and ``metrics.json`` into ``cfg.output_dir``.

    Before any slow work: the backbone source is checked, and an output folder holding another
    run is refused (see :func:`~consolidator_hf.training.checks.prepare_output_dir`). A run that
    fails leaves no empty folder behind. ``callbacks``: extra ``transformers.TrainerCallback``
    objects for the Trainer. Returns the metrics dict (also written to ``metrics.json`` by the
    main process only).
    """
    cfg = apply_recipe(cfg)
    cfg.validate()
    check_model_source(cfg.model)
    created = not os.path.exists(cfg.output_dir)
    prepare_output_dir(cfg)
    try:
        return _run(cfg, callbacks)
    except BaseException:
        if _is_main_process():
            clean_failed_run(cfg.output_dir, created)
        raise


def _is_main_process() -> bool:
    from accelerate import PartialState

    try:
        return PartialState().is_main_process
    except Exception:  # no state could be built: a single process
        return True


def _run(cfg: FinetuneConfig, callbacks: Optional[List[Any]]) -> Dict[str, Any]:
    from transformers import set_seed
    import datasets

    from ..data import make_transform

    train_ds, eval_ds = load_splits(cfg)  # before the process group: bad data fails fast
    args = build_training_args(cfg)  # sets up the process group under accelerate/torchrun
    requested = cfg  # metrics.json records the settings asked for (reruns compare them)
    cfg = clamp_warmup(cfg, len(train_ds), args.world_size)
    label_feature = train_ds.features["label"]
    names = list(getattr(label_feature, "names", None) or
                 [str(i) for i in range(label_feature.num_classes)])
    id2label = {i: n for i, n in enumerate(names)}

    set_seed(cfg.seed)  # the new head and the branches start from the same draw on every rank
    base = load_backbone(cfg.model, id2label)
    # Both preprocessings default to the model's own input size (a 32-px model gets 32 px).
    image_size = cfg.image_size or getattr(base.config, "image_size", 224)
    processor = _load_processor(cfg, image_size)
    transform = make_transform(cfg.preprocess, image_processor=processor, image_size=image_size)
    # Decoded by the transform (decode_image), which shrinks large files while decoding them.
    train_ds = train_ds.cast_column("image", datasets.Image(decode=False))
    eval_ds = eval_ds.cast_column("image", datasets.Image(decode=False))
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
        allow_partial_resume=cfg.allow_partial_resume,
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
    if trainer.is_world_process_zero() and not resume:
        # Names this run to a later one given the same folder; a resumed run's folder already
        # says what it holds, and a resume refused by its checks must leave nothing new behind.
        write_run_metadata(cfg)
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
        "config": requested.to_dict(), "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
    }
    if cfg.warmup_epochs != requested.warmup_epochs:
        metrics["warmup_epochs_clamped"] = cfg.warmup_epochs
    if trainer.is_world_process_zero():
        _write_outputs(trainer.accelerator.unwrap_model(trainer.model), processor, cfg, metrics)
        print(f"[rank {args.process_index}] wrote {cfg.output_dir}: adapter/, merged/, metrics.json",
              flush=True)
    trainer.accelerator.wait_for_everyone()
    return metrics


# ---------------------------------------------------------------------- publishing a run
# FinetuneConfig fields a model card reports for a training run.
RUN_DETAILS = ("learning_rate", "weight_decay", "batch_size", "num_train_epochs", "warmup_epochs",
               "min_lr", "seed", "preprocess", "recipe", "train_split")


def push_training_run(
    output_dir: PathLike, repo_id: str, *, private: bool = False, token: Optional[str] = None,
    commit_message: Optional[str] = None, revision: Optional[str] = None,
    base_model: Optional[str] = None,
) -> str:
    """Publish a finished ``scripts/finetune.py`` run: merge ``<output_dir>/adapter`` onto its
    base (``metrics.json``'s ``model``, or ``base_model``) and :func:`push_merged` it with the
    run's metrics, labels (``merged/config.json``), image processor (``merged/``) and recipe
    in the card. Returns the commit URL. This is what ``finetune.py --push-to-hub`` calls."""
    out = os.fspath(output_dir)
    check_can_upload(repo_id)
    metrics_path = os.path.join(out, "metrics.json")
    metrics = load_metrics(metrics_path)
    base = base_model or metrics.get("model") or metrics.get("config_model")
    if not base:
        raise ValueError(f"{metrics_path}: names no base model; pass base_model=")
    merged_dir = os.path.join(out, "merged")
    model = load_for_publishing(base, os.path.join(out, "adapter"), token=token)
    id2label = AutoConfig.from_pretrained(merged_dir).id2label
    processor = AutoImageProcessor.from_pretrained(merged_dir)
    details = {k: metrics[f"config_{k}"] for k in RUN_DETAILS
               if metrics.get(f"config_{k}") is not None}
    return push_merged(model, repo_id, private=private, token=token, revision=revision,
                       commit_message=commit_message or f"Upload {metrics.get('task', 'run')} "
                                                        "(merged Consolidator model)",
                       image_processor=processor, metrics=metrics_path, id2label=id2label,
                       base_model=base if is_hub_id(base) else None,
                       training_details=details)
