"""File plumbing shared by every writer and reader: atomic writes, Hub-or-folder lookup,
safetensors reads with errors that name the file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A crash or an exception leaves the old file (or nothing), never a half-written one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        # mkstemp (and some writers) create 0600; give the file what open() would (umask).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    An interrupted or failed build leaves the old folder (or nothing), never a half-written one.
    """
    import shutil

    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: PathLike,
                            metadata: Optional[Dict[str, str]] = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_safetensors(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a safetensors file; ``ValueError`` naming the file if corrupt."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, metadata


def resolve_file(path_or_repo: PathLike, filename: str, *, revision: Optional[str] = None,
                 token: Optional[str] = None) -> str:
    """``filename`` inside a local folder, or downloaded from a Hub repo id."""
    path_or_repo = os.fspath(path_or_repo)
    if os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (is {path_or_repo} an adapter folder?)")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(path_or_repo, filename, revision=revision, token=token)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not find {filename} in {path_or_repo!r}: it is not a local folder and the Hub "
            f"download failed ({type(e).__name__}: {e})"
        ) from None


def cache_dir(*parts: str) -> str:
    """The project's cache folder (cached backbones): ``$CONSOLIDATOR_HF_CACHE``, else
    ``$XDG_CACHE_HOME/consolidator_hf``, else ``~/.cache/consolidator_hf``; ``parts`` below it."""
    root = os.environ.get("CONSOLIDATOR_HF_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "consolidator_hf")
    return os.path.join(root, *parts)
