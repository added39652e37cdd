"""File plumbing shared by every writer and reader: atomic file writes, the one
all-or-nothing folder writer (:func:`write_folder`), Hub-or-folder lookup, safetensors reads
with errors that name the file, the Hub-id test and the project's cache folder.

Why one module: every artifact this library writes (adapters, merged models, converted
checkpoints, VTAB task folders, backbones, training checkpoints) must appear complete or not at
all, and must get the permissions ``open``/``mkdir`` would give. Writing that once keeps the
semantics equal."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import uuid
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PathLike = Union[str, os.PathLike]

__all__ = ["PathLike", "atomic_path", "atomic_write_text", "atomic_save_safetensors",
           "write_folder", "swap_in", "recover_folder", "load_safetensors", "resolve_file",
           "is_hub_id", "cache_dir"]


# Sibling names of a target being written: ".<name>.<pid>-<hex>.tmp" (a file being written),
# ".<name>.<pid>-<hex>.stage" (a folder being filled), ".<name>.<pid>-<hex>.old" (the previous
# folder, moved aside during a two-rename swap). The pid lets the next writer of the same target
# tell a killed writer's leftovers from a live one's, and remove them.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{12}\.(?P<kind>tmp|stage|old)$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _sibling(target: str, kind: str) -> str:
    parent, base = os.path.split(target)
    return os.path.join(parent, f".{base}.{os.getpid()}-{uuid.uuid4().hex[:12]}.{kind}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_folder(path: PathLike) -> None:
    """Clean what killed writers of ``path`` left beside it: temp files and stage folders are
    removed; a moved-aside old folder is put back when ``path`` itself is missing (the writer
    died between its two renames), else removed. Leftovers of live writers are not touched.
    :func:`write_folder` and :func:`atomic_path` call this first."""
    target = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(target)
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in sorted(names):
        m = _SIBLING.match(name)
        if not m or m.group("name") != base or _pid_alive(int(m.group("pid"))):
            continue
        leftover = os.path.join(parent, name)
        if m.group("kind") == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.rename(leftover, target)  # the complete old folder, back in its place
                continue
        if os.path.isdir(leftover) and not os.path.islink(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A crash or an exception leaves the old file (or nothing), never a half-written one; a
    killed writer's temp file is removed by the next write of the same ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    recover_folder(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    OS or the file system cannot (the caller then falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"could not swap {b} into place: {os.strerror(err)}", a)


def _link_tree(src: str, dst: str) -> None:
    """``dst`` holding ``src``'s entries as hard links (a copy where linking fails)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    else:
        link(src, dst)


def swap_in(stage: str, target: str) -> None:
    """Put the complete folder ``stage`` at ``target`` (a sibling), replacing what is there, so
    that ``target`` is at every instant the complete old or the complete new folder: one
    ``renameat2(RENAME_EXCHANGE)`` where Linux offers it, else two renames (old -> backup, new
    -> target; rolled back on failure, and :func:`recover_folder` puts a backup back if the
    writer is killed between them). The old folder is removed after the swap."""
    if not os.path.lexists(target):
        try:
            os.rename(stage, target)  # nothing to replace (an empty folder made meanwhile is fine)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)  # now holds the old folder
        return
    backup = _sibling(target, "old")
    os.rename(target, backup)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def write_folder(path: PathLike, *, overwrite: bool = True, preserve_others: bool = False,
                 check: Optional[Callable[[str], None]] = None) -> Iterator[str]:
    """Yield an empty staging folder beside ``path``; when the block ends without an error,
    the staged folder replaces ``path`` whole (:func:`swap_in`). All-or-nothing for the whole
    folder: at every instant ``path`` is the complete old folder or the complete new one.

    - An error (or a kill) while filling leaves ``path`` untouched; the stage is removed (a
      killed writer's by the next write of the same ``path``).
    - ``overwrite=False`` refuses an existing non-empty folder (``FileExistsError``) before
      anything is staged; a non-folder at ``path``, the working directory or a folder holding
      it are always refused.
    - ``preserve_others``: entries of the old folder the stage does not write are hard-linked
      into the stage before the swap, so they survive (an adapter saved into a folder that also
      holds other files). Otherwise the new folder replaces the old one (no stale files).
    - ``check(stage)`` (optional) runs after filling, before the swap: raise to abort.
    - The staged files get the permissions ``open``/``mkdir`` give under the umask.
    """
    target = os.path.abspath(os.fspath(path))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{target}: exists and is not a folder")
    cwd = os.path.abspath(os.getcwd())
    if os.path.isdir(target) and (cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep)):
        raise ValueError(f"{target}: is (or holds) the working directory; write the artifact "
                         "into a folder of its own")
    recover_folder(target)
    if not overwrite and os.path.isdir(target) and os.listdir(target):
        raise FileExistsError(f"{target}: folder exists and is not empty (pass overwrite=True "
                              "to replace it)")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    stage = _sibling(target, "stage")
    os.mkdir(stage)
    try:
        yield stage
        if check is not None:
            check(stage)
        _default_permissions(stage)
        if preserve_others and os.path.isdir(target):
            for name in os.listdir(target):
                if not os.path.lexists(os.path.join(stage, name)):
                    _link_tree(os.path.join(target, name), os.path.join(stage, name))
        swap_in(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _default_permissions(path: str) -> None:
    """What mkdir/open would give under the umask: mkdtemp/mkstemp make 0700/0600 and
    safetensors writes 0600, which would leave a published folder unreadable to others."""
    mask = _umask()
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                os.chmod(os.path.join(root, f), 0o666 & ~mask)


_UMASK: Optional[int] = None


def _umask() -> int:
    """The process umask, read once (reading it means setting it, which races with threads)."""
    global _UMASK
    if _UMASK is None:
        umask = os.umask(0)
        os.umask(umask)
        _UMASK = umask
    return _UMASK


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


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(name: Any) -> bool:
    """Whether ``name`` reads as a Hub repo id (``name`` or ``namespace/name``) rather than a
    local path: the one test used wherever a card or upload names a base model."""
    return (isinstance(name, str) and _REPO_ID.match(name) is not None and "--" not in name
            and ".." not in name and not os.path.exists(name))
