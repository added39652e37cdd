"""Publishing to local folders: a merged model or an adapter, each with its model card.

- :func:`save_merged`: merge a copy of a :class:`ConsolidatorModel` (the caller's model is never
  modified) and write an ordinary ``transformers`` folder (``config.json`` with
  ``id2label``/``label2id``, ``model.safetensors``, ``preprocessor_config.json``, ``README.md``)
  that loads with plain ``from_pretrained``.
- :func:`save_adapter`: the adapter files only (``consolidator_config.json``,
  ``consolidator_model.safetensors``) with their own card.
- :func:`load_for_publishing`: a base model with a trained adapter on top, ready to publish.

Every folder is written with :func:`consolidator_hf.io.write_folder`: it appears complete or not
at all, and replaces what was there whole. Uploads (:mod:`consolidator_hf.hub`) call these.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Union

from .cards import (CARD_NAME, MetricsLike, build_model_card, hub_base_model,
                    require_consolidator)
from .config import WEIGHTS_NAME
from .io import PathLike, load_safetensors, resolve_file, write_folder
from .model import ConsolidatorModel
from .processors import describe_processor, resolve_image_processor
from .targets import HEAD_MODULES

logger = logging.getLogger(__name__)

__all__ = ["save_merged", "save_adapter", "load_for_publishing"]


def _unmerged_copy(model: ConsolidatorModel) -> ConsolidatorModel:
    """A deep copy with the branches unmerged (a merged caller's model must stay merged;
    counts and adapter storage need the branches)."""
    work = copy.deepcopy(model)
    if any(layer.merged for _, layer in work.consolidator_layers()):
        work.unmerge_adapter()
    return work


def _merge_copy(work: ConsolidatorModel, safe_merge: bool,
                id2label: Optional[Mapping[Any, str]]):
    """Merge ``work`` (a copy the caller does not hold) into its plain base class."""
    merged = work.eval().merge_and_unload(safe_merge=safe_merge)
    config = getattr(merged, "config", None)
    if id2label is not None:
        if isinstance(id2label, (list, tuple)):
            id2label = dict(enumerate(id2label))
        labels = {int(k): str(v) for k, v in id2label.items()}
        n = getattr(config, "num_labels", None)
        if n is None or sorted(labels) != list(range(n)):
            raise ValueError(f"id2label: expected one label for each class id 0..{n}-1 of the "
                             f"model, got ids {sorted(labels)[:10]}")
        config.id2label = labels
    if config is not None and getattr(config, "id2label", None):
        # transformers 5 leaves label2id unset when only id2label was given: write both.
        config.label2id = {v: int(k) for k, v in config.id2label.items()}
    return merged


def save_merged(
    model: ConsolidatorModel, save_directory: PathLike, *, image_processor: Any = None,
    metrics: MetricsLike = None, dataset: Optional[str] = None, base_model: Optional[str] = None,
    epochs: Optional[float] = None, id2label: Optional[Union[Mapping[Any, str], List[str]]] = None,
    training_details: Optional[Mapping[str, Any]] = None, repo_id: Optional[str] = None,
    safe_merge: bool = True,
) -> str:
    """Merge a copy of ``model`` and write an ordinary ``transformers`` folder.

    Writes ``config.json`` (with ``id2label``/``label2id``; ``id2label=`` overrides the
    labels), ``model.safetensors``, ``preprocessor_config.json`` and a ``README.md`` model
    card. ``image_processor``: an image processor to save, a preset name (``"vit"``,
    ``"paper"``; see :func:`consolidator_hf.processors.default_image_processor`) or ``None`` for the ``"vit"`` preset at
    the model's image size. ``metrics`` (a mapping or a JSON file) fill the card's
    ``model-index``; ``epochs`` defaults to ``metrics["epoch"]``. The merge is done in fp32 on a
    deep copy (``safe_merge`` refuses NaN/inf weights); the caller's model is not modified.
    The folder appears complete or not at all. Returns its path.
    """
    model = require_consolidator(model, "save_merged")
    processor = resolve_image_processor(image_processor, model)
    work = _unmerged_copy(model)  # the one deep copy: counted, then merged
    counts = work.parameter_counts()
    card = build_model_card(
        model, kind="merged", repo_id=repo_id,
        model_name=None if repo_id else os.path.basename(os.path.abspath(os.fspath(save_directory))),
        base_model=base_model, metrics=metrics, dataset=dataset, epochs=epochs,
        training_details=training_details, preprocessing=describe_processor(processor),
        counts=counts, local_path=None if repo_id else os.fspath(save_directory),
    )
    merged = _merge_copy(work, safe_merge, id2label)

    path = os.path.abspath(os.fspath(save_directory))
    with write_folder(path) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        card.save(os.path.join(tmp, CARD_NAME))
    logger.info("wrote merged %s to %s", type(merged).__name__, path)
    return path


def save_adapter(
    model: ConsolidatorModel, save_directory: PathLike, *, metrics: MetricsLike = None,
    dataset: Optional[str] = None, base_model: Optional[str] = None, epochs: Optional[float] = None,
    training_details: Optional[Mapping[str, Any]] = None, repo_id: Optional[str] = None,
) -> str:
    """Write the adapter (``consolidator_config.json``, ``consolidator_model.safetensors``,
    consolidated as in ``save_pretrained``) with a ``README.md`` card. ``base_model`` (a Hub
    id) is also recorded in the saved config's ``base_model_name_or_path`` when that is unset.
    The caller's model is not modified. Returns the folder's path."""
    model = require_consolidator(model, "save_adapter")
    base = hub_base_model(model, base_model)
    source = _unmerged_copy(model)
    card = build_model_card(
        model, kind="adapter", repo_id=repo_id,
        model_name=None if repo_id else os.path.basename(os.path.abspath(os.fspath(save_directory))),
        base_model=base_model, metrics=metrics, dataset=dataset, epochs=epochs,
        training_details=training_details, counts=source.parameter_counts(),
        local_path=None if repo_id else os.fspath(save_directory),
    )

    path = os.path.abspath(os.fspath(save_directory))
    with write_folder(path) as tmp:
        source.save_pretrained(tmp)
        if base and not model.consolidator_config.base_model_name_or_path:
            model.consolidator_config.replace(base_model_name_or_path=base).save_pretrained(tmp)
        card.save(os.path.join(tmp, CARD_NAME))
    logger.info("wrote adapter to %s", path)
    return path


def load_for_publishing(
    base_model: PathLike, adapter: PathLike, *, base_revision: Optional[str] = None,
    adapter_revision: Optional[str] = None, token: Optional[str] = None,
) -> ConsolidatorModel:
    """A base model (folder or Hub id) with a trained adapter (folder or Hub id) on top, in
    eval mode: what ``scripts/push_merged.py`` and a training script publish.

    The base is loaded with ``AutoModelForImageClassification`` and the adapter's number of
    classes (read from its stored classifier), so a backbone checkpoint without a head works;
    the adapter's head replaces the base's.
    """
    from transformers import AutoModelForImageClassification

    tensors, metadata = load_safetensors(resolve_file(adapter, WEIGHTS_NAME,
                                                      revision=adapter_revision, token=token))
    # The stored head tells the number of classes; its name comes from the architecture table.
    head = HEAD_MODULES.get(metadata.get("model_type", ""))
    heads = [t for k, t in tensors.items() if head and k.endswith(f"{head}.weight")]
    kwargs: Dict[str, Any] = {}
    if len(heads) == 1:
        kwargs = {"num_labels": int(heads[0].shape[0]), "ignore_mismatched_sizes": True}
    base = AutoModelForImageClassification.from_pretrained(
        os.fspath(base_model), revision=base_revision, token=token, **kwargs)
    return ConsolidatorModel.from_pretrained(base, adapter, revision=adapter_revision,
                                             token=token, is_trainable=False).eval()
