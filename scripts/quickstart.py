"""Offline quick start: a small ViT, Consolidator branches, a few training steps on
scikit-learn's digits, then an exact merge back into a plain ViTForImageClassification.

    python scripts/quickstart.py
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import ViTConfig, ViTForImageClassification

from consolidator_hf import ConsolidatorConfig, get_consolidator_model


def digits_pixels():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    x = F.interpolate(x[:, None], size=32, mode="bilinear", align_corners=False)
    x = (x.repeat(1, 3, 1, 1) - 0.5) / 0.5
    return x, torch.tensor(digits.target)


def main() -> None:
    torch.manual_seed(0)
    x, y = digits_pixels()
    base = ViTForImageClassification(ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=10))
    model = get_consolidator_model(base, ConsolidatorConfig(groups=(32,), drop_rate=0.1))
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(150):
        idx = torch.randint(0, 1400, (64,))
        loss = model(pixel_values=x[idx], labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 149:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=x[1400:]).logits
        acc = (logits.argmax(-1) == y[1400:]).float().mean().item()
        print(f"held-out accuracy (397 digits): {acc:.3f}")
        merged = model.merge_and_unload()
        err = (merged(pixel_values=x[1400:]).logits - logits).abs().max().item()
    print(f"merged into {type(merged).__name__} with plain nn.Linear layers; "
          f"max |merged - unmerged| = {err:.2e}")
    assert err <= 1e-5


if __name__ == "__main__":
    main()
