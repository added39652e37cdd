"""The VTAB-1k registry: the 19 tasks, their groups and class counts, the paper's per-task
recipes and reported accuracies. Read from ``vtab1k.json`` shipped inside the package
(a copy of the project's shared registry; never retype its numbers)."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple

GROUPS: Tuple[str, ...] = ("natural", "specialized", "structured")
BACKBONES: Tuple[str, ...] = ("vit_b16_in21k", "mocov3_vit_b16")

# Folder names that the common VTAB-1k download script writes instead of the training names.
FOLDER_ALIASES: Dict[str, str] = {"cifar100": "cifar", "oxford_pet": "oxford_iiit_pet"}


@dataclass(frozen=True)
class VtabTask:
    name: str
    group: str
    num_classes: int
    paper_recipe: Dict[str, Dict[str, float]]
    paper_top1: float

    @property
    def folder_names(self) -> Tuple[str, ...]:
        """Folder names this task may have on disk (training name first)."""
        alias = FOLDER_ALIASES.get(self.name)
        return (self.name, alias) if alias else (self.name,)

    def recipe(self, backbone: str = "vit_b16_in21k") -> Dict[str, float]:
        """The paper's ``learning_rate``, ``weight_decay`` and ``drop_rate`` for this task."""
        if backbone not in self.paper_recipe:
            raise ValueError(f"{self.name}: no paper recipe for backbone {backbone!r}; "
                             f"known: {sorted(self.paper_recipe)}")
        return dict(self.paper_recipe[backbone])


@lru_cache(maxsize=1)
def registry() -> Dict[str, Any]:
    """The whole registry file as a dict."""
    text = resources.files("consolidator_hf.data").joinpath("vtab1k.json").read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def tasks() -> Tuple[VtabTask, ...]:
    return tuple(
        VtabTask(name=t["name"], group=t["group"], num_classes=int(t["num_classes"]),
                 paper_recipe=t["paper_recipe"], paper_top1=float(t["paper_top1_vit_b16_in21k"]))
        for t in registry()["tasks"]
    )


def task_names() -> List[str]:
    return [t.name for t in tasks()]


def get_task(name: str) -> VtabTask:
    """A task by its training name or its on-disk folder name (``cifar``, ``oxford_iiit_pet``)."""
    for t in tasks():
        if name in t.folder_names:
            return t
    raise ValueError(f"unknown VTAB-1k task {name!r}{did_you_mean(name)}; "
                     f"known tasks: {', '.join(task_names())}")


def closest_task(name: str) -> Optional[str]:
    """The registry name (training or folder spelling) closest to ``name``, if one is close
    (``difflib``, cutoff 0.75): ``cifar1000`` -> ``cifar100``."""
    spellings = [n for t in tasks() for n in t.folder_names]
    match = difflib.get_close_matches(name, spellings, n=1, cutoff=0.75)
    return match[0] if match else None


def did_you_mean(name: str) -> str:
    """``"; did you mean 'cifar100'?"`` for a near-miss of a task name, else ``""``."""
    match = closest_task(name)
    return f"; did you mean {match!r}?" if match else ""


def shared_recipe() -> Dict[str, Any]:
    """The recipe shared by all tasks (epochs, batch size, schedule, preprocessing...)."""
    return dict(registry()["shared_recipe"])


def paper_results() -> Dict[str, float]:
    """The paper's per-task top-1 accuracies (ViT-B/16 IN-21k)."""
    return {t.name: t.paper_top1 for t in tasks()}
