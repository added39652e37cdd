"""consolidator_hf: Consolidator (Hao et al., ICLR 2023) for Hugging Face vision models.

Grouped multi-branch connections beside frozen linear layers, trained with a tiny
parameter budget, then merged exactly back into the linear weights.
"""

from typing import Any, Callable, Dict

from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, ConsolidatorConfig
from .convert import ConversionError, convert_checkpoint
from .drop_path import add_backbone_drop_path, drop_path_rates
from .cards import build_model_card
from .hub import HubError, push_adapter, push_merged
from .processors import default_image_processor
from .publish import save_adapter, save_merged
from .layer import ConsolidatorBranch, ConsolidatorLinear
from .model import ConsolidatorModel

__version__ = "0.1.0"


def get_consolidator_model(model: nn.Module, config: ConsolidatorConfig) -> ConsolidatorModel:
    """Wrap ``model`` (any ``PreTrainedModel``/``nn.Module``) with Consolidator branches.

    Injects a :class:`ConsolidatorLinear` at every target ``nn.Linear`` and freezes everything
    but the branches, the adapted layers' biases, the LayerNorms and ``modules_to_save``
    (as ``config`` says).
    """
    return ConsolidatorModel(model, config)


# Data and metrics pull in datasets/evaluate: imported on first use, not with the core.
_LAZY = {"load_vtab1k": "data", "load_image_dataset": "data", "make_transform": "data",
         "Top1Accuracy": "metrics", "vtab_aggregate": "metrics",
         # the Trainer pipeline pulls in transformers.Trainer
         "FinetuneConfig": "training", "run_finetune": "training",
         # the real offline backbone needs onnx (the [backbone] extra)
         "convert_dinov2_onnx": "dinov2_onnx", "cached_dinov2_backbone": "dinov2_onnx",
         "OnnxBackboneError": "dinov2_onnx"}


def _lazy_getattr(package: str, table: Dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that imports ``table[name]``'s submodule of ``package``
    on first use, so that names needing an optional extra import nothing until asked for."""

    def __getattr__(name: str) -> Any:
        if name in table:
            import importlib

            return getattr(importlib.import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = _lazy_getattr(__name__, _LAZY)


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ConversionError",
    "ConsolidatorBranch",
    "ConsolidatorConfig",
    "ConsolidatorLinear",
    "ConsolidatorModel",
    "FinetuneConfig",
    "HubError",
    "OnnxBackboneError",
    "Top1Accuracy",
    "add_backbone_drop_path",
    "build_model_card",
    "cached_dinov2_backbone",
    "convert_dinov2_onnx",
    "convert_checkpoint",
    "default_image_processor",
    "drop_path_rates",
    "get_consolidator_model",
    "run_finetune",
    "load_image_dataset",
    "load_vtab1k",
    "make_transform",
    "push_adapter",
    "push_merged",
    "save_adapter",
    "save_merged",
    "vtab_aggregate",
]
