"""Fine-tuning with the Hugging Face ``Trainer``: one code path for every method
(Consolidator, head only, BitFit, full, LoRA), adapter-only checkpoints that resume exactly,
and the standard artifacts (adapter, merged model, model card, ``metrics.json``).

- :mod:`.config`: :class:`FinetuneConfig` (nesting a ``ConsolidatorConfig``), :func:`apply_recipe`;
- :mod:`.methods`: the five methods' model wrapping, :func:`parameter_summary`, :func:`peft_available`;
- :mod:`.trainer`: :class:`AdapterTrainer`, the LR schedule, the trainable-tensor checkpoint format;
- :mod:`.run`: :func:`run_finetune`, the run-folder layout, :func:`push_training_run`.
"""

from .config import METHODS, PREPROCESS, RECIPES, SAVE_STRATEGIES, FinetuneConfig, apply_recipe
from .methods import parameter_summary, peft_available, unwrap_model, wrap_model
from .run import RUN_DETAILS, build_training_args, load_splits, push_training_run, run_finetune
from .trainer import (
    TRAINABLE_WEIGHTS_NAME,
    AdapterTrainer,
    load_trainable_state,
    save_trainable_state,
    warmup_cosine_lambda,
)

__all__ = [
    "METHODS",
    "RUN_DETAILS",
    "PREPROCESS",
    "RECIPES",
    "SAVE_STRATEGIES",
    "TRAINABLE_WEIGHTS_NAME",
    "AdapterTrainer",
    "FinetuneConfig",
    "apply_recipe",
    "build_training_args",
    "load_splits",
    "load_trainable_state",
    "parameter_summary",
    "peft_available",
    "push_training_run",
    "run_finetune",
    "save_trainable_state",
    "unwrap_model",
    "wrap_model",
    "warmup_cosine_lambda",
]
