"""Pretrain the mini-VTAB backbone: a small ViTForImageClassification on Fashion-MNIST.

    python scripts/pretrain_backbone.py                        # default settings, cached folder
    python scripts/pretrain_backbone.py --output-dir my-backbone --epochs 3

Needs the Fashion-MNIST idx files: the Debian package ``dataset-fashion-mnist``'s, fetched into
the project cache when not installed (``fetch_fashion_mnist``), or ``--fashion-dir``. A folder
already holding a backbone pretrained with the same settings is reused (``--force`` trains again). Writes a standard Hugging Face folder plus pretrain.json and the
training curve (training_curve.json / .png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from consolidator_hf.cli import HelpFormatter, run_cli
from consolidator_apps.mini_vtab.backbone import PretrainConfig, default_backbone_dir, ensure_backbone


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output-dir", default=None,
                        help="backbone folder (default: ~/.cache/consolidator_hf/mini_vtab/backbone-<hash>)")
    parser.add_argument("--fashion-dir", default=None,
                        help="folder with the Fashion-MNIST idx files (default: the Debian package's, fetched when missing)")
    parser.add_argument("--force", action="store_true", help="pretrain even if a matching folder exists")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 helps on a CPU shared with other jobs)")
    for f in dataclasses.fields(PretrainConfig):
        kind = int if f.type in ("int", "Optional[int]") else float
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            help=f"(default {f.default})")
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    out = args.output_dir or default_backbone_dir(cfg)
    folder, info = ensure_backbone(out, cfg, fashion_dir=args.fashion_dir, force=args.force,
                                   num_threads=args.threads)
    print(json.dumps({"backbone": folder, "val_accuracy": info["val_accuracy"],
                      "train_time_s": info["train_time_s"], "num_parameters": info["num_parameters"]}))


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="pretrain_backbone.py"))
