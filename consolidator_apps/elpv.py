"""ELPV: 2,624 real electroluminescence images of solar cells, as VTAB-1k-style tasks.

The PyPI package ``elpv-dataset`` (data CC BY-NC-SA 4.0, code Apache-2.0; Buerhop-Lutz et al.
2018, Deitsch et al. 2019) ships 300x300 grey PNGs of single cells cut from module images, each
with the defect probability an expert gave it (0, 1/3, 2/3 or 1) and the cell type (mono- or
polycrystalline). Two tasks are built from it:

- ``elpv_defective`` (2 classes): functional (probability < 0.5) vs defective (>= 0.5), the
  dataset authors' binary split: 1,803 functional, 821 defective cells;
- ``elpv_defect4`` (4 classes): the defect probability itself (1,508 / 295 / 106 / 715 cells).

Each is written in the VTAB-1k on-disk format (:func:`consolidator_hf.data.write_vtab_task`):
a seeded permutation of all cells gives ``train800`` (800), ``val200`` (200) and ``test`` (the
next ``test_size``, default 1,000; never a cell of the other two), resized bicubically to
``image_size`` and saved as RGB JPEGs. It is a specialized-group task in VTAB's terms (a new sensor,
like VTAB's medical and remote-sensing tasks).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

ELPV_PACKAGE = "elpv-dataset"
ELPV_LICENSE = "CC BY-NC-SA 4.0 (images and labels), Apache-2.0 (loader code)"
ELPV_TASKS: Dict[str, Tuple[str, ...]] = {
    "elpv_defective": ("functional", "defective"),
    "elpv_defect4": ("p=0", "p=1/3", "p=2/3", "p=1"),
}
TRAIN_SIZE, VAL_SIZE, TEST_SIZE = 800, 200, 1000
ELPV_VERSION = 1  # bump when the written images change


def load_elpv() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ELPV cells: ``images (2624, 300, 300) uint8``, ``probabilities (2624,)`` in
    {0, 1/3, 2/3, 1}, ``types (2624,)`` ``"mono"`` / ``"poly"``."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise ImportError(f"the ELPV tasks need the PyPI package {ELPV_PACKAGE} (90 MB; data "
                          f"{ELPV_LICENSE}): pip install {ELPV_PACKAGE}, or pip install -e "
                          "'.[dev]'") from None
    images, probs, types = load_dataset()
    return np.asarray(images, dtype=np.uint8), np.asarray(probs, dtype=np.float64), np.asarray(types)


def elpv_labels(task: str, probabilities: np.ndarray) -> np.ndarray:
    """The class of every cell for ``task`` (see the module docstring)."""
    if task not in ELPV_TASKS:
        raise ValueError(f"unknown ELPV task {task!r}; known: {', '.join(ELPV_TASKS)}")
    if task == "elpv_defective":
        return (probabilities >= 0.5).astype(np.int64)
    return np.rint(probabilities * 3).astype(np.int64)


def write_elpv_task(data_dir: str, task: str = "elpv_defective", *, image_size: int = 56,
                    seed: int = 0, test_size: int = TEST_SIZE,
                    cells: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
                    ) -> Dict[str, object]:
    """Write ``data_dir/task`` (VTAB-1k format, images ``image_size`` px) and return its
    ``task.json`` summary. The split depends on ``seed`` only (not on ``task``), so the two
    tasks share their train/val/test cells. ``cells``: :func:`load_elpv`'s output, to load once."""
    from PIL import Image

    from consolidator_hf.data import write_vtab_task

    images, probs, types = cells if cells is not None else load_elpv()
    labels = elpv_labels(task, probs)
    if TRAIN_SIZE + VAL_SIZE + test_size > len(images):
        raise ValueError(f"{task}: test_size {test_size} + {TRAIN_SIZE + VAL_SIZE} training cells "
                         f"exceed the {len(images)} ELPV cells")
    perm = np.random.default_rng([int(seed), ELPV_VERSION]).permutation(len(images))
    rows = {"train800": perm[:TRAIN_SIZE], "val200": perm[TRAIN_SIZE:TRAIN_SIZE + VAL_SIZE],
            "test": perm[TRAIN_SIZE + VAL_SIZE:TRAIN_SIZE + VAL_SIZE + test_size]}

    def view(i: int) -> np.ndarray:
        grey = Image.fromarray(images[i], "L").resize((image_size, image_size), Image.BICUBIC)
        return np.repeat(np.asarray(grey)[..., None], 3, axis=-1)

    splits = {s: ([view(int(i)) for i in idx], [int(labels[i]) for i in idx]) for s, idx in rows.items()}
    sizes = {s: len(idx) for s, idx in rows.items()}
    sizes["train800val200"] = sizes["train800"] + sizes["val200"]
    summary = {
        "name": task, "group": "specialized", "num_classes": len(ELPV_TASKS[task]),
        "label_names": list(ELPV_TASKS[task]), "source": f"{ELPV_PACKAGE} (PyPI)",
        "license": ELPV_LICENSE, "seed": int(seed), "generator_version": ELPV_VERSION,
        "image_size": image_size, "sizes": sizes,
        "class_counts": {s: np.bincount(labels[idx], minlength=len(ELPV_TASKS[task])).tolist()
                         for s, idx in rows.items()},
        "cell_types": {s: {t: int((types[idx] == t).sum()) for t in ("mono", "poly")}
                       for s, idx in rows.items()},
    }
    write_vtab_task(data_dir, task, splits,
                    extra_files={"task.json": json.dumps(summary, indent=2, sort_keys=True) + "\n"})
    return summary


def ensure_elpv_task(data_dir: str, task: str = "elpv_defective", *, image_size: int = 56,
                     seed: int = 0, test_size: int = TEST_SIZE) -> Dict[str, object]:
    """:func:`write_elpv_task` unless ``data_dir/task/task.json`` already records the same
    settings; returns the summary."""
    path = os.path.join(data_dir, task, "task.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if (info.get("seed"), info.get("image_size"), info.get("generator_version"),
                info.get("sizes", {}).get("test")) == (seed, image_size, ELPV_VERSION, test_size):
            return info
    return write_elpv_task(data_dir, task, image_size=image_size, seed=seed, test_size=test_size)
