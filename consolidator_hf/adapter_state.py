"""The adapter file's tensors <-> a :class:`~consolidator_hf.model.ConsolidatorModel`'s layers
and trained base parameters: what ``save_pretrained`` writes (:func:`adapter_tensors`) and what
``from_pretrained`` / a Trainer resume loads back (:func:`load_adapter_state`). The file format
itself (metadata, key matching, the writer) is :mod:`consolidator_hf.storage`'s.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .layer import ConsolidatorLinear
from .storage import check_metadata, match_adapter_keys

# ``model`` below is a ConsolidatorModel, typed as nn.Module: model.py imports this module.


def stores_layer_bias(model: nn.Module, layer: ConsolidatorLinear) -> bool:
    """A consolidated adapter stores the layer's bias when training can change it:
    branch biases fold into it, or the base bias itself trains."""
    cfg = model.consolidator_config
    return cfg.branch_bias or (cfg.train_bias and layer.base_layer.bias is not None)


def adapter_tensors(model: nn.Module, consolidate: bool) -> Dict[str, torch.Tensor]:
    """What training changed, keyed by base-model module paths. Never a frozen tensor."""
    tensors: Dict[str, torch.Tensor] = {}
    layer_bias_names = set()
    for name, layer in model.consolidator_layers():
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge_adapter() before saving the adapter")
        if layer.disabled:  # the in-place tensors hold the base values in there
            raise ValueError(f"{name}: cannot save the adapter inside disable_adapter()")
        bias_changes = stores_layer_bias(model, layer)
        base_bias = layer.base_layer.bias
        if consolidate:
            _, values = layer.consolidated()
            tensors[f"{name}.delta"] = values.to(layer.branches[0].weight.dtype)
            if bias_changes:
                b = layer.delta_bias()
                if b is None:
                    b = base_bias.float()
                elif base_bias is not None:
                    b = b + base_bias.float()
                dtype = base_bias.dtype if base_bias is not None else layer.branches[0].weight.dtype
                tensors[f"{name}.bias"] = b.to(dtype)
                layer_bias_names.add(f"{name}.bias")
        else:
            for k, branch in enumerate(layer.branches):
                for pname, p in branch.named_parameters():
                    tensors[f"{name}.branches.{k}.{pname}"] = p.detach()
    for pname, p in model.trained_base_parameters():
        if pname not in layer_bias_names:
            tensors[pname] = p.detach()
    return tensors


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
                       source: str = "adapter") -> None:
    """Load tensors written by ``ConsolidatorModel.save_pretrained`` (either storage form) into
    ``model``'s layers and trained base parameters, after checking the file's metadata and keys."""
    model_type = model._model_type()
    consolidated = check_metadata(metadata, model_type, source)
    expected = adapter_tensors(model, consolidate=consolidated)
    remapped = match_adapter_keys(tensors, expected, model_type, source,
                                  type(model.base_model).__name__)
    layers = dict(model.consolidator_layers())
    params = {n.replace(".base_layer.", "."): p for n, p in model.base_model.named_parameters()}
    # Deltas first: splitting a delta zeroes the branch biases, which a stored bias may refill.
    for key, value in sorted(remapped.items(), key=lambda kv: not kv[0].endswith(".delta")):
        if key.endswith(".delta") and key[: -len(".delta")] in layers:
            layers[key[: -len(".delta")]].load_consolidated(value)
            continue
        layer_name = key.rsplit(".", 1)[0]
        if consolidated and key.endswith(".bias") and layer_name in layers:
            layer = layers[layer_name]
            if layer.base_layer.bias is None:
                # Branch biases but no base bias: the stored bias is sum_k c_k.
                layer.branches[0].bias.copy_(value.to(layer.branches[0].bias.dtype))
                continue
        param = params.get(key)
        if param is None:  # branch parameters of an unconsolidated file
            param = model.base_model.get_parameter(key)
        param.copy_(value.to(param.dtype))
