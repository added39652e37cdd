"""Tiny VTAB-format folders and tiny "pretrained" backbones saved to disk (no Hub)."""


import numpy as np
from PIL import Image
from transformers import ViTImageProcessor

from consolidator_hf.data.writer import write_vtab_task
from tiny import tiny_vit


def write_tiny_vtab(root, task="tiny_task", num_classes=3, sizes=(24, 6, 12), seed=0):
    """A learnable task: class c is a noisy image whose colour channel c is bright.
    ``sizes``: images in train800, val200 and test."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    labels = [i % num_classes for i in range(n)]
    images = []
    for label in labels:
        a = rng.integers(0, 90, size=(16, 16, 3))
        a[..., label % 3] += 160
        images.append(Image.fromarray(a.clip(0, 255).astype(np.uint8)))
    order = rng.permutation(n)
    a, b = sizes[0], sizes[0] + sizes[1]
    rows = {"train800": order[:a], "val200": order[a:b], "test": order[b:]}
    return write_vtab_task(str(root), task, {
        split: ([images[i] for i in idx], [labels[i] for i in idx]) for split, idx in rows.items()})


def save_tiny_backbone(path, seed=0, num_labels=3):
    """A tiny ViT classifier + its image processor, as a from_pretrained folder."""
    model = tiny_vit(seed=seed, num_labels=num_labels)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(path)
    return str(path)


def write_tiny_workdir(root):
    """``root/vtab`` (a tiny task) and ``root/backbone`` (a tiny pretrained ViT); returns root."""
    write_tiny_vtab(root / "vtab")
    save_tiny_backbone(root / "backbone")
    return root


def tiny_finetune_config(root, name, **overrides):
    """A ``FinetuneConfig`` for the tiny workdir ``root`` (:func:`write_tiny_workdir`) writing to
    ``root/name``: the settings the training tests share; ``overrides`` replace any of them."""
    from consolidator_hf.training import FinetuneConfig

    fields = dict(model=str(root / "backbone"), task="tiny_task", data_dir=str(root / "vtab"),
                  num_classes=3, groups=(8,), learning_rate=3e-2, weight_decay=0.0, batch_size=8,
                  warmup_epochs=0.5, seed=0, logging_steps=1, output_dir=str(root / name))
    fields.update(overrides)
    return FinetuneConfig(**fields)
