"""VTAB-1k registry, ``datasets``-based loaders, lazy image transforms and a writer of the
VTAB-1k on-disk format."""

from .loaders import (
    DEFAULT_MAX_PIXELS,
    SPLITS,
    check_image,
    check_vtab_task,
    load_image_dataset,
    load_vtab1k,
    read_vtab_list,
    vtab_features,
)
from .registry import (
    BACKBONES,
    FOLDER_ALIASES,
    GROUPS,
    VtabTask,
    closest_task,
    get_task,
    paper_results,
    registry,
    shared_recipe,
    task_names,
    tasks,
)
from .transforms import PREPROCESSING, decode_image, make_transform, paper_pixel_values, to_rgb
from .writer import write_vtab_task

__all__ = [
    "check_vtab_task",
    "closest_task",
    "BACKBONES",
    "DEFAULT_MAX_PIXELS",
    "FOLDER_ALIASES",
    "GROUPS",
    "PREPROCESSING",
    "SPLITS",
    "VtabTask",
    "check_image",
    "decode_image",
    "get_task",
    "load_image_dataset",
    "load_vtab1k",
    "make_transform",
    "paper_pixel_values",
    "paper_results",
    "read_vtab_list",
    "registry",
    "shared_recipe",
    "task_names",
    "tasks",
    "to_rgb",
    "vtab_features",
    "write_vtab_task",
]
