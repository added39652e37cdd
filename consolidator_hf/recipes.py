"""Training recipes as data: what the paper's released VTAB scripts use, per task.

A :class:`Recipe` bundles the Consolidator settings, the optimisation settings and the
preprocessing name; ``scripts/finetune.py --recipe paper`` applies one in a single switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict

from .data.registry import get_task, shared_recipe


@dataclass
class Recipe:
    """``consolidator``: ConsolidatorConfig keyword arguments; ``training``: optimisation
    settings (``learning_rate``, ``weight_decay``, ``num_train_epochs``, ``batch_size``,
    ``warmup_epochs``, ``warmup_start_lr``, ``min_lr``, ``optimizer``, ``scheduler``);
    ``preprocess``: the name of the image preprocessing."""

    consolidator: Dict[str, Any] = field(default_factory=dict)
    training: Dict[str, Any] = field(default_factory=dict)
    preprocess: str = "paper"


def paper_recipe(task: str, backbone: str = "vit_b16_in21k") -> Recipe:
    """The paper's released VTAB-1k recipe for ``task`` (numbers read from the registry)."""
    t = get_task(task)
    per_task = t.recipe(backbone)
    shared = shared_recipe()
    return Recipe(
        consolidator={
            "groups": tuple(shared["groups"]),
            "channel_shuffle": bool(shared["channel_shuffle"]),
            "drop_rate": float(per_task["drop_rate"]),
            # the paper's timm ViT has one fused qkv layer: group it the same way
            "qkv_grouping": "fused",
            "backbone_drop_path": float(shared["backbone_stochastic_depth"]),
        },
        training={
            "learning_rate": float(per_task["learning_rate"]),
            "weight_decay": float(per_task["weight_decay"]),
            "num_train_epochs": int(shared["epochs"]),
            "batch_size": int(shared["batch_size"]),
            "optimizer": "adamw",
            "scheduler": "cosine",
            # "cosine, 10 warmup epochs from 1e-6, min lr 1e-5" in the registry's words
            "warmup_epochs": 10,
            "warmup_start_lr": 1e-6,
            "min_lr": 1e-5,
        },
        preprocess="paper",
    )


RECIPES: Dict[str, Callable[..., Recipe]] = {"paper": paper_recipe}


def get_recipe(name: str, task: str, backbone: str = "vit_b16_in21k") -> Recipe:
    """A recipe by name (``"paper"``) for ``task``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name](task, backbone)
