"""Checkpoint conversion: the paper's layout and plain timm ViTs -> Hugging Face folders.

Checkpoints are built here from the docs/DESIGN.md semantics with random weights, and every converted
model is compared with this file's own reference forward of the checkpoint tensors (a small
timm-style ViT written in pure torch; it does not use consolidator_hf).
"""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from consolidator_hf import ConsolidatorModel
from consolidator_hf.convert import ConversionError, convert_checkpoint, load_checkpoint
from script_module import load_script
from fresh_python import run_fresh

D, M, P, GRID, DEPTH, LABELS = 64, 128, 4, 4, 2, 5
GROUPS = (8, 4)  # two branches
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_original.py")
LAYERS = {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (M, D), "mlp.fc2": (D, M)}


# ---------------------------------------------------------------------- checkpoints

def make_state(seed=0, branches=GROUPS, head=True):
    """A state dict in the paper's layout (docs/DESIGN.md section 4); ``branches=()``: plain timm."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    sd = {"cls_token": r(1, 1, D, s=1), "pos_embed": r(1, 1 + GRID * GRID, D),
          "patch_embed.proj.weight": r(D, 3, P, P), "patch_embed.proj.bias": r(D),
          "norm.weight": 1 + r(D), "norm.bias": r(D)}
    if head:
        sd["head.weight"], sd["head.bias"] = r(LABELS, D, s=1), r(LABELS)
    for i in range(DEPTH):
        for n in ("norm1", "norm2"):
            sd[f"blocks.{i}.{n}.weight"], sd[f"blocks.{i}.{n}.bias"] = 1 + r(D), r(D)
        for name, (out_f, in_f) in LAYERS.items():
            pre = f"blocks.{i}.{name}"
            if not branches:
                sd[f"{pre}.weight"], sd[f"{pre}.bias"] = r(out_f, in_f), r(out_f)
                continue
            sd[f"{pre}.fc_origin.weight"], sd[f"{pre}.fc_origin.bias"] = r(out_f, in_f, 1), r(out_f)
            for k, groups in enumerate(branches):
                sd[f"{pre}.fc_rep_branches.{k}.group_fc.weight"] = r(out_f, in_f // groups, 1)
                sd[f"{pre}.fc_rep_branches.{k}.group_fc.bias"] = r(out_f)
    return sd


def save_checkpoint(path, state, **extra):
    torch.save({"model": state, "epoch": 99, **extra}, path)
    return str(path)


# ---------------------------------------------------------------------- the reference forward

def shuffle(x, g):
    """docs/DESIGN.md: x'[j*g + i] = x[i*(in/g) + j]."""
    return x.unflatten(-1, (g, x.shape[-1] // g)).transpose(-1, -2).flatten(-2)


def linear(sd, pre, x, channel_shuffle):
    """fc_origin + sum over branches of a grouped 1x1 conv over the (shuffled) input."""
    if f"{pre}.weight" in sd:
        return F.linear(x, sd[f"{pre}.weight"], sd[f"{pre}.bias"])
    y = F.linear(x, sd[f"{pre}.fc_origin.weight"][..., 0], sd[f"{pre}.fc_origin.bias"])
    k = 0
    while f"{pre}.fc_rep_branches.{k}.group_fc.weight" in sd:
        w = sd[f"{pre}.fc_rep_branches.{k}.group_fc.weight"]
        g = x.shape[-1] // w.shape[1]
        xs = shuffle(x, g) if channel_shuffle else x
        conv = F.conv1d(xs.reshape(-1, x.shape[-1], 1), w, sd[f"{pre}.fc_rep_branches.{k}.group_fc.bias"],
                        groups=g)
        y = y + conv.reshape(*x.shape[:-1], -1)
        k += 1
    return y


def reference_forward(sd, x, heads, channel_shuffle=False):
    """timm ViT: patches + CLS + pos; blocks x += attn(norm1 x), x += mlp(norm2 x); norm; head(CLS)."""
    ln = lambda t, n: F.layer_norm(t, (D,), sd[f"{n}.weight"], sd[f"{n}.bias"], eps=1e-6)  # noqa: E731
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=P)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    B, N, _ = t.shape
    hd = D // heads
    for i in range(DEPTH):
        b = f"blocks.{i}"
        qkv = linear(sd, f"{b}.attn.qkv", ln(t, f"{b}.norm1"), channel_shuffle)
        q, k, v = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(-1)
        t = t + linear(sd, f"{b}.attn.proj", (attn @ v).transpose(1, 2).reshape(B, N, D), channel_shuffle)
        h = F.gelu(linear(sd, f"{b}.mlp.fc1", ln(t, f"{b}.norm2"), channel_shuffle))
        t = t + linear(sd, f"{b}.mlp.fc2", h, channel_shuffle)
    t = ln(t, "norm")
    return F.linear(t[:, 0], sd["head.weight"], sd["head.bias"]) if "head.weight" in sd else t


def pixels(n=3, seed=5):
    return torch.randn(n, 3, GRID * P, GRID * P, generator=torch.Generator().manual_seed(seed))


LOAD_SCRIPT = """
import json, sys, torch
import transformers
from transformers import AutoImageProcessor, ViTForImageClassification, ViTModel
jobs = json.load(open(sys.argv[1]))
x = torch.load(jobs["x"], weights_only=True)
out = {}
for name, (folder, cls) in jobs["folders"].items():
    model = getattr(transformers, cls).from_pretrained(folder).eval()
    with torch.no_grad():
        o = model(x)
    out[name] = o.logits if cls == "ViTForImageClassification" else o.last_hidden_state
    AutoImageProcessor.from_pretrained(folder)
assert "consolidator_hf" not in sys.modules
torch.save(out, jobs["y"])
"""


def load_in_fresh_process(tmp_path, folders, x):
    """Load each folder with plain transformers in a new process (no consolidator_hf)."""
    torch.save(x, tmp_path / "x.pt")
    jobs = {"x": str(tmp_path / "x.pt"), "y": str(tmp_path / "y.pt"), "folders": folders}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_fresh(LOAD_SCRIPT, str(tmp_path / "jobs.json"), cwd=tmp_path, check=True)
    return torch.load(tmp_path / "y.pt", weights_only=True)


# ---------------------------------------------------------------------- conversion

def test_paper_checkpoints_convert_to_merged_models(tmp_path):
    """Two branches, shuffle on and off, default (hidden/64 = 1) and explicit (4) heads."""
    state = make_state()
    ckpt = save_checkpoint(tmp_path / "paper.pth", state, args=argparse.Namespace(lr=1e-3))
    x = pixels()
    folders, expected = {}, {}
    for shuffle_on in (False, True):
        for heads in (None, 4):
            name = f"shuffle{int(shuffle_on)}_heads{heads}"
            out = tmp_path / name
            vit = convert_checkpoint(ckpt, out, num_heads=heads, channel_shuffle=shuffle_on)
            assert vit.branch_summary()["blocks.0.attn.qkv"] == list(GROUPS)
            folders[name] = (str(out), "ViTForImageClassification")
            expected[name] = reference_forward(state, x, heads or D // 64, shuffle_on)
            cfg = json.loads((out / "config.json").read_text())
            assert cfg["layer_norm_eps"] == 1e-6 and cfg["num_attention_heads"] == (heads or 1)
            assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (D, M, DEPTH)
            assert (cfg["patch_size"], cfg["image_size"], len(cfg["id2label"])) == (P, GRID * P, LABELS)
            assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors",
                                               "preprocessor_config.json"]
    got = load_in_fresh_process(tmp_path, folders, x)
    for name in folders:
        assert (got[name] - expected[name]).abs().max() <= 1e-4, name
    # the cases really differ: shuffle and head count change the function
    assert (expected["shuffle0_headsNone"] - expected["shuffle1_headsNone"]).abs().max() > 1e-2
    assert (expected["shuffle0_headsNone"] - expected["shuffle0_heads4"]).abs().max() > 1e-2
    pre = json.loads((tmp_path / "shuffle0_headsNone" / "preprocessor_config.json").read_text())
    assert pre["resample"] == 3  # PIL bicubic
    assert pre["image_mean"] == [0.485, 0.456, 0.406] and pre["image_std"] == [0.229, 0.224, 0.225]
    assert pre["size"] == {"height": GRID * P, "width": GRID * P}
    card = (tmp_path / "shuffle1_heads4" / "README.md").read_text()
    assert "library_name: transformers" in card and "channel shuffle on" in card


def run_script_in_process(argv):
    return load_script("convert_original").main(argv)


def test_adapter_output_loads_unmerged_merges_and_trains(tmp_path, capsys):
    from transformers import ViTForImageClassification

    state = make_state(seed=1)
    ckpt = save_checkpoint(tmp_path / "paper.pth", state)
    out = tmp_path / "adapter"
    assert run_script_in_process(["--checkpoint", ckpt, "--output", str(out), "--adapter",
                                  "--channel-shuffle", "--num-heads", "4"]) == 0
    assert "base + adapter" in capsys.readouterr().out
    x = pixels()
    ref = reference_forward(state, x, 4, channel_shuffle=True)
    model = ConsolidatorModel.from_pretrained(ViTForImageClassification.from_pretrained(out), out,
                                             is_trainable=True).eval()
    cfg = model.consolidator_config
    assert (cfg.groups, cfg.channel_shuffle, cfg.qkv_grouping) == (GROUPS, True, "fused")
    unmerged = model(x).logits
    assert (unmerged - ref).abs().max() <= 1e-4
    # the paper's qkv branch maps one-to-one onto the fused q/k/v branches
    k = model.base_model.get_submodule("vit.layers.1.attention.k_proj").branches[1].weight
    assert torch.equal(k, state["blocks.1.attn.qkv.fc_rep_branches.1.group_fc.weight"][D:2 * D, :, 0])
    # the base alone is the frozen W0 network
    base = ViTForImageClassification.from_pretrained(out).eval()
    assert (base(x).logits - ref).abs().max() > 1e-2
    # it trains further: branches get gradients, one step changes the output
    model.train()
    loss = model(pixel_values=x, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".branches." in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    model.eval()
    model.merge_adapter()
    assert (model(x).logits - unmerged).abs().max() <= 1e-5


def test_plain_timm_vit_converts_to_a_backbone(tmp_path):
    """MoCo v3 style: module.base_encoder. prefixes under 'state_dict', no classifier head."""
    state = make_state(seed=2, branches=(), head=False)
    moco = {f"module.base_encoder.{k}": v for k, v in state.items()}
    moco.update({f"module.momentum_encoder.{k}": v for k, v in state.items()})
    moco["module.base_encoder.head.0.weight"] = torch.randn(16, D)  # the SSL projection MLP
    moco["module.predictor.0.weight"] = torch.randn(16, 16)
    ckpt = tmp_path / "mocov3.pth.tar"
    torch.save({"state_dict": moco, "arch": "vit_base", "epoch": 300}, ckpt)
    backbone = tmp_path / "backbone"
    vit = convert_checkpoint(ckpt, backbone)
    assert vit.num_labels == 0 and not vit.has_branches and len(vit.dropped_keys) == len(state) + 2
    # with a head: a classifier whose weights are the timm head
    state_head = make_state(seed=3, branches=())
    torch.save({f"module.{k}": v for k, v in state_head.items()}, tmp_path / "timm.pth")
    classifier = tmp_path / "classifier"
    convert_checkpoint(tmp_path / "timm.pth", classifier, num_heads=2)
    x = pixels()
    got = load_in_fresh_process(tmp_path, {"backbone": (str(backbone), "ViTModel"),
                                           "classifier": (str(classifier), "ViTForImageClassification")}, x)
    hidden = reference_forward(state, x, heads=1)
    assert got["backbone"].shape == hidden.shape == (3, 1 + GRID * GRID, D)
    assert (got["backbone"] - hidden).abs().max() <= 1e-4
    assert (got["classifier"] - reference_forward(state_head, x, heads=2)).abs().max() <= 1e-4
    assert not os.path.exists(backbone / "consolidator_config.json")


def test_safetensors_checkpoint_and_module_prefix(tmp_path):
    from safetensors.torch import save_file

    state = make_state(seed=4)
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "c.safetensors")
    loaded, dropped = load_checkpoint(tmp_path / "c.safetensors")
    assert set(loaded) == set(state) and not dropped
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# ---------------------------------------------------------------------- bad inputs

class NotWeights:  # a pickle of this needs code (this class) to load
    def __init__(self):
        self.x = 1


def nothing_written(tmp_path, out):
    return not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def corrupt(tmp_path, kind):
    state = make_state()
    if kind == "truncated":
        path = save_checkpoint(tmp_path / "c.pth", state)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        return path, r"not a readable torch checkpoint \(truncated or corrupt\?\)"
    if kind == "code":
        return save_checkpoint(tmp_path / "c.pth", state, args=NotWeights()), \
            r"needs arbitrary code execution.*weights_only=True"
    if kind == "missing":
        del state["blocks.1.norm2.weight"], state["blocks.0.mlp.fc2.fc_origin.bias"]
        return save_checkpoint(tmp_path / "c.pth", state), \
            r"missing keys: \['blocks.0.mlp.fc2.fc_origin.bias', 'blocks.1.norm2.weight'\]"
    if kind == "unknown":
        state["blocks.0.ls1.gamma"] = torch.ones(D)
        state["dist_token"] = torch.ones(1, 1, D)
        return save_checkpoint(tmp_path / "c.pth", state), \
            r"unknown keys: \['blocks.0.ls1.gamma', 'dist_token'\]"
    if kind == "qkv_shape":
        state["blocks.1.attn.qkv.fc_origin.weight"] = torch.zeros(2 * D, D, 1)
        return save_checkpoint(tmp_path / "c.pth", state), \
            r"blocks.1.attn.qkv.fc_origin.weight: shape \(128, 64, 1\), expected \(192, 64, 1\)"
    if kind == "branch_shape":
        state["blocks.0.mlp.fc1.fc_rep_branches.1.group_fc.weight"] = torch.zeros(M, 7, 1)
        return save_checkpoint(tmp_path / "c.pth", state), \
            r"blocks.0.mlp.fc1.fc_rep_branches.1.group_fc.weight: shape \(128, 7, 1\)"
    if kind == "pos_embed":
        state["pos_embed"] = torch.zeros(1, 1 + 15, D)
        return save_checkpoint(tmp_path / "c.pth", state), r"'pos_embed' has shape \(1, 16, 64\)"
    if kind == "not_vit":
        return save_checkpoint(tmp_path / "c.pth", {"fc.weight": torch.zeros(2, 2)}), \
            r"not a timm ViT: 'patch_embed.proj.weight' is missing"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "code", "missing", "unknown", "qkv_shape",
                                  "branch_shape", "pos_embed", "not_vit"])
def test_bad_checkpoints_raise_clear_errors_and_write_nothing(tmp_path, kind):
    path, message = corrupt(tmp_path, kind)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(path, out)
    assert nothing_written(tmp_path, out)


def test_cli_reports_errors_and_writes_nothing(tmp_path):
    path, _ = corrupt(tmp_path, "missing")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, SCRIPT, "--checkpoint", path, "--output", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "missing keys" in r.stderr and "blocks.1.norm2.weight" in r.stderr
    assert nothing_written(tmp_path, out)


def test_other_refusals_write_nothing(tmp_path, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "paper.pth", make_state())
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="num_heads=3 does not divide the hidden size 64"):
        convert_checkpoint(ckpt, out, num_heads=3)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        convert_checkpoint(tmp_path / "nope.pth", out)
    plain = save_checkpoint(tmp_path / "plain.pth", make_state(branches=()))
    with pytest.raises(ConversionError, match="needs Consolidator branches"):
        convert_checkpoint(plain, out, adapter=True)
    mixed = make_state()
    for key in [k for k in mixed if k.startswith("blocks.1.mlp.fc1.fc_rep_branches.1.")]:
        del mixed[key]
    with pytest.raises(ConversionError, match="same branches"):
        convert_checkpoint(save_checkpoint(tmp_path / "mixed.pth", mixed), out, adapter=True)
    assert nothing_written(tmp_path, out)
    # a failure while writing leaves neither the folder nor a temp dir behind
    from transformers import ViTImageProcessor

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ViTImageProcessor, "save_pretrained", fail)
    monkeypatch.setattr(type(ViTImageProcessor()), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(ckpt, out)
    assert nothing_written(tmp_path, out)
    # an existing non-empty folder is not replaced without overwrite
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(ckpt, out)
    assert os.listdir(out) == ["keep.txt"]
    convert_checkpoint(ckpt, out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
