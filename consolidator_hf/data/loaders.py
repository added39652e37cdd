"""Loaders that return ``datasets.Dataset`` objects with exactly two features,
``{"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=N)}``:

- :func:`load_vtab1k` reads the on-disk VTAB-1k format
  (``<data_dir>/<task>/{train800,val200,train800val200,test}.txt``, each line
  ``images/<split>/<NNNNNN>.jpg <label>`` relative to the task folder);
- :func:`load_image_dataset` wraps any ``datasets.load_dataset`` source (Hub id, ``parquet``,
  ``imagefolder``...) and maps its image and label columns onto the same schema.

Images are stored as paths (decoded lazily by ``datasets``); the whole list is validated eagerly,
so a broken download fails at load time with the file and line, not hours into training.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import datasets

from .registry import closest_task, get_task

SPLITS: Tuple[str, ...] = ("train800", "val200", "train800val200", "test")
#: Images with more pixels are refused at load (a 10000 x 10000 image decodes to 300 MB).
DEFAULT_MAX_PIXELS = 50_000_000


def vtab_features(num_classes: int) -> datasets.Features:
    """The schema every loader here returns."""
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)})


def _resolve_task(task: str, num_classes: Optional[int]) -> Tuple[Tuple[str, ...], int]:
    """Folder names to look for and the class count (explicit ``num_classes`` wins)."""
    try:
        info = get_task(task)
    except ValueError:
        info = None
    if info is None:
        if num_classes is None:
            near = closest_task(task)
            if near is not None:
                raise ValueError(f"task {task!r} is not in the VTAB-1k registry; did you mean "
                                 f"{near!r}? (for a task of your own, pass num_classes)")
            raise ValueError(f"task {task!r} is not in the VTAB-1k registry: pass num_classes= explicitly")
        folders: Tuple[str, ...] = (task,)
    else:
        folders = info.folder_names
        if task not in folders:  # keep the spelling the caller asked for first
            folders = (task,) + folders
        if num_classes is None:
            num_classes = info.num_classes
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return folders, num_classes


def _find_folder(data_dir: str, task: str, folders: Tuple[str, ...]) -> str:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"VTAB-1k data directory {data_dir!r} does not exist")
    for name in folders:
        path = os.path.join(data_dir, name)
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(
        f"task folder for {task!r} not found under {data_dir!r}: looked for "
        + " or ".join(repr(os.path.join(data_dir, n)) for n in folders))


def _complete(path: str, fmt: Optional[str]) -> bool:
    """Whether a JPEG / PNG file ends with its end marker (a truncated download does not);
    other formats are not checked. Reads the last KiB only."""
    if fmt not in ("JPEG", "PNG"):
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1024))
        tail = f.read()
    if fmt == "PNG":
        return tail[-8:-4] == b"IEND"
    return tail.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")


#: Images that passed :func:`check_image` in this process, keyed by what ``os.stat`` says of the
#: file: a run, a sweep or mini-VTAB loads the same task many times (each load checks all four
#: list files), and opening every image again cost most of a short run's set-up.
_CHECKED: Dict[Tuple[Any, ...], Tuple[int, int]] = {}
_CHECKED_MAX = 1 << 20  # entries (~200 MB at most); cleared when full


def check_image(path: str, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                where: str = "") -> Tuple[int, int]:
    """``(width, height)`` of an image file, read from its header only (cheap, no decode).

    ``ValueError`` naming ``where`` and the file for a file PIL cannot identify, a JPEG/PNG
    without its end marker (truncated), or more than ``max_pixels`` pixels (``None``: no limit;
    PIL's own decompression-bomb limit still applies). A file that passed before in this
    process is not opened again while ``os.stat`` reports the same inode, size, modification
    and change times (any rewrite, truncation or replacement checks it again).
    """
    where = f"{where}: " if where else ""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{where}{path} is not a readable image ({e})") from None
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
           st.st_ctime_ns, max_pixels)
    size = _CHECKED.get(key)
    if size is None:
        size = _check_image_file(path, max_pixels, where)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = size
    return size


def _check_image_file(path: str, max_pixels: Optional[int], where: str) -> Tuple[int, int]:
    # where: the "list file:line: " prefix of every message, already formatted
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                (w, h), fmt = im.size, im.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}{path} is not a readable image ({e})") from None
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(f"{where}{path} is {w}x{h} = {w * h:,} pixels, over the limit of "
                         f"{max_pixels:,} (pass max_pixels= a larger value, or None, to allow it)")
    if not _complete(path, fmt):
        raise ValueError(f"{where}{path} is truncated (the {fmt} end marker is missing)")
    return w, h


def _read_text(list_file: str) -> str:
    with open(list_file, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{list_file}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at "
                         f"offset {e.start}); save the list file as UTF-8") from None


def read_vtab_list(list_file: str, num_classes: int, *, verify_images: bool = True,
                   max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Tuple[List[str], List[int]]:
    """Parse one VTAB-1k list file into absolute image paths and integer labels.

    Every line must be ``<relative image path> <integer label>``; blank lines are ignored; the
    file is UTF-8 (a byte-order mark is accepted). Raises ``ValueError`` naming the file and
    line number for a malformed line, a label outside ``[0, num_classes)``, a path that is
    absolute or leaves the task folder, or (``verify_images``) an image that is not readable,
    is truncated or has more than ``max_pixels`` pixels (:func:`check_image`: header and end
    marker only); ``FileNotFoundError`` naming the image for a missing image.
    """
    root = os.path.dirname(os.path.abspath(list_file))
    paths: List[str] = []
    labels: List[int] = []
    for lineno, raw in enumerate(_read_text(list_file).splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        # rsplit: the label is the last field, so a path containing spaces still parses
        fields = line.rsplit(None, 1)
        if len(fields) != 2:
            raise ValueError(f"{list_file}:{lineno}: malformed line {line!r}: "
                             "expected '<image path> <integer label>'")
        rel, label_text = fields
        try:
            label = int(label_text)
        except ValueError:
            raise ValueError(f"{list_file}:{lineno}: malformed line {line!r}: "
                             f"label {label_text!r} is not an integer") from None
        if not 0 <= label < num_classes:
            raise ValueError(f"{list_file}:{lineno}: label {label} outside [0, {num_classes})")
        path = os.path.normpath(os.path.join(root, rel))
        if os.path.isabs(rel) or os.path.commonpath([root, path]) != root:
            raise ValueError(f"{list_file}:{lineno}: image path {rel!r} must be relative "
                             "and stay inside the task folder")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{list_file}:{lineno}: image {path!r} does not exist")
        if verify_images:
            check_image(path, max_pixels=max_pixels, where=f"{list_file}:{lineno}")
        paths.append(path)
        labels.append(label)
    if not paths:
        raise ValueError(f"{list_file}: the list file has no entries")
    return paths, labels


def check_vtab_task(data_dir: str, task: str, splits: Tuple[str, ...] = ("train800val200", "test"),
                    *, num_classes: Optional[int] = None) -> int:
    """Check a task before anything slow: its name (a near-miss gets "did you mean"), its folder,
    that ``splits`` exist, and every list file present (format, labels, images). Returns the
    class count. Raises ``ValueError`` / ``FileNotFoundError`` naming the problem."""
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown VTAB-1k split {split!r}; expected one of {', '.join(SPLITS)}")
    folders, n = _resolve_task(task, num_classes)
    folder = _find_folder(os.fspath(data_dir), task, folders)
    for split in splits:
        list_file = os.path.join(folder, f"{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"list file {list_file!r} for split {split!r} of task {task!r} "
                                    "does not exist")
    for split in SPLITS:
        list_file = os.path.join(folder, f"{split}.txt")
        if os.path.isfile(list_file):
            read_vtab_list(list_file, n)
    return n


def load_vtab1k(data_dir: str, task: str, split: str, *, num_classes: Optional[int] = None,
                validate_all_splits: bool = True, verify_images: bool = True,
                max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> datasets.Dataset:
    """One split of one VTAB-1k task from the on-disk format.

    ``task`` is a training name (``cifar100``) or folder name (``cifar``); either folder spelling
    is found under ``data_dir``. ``num_classes`` defaults to the registry's class count; pass it
    for tasks that are not in the registry (same on-disk format, any folder name). Every image
    is checked at load (``verify_images``; header and end marker, see :func:`check_image`), so a
    bad file is reported with its path before training; ``max_pixels`` caps the image size.
    ``validate_all_splits``: also check the task's other list files (those present of
    :data:`SPLITS`) with the same rules, so a bad label in ``train800.txt`` fails even when
    only ``train800val200.txt`` is loaded (the four files describe one download).

    >>> ds = load_vtab1k("data/vtab-1k", "cifar100", "train800val200")  # doctest: +SKIP
    >>> ds.features["label"].num_classes  # doctest: +SKIP
    100
    """
    if split not in SPLITS:
        raise ValueError(f"unknown VTAB-1k split {split!r}; expected one of {', '.join(SPLITS)}")
    folders, n = _resolve_task(task, num_classes)
    folder = _find_folder(os.fspath(data_dir), task, folders)
    list_file = os.path.join(folder, f"{split}.txt")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"list file {list_file!r} for split {split!r} of task {task!r} does not exist")
    paths, labels = read_vtab_list(list_file, n, verify_images=verify_images,
                                   max_pixels=max_pixels)
    if validate_all_splits:
        for other in SPLITS:
            other_file = os.path.join(folder, f"{other}.txt")
            if other != split and os.path.isfile(other_file):
                read_vtab_list(other_file, n)
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=vtab_features(n))


def load_image_dataset(source: str, split: str, *, image_column: str = "image", label_column: str = "label",
                       num_classes: Optional[int] = None, **load_kwargs: Any) -> datasets.Dataset:
    """Any ``datasets.load_dataset`` source mapped onto ``{"image": Image(), "label": ClassLabel}``.

    ``source``, ``split`` and ``load_kwargs`` go to ``datasets.load_dataset`` (e.g.
    ``load_image_dataset("parquet", "train", data_files={"train": "x.parquet"}, image_column="img")``
    or ``load_image_dataset("imagefolder", "train", data_dir="pets/")``). Other columns are dropped.
    The label column may be a ``ClassLabel`` (kept; ``num_classes``, if given, must agree), integers
    (``num_classes`` defaults to ``max + 1``; every label must be in ``[0, num_classes)``) or
    strings (encoded as a ``ClassLabel`` with the sorted names).
    """
    ds = datasets.load_dataset(source, split=split, **load_kwargs)
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"load_dataset({source!r}, split={split!r}) did not return a Dataset "
                        f"(got {type(ds).__name__}); streaming sources are not supported here")
    for role, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in ds.column_names:
            raise ValueError(f"{source!r} split {split!r} has no column {column!r} ({role}); "
                             f"columns: {ds.column_names}")
    if image_column == label_column:
        raise ValueError(f"image_column and label_column are both {image_column!r}")
    ds = ds.select_columns([image_column, label_column])
    ds = ds.rename_columns({c: new for c, new in ((image_column, "image"), (label_column, "label")) if c != new})

    label_feature = ds.features["label"]
    if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
        ds = ds.class_encode_column("label")
        label_feature = ds.features["label"]
    if isinstance(label_feature, datasets.ClassLabel):
        if num_classes is not None and num_classes != label_feature.num_classes:
            raise ValueError(f"{source!r}: num_classes={num_classes} but column {label_column!r} is a "
                             f"ClassLabel with {label_feature.num_classes} classes")
        labels = ds["label"]
        # a ClassLabel column may hold -1 ("no label"): unusable for training or scoring
        bad = next((i for i, y in enumerate(labels) if not 0 <= y < label_feature.num_classes), None)
        if bad is not None:
            raise ValueError(f"{source!r} split {split!r}: row {bad} has label {labels[bad]} "
                             f"outside [0, {label_feature.num_classes})")
        labels_feature = label_feature
    elif isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint")):
        labels = ds["label"]
        if len(labels) == 0:
            raise ValueError(f"{source!r} split {split!r} is empty")
        lo, hi = min(labels), max(labels)
        if num_classes is None:
            num_classes = hi + 1
        if lo < 0 or hi >= num_classes:
            bad = next(i for i, y in enumerate(labels) if not 0 <= y < num_classes)
            raise ValueError(f"{source!r} split {split!r}: row {bad} has label {labels[bad]} "
                             f"outside [0, {num_classes})")
        labels_feature = datasets.ClassLabel(num_classes=num_classes)
    else:
        raise TypeError(f"{source!r}: label column {label_column!r} has type {label_feature}; "
                        "expected a ClassLabel, integers or strings")
    # cast_column accepts paths, bytes dicts and already-decoded images for the Image feature
    features = datasets.Features({"image": datasets.Image(), "label": labels_feature})
    if ds.features != features:
        ds = ds.cast(features)
    return ds
