"""Write a task in the VTAB-1k on-disk format (the one :func:`~consolidator_hf.data.load_vtab1k`
reads), from your own images.

The format (docs/DESIGN.md section 4)::

    <root>/<task>/train800.txt  val200.txt  train800val200.txt  test.txt
    <root>/<task>/images/<split>/<NNNNNN>.jpg

with one ``images/<split>/<NNNNNN>.jpg <label>`` line per image. ``train800val200.txt`` lists the
``train800`` and ``val200`` files again (no copies), as VTAB-1k's own lists do.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..io import write_folder
from .loaders import SPLITS

JPEG_QUALITY = 95

# The split files a task may have, in the order they are written.
_IMAGE_SPLITS = ("train800", "val200", "test")


def _to_pil(image: Any, where: str):
    """A PIL image JPEG can hold exactly (mode L or RGB); ``ValueError`` naming ``where``
    (split and image index) otherwise: an RGBA or 16-bit image would be converted lossily."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            raise ValueError(f"{where}: PIL image of mode {image.mode!r}; JPEG holds L or RGB "
                             "(convert it first, e.g. image.convert('RGB'))")
        return image
    import numpy as np

    try:
        arr = np.asarray(image)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: not an image ({type(image).__name__}: {e})") from None
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"{where}: an image must be a PIL image (L or RGB) or a uint8 array "
                         f"(H, W) or (H, W, 3), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB")


def check_task_name(task: Any) -> str:
    """A task name is one path component: not empty, not ``.`` or ``..``, no separator (else
    ``ValueError``), so that writing ``<root>/<task>`` can never replace ``root`` itself or
    write outside it."""
    if not isinstance(task, str) or task in ("", ".", "..") or "/" in task or "\\" in task \
            or (os.altsep and os.altsep in task) or "\x00" in task:
        raise ValueError(f"task name {task!r} must be a single folder name (not empty, '.', "
                         "'..', and without path separators)")
    return task


def write_vtab_task(root: str, task: str,
                    splits: Mapping[str, Tuple[Sequence[Any], Sequence[int]]], *,
                    quality: int = JPEG_QUALITY,
                    extra_files: Optional[Mapping[str, str]] = None) -> Dict[str, int]:
    """Write ``<root>/<task>`` in the VTAB-1k on-disk format; returns the lines per split file.

    ``splits``: ``{"train800" | "val200" | "test": (images, labels)}`` (any of the three);
    images are PIL images or uint8 arrays ``(H, W)`` / ``(H, W, 3)``, labels non-negative ints.
    With both ``train800`` and ``val200``, ``train800val200.txt`` lists the two together.
    Images are saved as JPEG at ``quality`` with 4:4:4 chroma (no colour subsampling), so the
    same pixels always give the same bytes. ``extra_files``: more text files for the task
    folder (name -> content), e.g. a description.

    The folder is built beside its final place and swapped in (:func:`io.write_folder`): at
    every instant ``<root>/<task>`` is the complete old task or the complete new one; an
    existing folder of the same name is replaced whole. ``task`` must be one folder name.
    """
    check_task_name(task)
    unknown = sorted(set(splits) - set(_IMAGE_SPLITS))
    if unknown:
        raise ValueError(f"{task}: unknown split(s) {unknown}; a VTAB-1k task has "
                         f"{', '.join(_IMAGE_SPLITS)} (train800val200 is written from the first two)")
    for split, (images, labels) in splits.items():
        if len(images) != len(labels):
            raise ValueError(f"{task}/{split}: {len(images)} images but {len(labels)} labels")
        for i, label in enumerate(labels):
            if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0:
                raise ValueError(f"{task}/{split}: label {label!r} of image {i} is not a "
                                 "non-negative integer")
    reserved = {f"{s}.txt" for s in SPLITS} | {"images"}
    for name in extra_files or {}:
        if not name or os.path.basename(name) != name or name in reserved or name.startswith("."):
            raise ValueError(f"{task}: extra file name {name!r} must be a plain file name other "
                             f"than {sorted(reserved)}")
    lines: Dict[str, List[str]] = {}
    with write_folder(os.path.join(root, task)) as tmp:
        for split in _IMAGE_SPLITS:
            if split not in splits:
                continue
            images, labels = splits[split]
            os.makedirs(os.path.join(tmp, "images", split))
            lines[split] = []
            for i, (image, label) in enumerate(zip(images, labels)):
                rel = f"images/{split}/{i:06d}.jpg"
                _to_pil(image, f"{task}/{split}: image {i}").save(os.path.join(tmp, rel), format="JPEG", quality=quality,
                                    subsampling=0)
                lines[split].append(f"{rel} {int(label)}")
        if "train800" in lines and "val200" in lines:
            lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, split_lines in lines.items():
            _write_text(os.path.join(tmp, f"{split}.txt"), "\n".join(split_lines) + "\n")
        for name, text in (extra_files or {}).items():
            _write_text(os.path.join(tmp, name), text)
    return {split: len(split_lines) for split, split_lines in lines.items()}


def _write_text(path: str, text: str) -> None:
    # Inside the task's temporary folder: the folder rename is what makes the write atomic.
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
