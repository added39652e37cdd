"""mini-VTAB target tasks: small VTAB-1k-style tasks generated deterministically from real images.

Each task is written in the VTAB-1k on-disk format (see ``docs/DESIGN.md`` section 4)::

    <data_dir>/<task>/train800.txt  val200.txt  train800val200.txt  test.txt  task.json
    <data_dir>/<task>/images/{train800,val200,test}/<NNNNNN>.jpg

with lines ``images/<split>/<NNNNNN>.jpg <label>``; ``train800val200.txt`` lists the 800 + 200
lines of the two smaller splits. Images are 32x32 RGB JPEGs (quality 95, no chroma subsampling).
The held-out test images never share a source image with train800val200.

The tasks mimic VTAB's three groups (the backbone, :mod:`.backbone`, is pretrained on the
Fashion-MNIST *training* set; every Fashion-MNIST-based task draws from the *test* set):

- natural / domain shift: ``digits`` (sklearn's handwritten digits, upsampled), ``fashion_clutter``
  (an item among cropped neighbours, like SVHN's house numbers);
- specialized / new sensor: ``fashion_negative`` (photographic negatives), ``fashion_tops_tinted``
  (the four confusable upper-body garments under random colour tints and sensor noise);
- structured: ``rotation`` (8 angle bins), ``location`` (3x3 cell of a small item),
  ``count`` (1-6 handwritten digits on a canvas).

The same seed gives byte-identical files (with the same numpy and Pillow versions).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from consolidator_hf.data.writer import JPEG_QUALITY, write_vtab_task
from .sources import FASHION_MNIST_CLASSES, load_digits_images, load_fashion_mnist

IMAGE_SIZE = 32
TRAIN_SIZE, VAL_SIZE, TEST_SIZE = 800, 200, 1000
GENERATOR_VERSION = 1

Split = Tuple[np.ndarray, np.ndarray]  # images (N, 32, 32, 3) uint8, labels (N,) int64


@dataclass(frozen=True)
class MiniTask:
    """One mini-VTAB task: its VTAB group, class count, source and image builder."""

    name: str
    group: str
    num_classes: int
    source: str  # "digits", "fashion_mnist" or "elpv"
    description: str
    label_names: Tuple[str, ...]
    # build(rng, sources, test_size) -> (train800val200 split, test split)
    build: Callable[[np.random.Generator, "Sources", int], Tuple[Split, Split]]


class Sources:
    """Lazily loaded source images (Fashion-MNIST only read when a task needs it)."""

    def __init__(self, fashion_dir: Optional[str] = None) -> None:
        self.fashion_dir = fashion_dir
        self._digits: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._fashion_test: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._elpv: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    @property
    def digits(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._digits is None:
            self._digits = load_digits_images()
        return self._digits

    @property
    def elpv(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._elpv is None:
            from ..elpv import load_elpv

            self._elpv = load_elpv()
        return self._elpv

    @property
    def fashion_test(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._fashion_test is None:
            self._fashion_test = load_fashion_mnist("test", self.fashion_dir)
        return self._fashion_test


# ----------------------------------------------------------------------------- pixel helpers
def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of a uint8 grey image to ``size x size``."""
    return np.asarray(Image.fromarray(img, "L").resize((size, size), Image.BICUBIC))


def standard_view(img: np.ndarray) -> np.ndarray:
    """A 28x28 image centred on a black 32x32 canvas: the view the backbone is pretrained on."""
    if img.shape != (28, 28):
        img = _resize(img, 28)
    return np.pad(img, 2)


def _paste_max(canvas: np.ndarray, item: np.ndarray, x: int, y: int) -> None:
    """Paste ``item`` with its top-left at column ``x``, row ``y`` (clipped), keeping the max."""
    h, w = item.shape
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, canvas.shape[1]), min(y + h, canvas.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    region = canvas[y0:y1, x0:x1]
    np.maximum(region, item[y0 - y:y1 - y, x0 - x:x1 - x], out=region)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _pools(rng: np.random.Generator, n: int, trainval: int) -> Tuple[np.ndarray, np.ndarray]:
    """Disjoint source-index pools: the first ``trainval`` of a permutation, and the rest."""
    perm = rng.permutation(n)
    return perm[:trainval], perm[trainval:]


def _stack(images: List[np.ndarray], labels: List[int]) -> Split:
    return np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64)


# ----------------------------------------------------------------------------- builders
def _build_digits(rng, src: Sources, test_size: int):
    images, labels = src.digits
    tv, te = _pools(rng, len(images), TRAIN_SIZE + VAL_SIZE)
    te = te[:test_size]  # digits has 1,797 images: 1,000 for train800val200, 797 left for test

    def split(idx):
        return _stack([_rgb(standard_view(_resize(images[i], 28))) for i in idx],
                      [int(labels[i]) for i in idx])
    return split(tv), split(te)


# ELPV cells are kept at 64 px (not the 32 px canvas): cracks need the pixels, and the real
# backbone resizes its input to its own size (56 px) anyway.
ELPV_IMAGE_SIZE = 64


def _build_elpv_defect4(rng, src: Sources, test_size: int):
    from ..elpv import elpv_labels

    images, probs, _ = src.elpv
    labels = elpv_labels("elpv_defect4", probs)
    tv, te = _pools(rng, len(images), TRAIN_SIZE + VAL_SIZE)
    te = te[:test_size]

    def split(idx):
        return _stack([_rgb(_resize(images[i], ELPV_IMAGE_SIZE)) for i in idx],
                      [int(labels[i]) for i in idx])
    return split(tv), split(te)


def _fashion_split(rng, src: Sources, test_size: int, render, labels_of=None, classes=None):
    """Shared skeleton of the Fashion-MNIST tasks: pick items from disjoint halves of the
    test set (optionally only ``classes``), render each with ``render(rng, item, pool)``."""
    images, labels = src.fashion_test
    keep = np.arange(len(images)) if classes is None else np.flatnonzero(np.isin(labels, classes))
    keep = keep[rng.permutation(len(keep))]
    half = len(keep) // 2
    out = []
    for pool, n in ((keep[:half], TRAIN_SIZE + VAL_SIZE), (keep[half:], test_size)):
        if len(pool) < n:
            raise ValueError(f"Fashion-MNIST test set too small for this task: a pool of "
                             f"{len(pool)} images, {n} needed")
        chosen = pool[:n]
        imgs, labs = [], []
        for i in chosen:
            img, lab = render(rng, images[i], int(labels[i]), images[pool])
            imgs.append(img)
            labs.append(lab)
        out.append(_stack(imgs, labs))
    return out[0], out[1]


def _build_fashion_clutter(rng, src, test_size):
    def render(rng, item, label, pool):
        canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        tx, ty = 6 + int(rng.integers(-2, 3)), 6 + int(rng.integers(-2, 3))
        for side in (-1, 1):  # neighbours cut by the frame, like SVHN's adjacent digits
            other = _resize(pool[int(rng.integers(len(pool)))], 20)
            _paste_max(canvas, other, tx + side * (18 + int(rng.integers(0, 4))),
                       ty + int(rng.integers(-3, 4)))
        _paste_max(canvas, _resize(item, 20), tx, ty)
        return _rgb(canvas), label
    return _fashion_split(rng, src, test_size, render)


def _build_fashion_negative(rng, src, test_size):
    def render(rng, item, label, pool):
        return _rgb(255 - standard_view(item)), label
    return _fashion_split(rng, src, test_size, render)


_TOPS = (0, 2, 4, 6)  # T-shirt/top, Pullover, Coat, Shirt: the classes Fashion-MNIST confuses most


def _build_fashion_tops_tinted(rng, src, test_size):
    def render(rng, item, label, pool):
        tint = rng.uniform(0.25, 1.0, size=3)
        tint /= tint.max()
        img = standard_view(item).astype(np.float32)[..., None] * tint[None, None, :]
        img += rng.normal(0.0, 25.0, size=img.shape)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8), _TOPS.index(label)
    return _fashion_split(rng, src, test_size, render, classes=list(_TOPS))


def _build_rotation(rng, src, test_size):
    def render(rng, item, label, pool):
        k = int(rng.integers(0, 8))
        angle = 45.0 * k + float(rng.uniform(-5.0, 5.0))
        img = Image.fromarray(standard_view(item), "L").rotate(angle, resample=Image.BILINEAR)
        return _rgb(np.asarray(img)), k
    return _fashion_split(rng, src, test_size, render)


def _build_location(rng, src, test_size):
    def render(rng, item, label, pool):
        cx, cy = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        # 10x10 item, top-left in cell c's range 8c..8c+6: cells are disjoint, 1 px apart
        _paste_max(canvas, _resize(item, 10), 8 * cx + int(rng.integers(0, 7)),
                   8 * cy + int(rng.integers(0, 7)))
        return _rgb(canvas), 3 * cy + cx
    return _fashion_split(rng, src, test_size, render)


MAX_COUNT = 6


def _place_boxes(rng, n: int, size: int, box: int) -> List[Tuple[int, int]]:
    """``n`` non-overlapping ``box x box`` squares on a ``size x size`` canvas (top-left corners)."""
    while True:
        placed: List[Tuple[int, int]] = []
        for _ in range(200):
            x, y = (int(v) for v in rng.integers(0, size - box + 1, size=2))
            if all(abs(x - a) >= box or abs(y - b) >= box for a, b in placed):
                placed.append((x, y))
                if len(placed) == n:
                    return placed
        # rare dead end (a crowded canvas): start this image again, still deterministically


def _build_count(rng, src, test_size):
    images, _ = src.digits
    tv, te = _pools(rng, len(images), len(images) // 2)  # disjoint sprite pools
    out = []
    for pool, n in ((tv, TRAIN_SIZE + VAL_SIZE), (te, test_size)):
        imgs, labs = [], []
        for _ in range(n):
            count = int(rng.integers(1, MAX_COUNT + 1))
            canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
            sprites = rng.choice(pool, size=count, replace=False)
            for s, (x, y) in zip(sprites, _place_boxes(rng, count, IMAGE_SIZE, 8)):
                _paste_max(canvas, images[s], x, y)
            imgs.append(_rgb(canvas))
            labs.append(count - 1)
        out.append(_stack(imgs, labs))
    return out[0], out[1]


_FASHION = tuple(FASHION_MNIST_CLASSES)
TASKS: Dict[str, MiniTask] = {t.name: t for t in (
    MiniTask("digits", "natural", 10, "digits",
             "sklearn's handwritten digits, 8x8 upsampled bicubically to 28x28 on the 32x32 canvas "
             "(a new domain and new classes; test: the 797 digits left after train800val200)",
             tuple(str(i) for i in range(10)), _build_digits),
    MiniTask("fashion_clutter", "natural", 10, "fashion_mnist",
             "a 20x20 Fashion-MNIST item in the centre, cropped neighbours left and right (SVHN-like)",
             _FASHION, _build_fashion_clutter),
    MiniTask("fashion_negative", "specialized", 10, "fashion_mnist",
             "Fashion-MNIST items as photographic negatives (white background)",
             _FASHION, _build_fashion_negative),
    MiniTask("fashion_tops_tinted", "specialized", 4, "fashion_mnist",
             "fine-grained: T-shirt/top vs pullover vs coat vs shirt, random colour tint, "
             "Gaussian sensor noise (sigma 25/255)",
             tuple(FASHION_MNIST_CLASSES[c] for c in _TOPS), _build_fashion_tops_tinted),
    MiniTask("elpv_defect4", "specialized", 4, "elpv",
             "real electroluminescence images of solar cells (PyPI elpv-dataset, CC BY-NC-SA 4.0), "
             "300x300 resized to 64x64: the expert's defect probability 0, 1/3, 2/3 or 1",
             ("p=0", "p=1/3", "p=2/3", "p=1"), _build_elpv_defect4),
    MiniTask("rotation", "structured", 8, "fashion_mnist",
             "rotation of a Fashion-MNIST item: 8 bins of 45 degrees (+-5 degrees jitter)",
             tuple(f"{45 * k} deg" for k in range(8)), _build_rotation),
    MiniTask("location", "structured", 9, "fashion_mnist",
             "which cell of a 3x3 grid holds a 10x10 Fashion-MNIST item (dSprites-location-like)",
             tuple(f"row {r} col {c}" for r in range(3) for c in range(3)), _build_location),
    MiniTask("count", "structured", MAX_COUNT, "digits",
             "how many (1-6) non-overlapping 8x8 handwritten digits lie on the canvas (CLEVR-count-like)",
             tuple(str(i) for i in range(1, MAX_COUNT + 1)), _build_count),
)}


# The default task lists: the small Fashion-MNIST-pretrained backbone's seven (every 32 px task),
# and five for the real DINOv2 backbone (natural: digits, fashion_clutter; specialized: ELPV's
# solar cells; structured: rotation, count), chosen before any result, the same for every method.
TOY_TASKS = ("digits", "fashion_clutter", "fashion_negative", "fashion_tops_tinted", "rotation",
             "location", "count")
REAL_TASKS = ("digits", "fashion_clutter", "elpv_defect4", "rotation", "count")


def task_names() -> List[str]:
    """All mini-VTAB task names, grouped natural, specialized, structured."""
    return list(TASKS)


def get_task(name: str) -> MiniTask:
    if name not in TASKS:
        raise ValueError(f"unknown mini-VTAB task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def task_seed(seed: int, name: str) -> List[int]:
    """The numpy seed sequence of one task: the user's seed and a stable hash of the name."""
    return [int(seed), zlib.crc32(name.encode("utf-8"))]


def generate_task(name: str, data_dir: str, *, seed: int = 0, fashion_dir: Optional[str] = None,
                  test_size: int = TEST_SIZE, sources: Optional[Sources] = None) -> Dict[str, object]:
    """Write task ``name`` under ``data_dir/name`` and return its ``task.json`` summary.

    The folder is built beside the target and renamed into place, so an interrupted run leaves
    no half-written task; an existing folder of the same name is replaced.
    """
    task = get_task(name)
    if test_size < 1:
        raise ValueError(f"test_size must be >= 1, got {test_size}")
    rng = np.random.default_rng(task_seed(seed, name))
    (tv_images, tv_labels), (te_images, te_labels) = task.build(rng, sources or Sources(fashion_dir), test_size)
    for split_name, labs in (("train800val200", tv_labels), ("test", te_labels)):
        if labs.min() < 0 or labs.max() >= task.num_classes:  # a builder bug, never user input
            raise AssertionError(f"{name}/{split_name}: labels outside 0..{task.num_classes - 1}")

    splits = {"train800": (tv_images[:TRAIN_SIZE], tv_labels[:TRAIN_SIZE]),
              "val200": (tv_images[TRAIN_SIZE:], tv_labels[TRAIN_SIZE:]),
              "test": (te_images, te_labels)}
    sizes = {split: len(labels) for split, (_, labels) in splits.items()}
    sizes["train800val200"] = sizes["train800"] + sizes["val200"]
    summary = {
        "name": name, "group": task.group, "num_classes": task.num_classes,
        "label_names": list(task.label_names), "description": task.description,
        "source": task.source, "seed": int(seed), "generator_version": GENERATOR_VERSION,
        "image_size": int(tv_images.shape[1]), "image_format": f"JPEG quality {JPEG_QUALITY}, 4:4:4",
        "sizes": sizes, "test_size_asked": int(test_size),
    }
    write_vtab_task(data_dir, name, splits, quality=JPEG_QUALITY,
                    extra_files={"task.json": json.dumps(summary, indent=2, sort_keys=True) + "\n"})
    return summary


def generate_tasks(data_dir: str, names: Optional[Sequence[str]] = None, *, seed: int = 0,
                   fashion_dir: Optional[str] = None, test_size: int = TEST_SIZE,
                   ) -> Dict[str, Dict[str, object]]:
    """Generate several tasks (all by default); returns ``{name: task.json summary}``."""
    sources = Sources(fashion_dir)
    return {n: generate_task(n, data_dir, seed=seed, test_size=test_size, sources=sources)
            for n in (names or task_names())}
