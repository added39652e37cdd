"""Write tiny VTAB-1k folders (the on-disk format of docs/DESIGN.md section 4) from sklearn's digits."""

from typing import Dict, List

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from consolidator_hf.data.writer import write_vtab_task as write_task

SIZES = {"train800": 8, "val200": 4, "train800val200": 12, "test": 6}


def write_vtab_task(data_dir: str, folder: str, num_classes: int = 10,
                    sizes: Dict[str, int] = SIZES, mode: str = "L") -> Dict[str, List[int]]:
    """Write ``data_dir/folder`` with the library's writer: digits upscaled to 24x24 JPEGs in PIL
    ``mode``, labels the digit classes modulo ``num_classes`` (``train800val200`` = ``train800``
    + ``val200`` when both are written). Returns the labels written per split file."""
    digits = load_digits()
    splits, k = {}, 0
    for split, n in sizes.items():
        if split == "train800val200":  # the writer lists train800 + val200 again
            continue
        images = [Image.fromarray((digits.images[k + i] * (255 / 16)).astype(np.uint8), mode="L")
                  .resize((24, 24)).convert(mode) for i in range(n)]
        labels = [int(digits.target[k + i]) % num_classes for i in range(n)]
        splits[split] = (images, labels)
        k += n
    write_task(data_dir, folder, splits)
    written = {split: labels for split, (_, labels) in splits.items()}
    if "train800" in written and "val200" in written:
        written["train800val200"] = written["train800"] + written["val200"]
    return written
