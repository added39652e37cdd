"""Checks a run makes before any slow work: the backbone source, the output folder (never mix
two runs in one), and the warmup length. Free of transformers' Trainer imports, so that
``scripts/finetune.py`` reports a bad argument in seconds, not after loading everything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from typing import Any, Dict, List, Optional

from ..io import is_hub_id
from .config import FinetuneConfig

#: Written into the output folder when training starts: what the folder holds (method, task,
#: model, start date), so that a later run can name it.
RUN_METADATA = "metadata.json"
#: Everything a run writes into its output folder (``--overwrite-output-dir`` removes these).
RUN_ENTRIES = ("adapter", "merged", "metrics.json", "checkpoints", RUN_METADATA)
_RESUME_LAST = ("true", "last", "latest")


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(model: str) -> bool:
    """Whether ``model`` names a local folder rather than a Hub id (``namespace/name``)."""
    return not is_hub_id(model)


def check_model_source(model: str) -> None:
    """Raise ``ValueError`` for a backbone that cannot load: a missing folder ("no such
    folder"), a folder without ``config.json``, or a Hub id that is not cached while
    ``HF_HUB_OFFLINE=1``. A Hub id with network access is left to ``from_pretrained``."""
    default = model == FinetuneConfig.model
    if looks_like_path(model):
        path = os.path.expanduser(model)
        if not os.path.exists(path):
            raise ValueError(f"model (--model): no such folder {model!r}")
        if not os.path.isdir(path):
            raise ValueError(f"model (--model): {model!r} is a file; expected a model folder "
                             "(config.json + weights)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model (--model): {model!r} has no config.json; expected a "
                             "transformers model folder")
        return
    if _truthy_env("HF_HUB_OFFLINE") or _truthy_env("TRANSFORMERS_OFFLINE"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ValueError(hub_unreachable_message(model, default, "HF_HUB_OFFLINE=1"))


def hub_unreachable_message(model: str, default: bool, why: str) -> str:
    which = "the default of --model, a Hub id" if default else "a Hub id"
    return (f"model (--model): {model!r} is {which}, not in the local cache, and the Hub is "
            f"unreachable ({why}); pass --model FOLDER, a local backbone folder")


# ---------------------------------------------------------------------- output folder
def _checkpoints(out: str) -> List[str]:
    folder = os.path.join(out, "checkpoints")
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.startswith("checkpoint-")
             and os.path.isdir(os.path.join(folder, n))]
    return sorted(names, key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else -1)


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def existing_run(out: str) -> Optional[Dict[str, Any]]:
    """What a run folder holds: ``{"method", "task", "model", "date", "checkpoints",
    "entries"}`` from its ``metrics.json`` (else ``metadata.json``) and ``checkpoints/``;
    ``None`` when the folder holds no run's files."""
    if not os.path.isdir(out):
        return None
    entries = [e for e in RUN_ENTRIES if os.path.exists(os.path.join(out, e))
               and not (os.path.isdir(os.path.join(out, e)) and not os.listdir(os.path.join(out, e)))]
    if not entries:
        return None
    info: Dict[str, Any] = {"entries": entries, "checkpoints": _checkpoints(out)}
    for name in ("metrics.json", RUN_METADATA):
        path = os.path.join(out, name)
        data = _read_json(path)
        if data:
            for key in ("method", "task", "model"):
                info.setdefault(key, data.get(key))
            info.setdefault("date", data.get("started") or time.strftime(
                "%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path))))
    if "date" not in info:
        newest = max(os.path.getmtime(os.path.join(out, e)) for e in entries)
        info["date"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(newest))
    return info


def describe_run(info: Dict[str, Any]) -> str:
    parts = [f"{k} {info[k]}" for k in ("method", "task") if info.get(k)]
    parts.append(f"from {info['date']}")
    if info["checkpoints"]:
        parts.append("checkpoints " + ", ".join(info["checkpoints"]))
    else:
        parts.append(", ".join(info["entries"]))
    return "; ".join(parts)


def _is_main_rank() -> bool:
    # Before the process group exists: the launchers' environment says which rank this is.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def prepare_output_dir(cfg: FinetuneConfig) -> None:
    """Refuse an output folder that holds a run, unless asked (the Trainer's convention).

    ``overwrite_output_dir``: the run's files (:data:`RUN_ENTRIES`) are removed first (by the
    main process). ``resume_from_checkpoint``: the folder's checkpoints are continued; ``'last'``
    needs at least one, and they must be this run's (same method and task). Otherwise a folder
    holding a run raises ``ValueError`` naming what is there and the two ways on.
    """
    out = cfg.output_dir
    info = existing_run(out)
    resume = cfg.resume_from_checkpoint
    if resume is not None and cfg.overwrite_output_dir:
        raise ValueError("overwrite_output_dir and resume_from_checkpoint: choose one "
                         "(overwriting clears the checkpoints a resume would read)")
    if resume is not None:
        if str(resume).lower() in _RESUME_LAST:
            if not (info and info["checkpoints"]):
                raise ValueError(f"resume_from_checkpoint={resume!r}: no checkpoint-* folder "
                                 f"under {os.path.join(out, 'checkpoints')!r} to resume")
        elif not os.path.isdir(str(resume)):
            raise ValueError(f"resume_from_checkpoint: no such folder {resume!r}")
        if info:
            other = [k for k in ("method", "task") if info.get(k) not in (None, getattr(cfg, k))]
            if other:
                raise ValueError(f"output_dir {out!r} holds another run ({describe_run(info)}); "
                                 f"it cannot resume a {cfg.method} run on {cfg.task}: choose "
                                 "another --output-dir, or pass --overwrite-output-dir to start over")
        return
    if info is None:
        return
    if cfg.overwrite_output_dir:
        if _is_main_rank():
            for entry in RUN_ENTRIES:
                path = os.path.join(out, entry)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        return
    same = all(info.get(k) == getattr(cfg, k) for k in ("method", "task"))
    if same and info["checkpoints"]:
        raise ValueError(f"output_dir {out!r} holds checkpoints of this run ({describe_run(info)}); "
                         "continue them with --resume-from-checkpoint last, or pass "
                         "--overwrite-output-dir to clear the folder and start over")
    raise ValueError(f"output_dir {out!r} holds another run ({describe_run(info)}); pass "
                     "--overwrite-output-dir to clear it first, --resume-from-checkpoint last to "
                     "continue its checkpoints, or choose another --output-dir")


def write_run_metadata(cfg: FinetuneConfig) -> None:
    """``metadata.json``: what this folder is about to hold (see :data:`RUN_METADATA`)."""
    from ..io import atomic_write_text

    os.makedirs(cfg.output_dir, exist_ok=True)
    data = {"method": cfg.method, "task": cfg.task, "model": cfg.model,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "config": cfg.to_dict()}
    atomic_write_text(os.path.join(cfg.output_dir, RUN_METADATA),
                      json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def clean_failed_run(out: str, created: bool) -> None:
    """After a failed run: drop an empty ``checkpoints/``, a ``metadata.json`` that describes
    nothing (no checkpoint, no result), and the folder itself if this run created it and it
    is now empty. Checkpoints and finished results stay."""
    ckpts = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpts) and not _checkpoints(out):
        shutil.rmtree(ckpts, ignore_errors=True)  # only logs (runs/) or nothing
    meta = os.path.join(out, RUN_METADATA)
    if os.path.isfile(meta) and not any(os.path.exists(os.path.join(out, e))
                                        for e in RUN_ENTRIES if e != RUN_METADATA):
        os.remove(meta)
    if created and os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)


# ---------------------------------------------------------------------- schedule
def clamp_warmup(cfg: FinetuneConfig, num_train_examples: int, world_size: int = 1) -> FinetuneConfig:
    """``cfg`` with ``warmup_epochs`` cut to half the run when it is longer (a warmup that
    outlasts the run never decays the learning rate), with a warning; else ``cfg`` itself."""
    batches = math.ceil(num_train_examples / (cfg.batch_size * max(1, world_size)))
    steps_per_epoch = max(1, batches // cfg.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if warmup_steps <= total / 2:
        return cfg
    clamped = (total / 2) / steps_per_epoch
    warnings.warn(f"warmup_epochs={cfg.warmup_epochs:g} ({round(warmup_steps)} steps) is longer "
                  f"than half the run ({total} steps); clamped to {clamped:g} epochs "
                  f"({total // 2} steps)", UserWarning, stacklevel=2)
    return dataclasses.replace(cfg, warmup_epochs=clamped)
