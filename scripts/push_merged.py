"""Publish a trained Consolidator adapter: merged into a plain model (default) or as the adapter.

    # merged ViTForImageClassification + model card to the Hub (token from HF_TOKEN or `hf auth login`)
    python scripts/push_merged.py --base-model google/vit-base-patch16-224-in21k \
        --adapter out/cifar100/adapter --repo-id me/vit-b16-cifar100-consolidator \
        --metrics out/cifar100/metrics.json --dataset cifar100

    # only the adapter files, with their own card
    python scripts/push_merged.py ... --adapter-only

    # no upload: write the same folder locally
    python scripts/push_merged.py --base-model BASE --adapter DIR --save-dir merged-model

``--base-model`` and ``--adapter`` may be local folders or Hub repo ids. The base is loaded
with the adapter's number of labels (read from its classifier); the adapter's head replaces
the base's. Prints the commit URL (or the folder written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional

from consolidator_hf import HubError
from consolidator_hf.cli import HelpFormatter, run_cli
from consolidator_hf.hub import push_adapter, push_merged
from consolidator_hf.processors import PRESETS
from consolidator_hf.publish import load_for_publishing, save_adapter, save_merged


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--base-model", required=True, help="base model folder or Hub id")
    p.add_argument("--base-revision", default=None, help="revision of a Hub base model")
    p.add_argument("--adapter", required=True, help="adapter folder or Hub id "
                   "(consolidator_config.json + consolidator_model.safetensors)")
    p.add_argument("--adapter-revision", default=None)
    p.add_argument("--repo-id", default=None, help="target Hub repo, 'namespace/name'")
    p.add_argument("--save-dir", default=None, help="also (or, without --repo-id, only) write "
                   "the folder here")
    p.add_argument("--adapter-only", action="store_true",
                   help="publish the adapter files with their card instead of the merged model")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the login "
                   "cache; prefer the environment: command lines are visible to other users)")
    p.add_argument("--revision", default=None, help="branch to commit to (created when missing)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--metrics", default=None, help="JSON file of eval metrics for the card")
    p.add_argument("--dataset", default=None, help="dataset id or VTAB-1k task name for the card")
    p.add_argument("--epochs", type=float, default=None, help="epochs trained (default: metrics' epoch)")
    p.add_argument("--labels", default=None, help="JSON file: list of class names or {id: name}")
    p.add_argument("--preprocess", default="vit", choices=sorted(PRESETS),
                   help="preset of the written image processor (ignored with --image-processor)")
    p.add_argument("--image-processor", default=None,
                   help="folder or Hub id of an image processor to ship instead of the preset")
    args = p.parse_args(argv)
    if not args.repo_id and not args.save_dir:
        p.error("give --repo-id (upload) and/or --save-dir (local folder)")
    return args


def read_labels(path: Optional[str]) -> Optional[Dict[int, str]]:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, list):
        return {i: str(v) for i, v in enumerate(data)}
    if isinstance(data, dict):
        return {int(k): str(v) for k, v in data.items()}
    raise ValueError(f"{path}: expected a JSON list of class names or an object {{id: name}}")


def main(argv=None) -> int:
    args = parse_args(argv)
    model = load_for_publishing(args.base_model, args.adapter, base_revision=args.base_revision,
                                adapter_revision=args.adapter_revision, token=args.token)
    card = dict(metrics=args.metrics, dataset=args.dataset, epochs=args.epochs,
                base_model=args.base_model if not os.path.exists(args.base_model) else None)
    if args.adapter_only:
        if args.save_dir:
            print(save_adapter(model, args.save_dir, repo_id=args.repo_id, **card))
        if args.repo_id:
            print(push_adapter(model, args.repo_id, private=args.private, token=args.token,
                               revision=args.revision, commit_message=args.commit_message, **card))
        return 0
    processor = args.preprocess
    if args.image_processor:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(args.image_processor, token=args.token)
    labels = read_labels(args.labels)
    if args.save_dir:
        print(save_merged(model, args.save_dir, image_processor=processor, id2label=labels,
                          repo_id=args.repo_id, **card))
    if args.repo_id:
        print(push_merged(model, args.repo_id, private=args.private, token=args.token,
                          revision=args.revision, commit_message=args.commit_message,
                          image_processor=processor, id2label=labels, **card))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="push_merged.py", extra_errors=(HubError,)))
