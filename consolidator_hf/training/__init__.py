"""Fine-tuning with the Hugging Face ``Trainer``: one code path for every method
(Consolidator, head only, BitFit, full, LoRA), adapter-only checkpoints that resume exactly,
and the standard artifacts (adapter, merged model, model card, ``metrics.json``).

- :mod:`.config`: :class:`FinetuneConfig` (nesting a ``ConsolidatorConfig``), :func:`apply_recipe`;
- :mod:`.methods`: the five methods' model wrapping, :func:`parameter_summary`, :func:`peft_available`;
- :mod:`.trainer`: :class:`AdapterTrainer`, the LR schedule, the trainable-tensor checkpoint format;
- :mod:`.checks`: what a run checks before slow work (backbone source, output folder, warmup);
- :mod:`.run`: :func:`run_finetune`, the run-folder layout, :func:`push_training_run`.
"""

from .. import _lazy_getattr
from .checks import check_model_source, clamp_warmup, existing_run, prepare_output_dir
from .config import METHODS, PREPROCESS, RECIPES, SAVE_STRATEGIES, FinetuneConfig, apply_recipe

# The rest pulls in transformers' Trainer (seconds): imported on first use, so that a command
# line can check its arguments against FinetuneConfig before paying for it.
_LAZY = {
    "parameter_summary": "methods", "peft_available": "methods", "unwrap_model": "methods",
    "wrap_model": "methods",
    "build_training_args": "run", "load_backbone": "run", "load_splits": "run",
    "run_finetune": "run", "push_training_run": "run", "RUN_DETAILS": "run",
    "TRAINABLE_WEIGHTS_NAME": "trainer", "AdapterTrainer": "trainer",
    "load_trainable_state": "trainer", "save_trainable_state": "trainer",
    "warmup_cosine_lambda": "trainer",
}


__getattr__ = _lazy_getattr(__name__, _LAZY)


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
    "check_model_source",
    "clamp_warmup",
    "existing_run",
    "load_backbone",
    "prepare_output_dir",
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
