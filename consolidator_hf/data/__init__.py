"""VTAB-1k registry and datasets-based loaders."""

from .registry import (
    BACKBONES,
    FOLDER_ALIASES,
    GROUPS,
    VtabTask,
    find_task_folder,
    get_task,
    paper_results,
    registry,
    shared_recipe,
    task_names,
    tasks,
)

__all__ = [
    "BACKBONES",
    "FOLDER_ALIASES",
    "GROUPS",
    "VtabTask",
    "find_task_folder",
    "get_task",
    "paper_results",
    "registry",
    "shared_recipe",
    "task_names",
    "tasks",
]
