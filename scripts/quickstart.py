"""Offline quick start: a small ViT, Consolidator branches, a few training steps on
scikit-learn's digits, then an exact merge back into a plain ViTForImageClassification.

    python scripts/quickstart.py                 # about half a minute on one idle core
    python scripts/quickstart.py --steps 50 --threads 2

The ViT starts from random weights (no pretrained backbone offline) and only the branches, biases,
LayerNorms and head train, for a few hundred steps: the held-out accuracy shows that training
works (chance is 10 %), not what Consolidator reaches on a pretrained model (for that:
``accelerate launch scripts/finetune.py``). The point of the last line is the merge: the merged
plain model gives the same logits as the adapted one (max difference at float rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from consolidator_hf.cli import HelpFormatter, add_debug_flag, run_cli


def default_threads() -> int:
    """1 on machines with at most 2 cores: this model is too small for a second thread to help,
    and on a busy 2-core machine two threads wait on each other (measured: 169 s with 2 threads
    against 28 s with 1 on a loaded 2-core machine). Else half the cores, at most 4."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores // 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps (batch 64)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="torch intra-op threads (default here: 1 on machines with <= 2 cores, "
                        "where a second thread only waits; else half the cores, at most 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the branches and the batches")
    add_debug_flag(p)
    return p


def digits_pixels():
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    x = F.interpolate(x[:, None], size=32, mode="bilinear", align_corners=False)
    x = (x.repeat(1, 3, 1, 1) - 0.5) / 0.5
    return x, torch.tensor(digits.target)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        raise ValueError(f"--steps and --threads must be >= 1, got {args.steps} and {args.threads}")
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from consolidator_hf import ConsolidatorConfig, get_consolidator_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = digits_pixels()
    base = ViTForImageClassification(ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=10))
    model = get_consolidator_model(base, ConsolidatorConfig(groups=(32,), drop_rate=0.1))
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    last = args.steps - 1
    for step in range(args.steps):
        idx = torch.randint(0, 1400, (64,))
        loss = model(pixel_values=x[idx], labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == last:
            print(f"step {step:3d}  loss {loss.item():.4f}  (chance level: ln 10 = 2.30)")
    model.eval()
    n_test = len(y) - 1400
    with torch.no_grad():
        logits = model(pixel_values=x[1400:]).logits
        acc = (logits.argmax(-1) == y[1400:]).float().mean().item()
        print(f"held-out accuracy ({n_test} digits never trained on): {acc:.3f} (chance: 0.100). "
              f"A randomly initialised ViT trained {args.steps} steps with its backbone frozen: "
              "this shows learning, not Consolidator's accuracy on a pretrained backbone")
        merged = model.merge_and_unload()
        err = (merged(pixel_values=x[1400:]).logits - logits).abs().max().item()
    print(f"merged into {type(merged).__name__} with plain nn.Linear layers; "
          f"max |merged - unmerged| logits = {err:.2e} (the merge is exact up to float rounding)")
    if err > 1e-5:
        raise ValueError(f"merged and unmerged logits differ by {err:.2e} > 1e-5")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], prog="quickstart.py"))
