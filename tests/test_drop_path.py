"""Backbone stochastic depth: identity in eval, per-sample drops with 1/(1-p) scale in training,
linear schedule over depth; with the installed (5.x) ViT layout and the 4.x one."""

import pytest
import torch

from consolidator_hf import ConsolidatorConfig, get_consolidator_model
from consolidator_hf.drop_path import add_backbone_drop_path, drop_path_rates
from consolidator_hf.targets import residual_branches
from tiny import pixels, tiny_vit
from vit4x import to_4x_layout

RATE = 0.6
DEPTH = 3


def layouts():
    base = tiny_vit(num_hidden_layers=DEPTH)
    return {"5.x": base, "4.x": to_4x_layout(tiny_vit(num_hidden_layers=DEPTH))}


def test_schedule_is_linear_over_depth():
    assert drop_path_rates(0.1, 12) == pytest.approx([0.1 * i / 11 for i in range(12)])
    assert drop_path_rates(0.1, 12)[0] == 0.0 and drop_path_rates(0.1, 12)[-1] == pytest.approx(0.1)
    # timm: torch.linspace(0, drop_path_rate, depth)
    assert drop_path_rates(0.3, 5) == pytest.approx(torch.linspace(0, 0.3, 5).tolist())
    assert drop_path_rates(0.5, 1) == [0.0]
    handle = add_backbone_drop_path(tiny_vit(num_hidden_layers=DEPTH), RATE)
    assert handle.rates == pytest.approx([0.0, 0.3, 0.6])
    assert add_backbone_drop_path(tiny_vit(), 0.0) is None
    with pytest.raises(ValueError, match="backbone_drop_path"):
        add_backbone_drop_path(tiny_vit(), 1.0)


def test_4x_test_model_matches_the_installed_vit():
    """The hand-written 4.x layout computes what the installed ViT computes (same weights)."""
    base = tiny_vit(num_hidden_layers=DEPTH)
    assert (to_4x_layout(base)(pixels()).logits - base(pixels()).logits).abs().max() <= 1e-5
    assert len(residual_branches(to_4x_layout(base))) == DEPTH


@pytest.mark.parametrize("layout", ["5.x", "4.x"])
def test_identity_in_eval(layout):
    model = layouts()[layout]
    x = pixels(4)
    y = model(x).logits
    handle = add_backbone_drop_path(model, RATE)
    assert torch.equal(model.eval()(x).logits, y)
    handle.remove()


@pytest.mark.parametrize("layout", ["5.x", "4.x"])
def test_training_drops_whole_samples_with_the_right_scale(layout):
    model = layouts()[layout]
    blocks = residual_branches(model)
    # Record each branch's value before and after the drop hook, and each block's input/output.
    before, after, block_io = {}, {}, {}

    def first(o):
        return o[0] if isinstance(o, tuple) else o

    for i, branches in enumerate(blocks):
        for j, b in enumerate(branches):
            b.register_forward_hook(lambda m, a, o, k=(i, j): before.__setitem__(k, first(o).clone()))
    handle = add_backbone_drop_path(model, RATE)
    for i, branches in enumerate(blocks):
        for j, b in enumerate(branches):
            b.register_forward_hook(lambda m, a, o, k=(i, j): after.__setitem__(k, first(o).clone()))
    layers = model.vit.layers if layout == "5.x" else model.vit.encoder.layer
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, o, i=i: block_io.__setitem__(i, (a[0], first(o))))

    n = 400
    model.train()
    with torch.no_grad():
        model(torch.randn(n, 3, 16, 16))
    for (i, j), pre in before.items():
        rate = handle.rates[i]
        post = after[(i, j)]
        kept = post.flatten(1).abs().sum(1) > 0
        # a kept sample is scaled by exactly 1/(1-rate), a dropped one is all zeros
        torch.testing.assert_close(post[kept], pre[kept] / (1 - rate), rtol=1e-6, atol=0)
        assert torch.equal(post[~kept], torch.zeros_like(post[~kept]))
        frac = 1 - kept.float().mean().item()
        assert abs(frac - rate) < 0.1, (i, j, frac, rate)
        if rate == 0:
            assert torch.equal(post, pre)
    # the dropped/scaled values are what enter the residual stream
    for i, (x_in, out) in block_io.items():
        torch.testing.assert_close(out, x_in + after[(i, 0)] + after[(i, 1)], rtol=0, atol=1e-5)
    # the two branches of one block are dropped independently
    kept_attn = after[(2, 0)].flatten(1).abs().sum(1) > 0
    kept_mlp = after[(2, 1)].flatten(1).abs().sum(1) > 0
    assert (kept_attn != kept_mlp).any()


def test_config_field_applies_and_merge_removes_hooks():
    x = pixels(8)
    cfg = ConsolidatorConfig(groups=(8,), backbone_drop_path=0.5)
    model = get_consolidator_model(tiny_vit(num_hidden_layers=DEPTH), cfg)
    assert model.backbone_drop_path.rates == pytest.approx([0.0, 0.25, 0.5])
    model.eval()
    y_eval = model(x).logits
    model.train()
    torch.manual_seed(3)
    y_train = model(x).logits
    assert (y_train - y_eval).abs().max() > 1e-3  # stochastic depth acts in training
    merged = model.merge_and_unload().train()
    assert not any(m._forward_hooks for m in merged.modules())
    assert torch.allclose(merged(x).logits, y_eval, atol=1e-5)


def test_unknown_architecture_is_refused():
    from torch import nn

    class Bare(nn.Module):
        config = type("C", (), {"model_type": "bert"})()

    with pytest.raises(ValueError, match="model_type='bert'"):
        add_backbone_drop_path(Bare(), 0.1)
