"""Write tiny VTAB-1k folders (the on-disk format of DESIGN.md section 4) from sklearn's digits."""

import os
from typing import Dict, List

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SIZES = {"train800": 8, "val200": 4, "train800val200": 12, "test": 6}


def write_vtab_task(data_dir: str, folder: str, num_classes: int = 10,
                    sizes: Dict[str, int] = SIZES, mode: str = "L") -> Dict[str, List[int]]:
    """Write ``data_dir/folder/{split}.txt`` and JPEGs ``images/<split>/<NNNNNN>.jpg`` (digits,
    upscaled to 24x24, in PIL ``mode``); labels are the digit classes modulo ``num_classes``.
    Returns the labels written per split."""
    digits = load_digits()
    root = os.path.join(data_dir, folder)
    written: Dict[str, List[int]] = {}
    k = 0
    for split, n in sizes.items():
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        lines, labels = [], []
        for i in range(n):
            arr = (digits.images[k] * (255 / 16)).astype(np.uint8)
            label = int(digits.target[k]) % num_classes
            k += 1
            rel = f"images/{split}/{i:06d}.jpg"
            Image.fromarray(arr, mode="L").resize((24, 24)).convert(mode).save(os.path.join(root, rel))
            lines.append(f"{rel} {label}")
            labels.append(label)
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        written[split] = labels
    return written
