"""The adapter file format (docs/DESIGN.md section 4): what ``consolidator_model.safetensors``
holds, its metadata, and how a file's keys are matched to a model's (transformers 4.x or 5.x
module names).

``ConsolidatorModel`` decides *which* tensors training changed; this module writes, reads and
checks them, so the format lives in one place.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Union

import torch

from .io import atomic_save_safetensors
from .config import FORMAT_VERSION, WEIGHTS_NAME
from .targets import rename_4_to_5

ADAPTER_FORMAT = "consolidator_hf"

__all__ = ["ADAPTER_FORMAT", "adapter_metadata", "check_metadata", "check_tensor",
           "write_adapter_file", "match_adapter_keys"]


def adapter_metadata(model_type: str, consolidated: bool) -> Dict[str, str]:
    """The safetensors metadata of an adapter file."""
    return {
        "format": ADAPTER_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "consolidated": "true" if consolidated else "false",
        "model_type": model_type,
    }


def write_adapter_file(directory: Union[str, os.PathLike], tensors: Mapping[str, torch.Tensor],
                       model_type: str, consolidated: bool) -> str:
    """Write ``consolidator_model.safetensors`` into ``directory``; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    atomic_save_safetensors(dict(tensors), path, adapter_metadata(model_type, consolidated))
    return path


def check_metadata(metadata: Mapping[str, str], model_type: str, source: str) -> bool:
    """Whether the file is consolidated; ``ValueError`` naming ``source`` if it is not an adapter
    file of this library or was saved for another ``model_type``."""
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{source}: not a consolidator_hf adapter file (metadata "
                         f"format={metadata.get('format')!r})")
    version = metadata.get("format_version", str(FORMAT_VERSION))
    if not (isinstance(version, str) and version.isdigit() and int(version) >= 1):
        raise ValueError(f"{source}: metadata format_version={version!r} is not a positive "
                         "integer")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"{source}: metadata format_version={version} is newer than this library "
                         f"understands ({FORMAT_VERSION}); upgrade consolidator_hf")
    saved_type = metadata.get("model_type", "")
    if saved_type and model_type and saved_type != model_type:
        raise ValueError(f"{source}: adapter was saved for model_type={saved_type!r}, the base "
                         f"model is {model_type!r}")
    return metadata.get("consolidated") == "true"


def match_adapter_keys(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                       model_type: str, source: str, model_name: str) -> Dict[str, torch.Tensor]:
    """``tensors`` re-keyed onto the names of ``expected`` (keys written under transformers 4.x
    module names match 5.x ones and back). Unknown or missing keys, and shapes that differ (a
    ``.delta`` is checked by the layer that loads it), raise one ``ValueError`` naming ``source``."""
    canon = {rename_4_to_5(k, model_type): k for k in expected}
    remapped: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        target = canon.get(rename_4_to_5(key, model_type))
        if target is None:
            unknown.append(key)
        else:
            remapped[target] = value
    missing = sorted(set(expected) - set(remapped))
    if unknown or missing:
        raise ValueError(
            f"{source}: adapter does not match the base model ({model_name}); unexpected keys: "
            f"{sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''}; missing keys: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    for key, value in remapped.items():
        if not key.endswith(".delta") and value.shape != expected[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the base model "
                             f"expects {tuple(expected[key].shape)}")
        check_tensor(value, key, source)
    return remapped


def check_tensor(value: torch.Tensor, key: str, source: str) -> None:
    """``ValueError`` naming ``source`` and ``key`` for a tensor an adapter cannot hold: not a
    floating dtype (an int64 or bool tensor would be cast silently and shift the logits), or
    NaN/inf values. Floating dtypes load into a model of another floating dtype (cast)."""
    if not value.is_floating_point():
        raise ValueError(f"{source}: {key} has dtype {value.dtype}; adapter tensors are floating "
                         "point (float32, bfloat16, float16...): the file is not an adapter of "
                         "this library or was altered")
    if not bool(torch.isfinite(value).all()):
        n = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{source}: {key} holds {n} NaN or inf value(s); refusing to load it")
