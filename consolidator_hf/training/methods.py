"""The five fine-tuning methods as model wrapping: what trains, and how it is counted.

``consolidator`` (Consolidator branches, :class:`~consolidator_hf.model.ConsolidatorModel`),
``linear`` (the head only), ``bitfit`` (biases + LayerNorms + head), ``full`` (everything) and
``lora`` (PEFT LoRA on the query/value projections + head). Head and LoRA module names come
from :mod:`consolidator_hf.targets`.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict

from torch import nn

from ..config import ConsolidatorConfig
from ..model import ConsolidatorModel
from ..targets import head_module_name, is_norm, lora_target_modules
from .config import FinetuneConfig

_DEFAULT_ADAPTER = ConsolidatorConfig()


def peft_available() -> bool:
    """Whether the optional dependency ``peft`` (method ``lora``) is installed."""
    return importlib.util.find_spec("peft") is not None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _freeze_all_but(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name, p)))


def wrap_model(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Apply ``cfg.method`` to a freshly loaded image-classification model."""
    head = head_module_name(model)
    if cfg.method == "consolidator":
        adapter = cfg.consolidator
        changes = {}
        if adapter.modules_to_save == _DEFAULT_ADAPTER.modules_to_save:
            changes["modules_to_save"] = [head]
        if adapter.base_model_name_or_path is None:
            changes["base_model_name_or_path"] = cfg.model
        return ConsolidatorModel(model, adapter.replace(**changes))
    if cfg.method == "linear":
        _freeze_all_but(model, lambda n, p: n.startswith(head + "."))
    elif cfg.method == "bitfit":
        norms = {n for n, m in model.named_modules() if is_norm(m)}
        _freeze_all_but(model, lambda n, p: n.startswith(head + ".") or n.endswith(".bias")
                        or n.rsplit(".", 1)[0] in norms)
    elif cfg.method == "full":
        _freeze_all_but(model, lambda n, p: True)
    elif cfg.method == "lora":
        if not peft_available():
            raise ImportError("method='lora' needs the optional dependency peft: pip install peft")
        from peft import LoraConfig, get_peft_model

        targets = cfg.target_modules or lora_target_modules(model)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or cfg.lora_r,
                          target_modules=targets, modules_to_save=[head])
        return get_peft_model(model, lora)
    return model


def parameter_summary(model: nn.Module) -> Dict[str, int]:
    """Parameter counts of any wrapped model, under the keys of
    :meth:`ConsolidatorModel.parameter_counts`: ``trainable`` (``requires_grad`` now),
    ``branch`` (Consolidator branch parameters; 0 for the other methods), ``stored`` (what the
    adapter file holds) and ``base`` (the backbone's own parameters)."""
    model = unwrap_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(model, ConsolidatorModel):
        return {**model.parameter_counts(), "trainable": trainable}
    total = sum(p.numel() for p in model.parameters())
    base = total - (trainable if type(model).__name__.startswith("Peft") else 0)
    return {"trainable": trainable, "branch": 0, "stored": trainable, "base": base}
