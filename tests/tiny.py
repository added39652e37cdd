"""Tiny models built from configs in code (no Hub)."""

import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=16, patch_size=4, num_labels=3)


def tiny_vit(seed: int = 0, **kw) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**{**TINY, **kw})).eval()


def tiny_deit(seed: int = 0) -> DeiTForImageClassification:
    torch.manual_seed(seed)
    return DeiTForImageClassification(DeiTConfig(**TINY)).eval()


def tiny_dinov2(seed: int = 0) -> Dinov2ForImageClassification:
    torch.manual_seed(seed)
    return Dinov2ForImageClassification(Dinov2Config(**TINY)).eval()


def pixels(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g)


def perturb_trainables(model, seed: int = 1) -> None:
    """Make every trainable tensor differ from its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
