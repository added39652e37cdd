"""The offline default run: real transfer on a machine with no network, in minutes on a CPU.

1. **Source task.** scikit-learn's digits 0-4 (8x8, upscaled to 32x32) written in the VTAB-1k
   on-disk format; a small ViT is pretrained on it from scratch with the same Trainer pipeline
   (``method="full"``, :func:`consolidator_apps.pretraining.pretrain_from_scratch`, which
   mini-VTAB's backbone uses too). The backbone is cached as a standard Hugging Face folder
   (``ViTModel``: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``, plus
   ``training_curve.json``), so a second run reuses it. The default configuration's backbone
   is **shipped** in this package (``consolidator_apps/backbones/``, 600 KB, pretrained by this
   code): pretraining from scratch on 720 images is chaotic, so CPUs with other floating-point
   kernels end with other backbones and the target accuracies moved by up to 8 points, while the
   adaptation of one fixed backbone gave the same accuracies under other kernels (README,
   "Reproducibility"). ``pretrain=True`` pretrains here instead.
2. **Target task.** The digits 5-9 (relabelled 0-4), an unseen task, in the same format with
   VTAB-style 4:1 train/val splits (``train800`` 400 + ``val200`` 100 images; ``test`` the rest),
   read back through :func:`consolidator_hf.data.load_vtab1k`. The cached backbone is adapted
   with Consolidator branches and, as the baseline, with the head only (``linear``), on the
   same data, schedule and seed.

``scripts/finetune.py`` with no arguments runs :func:`run_offline_default`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from consolidator_hf.io import atomic_write_text, cache_dir, write_folder
from consolidator_hf.data import write_vtab_task
from consolidator_hf.training import FinetuneConfig

# .pretraining and run_finetune pull in transformers' Trainer: imported where used, so that
# scripts/finetune.py can build its flags from OfflineDefaultConfig in a fraction of a second.

SOURCE_TASK = "digits_0to4"
TARGET_TASK = "digits_5to9"
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
# Bumped when the written images change (2: JPEGs with 4:4:4 chroma), so a backbone cached from
# other images is not reused.
DATA_VERSION = 2


def default_cache_dir() -> str:
    """Where the pretrained backbone is cached (see :func:`consolidator_hf.io.cache_dir`)."""
    return cache_dir()


@dataclass
class OfflineDefaultConfig:
    """Sizes and schedules of the offline default run (the defaults are the README's run;
    tests shrink them)."""

    output_dir: str = "outputs/offline-default"
    cache_dir: Optional[str] = None
    seed: int = 0
    image_size: int = 32
    # the backbone (a small ViT)
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    patch_size: int = 8
    # source pretraining
    source_epochs: float = 25.0
    source_learning_rate: float = 2e-3
    # target adaptation
    target_epochs: float = 20.0
    groups: Tuple[int, ...] = (32,)
    drop_rate: float = 0.1
    consolidator_learning_rate: float = 1e-2
    linear_learning_rate: float = 0.2  # a head alone wants a larger step (tried 0.01, 0.05, 0.2)
    batch_size: int = 32
    # target split sizes (VTAB's 800/200, scaled to the ~900 images of five digit classes)
    target_train: int = 400
    target_val: int = 100
    # reduce for tests: cap the images per split (None: all)
    max_images_per_split: Optional[int] = None
    use_cpu: bool = False
    logging_steps: int = 10
    # the backbone: the shipped one when it matches these settings, unless asked to pretrain
    pretrain: bool = field(default=False, metadata={"help": (
        "offline default: pretrain the backbone on this machine (into the cache) instead of "
        "adapting the one shipped in consolidator_apps/backbones; other CPUs pretrain other "
        "backbones, see README 'Reproducibility'")})


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backbones")


# ---------------------------------------------------------------------- data
def _digit_images(image_size: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the offline default needs scikit-learn (its digits are the only images "
                          "shipped in a PyPI package): pip install scikit-learn") from None
    import numpy as np
    from PIL import Image

    digits = load_digits()
    images = []
    for a in digits.images:  # 8x8 floats in [0, 16]
        gray = Image.fromarray((a * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        images.append(gray.resize((image_size, image_size), Image.BICUBIC).convert("RGB"))
    return images, digits.target


def _split_indices(idx, n_train: int, n_val: int, cap: Optional[int]) -> Dict[str, List[int]]:
    parts = {"train800": idx[:n_train], "val200": idx[n_train:n_train + n_val],
             "test": idx[n_train + n_val:]}
    return {k: [int(i) for i in (v[:cap] if cap is not None else v)] for k, v in parts.items()}


def write_digit_tasks(data_dir: str, cfg: OfflineDefaultConfig) -> Dict[str, Dict[str, int]]:
    """Write the source (digits 0-4) and target (digits 5-9) tasks; return the split sizes.

    Each task keeps VTAB's 4:1 train/val ratio: the target uses ``target_train`` +
    ``target_val`` images and tests on the rest; the source trains on 80 % of its images.
    """
    import numpy as np

    images, target = _digit_images(cfg.image_size)
    rng = np.random.default_rng(cfg.seed)
    sizes: Dict[str, Dict[str, int]] = {}
    for task, classes in ((SOURCE_TASK, SOURCE_CLASSES), (TARGET_TASK, TARGET_CLASSES)):
        idx = np.flatnonzero(np.isin(target, classes))
        idx = idx[rng.permutation(len(idx))]
        if task == SOURCE_TASK:
            n_train, n_val = int(0.64 * len(idx)), int(0.16 * len(idx))
        else:
            n_train, n_val = cfg.target_train, cfg.target_val
        if n_train + n_val >= len(idx):
            raise ValueError(f"{task}: {n_train} + {n_val} training images leave none of the "
                             f"{len(idx)} for the test split")
        parts = _split_indices(idx, n_train, n_val, cfg.max_images_per_split)
        write_vtab_task(data_dir, task, {
            split: ([images[i] for i in rows], [classes.index(int(target[i])) for i in rows])
            for split, rows in parts.items()})
        sizes[task] = {k: len(v) for k, v in parts.items()}
    return sizes


# ---------------------------------------------------------------------- backbone
def backbone_name(cfg: OfflineDefaultConfig) -> str:
    """The cache folder name: every setting that changes the pretrained weights."""
    cap = "" if cfg.max_images_per_split is None else f"-cap{cfg.max_images_per_split}"
    return (f"vit-digits0to4-h{cfg.hidden_size}-l{cfg.num_hidden_layers}-a{cfg.num_attention_heads}"
            f"-i{cfg.intermediate_size}-p{cfg.patch_size}-s{cfg.image_size}-e{cfg.source_epochs:g}"
            f"-lr{cfg.source_learning_rate:g}-b{cfg.batch_size}-seed{cfg.seed}{cap}-d{DATA_VERSION}")


def shipped_backbone(cfg: OfflineDefaultConfig) -> Optional[str]:
    """The backbone folder shipped in this package for ``cfg``'s settings, or None (other
    settings, or ``cfg.pretrain``)."""
    folder = os.path.join(SHIPPED_DIR, backbone_name(cfg))
    if cfg.pretrain or not os.path.isfile(os.path.join(folder, "model.safetensors")):
        return None
    return folder


def pretrain_backbone(data_dir: str, cfg: OfflineDefaultConfig, cache_dir: str) -> Tuple[str, str]:
    """The source-pretrained backbone folder and where it came from: ``"shipped"`` (this
    package's, see :func:`shipped_backbone`), ``"cache"`` (pretrained by an earlier run) or
    ``"pretrained"`` (now). Only the main process writes the cache."""
    shipped = shipped_backbone(cfg)
    if shipped is not None:
        return shipped, "shipped"
    from transformers import ViTConfig, ViTForImageClassification
    from transformers import ViTImageProcessorPil as ViTImageProcessor  # what ViTImageProcessor
    # falls back to without torchvision (with a warning); named directly, it gives none

    from .pretraining import is_main_process, pretrain_from_scratch, wait_for_everyone

    final = os.path.join(cache_dir, backbone_name(cfg))
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        return final, "cache"

    work = os.path.join(cfg.output_dir, "pretrain")
    config = ViTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads,
                       intermediate_size=cfg.intermediate_size, image_size=cfg.image_size,
                       patch_size=cfg.patch_size, num_labels=len(SOURCE_CLASSES))
    processor = ViTImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    print(f"== pretraining the backbone on {SOURCE_TASK} (cached afterwards in {final})", flush=True)
    result = pretrain_from_scratch(
        config, processor, data_dir=data_dir, task=SOURCE_TASK, num_classes=len(SOURCE_CLASSES),
        work_dir=work, train_split="train800val200", eval_split="test",
        epochs=cfg.source_epochs, learning_rate=cfg.source_learning_rate, weight_decay=0.05,
        warmup_epochs=min(2.0, cfg.source_epochs / 4), batch_size=cfg.batch_size, seed=cfg.seed,
        use_cpu=cfg.use_cpu, logging_steps=cfg.logging_steps)
    metrics = result.metrics
    if is_main_process() and not os.path.isdir(final):  # another run may have finished first
        trained = ViTForImageClassification.from_pretrained(result.model_dir)
        curve = {"source_task": SOURCE_TASK, "source_test_accuracy": metrics["accuracy"],
                 "loss_history": metrics["loss_history"], "epochs": metrics["epochs"],
                 "train_runtime_s": metrics["train_runtime_s"],
                 "num_train_examples": metrics["num_train_examples"]}
        with write_folder(final) as tmp:
            # Saved without the head: a backbone folder like google/vit-base-patch16-224-in21k,
            # so the target task always starts from a fresh classifier.
            trained.vit.save_pretrained(tmp)
            shutil.copy(os.path.join(result.model_dir, "preprocessor_config.json"), tmp)
            with open(os.path.join(tmp, "training_curve.json"), "w", encoding="utf-8") as f:
                f.write(json.dumps(curve, indent=2) + "\n")
    wait_for_everyone()
    return final, "pretrained"


# ---------------------------------------------------------------------- the run
def run_offline_default(cfg: Optional[OfflineDefaultConfig] = None) -> Dict[str, Any]:
    """Pretrain (or reuse) the backbone, adapt it to the target task with Consolidator and
    with the head only, print both test accuracies and write ``summary.json``."""
    from consolidator_hf.training import run_finetune

    from .pretraining import is_main_process, wait_for_everyone

    cfg = cfg or OfflineDefaultConfig()
    start = time.perf_counter()
    cache_dir = cfg.cache_dir or default_cache_dir()
    data_dir = os.path.join(cfg.output_dir, "vtab-digits")
    if is_main_process():
        sizes = write_digit_tasks(data_dir, cfg)
    wait_for_everyone()
    if not is_main_process():
        sizes = {}
    backbone, source = pretrain_backbone(data_dir, cfg, cache_dir)
    with open(os.path.join(backbone, "training_curve.json"), encoding="utf-8") as f:
        curve = json.load(f)

    common = dict(model=backbone, task=TARGET_TASK, data_dir=data_dir,
                  num_classes=len(TARGET_CLASSES), train_split="train800val200",
                  eval_split="test", num_train_epochs=cfg.target_epochs,
                  warmup_epochs=min(2.0, cfg.target_epochs / 4), weight_decay=1e-4,
                  batch_size=cfg.batch_size, seed=cfg.seed, preprocess="processor",
                  save_strategy="no", use_cpu=cfg.use_cpu, logging_steps=cfg.logging_steps,
                  overwrite_output_dir=True)  # its own sub-folders: a rerun replaces them
    runs = {
        "consolidator": FinetuneConfig(method="consolidator", groups=cfg.groups,
                                       drop_rate=cfg.drop_rate,
                                       learning_rate=cfg.consolidator_learning_rate,
                                       output_dir=os.path.join(cfg.output_dir, "consolidator"),
                                       **common),
        "linear": FinetuneConfig(method="linear", learning_rate=cfg.linear_learning_rate,
                                 output_dir=os.path.join(cfg.output_dir, "linear"), **common),
    }
    results = {}
    for name, run_cfg in runs.items():
        print(f"== adapting the backbone to {TARGET_TASK}: {name}", flush=True)
        results[name] = run_finetune(run_cfg)
    elapsed = time.perf_counter() - start
    summary = {
        "source_task": SOURCE_TASK, "target_task": TARGET_TASK, "backbone": backbone,
        "backbone_source": source, "backbone_reused_from_cache": source == "cache",
        "source_test_accuracy": curve["source_test_accuracy"], "split_sizes": sizes,
        "results": {k: {"accuracy": v["accuracy"], "trainable_params": v["trainable_params"],
                        "stored_params": v["stored_params"],
                        "train_runtime_s": v["train_runtime_s"],
                        "output_dir": runs[k].output_dir}
                    for k, v in results.items()},
        "total_runtime_s": round(elapsed, 1), "config": _as_dict(cfg),
    }
    if is_main_process():
        atomic_write_text(os.path.join(cfg.output_dir, "summary.json"),
                          json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary), flush=True)
    return summary


def _as_dict(cfg: OfflineDefaultConfig) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["groups"] = list(cfg.groups)
    return d


_SOURCE_NOTE = {"shipped": ", shipped with consolidator_apps", "cache": ", reused from cache"}


def format_summary(summary: Dict[str, Any]) -> str:
    r = summary["results"]
    n_test = r and summary["split_sizes"].get(TARGET_TASK, {}).get("test")
    lines = [
        "",
        f"Offline default: backbone pretrained on {SOURCE_TASK} "
        f"(test accuracy {100 * summary['source_test_accuracy']:.1f} %"
        f"{_SOURCE_NOTE.get(summary.get('backbone_source'), '')}), "
        f"adapted to {TARGET_TASK} ({n_test} test images)",
        f"{'method':<14}{'test top-1':>12}{'trainable':>12}{'stored':>10}{'train s':>10}",
    ]
    for name, v in r.items():
        lines.append(f"{name:<14}{100 * v['accuracy']:>11.1f}%{v['trainable_params']:>12,}"
                     f"{v['stored_params']:>10,}{v['train_runtime_s']:>10.1f}")
    lines.append(f"total time {summary['total_runtime_s']:.0f} s; outputs in "
                 f"{os.path.dirname(r['consolidator']['output_dir'])}/")
    return "\n".join(lines)
