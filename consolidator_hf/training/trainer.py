"""The Trainer side of a run: :class:`AdapterTrainer` (adapter-only checkpoints that resume
exactly), the warmup + cosine learning-rate schedule, and the checkpoint format of the
trainable tensors (``trainable_params.safetensors`` for the non-Consolidator methods).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from transformers import Trainer

from .._io import atomic_save_safetensors, atomic_write_text, load_safetensors
from ..config import WEIGHTS_NAME
from ..model import ConsolidatorModel
from .methods import unwrap_model

#: Trainable tensors of a non-Consolidator method (checkpoints and ``adapter/``).
TRAINABLE_WEIGHTS_NAME = "trainable_params.safetensors"
_TRAINABLE_FORMAT = "consolidator_hf-trainable"


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


def save_trainable_state(model: nn.Module, directory: str) -> None:
    """Write exactly the tensors training changes, never a frozen one.

    A :class:`ConsolidatorModel` writes its raw branches (``consolidate=False``: the exact
    training state); any other model writes its ``requires_grad`` parameters to
    ``trainable_params.safetensors``.
    """
    model = unwrap_model(model)
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
    model = unwrap_model(model)
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


def unused_trainable_parameters(model: nn.Module, example: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the ``requires_grad`` parameters that one training-mode forward + backward of
    ``model(**example)`` leaves without a gradient (DDP's "unused parameters").

    Decides DDP's ``find_unused_parameters``: ``False`` when this is empty (a ViT forward reaches
    every trainable tensor), which spares DDP a graph walk per step and its warning. The torch
    RNG, the model's mode and its ``.grad`` fields are left as they were.
    """
    model = unwrap_model(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.grad for n, p in params.items()}
    was_training = model.training
    device = next(iter(params.values())).device if params else torch.device("cpu")
    try:
        with torch.random.fork_rng(devices=[]):
            model.train()
            for p in params.values():
                p.grad = None
            out = model(**{k: v.to(device) for k, v in example.items()})
            logits = out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
            logits.float().sum().backward()
        return sorted(n for n, p in params.items() if p.grad is None)
    finally:
        for n, p in params.items():
            p.grad = before[n]
        model.train(was_training)
