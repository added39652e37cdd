"""qkv_grouping="fused": q, k and v grouped as the paper's single qkv layer (3D x D)."""

import pytest
import torch
import torch.nn.functional as F

from consolidator_hf import ConsolidatorConfig, ConsolidatorModel, get_consolidator_model
from consolidator_hf.recipes import paper_recipe
from consolidator_hf.data import shared_recipe, get_task
from tiny import TINY, perturb_trainables, pixels, tiny_vit
from vit4x import to_4x_layout

D = TINY["hidden_size"]  # 32


def cfg(**kw):
    kw.setdefault("groups", (8,))
    kw.setdefault("init_range", 0.05)
    kw.setdefault("qkv_grouping", "fused")
    return ConsolidatorConfig(**kw)


def qkv_layers(model, block=0):
    return [model.base_model.get_submodule(f"vit.layers.{block}.attention.{p}")
            for p in ("q_proj", "k_proj", "v_proj")]


@pytest.mark.parametrize("groups", [(8,), (16, 4)])
def test_parameter_count_equals_the_papers(groups):
    """Per branch the paper's qkv group_fc has 3D x D/g weights + 3D bias; fc1/fc2/proj likewise."""
    model = get_consolidator_model(tiny_vit(), cfg(groups=groups))
    M, L = TINY["intermediate_size"], TINY["num_hidden_layers"]
    paper = 0
    for g in groups:  # (out, in) of the paper's qkv, proj, fc1, fc2
        for out_f, in_f in ((3 * D, D), (D, D), (M, D), (D, M)):
            paper += out_f * (in_f // g) + out_f
    assert model.parameter_counts()["branch"] == L * paper
    qkv = sum(p.numel() for layer in qkv_layers(model) for p in layer.branches.parameters())
    assert qkv == sum(3 * D * (D // g) + 3 * D for g in groups)


@pytest.mark.parametrize("shuffle", [False, True])
def test_fused_branch_is_the_papers_grouped_conv(shuffle):
    """[q; k; v] branch outputs equal a grouped 1x1 conv with g groups over all 3D rows."""
    g = 4
    model = get_consolidator_model(tiny_vit(), cfg(groups=(g,), channel_shuffle=shuffle))
    layers = qkv_layers(model)
    assert [(l.row_offset, l.virtual_out_features) for l in layers] == [(0, 3 * D), (D, 3 * D), (2 * D, 3 * D)]
    weight = torch.cat([l.branches[0].weight for l in layers])  # (3D, D/g): the paper's layout
    bias = torch.cat([l.branches[0].bias for l in layers])
    x = torch.randn(5, D)
    xs = x.view(5, g, D // g).transpose(1, 2).reshape(5, D) if shuffle else x
    conv = F.conv1d(xs[:, :, None], weight[:, :, None], bias, groups=g)[:, :, 0]
    ours = torch.cat([l(x) - l.base_layer(x) for l in layers], dim=1)
    torch.testing.assert_close(ours, conv, rtol=1e-5, atol=1e-6)
    # the support of [Dq; Dk; Dv] is the paper's block diagonal: g blocks of (3D/g) x (D/g)
    dense = torch.cat([l.delta_weight() for l in layers])
    rows = torch.arange(3 * D)[:, None] // (3 * D // g)
    s = D // g
    c = torch.arange(D)[None, :]
    # the group that reads input channel c: shuffled, c = i*s + j sits at position j*g + i
    cols = ((c % s) * g + c // s) // s if shuffle else c // s
    assert torch.equal(dense != 0, rows == cols)


def test_separate_grouping_differs_from_fused():
    fused = get_consolidator_model(tiny_vit(), cfg(groups=(4,)))
    separate = get_consolidator_model(tiny_vit(), cfg(groups=(4,), qkv_grouping="separate"))
    sup = lambda m: torch.cat([l.delta_weight() for l in qkv_layers(m)]) != 0  # noqa: E731
    assert sup(fused).sum() == sup(separate).sum()  # same parameter count ...
    assert not torch.equal(sup(fused), sup(separate))  # ... different sparsity pattern
    assert qkv_layers(separate)[1].row_offset == 0


@pytest.mark.parametrize("shuffle", [False, True])
def test_merge_exactness_and_save_load(shuffle, tmp_path):
    x = pixels()
    model = get_consolidator_model(tiny_vit(), cfg(groups=(8, 4), channel_shuffle=shuffle,
                                                   drop_rate=0.2)).eval()
    perturb_trainables(model)
    y = model(x).logits
    assert (y - tiny_vit()(x).logits).abs().max() > 1e-3
    for consolidate in (True, False):
        model.save_pretrained(tmp_path / str(consolidate), consolidate=consolidate)
        loaded = ConsolidatorModel.from_pretrained(tiny_vit(), tmp_path / str(consolidate)).eval()
        assert loaded.consolidator_config.qkv_grouping == "fused"
        assert qkv_layers(loaded)[2].row_offset == 2 * D
        assert (loaded(x).logits - y).abs().max() <= 1e-5
    model.merge_adapter()
    assert (model(x).logits - y).abs().max() <= 1e-5
    model.unmerge_adapter()
    assert (model(x).logits - y).abs().max() <= 1e-5
    assert (model.merge_and_unload()(x).logits - y).abs().max() <= 1e-5


def test_fused_with_4x_module_names():
    model = get_consolidator_model(to_4x_layout(tiny_vit()), cfg(groups=(8,))).eval()
    offsets = {n.rsplit(".", 1)[-1]: (l.row_offset, l.virtual_out_features)
               for n, l in model.consolidator_layers() if ".layer.0.attention.attention." in n}
    assert offsets == {"query": (0, 3 * D), "key": (D, 3 * D), "value": (2 * D, 3 * D)}
    perturb_trainables(model)
    y = model(pixels()).logits
    model.merge_adapter()
    assert (model(pixels()).logits - y).abs().max() <= 1e-5


def test_fused_errors():
    with pytest.raises(ValueError, match="qkv_grouping"):
        ConsolidatorConfig(qkv_grouping="qkv")
    with pytest.raises(ValueError, match=r"k_proj'\] of its fused set"):
        get_consolidator_model(tiny_vit(), cfg(exclude_modules=["vit.layers.1.attention.k_proj"]))
    # groups=3 divides 3D but not in_features: the layer, its shape and the group are named
    with pytest.raises(ValueError, match=r"vit\.layers\.0\.attention\.q_proj .*groups=3"):
        get_consolidator_model(tiny_vit(), cfg(groups=(3,)))


def test_paper_recipe_config():
    c = ConsolidatorConfig.from_recipe("paper", task="cifar100")
    assert c.qkv_grouping == "fused"
    assert c.backbone_drop_path == shared_recipe()["backbone_stochastic_depth"]
    assert c.groups == tuple(shared_recipe()["groups"])
    assert c.channel_shuffle is shared_recipe()["channel_shuffle"]
    assert c.drop_rate == get_task("cifar100").recipe()["drop_rate"]
    assert paper_recipe("svhn").consolidator["qkv_grouping"] == "fused"
    assert ConsolidatorConfig.from_recipe("paper", task="svhn", groups=(8,)).groups == (8,)
    assert ConsolidatorConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        ConsolidatorConfig.from_recipe("nope", task="svhn")
