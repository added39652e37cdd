"""The one backbone pretraining path of the demo apps: a randomly initialised ViT classifier
trained from scratch on a task in the VTAB-1k on-disk format, through the library's own Trainer
pipeline (:func:`consolidator_hf.training.run_finetune` with ``method="full"``).

The offline default (digits 0-4) and mini-VTAB (Fashion-MNIST) both pretrain through
:func:`pretrain_from_scratch`; each then saves the trained model in its own backbone layout.
The Trainer supplies AdamW (no decay on biases and LayerNorms), gradient clipping at 1.0, the
warmup + cosine schedule and the loss log.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from transformers import TrainerCallback

from consolidator_hf.training import FinetuneConfig, run_finetune


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


class _EpochEval(TrainerCallback):
    """Evaluate on the run's eval split at the end of every epoch and keep the results."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.evals: List[Dict[str, Any]] = []
        self.done = False

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_evaluate = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.done = True  # run_finetune's own final evaluation is not an epoch's

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.done and metrics and "eval_accuracy" in metrics:
            self.evals.append({"epoch": int(round(state.epoch or 0)), "step": state.global_step,
                               "val_accuracy": float(metrics["eval_accuracy"]),
                               "val_loss": float(metrics["eval_loss"]),
                               "elapsed_s": round(time.perf_counter() - self.start, 1)})


@dataclass
class PretrainResult:
    """``model_dir``: the run's ``merged/`` folder (the trained ``ViTForImageClassification``
    with its image processor); ``metrics``: ``run_finetune``'s; ``evals``: one entry per epoch
    (``epoch``, ``step``, ``val_accuracy``, ``val_loss``, ``elapsed_s``) when asked for."""

    model_dir: str
    metrics: Dict[str, Any]
    evals: List[Dict[str, Any]] = field(default_factory=list)


def pretrain_from_scratch(vit_config: Any, image_processor: Any, *, data_dir: str, task: str,
                          num_classes: int, work_dir: str, train_split: str, eval_split: str,
                          epochs: float, learning_rate: float, weight_decay: float,
                          warmup_epochs: float, batch_size: int, seed: int,
                          use_cpu: bool = False, logging_steps: int = 10,
                          eval_every_epoch: bool = False,
                          callbacks: Optional[List[Any]] = None) -> PretrainResult:
    """Initialise a ``ViTForImageClassification(vit_config)`` (seeded), save it with
    ``image_processor`` under ``work_dir/init``, and train every parameter on
    ``data_dir/task`` (``train_split`` -> ``eval_split``) into ``work_dir/run``. Only the main
    process writes the initial folder."""
    import torch
    from transformers import ViTForImageClassification

    init = os.path.join(work_dir, "init")
    if is_main_process():
        torch.manual_seed(seed)
        ViTForImageClassification(vit_config).save_pretrained(init)
        image_processor.save_pretrained(init)
    wait_for_everyone()
    cfg = FinetuneConfig(
        model=init, task=task, data_dir=data_dir, num_classes=num_classes,
        train_split=train_split, eval_split=eval_split, method="full",
        learning_rate=learning_rate, weight_decay=weight_decay, num_train_epochs=epochs,
        warmup_epochs=warmup_epochs, batch_size=batch_size, seed=seed, preprocess="processor",
        output_dir=os.path.join(work_dir, "run"), save_strategy="no", use_cpu=use_cpu,
        logging_steps=logging_steps, overwrite_output_dir=True)  # work_dir is scratch space
    epoch_eval = _EpochEval() if eval_every_epoch else None
    extra = list(callbacks or []) + ([epoch_eval] if epoch_eval else [])
    metrics = run_finetune(cfg, callbacks=extra or None)
    return PretrainResult(os.path.join(work_dir, "run", "merged"), metrics,
                          epoch_eval.evals if epoch_eval else [])
