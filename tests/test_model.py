import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from consolidator_hf import (
    ConsolidatorConfig,
    ConsolidatorLinear,
    ConsolidatorModel,
    get_consolidator_model,
)
from consolidator_hf.targets import TARGET_MODULES, default_target_modules, rename_4_to_5
from tiny import perturb_trainables, pixels, tiny_deit, tiny_dinov2, tiny_vit
from fresh_python import run_fresh


def cfg(**kw):
    kw.setdefault("groups", (8,))
    kw.setdefault("init_range", 0.05)
    return ConsolidatorConfig(**kw)


@pytest.mark.parametrize("groups", [(8,), (8, 4)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("branch_bias", [False, True])
def test_merged_equals_unmerged(groups, shuffle, branch_bias):
    base = tiny_vit()
    x = pixels()
    plain = base(x).logits
    model = get_consolidator_model(base, cfg(groups=groups, channel_shuffle=shuffle,
                                             branch_bias=branch_bias, drop_rate=0.3)).eval()
    perturb_trainables(model)
    y = model(pixels()).logits
    assert (y - plain).abs().max() > 1e-3  # the adapter really changes the output
    model.merge_adapter()
    assert (model(x).logits - y).abs().max() <= 1e-5
    model.unmerge_adapter()
    assert (model(x).logits - y).abs().max() <= 1e-5


def test_merge_and_unload_returns_plain_model():
    model = get_consolidator_model(tiny_vit(), cfg(groups=(8, 4))).eval()
    perturb_trainables(model)
    y = model(pixels()).logits
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "ViTForImageClassification"
    assert not any(isinstance(m, ConsolidatorLinear) for m in merged.modules())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("q_proj", "fc1")))
    assert set(merged.state_dict()) == set(tiny_vit().state_dict())
    assert (merged(pixels()).logits - y).abs().max() <= 1e-5


def test_unload_returns_untouched_base():
    base = tiny_vit()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_consolidator_model(base, cfg())
    perturb_trainables(model)
    plain = model.unload()
    assert set(plain.state_dict()) == set(reference)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_freezing_policy_and_counts(capsys):
    model = get_consolidator_model(tiny_vit(), cfg())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.vit.layers.0.attention.q_proj.branches.0.weight" in trainable
    assert "base_model.vit.layers.0.attention.q_proj.base_layer.bias" in trainable
    assert "base_model.vit.layers.0.layernorm_before.weight" in trainable
    assert "base_model.classifier.weight" in trainable
    assert "base_model.vit.layers.0.attention.q_proj.base_layer.weight" not in trainable
    assert "base_model.vit.embeddings.patch_embeddings.projection.weight" not in trainable
    assert "base_model.vit.embeddings.cls_token" not in trainable
    assert len(model.targeted_module_names) == 12
    counts = model.parameter_counts()
    # hidden 32, mlp 64, groups 8: q/k/v/o 32x4, fc1 64x4, fc2 32x8 (+ branch biases)
    per_block = 4 * (32 * 4 + 32) + (64 * 4 + 64) + (32 * 8 + 32)
    assert counts["branch"] == 2 * per_block
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"{counts['trainable']:,}" in out and "stored after consolidation" in out

    frozen = get_consolidator_model(tiny_vit(), cfg(train_bias=False, train_layernorm=False,
                                                    modules_to_save=None))
    names = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert names and all(".branches." in n for n in names)


def test_forward_passes_labels_and_trains():
    model = get_consolidator_model(tiny_vit(), cfg()).train()
    out = model(pixel_values=pixels(4), labels=torch.tensor([0, 1, 2, 0]))
    assert out.loss is not None and out.loss.ndim == 0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert model.config.num_labels == 3  # attribute lookup falls through to the base model


def test_save_load_roundtrip_and_file_contents(tmp_path):
    model = get_consolidator_model(tiny_vit(), cfg(groups=(8, 4), channel_shuffle=True)).eval()
    perturb_trainables(model)
    y = model(pixels()).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["consolidator_config.json", "consolidator_model.safetensors"]
    path = tmp_path / "consolidator_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    frozen = {n for n, p in tiny_vit().named_parameters()} - {
        n.replace(".base_layer.", ".").removeprefix("base_model.")
        for n, p in model.named_parameters() if p.requires_grad}
    assert not frozen & set(keys), "a frozen backbone tensor was saved"
    assert not any(k.endswith(".weight") and ("q_proj" in k or "fc1" in k) for k in keys)
    assert "vit.layers.0.attention.q_proj.delta" in keys
    # tensor bytes == stored parameters x dtype size (+ header)
    stored = model.parameter_counts()["stored"]
    assert sum(t.numel() for t in tensors.values()) == stored
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert os.path.getsize(path) == 8 + header + 4 * stored

    loaded = ConsolidatorModel.from_pretrained(tiny_vit(), tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert (loaded(pixels()).logits - y).abs().max() <= 1e-5
    trainable = ConsolidatorModel.from_pretrained(tiny_vit(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}  # can keep training


def test_unconsolidated_save_is_exact_training_state(tmp_path):
    model = get_consolidator_model(tiny_vit(), cfg(groups=(8, 4))).eval()
    perturb_trainables(model)
    model.save_pretrained(tmp_path, consolidate=False)
    loaded = ConsolidatorModel.from_pretrained(tiny_vit(), tmp_path, is_trainable=True)
    a = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_nested_supports_cost_no_more_than_the_larger():
    one = get_consolidator_model(tiny_vit(), cfg(groups=(4,), branch_bias=False))
    two = get_consolidator_model(tiny_vit(), cfg(groups=(8, 4), branch_bias=False))
    shuffled = get_consolidator_model(tiny_vit(), cfg(groups=(8, 4), channel_shuffle=True,
                                                      branch_bias=False))
    delta = lambda m: sum(l.stored_numel() for _, l in m.consolidator_layers())
    assert delta(two) == delta(one)
    assert delta(two) < sum(p.numel() for _, l in two.consolidator_layers()
                            for p in l.branches.parameters())
    assert delta(shuffled) > delta(one)  # shuffled supports are not nested


def test_merged_model_loads_without_consolidator_hf(tmp_path):
    model = get_consolidator_model(tiny_vit(), cfg(groups=(8, 4), channel_shuffle=True)).eval()
    perturb_trainables(model)
    x = pixels()
    y = model(x).logits
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, torch
from transformers import ViTForImageClassification
m = ViTForImageClassification.from_pretrained({str(tmp_path / 'merged')!r}).eval()
assert 'consolidator_hf' not in sys.modules
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
with torch.no_grad():
    torch.save(m(x).logits, {str(tmp_path / 'y.pt')!r})
"""
    run_fresh(script, cwd=tmp_path, check=True)
    y2 = torch.load(tmp_path / "y.pt", weights_only=True)
    assert (y2 - y).abs().max() <= 1e-5


@pytest.mark.parametrize("factory", [tiny_deit, tiny_dinov2])
def test_other_architectures(factory, tmp_path):
    base = factory()
    model = get_consolidator_model(base, cfg(groups=(8, 4))).eval()
    assert len(model.targeted_module_names) == 12
    perturb_trainables(model)
    y = model(pixels()).logits
    model.save_pretrained(tmp_path)
    loaded = ConsolidatorModel.from_pretrained(factory(), tmp_path).eval()
    assert (loaded(pixels()).logits - y).abs().max() <= 1e-5
    merged = loaded.merge_and_unload()
    assert type(merged) is type(base)
    assert (merged(pixels()).logits - y).abs().max() <= 1e-5


def test_target_table_covers_both_naming_schemes():
    vit = TARGET_MODULES["vit"]
    assert vit["5.x"] == ["attention.q_proj", "attention.k_proj", "attention.v_proj",
                          "attention.o_proj", "mlp.fc1", "mlp.fc2"]
    assert vit["4.x"] == ["attention.attention.query", "attention.attention.key",
                          "attention.attention.value", "attention.output.dense",
                          "intermediate.dense", "output.dense"]
    v4 = [f"vit.encoder.layer.0.{t}" for t in vit["4.x"]]
    v5 = [f"vit.layers.0.{t}" for t in vit["5.x"]]
    assert [rename_4_to_5(n, "vit") for n in v4] == v5
    assert rename_4_to_5("dinov2.encoder.layer.1.attention.attention.key", "dinov2") == \
        "dinov2.encoder.layer.1.attention.k_proj"
    # the installed transformers uses one of the two schemes
    assert default_target_modules(tiny_vit()) in (vit["5.x"], vit["4.x"])


def test_adapter_saved_with_4x_names_loads(tmp_path):
    from consolidator_hf.io import atomic_save_safetensors, load_safetensors

    model = get_consolidator_model(tiny_vit(), cfg()).eval()
    perturb_trainables(model)
    y = model(pixels()).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "consolidator_model.safetensors"
    tensors, meta = load_safetensors(path)
    back = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
            "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}

    def to4(k):
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        for new, old in back.items():
            k = k.replace(new, old)
        return k

    atomic_save_safetensors({to4(k): v for k, v in tensors.items()}, path, meta)
    loaded = ConsolidatorModel.from_pretrained(tiny_vit(), tmp_path).eval()
    assert (loaded(pixels()).logits - y).abs().max() <= 1e-5


# ---------------------------------------------------------------------- errors

def test_config_validation_names_the_field():
    for kwargs, field in [({"groups": ()}, "groups"), ({"groups": (0,)}, "groups"),
                          ({"groups": (2.5,)}, "groups"), ({"drop_rate": 1.0}, "drop_rate"),
                          ({"drop_rate": -0.1}, "drop_rate"), ({"init_range": -1}, "init_range"),
                          ({"channel_shuffle": "yes"}, "channel_shuffle"),
                          ({"target_modules": "(["}, "target_modules"),
                          ({"target_modules": []}, "target_modules"),
                          ({"modules_to_save": "classifier"}, "modules_to_save")]:
        with pytest.raises(ValueError, match=field):
            ConsolidatorConfig(**kwargs)


def test_config_json_roundtrip_and_unknown_keys(tmp_path):
    c = ConsolidatorConfig(groups=(8, 4), channel_shuffle=True, drop_rate=0.2,
                           target_modules=["q_proj"], base_model_name_or_path="x/y")
    c.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "consolidator_config.json").read_text())
    assert d["format_version"] == 1 and d["groups"] == [8, 4]
    assert ConsolidatorConfig.from_pretrained(tmp_path) == c
    d["future_field"] = 1
    (tmp_path / "consolidator_config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="future_field"):
        assert ConsolidatorConfig.from_pretrained(tmp_path) == c
    d["format_version"] = 99
    (tmp_path / "consolidator_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="format_version"):
        ConsolidatorConfig.from_pretrained(tmp_path)
    (tmp_path / "consolidator_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ConsolidatorConfig.from_pretrained(tmp_path)


def test_injection_errors():
    with pytest.raises(ValueError, match=r"vit\.layers\.0\.attention\.q_proj \(out=32, in=32\): groups=5"):
        get_consolidator_model(tiny_vit(), cfg(groups=(5,)))
    with pytest.raises(ValueError, match="'nope' matches no nn.Linear"):
        get_consolidator_model(tiny_vit(), cfg(target_modules=["q_proj", "nope"]))
    with pytest.raises(ValueError, match="not nn.Linear"):
        get_consolidator_model(tiny_vit(), cfg(target_modules=["attention"]))
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        get_consolidator_model(tiny_vit(), cfg(target_modules=r".*nothing.*"))
    model = get_consolidator_model(tiny_vit(), cfg(target_modules=r".*\.(q|v)_proj",
                                                   exclude_modules=["layers.1.attention.v_proj"]))
    assert model.targeted_module_names == ["vit.layers.0.attention.q_proj",
                                           "vit.layers.0.attention.v_proj",
                                           "vit.layers.1.attention.q_proj"]


def test_load_errors_name_the_problem(tmp_path):
    model = get_consolidator_model(tiny_vit(), cfg())
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="consolidator_config.json"):
        ConsolidatorModel.from_pretrained(tiny_vit(), tmp_path)
    # mismatched base: other hidden size
    with pytest.raises(ValueError, match="shape|does not match|support"):
        ConsolidatorModel.from_pretrained(tiny_vit(hidden_size=48, num_attention_heads=2), tmp_path / "ok")
    # mismatched base: other depth
    with pytest.raises(ValueError, match="missing keys|unexpected keys"):
        ConsolidatorModel.from_pretrained(tiny_vit(num_hidden_layers=1), tmp_path / "ok")
    with pytest.raises(ValueError, match="model_type"):
        ConsolidatorModel.from_pretrained(tiny_dinov2(), tmp_path / "ok")
    # corrupt weights file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "consolidator_config.json").write_text((tmp_path / "ok" / "consolidator_config.json").read_text())
    data = (tmp_path / "ok" / "consolidator_model.safetensors").read_bytes()
    (bad / "consolidator_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="consolidator_model.safetensors: not a readable safetensors"):
        ConsolidatorModel.from_pretrained(tiny_vit(), bad)
    (bad / "consolidator_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="consolidator_model.safetensors"):
        ConsolidatorModel.from_pretrained(tiny_vit(), bad)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = get_consolidator_model(tiny_vit(), cfg())
    import consolidator_hf.io as io

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(RuntimeError):
        model.save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == []


def test_saved_files_get_ordinary_permissions(tmp_path):
    model = get_consolidator_model(tiny_vit(), cfg())
    model.save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_frozen_loaded_model_saves_the_same_adapter(tmp_path):
    """What is stored follows the config's policy, not requires_grad (is_trainable=False)."""
    model = get_consolidator_model(tiny_vit(), cfg(groups=(8, 4))).eval()
    perturb_trainables(model)
    model.save_pretrained(tmp_path / "a")
    frozen = ConsolidatorModel.from_pretrained(tiny_vit(), tmp_path / "a")
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.parameter_counts() == model.parameter_counts()
    frozen.save_pretrained(tmp_path / "b")
    from consolidator_hf.io import load_safetensors

    a, _ = load_safetensors(tmp_path / "a" / "consolidator_model.safetensors")
    b, _ = load_safetensors(tmp_path / "b" / "consolidator_model.safetensors")
    assert a.keys() == b.keys() and any("layernorm" in k for k in a) and "classifier.weight" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_counts_hold_while_merged():
    """parameter_counts() is structural: the same figures for a merged model."""
    model = get_consolidator_model(tiny_vit(), cfg(groups=(8, 4), channel_shuffle=True)).eval()
    before = model.parameter_counts()
    model.merge_adapter()
    assert model.parameter_counts() == before


def test_disable_adapter_gives_the_base_model_and_restores_everything(tmp_path):
    """Inside disable_adapter() the wrapper computes what the untouched base computes (branches
    bypassed, trained biases/norms/head at their original values, drop path off, nothing
    trainable); on exit the trained state, the grad flags and the drop-path hooks are back."""
    base = tiny_vit()
    x = pixels()
    with torch.no_grad():
        plain = base(x).logits.clone()
    model = get_consolidator_model(base, cfg(groups=(8, 4), drop_rate=0.3,
                                             backbone_drop_path=0.2, modules_to_save=["classifier"]))
    perturb_trainables(model)
    model.eval()
    with torch.no_grad():
        adapted = model(x).logits.clone()
    assert (adapted - plain).abs().max() > 1e-3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    model.train()  # drop path and branch drop would act here if they were on
    with model.disable_adapter():
        torch.testing.assert_close(model(x).logits, plain, rtol=0, atol=1e-6)
        assert not any(p.requires_grad for p in model.parameters())
        with model.disable_adapter():  # nested: still disabled, nothing restored early
            torch.testing.assert_close(model(x).logits, plain, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x).logits, plain, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="cannot merge inside disable_adapter"):
            model.merge_adapter()
        with pytest.raises(ValueError, match="cannot save the adapter inside disable_adapter"):
            model.save_pretrained(str(tmp_path))
        assert os.listdir(tmp_path) == []
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.backbone_drop_path is not None and len(model.backbone_drop_path._handles) > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=0, atol=0)

    # An exception inside the block restores as well.
    with pytest.raises(RuntimeError, match="boom"):
        with model.disable_adapter():
            raise RuntimeError("boom")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=0, atol=0)

    model.merge_adapter()
    with pytest.raises(ValueError, match="is merged; call unmerge_adapter"):
        with model.disable_adapter():
            pass
