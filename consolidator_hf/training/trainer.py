"""The Trainer side of a run: :class:`AdapterTrainer` (adapter-only checkpoints that resume
exactly), the warmup + cosine learning-rate schedule, and the checkpoint format of the
trainable tensors (``trainable_params.safetensors`` for the non-Consolidator methods).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from ..io import atomic_save_safetensors, atomic_write_text, load_safetensors, swap_in
from ..config import WEIGHTS_NAME
from ..model import ConsolidatorModel
from ..storage import check_tensor
from .methods import unwrap_model

#: Where a checkpoint is written before it is renamed to ``checkpoint-N`` beside it.
CHECKPOINT_STAGING_DIR = ".staging"
#: Files a checkpoint needs for an exact resume (besides the trainable tensors).
RESUME_STATE_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")

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
        # Straight into the folder: a checkpoint is staged whole by AdapterTrainer, and other
        # processes write their RNG state into the same folder meanwhile.
        model.write_adapter_files(directory, consolidate=False)
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
        check_tensor(value, name, path)
        params[name].copy_(value.to(params[name].dtype))


def check_checkpoint(checkpoint: str, *, world_size: int = 1, allow_partial: bool = False,
                     weights: bool = True) -> List[str]:
    """Check that ``checkpoint`` can resume a run exactly; returns the resume files it lacks.

    ``trainer_state.json`` must be a JSON object; ``optimizer.pt``, ``scheduler.pt`` and the
    RNG state (``rng_state.pth``, or ``rng_state_<rank>.pth`` per process when ``world_size >
    1``) must be there and be complete torch archives (their zip directory is read, not the
    data); ``weights``: the trainable tensors too. A missing resume file raises
    ``FileNotFoundError`` naming it and the way out, unless ``allow_partial`` (then a warning
    is given: the run resumes, but not bit-identically). A truncated or garbage file raises
    ``ValueError`` naming it.
    """
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint folder")
    state_file = os.path.join(checkpoint, "trainer_state.json")
    if os.path.isfile(state_file):
        try:
            with open(state_file, encoding="utf-8") as f:
                state = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{state_file}: not valid JSON ({e}); the checkpoint is corrupt") from None
        if not isinstance(state, dict) or "global_step" not in state:
            raise ValueError(f"{state_file}: not a Trainer state (no global_step)")
    else:
        raise FileNotFoundError(f"{state_file}: missing; {checkpoint} is not a Trainer checkpoint")
    if weights and not any(os.path.isfile(os.path.join(checkpoint, n))
                           for n in (WEIGHTS_NAME, TRAINABLE_WEIGHTS_NAME)):
        raise FileNotFoundError(f"{checkpoint}: holds neither {WEIGHTS_NAME} nor "
                                f"{TRAINABLE_WEIGHTS_NAME}; it is not an adapter checkpoint")
    rng = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
    missing = []
    for name in ["optimizer.pt", "scheduler.pt"] + rng:
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            missing.append(name)
            continue
        try:  # torch.save writes a zip archive; a truncated one has no central directory
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path}: truncated or corrupt ({e}); resume from an earlier "
                             "checkpoint") from None
    if missing:
        message = (f"{checkpoint}: missing {', '.join(missing)}; resuming without them would not "
                   "continue the run exactly (optimizer moments, learning-rate schedule or "
                   "random state start afresh)")
        if not allow_partial:
            raise FileNotFoundError(message + ". Resume from a complete checkpoint, or pass "
                                    "allow_partial_resume=True (--allow-partial-resume) to go on "
                                    "anyway")
        warnings.warn(message + " (allow_partial_resume=True)", stacklevel=2)
    return missing


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf: the run stops at that step (before the optimizer
    applies it), and writes neither ``adapter/`` nor ``merged/``."""


class AdapterTrainer(Trainer):
    """A ``Trainer`` whose checkpoints hold only the trainable tensors (plus the optimizer,
    scheduler, RNG and trainer state the base class adds), never the frozen backbone, and
    whose scheduler is warmup-from-``warmup_start_lr`` + cosine-to-``min_lr``.

    FSDP and DeepSpeed keep the base class's own (full) checkpointing: their parameters are
    sharded, and the base class gathers them.
    """

    def __init__(self, *args: Any, warmup_epochs: float = 0.0, warmup_start_lr: float = 0.0,
                 min_lr: float = 0.0, allow_partial_resume: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup_epochs = warmup_epochs
        self.warmup_start_lr = warmup_start_lr
        self.min_lr = min_lr
        self.allow_partial_resume = allow_partial_resume
        self._staging_run_dir: Optional[str] = None

    # ------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any,
              **kwargs: Any):
        """The base ``train``; a checkpoint to resume from is checked first
        (:func:`check_checkpoint`). ``True`` picks the newest ``checkpoint-N``: every one is
        complete, since checkpoints are staged and renamed in (:meth:`_save_checkpoint`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) \
                if os.path.isdir(self.args.output_dir) else None
            if resume_from_checkpoint is None:
                raise FileNotFoundError(f"resume 'last': no checkpoint-N folder under "
                                        f"{self.args.output_dir}")
        if resume_from_checkpoint:
            check_checkpoint(os.fspath(resume_from_checkpoint), world_size=self.args.world_size,
                             allow_partial=self.allow_partial_resume, weights=not self._sharded())
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write ``checkpoint-N`` under ``<run>/.staging/`` (every process writes its part),
        then rename it in: ``checkpoint-N`` only ever exists complete, so a kill while
        checkpointing leaves the previous checkpoints as they were and ``last`` picks the
        newest complete one. Old checkpoints are rotated only after the rename."""
        if trial is not None:
            return super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial)
        stage_root = os.path.join(run_dir, CHECKPOINT_STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(stage_root, ignore_errors=True)  # what a killed save left
            os.makedirs(stage_root)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = stage_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            swap_in(os.path.join(stage_root, name), os.path.join(run_dir, name))
            shutil.rmtree(stage_root, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
            raise ValueError(f"{checkpoint}: optimizer.pt / scheduler.pt do not load ({e}); the "
                             "checkpoint is corrupt or from another run") from None

    def _load_rng_state(self, checkpoint: Optional[str]) -> None:
        try:
            return super()._load_rng_state(checkpoint)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
            raise ValueError(f"{checkpoint}: the RNG state does not load ({e}); the checkpoint "
                             "is corrupt") from None

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base step, then a stop at the first non-finite loss (the base class would go on,
        logging ``loss 0`` / ``grad_norm nan``, and write a NaN adapter at the end). The check
        reads the loss on the host, as the base loop's own NaN filter already does each step;
        with several processes the flag is reduced so that every rank stops together."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self.args.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bool(bad.item()):
            raise NonFiniteLossError(
                f"training stopped at step {self.state.global_step + 1} (epoch "
                f"{float(self.state.epoch or 0.0):.3f}): the loss is {loss.detach().float().mean().item()}"
                f"{'' if self.args.world_size == 1 else ' (on at least one process)'}; no "
                "adapter or merged model is written. Lower the learning rate, or check the data")
        return loss

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
