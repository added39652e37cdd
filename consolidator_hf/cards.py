"""Model cards, built in one place for every folder this project writes.

:func:`render_card` is the one builder: the YAML front matter always comes from
``huggingface_hub.ModelCardData`` (never hand-written YAML) and the body is Markdown. The
``*_card`` functions below say what each kind of folder's card holds:

- :func:`build_model_card`: a merged Consolidator model (``kind="merged"``) or an adapter
  (``kind="adapter"``), with a model-index from the run's metrics;
- :func:`baseline_card`: a merged baseline run of ``run_finetune`` (linear, bitfit, full, lora);
- :func:`converted_card`: a checkpoint of the paper's code or a timm ViT, converted;
- :func:`backbone_card`: a backbone folder (pretrained or converted) with its origin.
"""

from __future__ import annotations

import math
import json
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .io import PathLike, is_hub_id
from .model import ConsolidatorModel

CARD_NAME = "README.md"
ADAPTER_LIBRARY_NAME = "consolidator_hf"
BASE_TAGS = ("consolidator", "vision", "image-classification")

MetricsLike = Union[Mapping[str, Any], PathLike, None]

CITATION = """@inproceedings{hao2023consolidator,
  title     = {Consolidator: Mergeable Adapter with Grouped Connections for Visual Adaptation},
  author    = {Hao, Tianxiang and Chen, Hui and Guo, Yuchen and Ding, Guiguang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}"""


def render_card(data: Any, body: str):
    """A ``huggingface_hub.ModelCard`` from ``ModelCardData`` (or its keyword arguments) and a
    Markdown body."""
    from huggingface_hub import ModelCard, ModelCardData

    if isinstance(data, Mapping):
        data = ModelCardData(**data)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.lstrip()}")


def table(rows: Iterable[Tuple[str, Any]]) -> str:
    """A two-column Markdown table with no header labels."""
    return "\n".join(["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def require_consolidator(model: Any, func: str) -> ConsolidatorModel:
    if not isinstance(model, ConsolidatorModel):
        raise TypeError(f"{func}: expected a ConsolidatorModel (from get_consolidator_model or "
                        f"ConsolidatorModel.from_pretrained), got {type(model).__name__}")
    return model


def vtab_task(dataset: Optional[str]) -> Optional[str]:
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


def split_metrics(flat: Mapping[str, Any]) -> Tuple[List[Tuple[str, Optional[str], float]],
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


def hub_base_model(model: ConsolidatorModel, base_model: Optional[str]) -> Optional[str]:
    """The base model's Hub id for the card: ``base_model`` if given, else the adapter config's
    ``base_model_name_or_path`` or the base model's ``name_or_path`` when they are Hub ids
    (``None`` when the base is only known as a local path)."""
    if base_model is not None:
        if not is_hub_id(base_model):
            raise ValueError(f"base_model: {base_model!r} is not a Hub repo id ('namespace/name')")
        return base_model
    for candidate in (model.consolidator_config.base_model_name_or_path,
                      getattr(model.base_model, "name_or_path", None)):
        if candidate and is_hub_id(candidate):
            return candidate
    return None


def build_model_card(
    model: ConsolidatorModel, *, kind: str = "merged", model_name: Optional[str] = None,
    repo_id: Optional[str] = None, base_model: Optional[str] = None, metrics: MetricsLike = None,
    dataset: Optional[str] = None, epochs: Optional[float] = None,
    training_details: Optional[Mapping[str, Any]] = None, preprocessing: Optional[str] = None,
    counts: Optional[Dict[str, int]] = None, local_path: Optional[str] = None,
):
    """The ``huggingface_hub.ModelCard`` of a merged model (``kind="merged"``) or of an
    adapter (``kind="adapter"``).

    Metadata: ``base_model`` (when it is a Hub id), ``library_name`` (``transformers`` for a
    merged model, ``consolidator_hf`` for an adapter), ``pipeline_tag: image-classification``,
    tags (``consolidator``, ``vision``, ``image-classification``, ``vtab`` for a VTAB-1k task,
    ``base_model:adapter:<id>`` for an adapter), ``datasets`` and a ``model-index`` with the
    numeric entries of ``metrics`` (needs ``dataset``). The body says how the model was trained
    (groups, drop rate, trainable and stored parameters, epochs) and how to load it, from
    ``repo_id``, else from ``local_path`` (the folder the card is saved in), else from ``"."``.
    """
    from huggingface_hub import EvalResult, ModelCardData

    model = require_consolidator(model, "build_model_card")
    if kind not in ("merged", "adapter"):
        raise ValueError(f"kind: expected 'merged' or 'adapter', got {kind!r}")
    cfg = model.consolidator_config
    counts = counts or model.parameter_counts()
    base = hub_base_model(model, base_model)
    flat = load_metrics(metrics)
    if dataset is None and isinstance(flat.get("task"), str):
        dataset = flat["task"]  # scripts/finetune.py's metrics.json names its task
    task = vtab_task(dataset)
    results, metric_epochs = split_metrics(flat)
    epochs = epochs if epochs is not None else metric_epochs
    name = model_name or (repo_id.split("/")[-1] if repo_id else None) or \
        f"{type(model.base_model).__name__}-consolidator"
    load_id = repo_id or (os.fspath(local_path) if local_path else ".")  # never a placeholder
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
    sections = [f"# {name}", intro, "## How to use", usage, "## Training", table(rows)]
    if results:
        if any(s for _, s, _ in results):
            metric_rows = "\n".join(f"| {m} | {s or '-'} | {v:.6g} |" for m, s, v in results)
            header = "| metric | split | value |\n| --- | --- | --- |\n"
        else:  # no split known: no empty column
            metric_rows = "\n".join(f"| {m} | {v:.6g} |" for m, _, v in results)
            header = "| metric | value |\n| --- | --- |\n"
        sections += ["## Evaluation", header + metric_rows]
    if preprocessing:
        sections += ["## Preprocessing", preprocessing]
    sections += ["## Citation", f"```bibtex\n{CITATION}\n```"]
    body = "\n\n".join(sections) + "\n"
    return render_card(data, body)




def baseline_card(cfg: Any, metrics: Mapping[str, Any], local_path: Optional[str] = None):
    """The card of a merged run of ``run_finetune`` (``cfg``: its ``FinetuneConfig``)."""
    method = cfg.method
    where = local_path or "."
    rows = [
        ("base model", f"`{cfg.model}`"),
        ("task", f"`{cfg.task}` (train: `{cfg.train_split}`, {metrics.get('num_train_examples')} "
                 f"images; eval: `{cfg.eval_split}`, {metrics.get('num_eval_examples')} images)"),
        ("method", method + (f" (groups={list(cfg.groups)}, channel_shuffle={cfg.channel_shuffle}, "
                             f"drop_rate={cfg.drop_rate})" if method == "consolidator" else "")),
        (f"top-1 accuracy ({cfg.eval_split})", f"{100 * metrics['accuracy']:.2f} %"),
        ("trainable / stored parameters",
         f"{metrics['trainable_params']:,} / {metrics['stored_params']:,}"),
        ("schedule", f"AdamW, lr {cfg.learning_rate:g}, weight decay {cfg.weight_decay:g}, "
                     f"{cfg.num_train_epochs:g} epochs, batch {cfg.batch_size}, warmup "
                     f"{cfg.warmup_epochs:g} epochs, cosine to {cfg.min_lr:g}"),
        ("preprocessing", f"`{cfg.preprocess}` at {metrics.get('image_size')} px"),
        ("seed", cfg.seed),
    ]
    merged_note = (" (Consolidator branches merged exactly into the linear weights, zero "
                   "inference overhead)" if method == "consolidator" else "")
    body = f"""# {cfg.task} ({method}) on {os.path.basename(cfg.model.rstrip('/'))}

A plain `{metrics.get('architecture', 'ViTForImageClassification')}`: {method} fine-tuning
with `consolidator_hf`{merged_note}. It loads with `transformers` alone:

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained("{where}")
processor = AutoImageProcessor.from_pretrained("{where}")
```

{table(rows)}
"""
    return render_card(dict(library_name="transformers", pipeline_tag="image-classification",
                            tags=list(BASE_TAGS) + [method],
                            base_model=cfg.model if is_hub_id(cfg.model) else None), body)


def converted_card(*, class_name: str, source: str, origin: str, what: str,
                   rows: Sequence[Tuple[str, Any]], preprocessing: str, usage: str,
                   tags: Sequence[str], pipeline_tag: str):
    """The card of a converted checkpoint (``convert.convert_checkpoint``)."""
    body = f"""# {class_name} converted from `{os.path.basename(source)}`

Converted with `consolidator_hf` (`scripts/convert_original.py`) from {origin}: {what}

{table(rows)}

{preprocessing}

{usage}
"""
    return render_card(dict(library_name="transformers", pipeline_tag=pipeline_tag,
                            tags=list(tags)), body)


def backbone_card(*, title: str, sections: Sequence[Tuple[str, str]], tags: Sequence[str],
                  license: Optional[str] = None, pipeline_tag: Optional[str] = None):
    """The card of a backbone folder (pretrained here, or converted from a package's weights):
    a title and ``(heading, text)`` sections saying where it comes from and what it is."""
    body = f"# {title}\n\n" + "\n\n".join(
        (f"**{heading}.** {text}" if heading else text) for heading, text in sections) + "\n"
    return render_card(dict(library_name="transformers", license=license,
                            pipeline_tag=pipeline_tag, tags=list(tags)), body)
