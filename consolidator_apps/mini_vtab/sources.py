"""The real images mini-VTAB is built from, read offline.

- Fashion-MNIST (70,000 28x28 grey images, 10 classes) from the gzip idx files that Debian's
  ``dataset-fashion-mnist`` package installs under ``/usr/share/datasets/fashion-mnist/``
  (``apt-get install dataset-fashion-mnist``). Without root, :func:`fetch_fashion_mnist` downloads
  the same package with ``apt-get download`` and unpacks it into the project's cache
  (``~/.cache/consolidator_hf/fashion-mnist``); the scripts call it when no copy is found. With
  network access the same images are on the Hub
  as ``zalando-datasets/fashion_mnist``: :func:`export_fashion_mnist_idx` writes such a dataset
  (``consolidator_hf.data.load_image_dataset("zalando-datasets/fashion_mnist", "test")``) as idx
  files; point ``fashion_dir`` at any folder holding the four idx files.
- scikit-learn's digits (1,797 8x8 grey images, 10 classes), shipped inside scikit-learn.

Every image comes back as ``uint8`` numpy arrays, ``images (N, H, W)`` and ``labels (N,)``.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import struct
import subprocess
import tempfile
from typing import Optional, Tuple

import numpy as np

from consolidator_hf.io import cache_dir, write_folder

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"  # the Debian package holding the idx files
_PACKAGE_FOLDER = "usr/share/datasets/fashion-mnist"  # where the idx files lie inside that package
FASHION_MNIST_ENV = "CONSOLIDATOR_FASHION_MNIST_DIR"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# idx type codes (the format's third magic byte) -> numpy dtype (big-endian on disk)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzip-compressed, by the ``.gz`` suffix) as a numpy array.

    The format: two zero bytes, a type code, the number of dimensions, one big-endian uint32
    per dimension, then the data. Raises ``ValueError`` naming the file when it is malformed.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read idx file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {data[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: idx header says shape {shape} ({expected} bytes of data), "
                         f"the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip idx file (the inverse of :func:`read_idx` for uint8), atomically."""
    from consolidator_hf.io import atomic_path

    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: write_idx writes uint8 arrays, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with atomic_path(path) as tmp:
        # mtime=0: the same array gives the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(header + array.tobytes())


def export_fashion_mnist_idx(dataset, fashion_dir: str, split: str) -> Tuple[str, str]:
    """Write a ``datasets.Dataset`` with ``image`` (28x28) and ``label`` columns -- e.g.
    ``load_image_dataset("zalando-datasets/fashion_mnist", split)`` on a machine with network --
    as the two idx files :func:`load_fashion_mnist` reads for ``split``. Returns their paths."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    images = np.stack([np.asarray(im.convert("L"), dtype=np.uint8) for im in dataset["image"]])
    labels = np.asarray(dataset["label"], dtype=np.uint8)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"Fashion-MNIST images are 28x28, the dataset holds {images.shape[1:]}")
    paths = tuple(os.path.join(fashion_dir, name) for name in FASHION_MNIST_FILES[split])
    write_idx(paths[0], images)
    write_idx(paths[1], labels)
    return paths  # type: ignore[return-value]


def fashion_mnist_cache_dir() -> str:
    """Where :func:`fetch_fashion_mnist` unpacks the idx files: the project cache's ``fashion-mnist``."""
    return cache_dir("fashion-mnist")


def _has_idx_files(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name))
               for names in FASHION_MNIST_FILES.values() for name in names)


def fashion_mnist_dir(fashion_dir: Optional[str] = None) -> str:
    """``fashion_dir``, else ``$CONSOLIDATOR_FASHION_MNIST_DIR``, else the Debian package's folder
    when it holds the files, else the cache folder :func:`fetch_fashion_mnist` fills."""
    explicit = fashion_dir or os.environ.get(FASHION_MNIST_ENV)
    if explicit:
        return explicit
    if _has_idx_files(FASHION_MNIST_DIR) or not _has_idx_files(fashion_mnist_cache_dir()):
        return FASHION_MNIST_DIR
    return fashion_mnist_cache_dir()


def fetch_fashion_mnist(fashion_dir: Optional[str] = None, *, quiet: bool = False) -> str:
    """Make sure the Fashion-MNIST idx files exist and return their folder.

    An explicit ``fashion_dir`` (or ``$CONSOLIDATOR_FASHION_MNIST_DIR``) is returned as given: it
    is the user's folder, not ours to fill. Nothing is done either when the Debian folder or the
    cache already holds the four files. Otherwise the Debian package ``dataset-fashion-mnist`` is
    downloaded with ``apt-get download`` (needs no root, only a Debian/Ubuntu package index) and
    unpacked with ``dpkg-deb -x``; its four idx files are checked (readable, images ``(N, 28, 28)``
    uint8 beside ``N`` labels in 0..9) and the cache folder is written all-or-nothing.
    """
    explicit = fashion_dir or os.environ.get(FASHION_MNIST_ENV)
    if explicit:
        return explicit  # the user's folder: read as given (the loader names a missing file)
    folder = fashion_mnist_dir()
    if _has_idx_files(folder):
        return folder
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed and {' and '.join(missing)} (Debian's package tools) "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH to fetch it; pass --fashion-dir / set "
            f"${FASHION_MNIST_ENV} to a folder holding the idx files (see export_fashion_mnist_idx)")
    target = fashion_mnist_cache_dir()
    if not quiet:
        print(f"Fashion-MNIST not found; fetching the Debian package {FASHION_MNIST_PACKAGE} "
              f"into {target}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fashion-mnist-") as tmp:
        done = subprocess.run(["apt-get", "download", FASHION_MNIST_PACKAGE], cwd=tmp,
                              capture_output=True, text=True)
        debs = glob.glob(os.path.join(tmp, "*.deb"))
        if done.returncode != 0 or len(debs) != 1:
            raise RuntimeError(
                f"`apt-get download {FASHION_MNIST_PACKAGE}` failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}. With root, `apt-get update && apt-get "
                f"install {FASHION_MNIST_PACKAGE}` installs it; or pass --fashion-dir")
        unpacked = os.path.join(tmp, "unpacked")
        done = subprocess.run(["dpkg-deb", "-x", debs[0], unpacked], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`dpkg-deb -x {os.path.basename(debs[0])}` failed (exit "
                               f"{done.returncode}): {done.stderr.strip()[-500:]}")
        source = os.path.join(unpacked, _PACKAGE_FOLDER)
        if not _has_idx_files(source):
            raise RuntimeError(f"{os.path.basename(debs[0])}: holds no Fashion-MNIST idx files "
                               f"under /{_PACKAGE_FOLDER}")
        with write_folder(target, check=_check_idx_folder) as stage:
            for names in FASHION_MNIST_FILES.values():
                for name in names:
                    shutil.copyfile(os.path.join(source, name), os.path.join(stage, name))
    return target


def _check_idx_folder(folder: str) -> None:
    for split in FASHION_MNIST_FILES:
        load_fashion_mnist(split, folder)


def load_fashion_mnist(split: str, fashion_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60,000 images, "test": 10,000) as uint8 arrays."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    root = fashion_mnist_dir(fashion_dir)
    paths = [os.path.join(root, name) for name in FASHION_MNIST_FILES[split]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST idx file(s) not found: {', '.join(missing)}. Fetch them with "
            f"`python -c 'from consolidator_apps.mini_vtab import fetch_fashion_mnist; "
            f"fetch_fashion_mnist()'` or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
            f"or pass fashion_dir / set "
            f"${FASHION_MNIST_ENV} to a folder holding {', '.join(FASHION_MNIST_FILES[split])} "
            f"(with network access: the Hub dataset zalando-datasets/fashion_mnist, read with "
            f"consolidator_hf.data.load_image_dataset).")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{paths[0]} / {paths[1]}: expected images (N, H, W) and labels (N,), "
                         f"got {images.shape} and {labels.shape}")
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{paths[0]}: expected 28x28 images, got {images.shape[1:]}")
    if images.dtype != np.uint8 or labels.dtype != np.uint8 or labels.max(initial=0) > 9:
        raise ValueError(f"{paths[0]} / {paths[1]}: expected uint8 images and labels in 0..9")
    return images, labels.astype(np.int64)


def load_digits_images() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: 1,797 8x8 images as uint8 in [0, 255] (from 0..16), labels 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)
