"""Batch transforms for ``Dataset.set_transform``: images in, ``pixel_values``/``labels`` out.

Applied lazily, so the dataset on disk stays raw JPEGs and each preprocessing can be chosen by name:

- ``"paper"``: what the paper's VTAB scripts do: bicubic resize straight to ``image_size`` squared
  (no crop, no augmentation), scale to [0, 1], normalise with the ImageNet mean/std from the
  registry's ``shared_recipe``. Pure PIL + numpy + torch.
- ``"processor"``: the model's own ``transformers`` image processor (e.g. ``ViTImageProcessor``:
  bilinear, mean/std 0.5), with its own size settings.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..processors import PREPROCESSING, preset_settings


def to_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode (L, P, RGBA, CMYK, I;16...) or an HxW[xC] array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16/32-bit grey: PIL's direct conversion clips to 255, so rescale the range to 8 bits first
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    return image.convert("RGB")


#: A decoded image keeps at least this many times the target size per side (draft/reduce
#: only shrink images larger than twice that, so ordinary VTAB images decode exactly as before).
DECODE_MARGIN = 4


def decode_image(value: Any, target: Optional[Tuple[int, int]] = None, *,
                 max_pixels: Optional[int] = None) -> Image.Image:
    """A PIL image from a decoded image, a path, or a ``datasets`` ``{"path", "bytes"}`` dict.

    A large file is downscaled while it is decoded, before any transform sees it: a JPEG
    through ``Image.draft`` (the decoder's DCT scaling: 1/2, 1/4 or 1/8, never below
    ``DECODE_MARGIN x target``), other formats with ``Image.reduce`` right after loading. Only
    images wider or taller than ``2 * DECODE_MARGIN x target`` change. ``max_pixels``: refuse a
    larger file (``ValueError`` naming it). EXIF orientation is applied as ``datasets`` does.
    """
    from PIL import ImageOps

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
        source: Any = io.BytesIO(data) if data is not None else path
        name = path or "<image bytes>"
    else:
        source = name = os.fspath(value)
    try:
        im = Image.open(source)
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ValueError(f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of "
                             f"{max_pixels:,}")
        if target is not None and im.format == "JPEG":
            im.draft(None, (DECODE_MARGIN * target[0], DECODE_MARGIN * target[1]))
        im.load()
    except (OSError, SyntaxError) as e:  # PIL reports truncated / corrupt data as OSError
        raise ValueError(f"{name}: cannot decode the image ({e})") from None
    if target is not None:
        factor = min(im.size[0] // (DECODE_MARGIN * target[0]),
                     im.size[1] // (DECODE_MARGIN * target[1]))
        if factor >= 2:
            im = im.reduce(factor)
    if im.getexif().get(0x0112) is not None:  # EXIF Orientation
        im = ImageOps.exif_transpose(im)
    return im


def _processor_size(image_processor: Any) -> Optional[Tuple[int, int]]:
    size = getattr(image_processor, "size", None) or {}
    if "height" in size and "width" in size:
        return int(size["width"]), int(size["height"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


def paper_pixel_values(images: Sequence[Any], image_size: int = 224) -> torch.Tensor:
    """(B, 3, image_size, image_size) float32: bicubic resize, /255, ImageNet mean/std."""
    settings = preset_settings("paper")  # the one definition of the paper's preprocessing
    mean = np.asarray(settings["image_mean"], dtype=np.float32)
    std = np.asarray(settings["image_std"], dtype=np.float32)
    resample = Image.Resampling(settings["resample"])
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    for i, image in enumerate(images):
        rgb = to_rgb(image).resize((image_size, image_size), resample)
        arr = np.asarray(rgb, dtype=np.float32) / 255.0
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(out)


def make_transform(preprocess: str, *, image_processor: Any = None,
                   image_size: int = 224) -> Callable[[Dict[str, List[Any]]], Dict[str, torch.Tensor]]:
    """A ``Dataset.set_transform`` function for the named preprocessing.

    The returned function maps a batch ``{"image": [PIL... or undecoded path/bytes dicts],
    "label": [int...]}`` (undecoded images go through :func:`decode_image`) to
    ``{"pixel_values": FloatTensor (B, 3, H, W), "labels": LongTensor (B,)}``. ``image_size``
    applies to ``"paper"``; ``"processor"`` uses the processor's own size settings.

    >>> ds.set_transform(make_transform("paper"))  # doctest: +SKIP
    >>> ds[0]["pixel_values"].shape  # doctest: +SKIP
    torch.Size([3, 224, 224])
    """
    if preprocess not in PREPROCESSING:
        raise ValueError(f"unknown preprocess {preprocess!r}; expected one of {', '.join(PREPROCESSING)}")
    if preprocess == "processor" and image_processor is None:
        raise ValueError("preprocess='processor' needs image_processor= (e.g. AutoImageProcessor.from_pretrained(model))")
    if preprocess == "paper" and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")

    target = (image_size, image_size) if preprocess == "paper" else _processor_size(image_processor)

    def transform(batch: Dict[str, List[Any]]) -> Dict[str, torch.Tensor]:
        if "image" not in batch or "label" not in batch:
            raise KeyError(f"expected a batch with 'image' and 'label' columns, got {sorted(batch)}")
        # Undecoded columns (datasets.Image(decode=False): path/bytes dicts) are decoded
        # here, shrinking large files at decode time.
        images = [to_rgb(decode_image(im, target)) for im in batch["image"]]
        if preprocess == "paper":
            pixel_values = paper_pixel_values(images, image_size)
        else:
            pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch["label"], dtype=torch.long)}

    return transform
