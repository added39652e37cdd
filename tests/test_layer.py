import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from consolidator_hf import ConsolidatorLinear


def make(in_f=12, out_f=24, groups=(4,), **kw):
    base = nn.Linear(in_f, out_f)
    kw.setdefault("init_range", 0.2)
    return ConsolidatorLinear(base, groups, **kw)


@settings(max_examples=50, deadline=None)
@given(
    gs=st.lists(st.sampled_from([1, 2, 3, 6]), min_size=1, max_size=3),
    mult_in=st.integers(1, 3), mult_out=st.integers(1, 3), shuffle=st.booleans(),
    bias=st.booleans(),
)
def test_delta_weight_reproduces_branch_forward(gs, mult_in, mult_out, shuffle, bias):
    layer = make(6 * mult_in, 6 * mult_out, tuple(gs), channel_shuffle=shuffle,
                 branch_bias=bias).double().eval()
    x = torch.randn(4, 6 * mult_in, dtype=torch.float64)
    branch_sum = sum(b(x) for b in layer.branches)
    db = layer.delta_bias()
    expected = x @ layer.delta_weight().double().T + (db.double() if db is not None else 0)
    torch.testing.assert_close(branch_sum, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [(4,), (4, 2)])
def test_merge_unmerge_exact(shuffle, bias, groups):
    layer = make(groups=groups, channel_shuffle=shuffle, branch_bias=bias, drop_rate=0.5).eval()
    w0 = layer.base_layer.weight.clone()
    b0 = layer.base_layer.bias.clone()
    x = torch.randn(3, 5, 12)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert (layer(x) - y).abs().max() <= 1e-5
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.bias, b0, rtol=0, atol=1e-6)
    assert (layer(x) - y).abs().max() <= 1e-6


def test_merge_adds_bias_slot_to_biasless_base():
    base = nn.Linear(8, 8, bias=False)
    layer = ConsolidatorLinear(base, (2,), init_range=0.5).eval()
    x = torch.randn(4, 8)
    y = layer(x)
    layer.merge()
    assert layer.base_layer.bias is not None
    assert (layer(x) - y).abs().max() <= 1e-6
    layer.unmerge()
    assert layer.base_layer.bias is None


def test_drop_is_per_sample_with_scale():
    layer = make(groups=(4,), drop_rate=0.5).train()
    x = torch.randn(64, 12)
    base = layer.base_layer(x)
    branch = layer.branches[0](x)
    torch.manual_seed(3)
    y = layer(x)
    # each sample is base + 0 or base + 2 * branch
    kept = torch.isclose(y, base + 2 * branch, atol=1e-6).all(-1)
    dropped = torch.isclose(y, base, atol=1e-6).all(-1)
    assert bool((kept | dropped).all())
    assert 10 < int(kept.sum()) < 54
    layer.eval()
    torch.testing.assert_close(layer(x), base + branch)


def test_safe_merge_refuses_non_finite():
    layer = make().eval()
    with torch.no_grad():
        layer.branches[0].weight[0, 0] = float("nan")
    w0 = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, w0)


def test_merge_in_bf16_is_computed_in_fp32():
    torch.manual_seed(0)
    layer = make(groups=(4,), init_range=1e-3)
    layer = layer.to(torch.bfloat16)
    w0 = layer.base_layer.weight.float().clone()
    expected = (w0 + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.base_layer.weight, expected)


def test_bad_groups_error_names_layer():
    with pytest.raises(ValueError, match=r"enc\.fc1 \(out=24, in=12\): groups=5"):
        make(groups=(5,), name="enc.fc1")
    with pytest.raises(TypeError, match="nn.Linear"):
        ConsolidatorLinear(nn.Conv1d(2, 2, 1), (1,))
    with pytest.raises(ValueError, match="drop_rate"):
        make(drop_rate=1.0)
