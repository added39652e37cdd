"""The mini-VTAB backbone: a small ``ViTForImageClassification`` pretrained on Fashion-MNIST.

It stands in for the paper's ImageNet-21k ViT-B/16 (no pretrained vision model is available
offline). The pretraining is seeded, runs in minutes on two CPU cores, and writes a standard
Hugging Face folder -- ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` --
that loads with ``ViTForImageClassification.from_pretrained`` without this package, plus
``pretrain.json`` (settings, results, versions) and the training curve
(``training_curve.json``, ``training_curve.png``). :func:`ensure_backbone` reuses a folder
whose ``pretrain.json`` records the same settings, so later runs do not train again.

It pretrains through the same Trainer path as the offline default
(:func:`consolidator_apps.pretraining.pretrain_from_scratch`: ``run_finetune(method="full")``
on the source images written in the VTAB-1k format). Up to commit e67fbcd it pretrained with
a hand-written loop (random 2-pixel shifts and flips, no decay on embeddings); the committed
results in ``docs/mini_vtab/`` come from that backbone. :data:`PRETRAIN_VERSION` is part of the
settings, so a backbone cached by the old code is never reused.

The source task is classification of the Fashion-MNIST *training* set (60,000 images; 5,000 held
out for the validation curve); mini-VTAB's Fashion-MNIST tasks draw from the *test* set only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from consolidator_hf.cards import backbone_card
from consolidator_hf.io import cache_dir, write_folder
from consolidator_hf.data.writer import write_vtab_task

from ..pretraining import pretrain_from_scratch
from .sources import FASHION_MNIST_CLASSES, fetch_fashion_mnist, load_fashion_mnist

PRETRAIN_INFO = "pretrain.json"
CURVE_JSON = "training_curve.json"
CURVE_PNG = "training_curve.png"
# Pixel normalisation of the backbone (and of its saved ViTImageProcessor): x/255, then (x-0.5)/0.5.
MEAN = STD = 0.5
# Bumped when the pretraining itself changes (2: the shared Trainer path instead of the
# hand-written loop), so that a cached backbone of other code is not reused.
PRETRAIN_VERSION = 2
SOURCE_TASK = "fashion_mnist_source"


@dataclass
class PretrainConfig:
    """Architecture and optimisation of the backbone pretraining.

    The default (32x32 inputs, 8x8 patches -> 16 tokens + CLS, width 96, 4 layers, 3 heads) is
    sized so that mini-VTAB's ~250 fine-tuning runs fit in an hour on two CPU cores; width 96
    gives the paper's 2-channel blocks at ``groups=48``.
    """

    hidden_size: int = 96
    num_hidden_layers: int = 4
    num_attention_heads: int = 3
    intermediate_size: int = 384
    image_size: int = 32
    patch_size: int = 8
    epochs: int = 6
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    val_samples: int = 5000
    max_train_samples: Optional[int] = None  # None: all 55,000 remaining training images
    seed: int = 0
    log_every: int = 50

    def validate(self) -> None:
        if self.image_size != 32:
            raise ValueError(f"image_size: mini-VTAB images are 32x32, got {self.image_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must divide "
                             f"hidden_size {self.hidden_size}")
        for name in ("epochs", "batch_size", "val_samples", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "pretrain_version": PRETRAIN_VERSION}

    def fingerprint(self) -> str:
        """A short hash of the settings (names the default cache folder)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def default_cache_dir() -> str:
    """The project's cache folder (:func:`consolidator_hf.io.cache_dir`) plus ``mini_vtab``."""
    return cache_dir("mini_vtab")


def default_backbone_dir(cfg: Optional[PretrainConfig] = None) -> str:
    cfg = cfg or PretrainConfig()
    return os.path.join(default_cache_dir(), f"backbone-{cfg.fingerprint()}")


def _vit_config(cfg: PretrainConfig):
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10,
        id2label={i: n for i, n in enumerate(FASHION_MNIST_CLASSES)},
        label2id={n: i for i, n in enumerate(FASHION_MNIST_CLASSES)})


def _plot_curve(curve: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(curve["log_steps"], curve["train_loss"], lw=1)
    a.set(xlabel="step", ylabel="train loss (window mean)", title="backbone pretraining")
    b.plot([e["epoch"] for e in curve["eval"]], [e["val_accuracy"] for e in curve["eval"]], "o-")
    b.set(xlabel="epoch", ylabel="val accuracy", title="Fashion-MNIST held-out 5k", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model_card(cfg: PretrainConfig, info: Dict[str, Any]) -> str:
    return str(backbone_card(
        title="mini-VTAB backbone", tags=["vit", "consolidator_hf", "mini-vtab"],
        pipeline_tag="image-classification",
        sections=[("", f"A small ViT (width {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                       f"{cfg.image_size}x{cfg.image_size} inputs, {cfg.patch_size}x{cfg.patch_size} "
                       f"patches, {info['num_parameters']:,} parameters) pretrained by "
                       "consolidator_hf's `scripts/pretrain_backbone.py` on Fashion-MNIST "
                       "classification (training set; 5,000 images held out). Held-out accuracy: "
                       f"{info['val_accuracy']:.4f}. Inputs: 28x28 items centred on a black 32x32 "
                       "canvas, grey replicated to RGB, x/255 normalised with mean/std 0.5. It is "
                       "the stand-in backbone of the mini-VTAB benchmark.")]))


def pretrain_backbone(output_dir: str, cfg: Optional[PretrainConfig] = None, *,
                      fashion_dir: Optional[str] = None, verbose: bool = True,
                      num_threads: Optional[int] = None) -> Dict[str, Any]:
    """Pretrain the backbone and write it to ``output_dir`` (replaced atomically); returns the
    ``pretrain.json`` contents (settings, accuracy, time).

    ``num_threads`` sets torch's intra-op threads for the run (restored afterwards): on a CPU
    shared with other jobs, one thread avoids OpenMP's spin-waiting slowing every step down.
    """
    cfg = cfg or PretrainConfig()
    cfg.validate()
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _pretrain(output_dir, cfg, fashion_dir, verbose)
    finally:
        torch.set_num_threads(previous)


def _canvas(images: np.ndarray) -> np.ndarray:
    """28x28 uint8 items centred on a black 32x32 canvas (the backbone's input)."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))


def _pretrain(output_dir: str, cfg: PretrainConfig, fashion_dir: Optional[str],
              verbose: bool) -> Dict[str, Any]:
    from transformers import ViTForImageClassification, ViTImageProcessor

    t_start = time.perf_counter()
    images, labels = load_fashion_mnist("train", fashion_dir)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"Fashion-MNIST images must be 28x28, got {images.shape[1:]}")
    perm = np.random.default_rng(cfg.seed).permutation(len(images))
    if len(images) <= cfg.val_samples:
        raise ValueError(f"val_samples={cfg.val_samples} leaves no training images "
                         f"(the source has {len(images)})")
    val_idx, train_idx = perm[:cfg.val_samples], perm[cfg.val_samples:]
    if cfg.max_train_samples is not None:
        train_idx = train_idx[:cfg.max_train_samples]
    processor = ViTImageProcessor(do_resize=True, size={"height": cfg.image_size, "width": cfg.image_size},
                                  resample=3, do_rescale=True, rescale_factor=1 / 255,
                                  do_normalize=True, image_mean=[MEAN] * 3, image_std=[STD] * 3)
    work = f"{os.path.abspath(output_dir).rstrip(os.sep)}.pretrain-{os.getpid()}"
    try:
        # The source task in the VTAB-1k format: train800 = the training images, val200 = the
        # held-out ones (the names are the format's; the sizes are the config's).
        data_dir = os.path.join(work, "data")
        write_vtab_task(data_dir, SOURCE_TASK, {
            "train800": (list(_canvas(images[train_idx])), [int(y) for y in labels[train_idx]]),
            "val200": (list(_canvas(images[val_idx])), [int(y) for y in labels[val_idx]])})
        if verbose:
            print(f"wrote the source task ({len(train_idx)} + {len(val_idx)} images) in "
                  f"{time.perf_counter() - t_start:.0f} s; pretraining", flush=True)
        result = pretrain_from_scratch(
            _vit_config(cfg), processor, data_dir=data_dir, task=SOURCE_TASK,
            num_classes=len(FASHION_MNIST_CLASSES), work_dir=work, train_split="train800",
            eval_split="val200", epochs=cfg.epochs, learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_fraction * cfg.epochs,
            batch_size=cfg.batch_size, seed=cfg.seed, logging_steps=cfg.log_every,
            eval_every_epoch=True)
        model = ViTForImageClassification.from_pretrained(result.model_dir).eval()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # the Trainer's ClassLabel names are "0".."9": give the saved model the class names back
    model.config.id2label = {i: n for i, n in enumerate(FASHION_MNIST_CLASSES)}
    model.config.label2id = {n: i for i, n in enumerate(FASHION_MNIST_CLASSES)}
    metrics = result.metrics
    if verbose:
        for e in result.evals:
            print(f"epoch {e['epoch']}/{cfg.epochs}  step {e['step']}  val acc "
                  f"{e['val_accuracy']:.4f}  ({e['elapsed_s']:.0f} s)", flush=True)
    curve: Dict[str, Any] = {"log_steps": [int(s) for s, _ in metrics["loss_history"]],
                             "train_loss": [float(l) for _, l in metrics["loss_history"]],
                             "eval": result.evals}
    info = {
        "config": cfg.to_dict(),
        "source": "Fashion-MNIST train split (idx files)",
        "pretraining": "consolidator_apps.pretraining.pretrain_from_scratch "
                       "(run_finetune, method='full')",
        "train_images": int(metrics["num_train_examples"]),
        "val_images": int(metrics["num_eval_examples"]),
        "val_accuracy": float(metrics["accuracy"]),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "train_time_s": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        "versions": {"torch": torch.__version__, "numpy": np.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    curve["train_time_s"] = info["train_time_s"]

    with write_folder(output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, CURVE_JSON), "w", encoding="utf-8") as f:
            json.dump(curve, f, indent=1)
        _plot_curve(curve, os.path.join(tmp, CURVE_PNG))
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(_model_card(cfg, info))
        # written last: its presence marks a complete folder for ensure_backbone
        with open(os.path.join(tmp, PRETRAIN_INFO), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    return info


def read_pretrain_info(backbone_dir: str) -> Optional[Dict[str, Any]]:
    """``pretrain.json`` of a complete backbone folder, or ``None``."""
    path = os.path.join(backbone_dir, PRETRAIN_INFO)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(backbone_dir, "model.safetensors"))):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ensure_backbone(output_dir: Optional[str] = None, cfg: Optional[PretrainConfig] = None, *,
                    fashion_dir: Optional[str] = None, force: bool = False,
                    verbose: bool = True, num_threads: Optional[int] = None) -> Tuple[str, Dict[str, Any]]:
    """The backbone folder for ``cfg``: reused when ``output_dir`` already holds one pretrained
    with the same settings, pretrained otherwise (or when ``force``). Returns (folder, info)."""
    cfg = cfg or PretrainConfig()
    output_dir = output_dir or default_backbone_dir(cfg)
    info = None if force else read_pretrain_info(output_dir)
    if info is not None and info.get("config") == cfg.to_dict():
        if verbose:
            print(f"reusing the pretrained backbone in {output_dir} "
                  f"(val accuracy {info['val_accuracy']:.4f}, trained in {info['train_time_s']} s)")
        return output_dir, info
    if info is not None and verbose:
        print(f"{output_dir} holds a backbone pretrained with other settings: pretraining again")
    fashion_dir = fetch_fashion_mnist(fashion_dir, quiet=not verbose)
    return output_dir, pretrain_backbone(output_dir, cfg, fashion_dir=fashion_dir, verbose=verbose,
                                         num_threads=num_threads)
