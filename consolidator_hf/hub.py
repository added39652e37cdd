"""Publishing: a merged model or an adapter, to a local folder or a Hub repo, with a model card.

- :func:`save_merged` / :func:`push_merged`: merge a copy of a :class:`ConsolidatorModel`
  (the caller's model is never modified) and write an ordinary ``transformers`` folder
  (``config.json`` with ``id2label``/``label2id``, ``model.safetensors``,
  ``preprocessor_config.json``, ``README.md``) that loads with plain ``from_pretrained``.
- :func:`save_adapter` / :func:`push_adapter`: the adapter files only
  (``consolidator_config.json``, ``consolidator_model.safetensors``) with their own card;
  ``ConsolidatorModel.from_pretrained(base, "<repo_id>")`` loads them back.
- :func:`build_model_card`: the card both use (``huggingface_hub.ModelCard``).

Uploads go through ``huggingface_hub`` (``create_repo`` + one ``create_commit``), so
``HF_ENDPOINT``, ``HF_TOKEN`` and the login cache work as usual. Tokens are passed to the
client only: never printed, logged or written. Any failure while talking to the Hub raises
:class:`HubError` naming the repo and the step that failed, and leaves no local files behind.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ._io import PathLike, write_folder
from .model import ConsolidatorModel

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
ADAPTER_LIBRARY_NAME = "consolidator_hf"
BASE_TAGS = ("consolidator", "vision", "image-classification")

MetricsLike = Union[Mapping[str, Any], PathLike, None]

# Presets of the default image processor (see default_image_processor):
# "vit" = google/vit-base-patch16-224-in21k's own processor (bilinear, mean/std 0.5);
# "paper" = the paper's VTAB recipe (bicubic, ImageNet mean/std from the registry).
PREPROCESS_PRESETS: Tuple[str, ...] = ("vit", "paper")


def _preset(name: str) -> Dict[str, Any]:
    if name == "vit":
        return {"resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    from .data.registry import shared_recipe

    shared = shared_recipe()
    return {"resample": 3, "image_mean": list(shared["normalize_mean"]),
            "image_std": list(shared["normalize_std"])}

_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

CITATION = """@inproceedings{hao2023consolidator,
  title     = {Consolidator: Mergeable Adapter with Grouped Connections for Visual Adaptation},
  author    = {Hao, Tianxiang and Chen, Hui and Guo, Yuchen and Ding, Guiguang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}"""


class HubError(RuntimeError):
    """Talking to the Hub failed; the message names the repo, the step and the cause."""


# ---------------------------------------------------------------------- small helpers
def _require_consolidator(model: Any, func: str) -> ConsolidatorModel:
    if not isinstance(model, ConsolidatorModel):
        raise TypeError(f"{func}: expected a ConsolidatorModel (from get_consolidator_model or "
                        f"ConsolidatorModel.from_pretrained), got {type(model).__name__}")
    return model


def _image_size(model: ConsolidatorModel) -> Tuple[int, int]:
    size = getattr(getattr(model.base_model, "config", None), "image_size", None)
    if size is None:
        raise ValueError("the model's config has no image_size; pass image_processor=")
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def default_image_processor(image_size: Union[int, Tuple[int, int]], preprocess: str = "vit"):
    """A ``ViTImageProcessor`` resizing to ``image_size``.

    ``preprocess="vit"`` (default) is the processor of ``google/vit-base-patch16-224-in21k``:
    bilinear resize, rescale to [0, 1], normalise with mean = std = 0.5.
    ``preprocess="paper"`` is the paper's VTAB recipe: bicubic resize, ImageNet mean/std.
    """
    if preprocess not in PREPROCESS_PRESETS:
        raise ValueError(f"preprocess: expected one of {sorted(PREPROCESS_PRESETS)}, "
                         f"got {preprocess!r}")
    try:  # transformers 5: the PIL backend, which needs no torchvision
        from transformers import ViTImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x
        from transformers import ViTImageProcessor as processor_class
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return processor_class(do_resize=True, size={"height": int(h), "width": int(w)},
                           do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                           **_preset(preprocess))


def _resolve_image_processor(image_processor: Any, model: ConsolidatorModel):
    if image_processor is None:
        return default_image_processor(_image_size(model), "vit")
    if isinstance(image_processor, str):
        return default_image_processor(_image_size(model), image_processor)
    if not hasattr(image_processor, "save_pretrained"):
        raise TypeError("image_processor: expected an image processor (with save_pretrained), "
                        f"a preset name {sorted(PREPROCESS_PRESETS)} or None, "
                        f"got {type(image_processor).__name__}")
    return image_processor


def _describe_processor(processor: Any) -> str:
    d = processor.to_dict() if hasattr(processor, "to_dict") else {}
    size = d.get("size") or {}
    if "height" in size:
        size_text = f"{size['height']}x{size['width']}"
    else:
        size_text = ", ".join(f"{k}={v}" for k, v in size.items()) or "unknown size"
    parts = [f"`{d.get('image_processor_type', type(processor).__name__)}`"]
    if d.get("do_resize", True):
        resample = d.get("resample")
        parts.append(f"resize to {size_text} ({_RESAMPLE_NAMES.get(resample, resample)})")
    if d.get("do_rescale", True):
        parts.append("rescale to [0, 1]")
    if d.get("do_normalize", True):
        parts.append(f"normalise with mean {d.get('image_mean')} and std {d.get('image_std')}")
    return ", ".join(parts)


def load_metrics(metrics: MetricsLike) -> Dict[str, Any]:
    """``metrics`` as a flat dict: a mapping, or the path of a JSON file holding one
    (e.g. the Trainer's ``all_results.json`` / ``eval_results.json``). Nested mappings are
    flattened with ``_`` (``{"test": {"accuracy": .9}}`` -> ``test_accuracy``)."""
    if metrics is None:
        return {}
    if isinstance(metrics, (str, os.PathLike)):
        path = os.fspath(metrics)
        try:
            with open(path, encoding="utf-8") as f:
                metrics = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such metrics file") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(metrics, dict):
            raise ValueError(f"{path}: expected a JSON object of metrics")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics: expected a mapping or a JSON file path, got {type(metrics).__name__}")
    flat: Dict[str, Any] = {}

    def walk(prefix: str, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            key = f"{prefix}_{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                walk(key, v)
            else:
                flat[key] = v

    walk("", metrics)
    return flat


# Quality metrics go into the card's model-index; everything else a metrics file may hold
# (runtimes, parameter counts, image size, the run's config...) stays out.
_QUALITY_METRIC = re.compile(r"(^|_)(accuracy|acc|top\d+|top_\d+|f1|precision|recall|auc|roc_auc|"
                             r"loss|error|error_rate|mae|mse|rmse|iou|miou|map|mcc)($|_)")
_SPLIT_PREFIXES = (("test_", "test"), ("eval_", None), ("validation_", "validation"),
                   ("val_", "validation"))


def _split_metrics(flat: Mapping[str, Any]) -> Tuple[List[Tuple[str, Optional[str], float]],
                                                       Optional[float]]:
    """``[(metric, split, value)]`` of the numeric quality metrics, and the epoch count.

    ``eval_``/unprefixed metrics get the split named by an ``eval_split`` entry (as
    ``scripts/finetune.py``'s ``metrics.json`` has), ``test_`` ones split ``test``.
    """
    epochs = None
    for key in ("epoch", "epochs", "num_train_epochs", "train_epoch"):
        v = flat.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            epochs = float(v)
            break
    eval_split = flat.get("eval_split") if isinstance(flat.get("eval_split"), str) else None
    results = []
    for key, value in flat.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith(("train_", "config_")) or not math.isfinite(value):
            continue
        name, split = key, eval_split
        for prefix, split_name in _SPLIT_PREFIXES:
            if key.startswith(prefix):
                name, split = key[len(prefix):], split_name or eval_split
                break
        if _QUALITY_METRIC.search(name):
            results.append((name, split, float(value)))
    return results, epochs


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _is_hub_id(name: Any) -> bool:
    return (isinstance(name, str) and _REPO_ID.match(name) is not None and "--" not in name
            and ".." not in name and not os.path.exists(name))


def _hub_base_model(model: ConsolidatorModel, base_model: Optional[str]) -> Optional[str]:
    """The base model's Hub id for the card: ``base_model`` if given, else the adapter config's
    ``base_model_name_or_path`` or the base model's ``name_or_path`` when they are Hub ids
    (``None`` when the base is only known as a local path)."""
    if base_model is not None:
        if not _is_hub_id(base_model):
            raise ValueError(f"base_model: {base_model!r} is not a Hub repo id ('namespace/name')")
        return base_model
    for candidate in (model.consolidator_config.base_model_name_or_path,
                      getattr(model.base_model, "name_or_path", None)):
        if candidate and _is_hub_id(candidate):
            return candidate
    return None


def _vtab_task(dataset: Optional[str]) -> Optional[str]:
    """The VTAB-1k task ``dataset`` names: a bare task name (``cifar100``, ``cifar``) or a
    VTAB-named id (``vtab-1k-dtd``). ``uoft-cs/cifar100`` is the full dataset, not VTAB-1k."""
    if not dataset or ("/" in dataset and "vtab" not in dataset.lower()):
        return None
    from .data.registry import get_task

    name = dataset.split("/")[-1].lower()
    for candidate in (name, re.sub(r"^vtab[-_]?1k[-_]", "", name)):
        try:
            return get_task(candidate).name
        except ValueError:
            continue
    return None


def _unmerged_copy(model: ConsolidatorModel) -> ConsolidatorModel:
    """A deep copy with the branches unmerged (a merged caller's model must stay merged;
    counts and adapter storage need the branches)."""
    work = copy.deepcopy(model)
    if any(layer.merged for _, layer in work.consolidator_layers()):
        work.unmerge_adapter()
    return work


# ---------------------------------------------------------------------- model card
def build_model_card(
    model: ConsolidatorModel, *, kind: str = "merged", model_name: Optional[str] = None,
    repo_id: Optional[str] = None, base_model: Optional[str] = None, metrics: MetricsLike = None,
    dataset: Optional[str] = None, epochs: Optional[float] = None,
    training_details: Optional[Mapping[str, Any]] = None, preprocessing: Optional[str] = None,
    counts: Optional[Dict[str, int]] = None,
):
    """The ``huggingface_hub.ModelCard`` of a merged model (``kind="merged"``) or of an
    adapter (``kind="adapter"``).

    Metadata: ``base_model`` (when it is a Hub id), ``library_name`` (``transformers`` for a
    merged model, ``consolidator_hf`` for an adapter), ``pipeline_tag: image-classification``,
    tags (``consolidator``, ``vision``, ``image-classification``, ``vtab`` for a VTAB-1k task,
    ``base_model:adapter:<id>`` for an adapter), ``datasets`` and a ``model-index`` with the
    numeric entries of ``metrics`` (needs ``dataset``). The body says how the model was trained
    (groups, drop rate, trainable and stored parameters, epochs) and how to load it.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    model = _require_consolidator(model, "build_model_card")
    if kind not in ("merged", "adapter"):
        raise ValueError(f"kind: expected 'merged' or 'adapter', got {kind!r}")
    cfg = model.consolidator_config
    counts = counts or model.parameter_counts()
    base = _hub_base_model(model, base_model)
    flat = load_metrics(metrics)
    if dataset is None and isinstance(flat.get("task"), str):
        dataset = flat["task"]  # scripts/finetune.py's metrics.json names its task
    task = _vtab_task(dataset)
    results, metric_epochs = _split_metrics(flat)
    epochs = epochs if epochs is not None else metric_epochs
    name = model_name or (repo_id.split("/")[-1] if repo_id else None) or \
        f"{type(model.base_model).__name__}-consolidator"
    load_id = repo_id or f"path/to/{name}"
    arch = type(model.base_model).__name__
    num_labels = getattr(getattr(model.base_model, "config", None), "num_labels", None)

    tags = list(BASE_TAGS)
    if task is not None or (dataset and "vtab" in dataset.lower()):
        tags.append("vtab")
    if kind == "adapter":
        tags.append("adapter")
        if base:
            tags.append(f"base_model:adapter:{base}")
    else:
        tags.append("merged")

    eval_results = None
    if results and dataset:
        eval_results = [
            EvalResult(task_type="image-classification", task_name="Image Classification",
                       dataset_type=dataset,
                       dataset_name=f"VTAB-1k {task}" if task else dataset,
                       dataset_split=split, metric_type=metric, metric_value=value)
            for metric, split, value in results
        ]
    data = ModelCardData(
        base_model=base,
        library_name="transformers" if kind == "merged" else ADAPTER_LIBRARY_NAME,
        pipeline_tag="image-classification", tags=tags,
        datasets=[dataset] if dataset else None, model_name=name,
        eval_results=eval_results, metrics=sorted({m for m, _, _ in results}) or None,
        base_model_relation=("finetune" if kind == "merged" else "adapter") if base else None,
    )

    groups = ", ".join(str(g) for g in cfg.groups)
    percent = 100.0 * counts["trainable"] / counts["base"] if counts["base"] else 0.0
    stored_percent = 100.0 * counts["stored"] / counts["base"] if counts["base"] else 0.0
    rows = [
        ("base model", f"`{base}`" if base else "a local checkpoint"),
        ("architecture", f"`{arch}`" + (f", {num_labels} labels" if num_labels else "")),
        ("method", f"Consolidator: {len(cfg.groups)} grouped branch(es) beside each adapted "
                   f"linear layer, group counts ({groups})"),
        ("channel shuffle", "on" if cfg.channel_shuffle else "off"),
        ("branch drop rate", f"{cfg.drop_rate:g}"),
        ("adapted linear layers", str(len(model.targeted_module_names))),
        ("also trained", ", ".join(
            [s for s, on in (("biases of the adapted layers", cfg.train_bias),
                             ("LayerNorms", cfg.train_layernorm)) if on]
            + [f"`{m}`" for m in (cfg.modules_to_save or [])]) or "nothing else"),
        ("trainable parameters", f"{counts['trainable']:,} ({percent:.2f} % of the base model)"),
        ("stored parameters after consolidation", f"{counts['stored']:,} ({stored_percent:.2f} %)"),
        ("base model parameters", f"{counts['base']:,}"),
    ]
    if epochs is not None:
        rows.append(("epochs", f"{epochs:g}"))
    if dataset:
        rows.append(("dataset", f"`{dataset}`" + (f" (VTAB-1k task `{task}`)" if task else "")))
    for k, v in (training_details or {}).items():
        rows.append((str(k).replace("_", " "), str(v)))
    table = "\n".join(["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])

    if kind == "merged":
        intro = (
            f"A `{arch}` fine-tuned with **Consolidator** (Hao et al., ICLR 2023)"
            f"{f' on `{dataset}`' if dataset else ''} and **merged**: grouped multi-branch "
            "adapters were trained beside the frozen linear layers, then folded exactly into "
            "their weights (`W = W0 + sum_k D_k`, `b = b0 + sum_k c_k`). This is an ordinary "
            f"`{arch}` checkpoint: same architecture and parameter count as the base model, "
            "**no inference overhead**, no extra modules and no custom code. "
            "It loads with plain `from_pretrained`."
        )
        usage = f"""```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{load_id}")
model = AutoModelForImageClassification.from_pretrained("{load_id}").eval()
image = Image.new("RGB", (224, 224))  # your image here
with torch.no_grad():
    logits = model(**processor(images=image, return_tensors="pt")).logits
print(model.config.id2label[int(logits.argmax(-1))])
```"""
    else:
        base_ref = f'"{base}"' if base else '"<the base model>"'
        base_line = f"{arch}.from_pretrained({base_ref}, num_labels={num_labels})"
        intro = (
            f"A **Consolidator** adapter (Hao et al., ICLR 2023) for `{arch}`"
            f"{f' on `{dataset}`' if dataset else ''}: only what training changed, stored after "
            "the paper's stage-1 consolidation (each layer's branches as one delta on the union "
            "of their supports, plus the trained biases, LayerNorms and head). "
            "It needs the base model and `consolidator_hf` to load; merged, it becomes a plain "
            f"`{arch}` with no inference overhead."
        )
        usage = f"""```python
from transformers import {arch}
from consolidator_hf import ConsolidatorModel

base = {base_line}
model = ConsolidatorModel.from_pretrained(base, "{load_id}")  # is_trainable=True to train on
merged = model.merge_and_unload()  # a plain {arch}
```"""
    sections = [f"# {name}", intro, "## How to use", usage, "## Training", table]
    if results:
        metric_rows = "\n".join(f"| {m} | {s or ''} | {v:.6g} |" for m, s, v in results)
        sections += ["## Evaluation", "| metric | split | value |\n| --- | --- | --- |\n" + metric_rows]
    if preprocessing:
        sections += ["## Preprocessing", preprocessing]
    sections += ["## Citation", f"```bibtex\n{CITATION}\n```"]
    body = "\n\n".join(sections) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# ---------------------------------------------------------------------- local folders
def _write_folder(save_directory: PathLike, fill: Callable[[str], None]) -> str:
    """Run ``fill(stage)`` on a staging folder that then replaces ``save_directory`` whole
    (:func:`_io.write_folder`): on any error or kill the old folder stays as it was; files of
    the old folder (e.g. a stale ``pytorch_model.bin``) do not survive beside the new ones."""
    with write_folder(save_directory) as stage:
        fill(stage)
    return os.path.abspath(os.fspath(save_directory))


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
    ``"paper"``; see :func:`default_image_processor`) or ``None`` for the ``"vit"`` preset at
    the model's image size. ``metrics`` (a mapping or a JSON file) fill the card's
    ``model-index``; ``epochs`` defaults to ``metrics["epoch"]``. The merge is done in fp32 on a
    deep copy (``safe_merge`` refuses NaN/inf weights); the caller's model is not modified.
    The folder appears complete or not at all. Returns its path.
    """
    model = _require_consolidator(model, "save_merged")
    processor = _resolve_image_processor(image_processor, model)
    work = _unmerged_copy(model)  # the one deep copy: counted, then merged
    counts = work.parameter_counts()
    card = build_model_card(
        model, kind="merged", repo_id=repo_id,
        model_name=None if repo_id else os.path.basename(os.path.abspath(os.fspath(save_directory))),
        base_model=base_model, metrics=metrics, dataset=dataset, epochs=epochs,
        training_details=training_details, preprocessing=_describe_processor(processor),
        counts=counts,
    )
    merged = _merge_copy(work, safe_merge, id2label)

    def fill(tmp: str) -> None:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        card.save(os.path.join(tmp, CARD_NAME))

    path = _write_folder(save_directory, fill)
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
    model = _require_consolidator(model, "save_adapter")
    base = _hub_base_model(model, base_model)
    source = _unmerged_copy(model)
    card = build_model_card(
        model, kind="adapter", repo_id=repo_id,
        model_name=None if repo_id else os.path.basename(os.path.abspath(os.fspath(save_directory))),
        base_model=base_model, metrics=metrics, dataset=dataset, epochs=epochs,
        training_details=training_details, counts=source.parameter_counts(),
    )

    def fill(tmp: str) -> None:
        source.save_pretrained(tmp)
        if base and not model.consolidator_config.base_model_name_or_path:
            model.consolidator_config.replace(base_model_name_or_path=base).save_pretrained(tmp)
        card.save(os.path.join(tmp, CARD_NAME))

    path = _write_folder(save_directory, fill)
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

    from ._io import load_safetensors, resolve_file
    from .config import WEIGHTS_NAME

    tensors, _ = load_safetensors(resolve_file(adapter, WEIGHTS_NAME, revision=adapter_revision,
                                               token=token))
    heads = [t for k, t in tensors.items() if k.endswith("classifier.weight")]
    kwargs: Dict[str, Any] = {}
    if len(heads) == 1:
        kwargs = {"num_labels": int(heads[0].shape[0]), "ignore_mismatched_sizes": True}
    base = AutoModelForImageClassification.from_pretrained(
        os.fspath(base_model), revision=base_revision, token=token, **kwargs)
    return ConsolidatorModel.from_pretrained(base, adapter, revision=adapter_revision,
                                             token=token, is_trainable=False).eval()


# ---------------------------------------------------------------------- Hub uploads
def _redact(text: str, token: Optional[str]) -> str:
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret and len(secret) >= 8:  # a short "secret" would mangle ordinary words
            text = text.replace(secret, "***")
    return text


def _describe_error(e: BaseException) -> str:
    """One line: the exception and its causes (e.g. LFS upload -> HTTP error), without repeats."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to upload"
    parts: List[str] = []
    seen_ids, seen_msgs = set(), []
    while e is not None and id(e) not in seen_ids:
        seen_ids.add(id(e))
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if not any(msg in m for m in seen_msgs):
            text = f"{type(e).__name__}: {msg}"
            if isinstance(e, HfHubHTTPError) and e.response is not None \
                    and e.response.status_code == 401:
                text += " (authentication failed: pass token=, set HF_TOKEN or run `hf auth login`)"
            parts.append(text)
            seen_msgs.append(msg)
        if isinstance(e, HfHubHTTPError):
            break  # its cause is the raw HTTP error it already describes
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)


def _hub_step(step: str, repo_id: str, token: Optional[str], endpoint: str, fn: Callable[[], Any]):
    try:
        return fn()
    except Exception as e:  # every client or network error becomes one clear message
        detail = _redact(_describe_error(e), token)
        raise HubError(f"could not {step} for Hub repo {repo_id!r} at {endpoint}: {detail}") from None


def check_can_upload(repo_id: str) -> None:
    """Fail before any long work (a merge, a training run): ``ValueError`` for a malformed
    repo id, :class:`HubError` in offline mode."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if not isinstance(repo_id, str):
            raise HFValidationError(f"expected a string, got {type(repo_id).__name__}")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo_id: {repo_id!r} is not a valid Hub repo id "
                         f"('namespace/name'): {e}") from None
    if constants.is_offline_mode():
        raise HubError(f"cannot upload to Hub repo {repo_id!r}: HF_HUB_OFFLINE is set (unset it or "
                       "set HF_HUB_OFFLINE=0 to upload)")


def _upload_folder(folder: str, repo_id: str, *, private: bool, token: Optional[str],
                   commit_message: str, revision: Optional[str]) -> str:
    """``create_repo`` (exist_ok) + optional branch + one commit of every file in ``folder``."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_can_upload(repo_id)
    api = HfApi(token=token)
    endpoint = api.endpoint
    _hub_step("create the repository", repo_id, token, endpoint,
              lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    if revision and revision != "main":
        _hub_step(f"create branch {revision!r}", repo_id, token, endpoint,
                  lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    files = sorted(os.listdir(folder))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
                  for name in files]
    logger.info("uploading %s to %s/%s", ", ".join(files), endpoint, repo_id)
    info = _hub_step("upload the files and commit", repo_id, token, endpoint,
                     lambda: api.create_commit(repo_id, operations, commit_message=commit_message,
                                               revision=revision))
    logger.info("pushed to %s", info.commit_url)
    return str(info.commit_url)


def push_merged(
    model: ConsolidatorModel, repo_id: str, *, private: bool = False, token: Optional[str] = None,
    commit_message: Optional[str] = None, image_processor: Any = None, metrics: MetricsLike = None,
    dataset: Optional[str] = None, revision: Optional[str] = None, base_model: Optional[str] = None,
    epochs: Optional[float] = None, id2label: Optional[Union[Mapping[Any, str], List[str]]] = None,
    training_details: Optional[Mapping[str, Any]] = None, safe_merge: bool = True,
) -> str:
    """Merge a copy of ``model`` and upload it as an ordinary model repo; return the commit URL.

    The repo gets what :func:`save_merged` writes (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``, ``README.md``) in one commit; the repo is created when it does
    not exist (``private`` applies then) and ``revision`` names a branch (created from
    ``main`` when missing). ``token`` defaults to ``HF_TOKEN`` / the login cache and is never
    logged or written. The files are staged in a temporary folder that is removed afterwards,
    whether the upload worked or not; failures raise :class:`HubError`. This is the one call
    a training script needs, e.g. ``push_merged(model, args.push_to_hub, metrics=metrics)``.
    """
    model = _require_consolidator(model, "push_merged")
    check_can_upload(repo_id)
    with tempfile.TemporaryDirectory(prefix="consolidator-push-") as tmp:
        folder = save_merged(model, os.path.join(tmp, "merged"), image_processor=image_processor,
                             metrics=metrics, dataset=dataset, base_model=base_model,
                             epochs=epochs, id2label=id2label, training_details=training_details,
                             repo_id=repo_id, safe_merge=safe_merge)
        return _upload_folder(folder, repo_id, private=private, token=token, revision=revision,
                              commit_message=commit_message or "Upload merged Consolidator model")


def push_adapter(
    model: ConsolidatorModel, repo_id: str, *, private: bool = False, token: Optional[str] = None,
    commit_message: Optional[str] = None, metrics: MetricsLike = None,
    dataset: Optional[str] = None, revision: Optional[str] = None, base_model: Optional[str] = None,
    epochs: Optional[float] = None, training_details: Optional[Mapping[str, Any]] = None,
) -> str:
    """Upload only the adapter files (what :func:`save_adapter` writes) and their card; return
    the commit URL. ``ConsolidatorModel.from_pretrained(base, repo_id)`` loads them back."""
    model = _require_consolidator(model, "push_adapter")
    check_can_upload(repo_id)
    with tempfile.TemporaryDirectory(prefix="consolidator-push-") as tmp:
        folder = save_adapter(model, os.path.join(tmp, "adapter"), metrics=metrics,
                              dataset=dataset, base_model=base_model, epochs=epochs,
                              training_details=training_details, repo_id=repo_id)
        return _upload_folder(folder, repo_id, private=private, token=token, revision=revision,
                              commit_message=commit_message or "Upload Consolidator adapter")


# FinetuneConfig fields a model card reports for a training run.
RUN_DETAILS = ("learning_rate", "weight_decay", "batch_size", "num_train_epochs", "warmup_epochs",
                "min_lr", "seed", "preprocess", "recipe", "train_split")


def push_training_run(
    output_dir: PathLike, repo_id: str, *, private: bool = False, token: Optional[str] = None,
    commit_message: Optional[str] = None, revision: Optional[str] = None,
    base_model: Optional[str] = None,
) -> str:
    """Publish a finished ``scripts/finetune.py`` run: merge ``<output_dir>/adapter`` onto its
    base (``metrics.json``'s ``model``, or ``base_model``) and :func:`push_merged` it with the
    run's metrics, labels (``merged/config.json``), image processor (``merged/``) and recipe
    in the card. Returns the commit URL. This is what ``finetune.py --push-to-hub`` calls."""
    out = os.fspath(output_dir)
    check_can_upload(repo_id)
    metrics_path = os.path.join(out, "metrics.json")
    metrics = load_metrics(metrics_path)
    base = base_model or metrics.get("model") or metrics.get("config_model")
    if not base:
        raise ValueError(f"{metrics_path}: names no base model; pass base_model=")
    merged_dir = os.path.join(out, "merged")
    model = load_for_publishing(base, os.path.join(out, "adapter"), token=token)
    from transformers import AutoConfig, AutoImageProcessor

    id2label = AutoConfig.from_pretrained(merged_dir).id2label
    processor = AutoImageProcessor.from_pretrained(merged_dir)
    details = {k: metrics[f"config_{k}"] for k in RUN_DETAILS
               if metrics.get(f"config_{k}") is not None}
    return push_merged(model, repo_id, private=private, token=token, revision=revision,
                       commit_message=commit_message or f"Upload {metrics.get('task', 'run')} "
                                                        "(merged Consolidator model)",
                       image_processor=processor, metrics=metrics_path, id2label=id2label,
                       base_model=base if _is_hub_id(base) else None,
                       training_details=details)


__all__ = [
    "CARD_NAME",
    "HubError",
    "build_model_card",
    "check_can_upload",
    "default_image_processor",
    "load_for_publishing",
    "load_metrics",
    "push_adapter",
    "push_merged",
    "push_training_run",
    "save_adapter",
    "save_merged",
]
