"""Image preprocessing, one vocabulary for the whole package.

Two names, each meaning one thing everywhere:

- ``PRESETS`` — image-processor settings by name, for the processor written beside a merged
  model or a converted backbone (:func:`default_image_processor`):
  ``"vit"`` = ``google/vit-base-patch16-224-in21k``'s own processor (bilinear, mean/std 0.5);
  ``"paper"`` = the paper's VTAB recipe (bicubic resize straight to the image size, ImageNet
  mean/std from the registry's ``shared_recipe``).
- ``PREPROCESSING`` — how training data is preprocessed (:func:`consolidator_hf.data.make_transform`,
  ``FinetuneConfig.preprocess``): ``"paper"`` (the preset above) or ``"processor"`` (the
  model's own image processor).

The ``"paper"`` settings are defined once, in :func:`preset_settings`; the data transform and
the written processor both read them.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Union

PRESETS: Tuple[str, ...] = ("vit", "paper")
PREPROCESSING: Tuple[str, ...] = ("paper", "processor")
# Deprecated spelling shown by earlier READMEs (scripts/push_merged.py --preprocess).
PREPROCESS_PRESETS = PRESETS

RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

__all__ = ["PRESETS", "PREPROCESSING", "PREPROCESS_PRESETS", "preset_settings",
           "default_image_processor", "resolve_image_processor", "describe_processor",
           "image_size_of"]


def preset_settings(name: str) -> Dict[str, Any]:
    """``resample`` (PIL code), ``image_mean`` and ``image_std`` of a preset."""
    if name not in PRESETS:
        raise ValueError(f"preprocess: expected one of {sorted(PRESETS)}, got {name!r}")
    if name == "vit":
        return {"resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    from .data.registry import shared_recipe

    shared = shared_recipe()
    return {"resample": 3, "image_mean": list(shared["normalize_mean"]),
            "image_std": list(shared["normalize_std"])}


def default_image_processor(image_size: Union[int, Tuple[int, int]], preprocess: str = "vit"):
    """A ``ViTImageProcessor`` resizing to ``image_size`` with a preset's settings.

    ``preprocess="vit"`` (default) is the processor of ``google/vit-base-patch16-224-in21k``:
    bilinear resize, rescale to [0, 1], normalise with mean = std = 0.5.
    ``preprocess="paper"`` is the paper's VTAB recipe: bicubic resize, ImageNet mean/std.
    """
    settings = preset_settings(preprocess)
    try:  # transformers 5: the PIL backend, which needs no torchvision
        from transformers import ViTImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x
        from transformers import ViTImageProcessor as processor_class
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return processor_class(do_resize=True, size={"height": int(h), "width": int(w)},
                           do_rescale=True, rescale_factor=1 / 255, do_normalize=True, **settings)


def image_size_of(model: Any) -> Tuple[int, int]:
    """``(height, width)`` from a model's (or wrapped model's) ``config.image_size``."""
    base = getattr(model, "base_model", model)
    size = getattr(getattr(base, "config", None), "image_size", None)
    if size is None:
        raise ValueError("the model's config has no image_size; pass image_processor=")
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def resolve_image_processor(image_processor: Any, model: Any):
    """``None`` -> the ``"vit"`` preset at the model's size; a preset name -> that preset; an
    image processor -> itself."""
    if image_processor is None:
        return default_image_processor(image_size_of(model), "vit")
    if isinstance(image_processor, str):
        return default_image_processor(image_size_of(model), image_processor)
    if not hasattr(image_processor, "save_pretrained"):
        raise TypeError("image_processor: expected an image processor (with save_pretrained), "
                        f"a preset name {sorted(PRESETS)} or None, "
                        f"got {type(image_processor).__name__}")
    return image_processor


def describe_processor(processor: Any) -> str:
    """One line saying what a processor does (for model cards)."""
    d = processor.to_dict() if hasattr(processor, "to_dict") else {}
    size = d.get("size") or {}
    if "height" in size:
        size_text = f"{size['height']}x{size['width']}"
    else:
        size_text = ", ".join(f"{k}={v}" for k, v in size.items()) or "unknown size"
    parts = [f"`{d.get('image_processor_type', type(processor).__name__)}`"]
    if d.get("do_resize", True):
        resample = d.get("resample")
        parts.append(f"resize to {size_text} ({RESAMPLE_NAMES.get(resample, resample)})")
    if d.get("do_rescale", True):
        parts.append("rescale to [0, 1]")
    if d.get("do_normalize", True):
        parts.append(f"normalise with mean {d.get('image_mean')} and std {d.get('image_std')}")
    return ", ".join(parts)
