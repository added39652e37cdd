"""The fast training path (one merged-weight GEMM, block-structured backward) against the
reference forward: same outputs and gradients, same drop masks, and it trains a whole model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from consolidator_hf import ConsolidatorConfig, ConsolidatorLinear, get_consolidator_model, grouped
from tiny import pixels, tiny_vit


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|: an element-wise bound scaled to the tensor."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run(layer: ConsolidatorLinear, impl: str, x: torch.Tensor, seed: int):
    """Output and every gradient of one forward/backward with the given implementation."""
    layer.impl = impl
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    # A fixed, non-uniform upstream gradient so that every output entry matters.
    w = torch.linspace(-1.0, 2.0, y.numel()).view_as(y)
    (y * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


CASES = [
    # (in, out, groups, row_offset, virtual_out)
    (12, 24, (4,), 0, None),
    (12, 24, (4, 2), 0, None),           # two branches
    (12, 12, (3,), 12, 36),              # row slice of a virtual layer (k of a fused qkv)
    (12, 24, (6, 2), 12, 36),            # two branches on a slice
    (12, 10, (1,), 5, 30),               # a slice that starts and ends inside a group
]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(6,), (5, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.5])
def test_fast_equals_reference(shuffle, case, shape, drop_rate):
    in_f, out_f, groups, row_offset, vout = case
    base = nn.Linear(in_f, out_f)
    base.weight.requires_grad_(False)
    layer = ConsolidatorLinear(base, groups, channel_shuffle=shuffle, drop_rate=drop_rate,
                               init_range=0.3, row_offset=row_offset,
                               virtual_out_features=vout).train()
    w0 = base.weight.clone()
    x = torch.randn(*shape, in_f)
    y_ref, gx_ref, g_ref = _run(layer, "reference", x, seed=3)
    y_fast, gx_fast, g_fast = _run(layer, "fast", x, seed=3)
    assert torch.equal(base.weight, w0), "the fast path must restore the frozen weight exactly"
    expected = {"base_layer.bias"} | {f"branches.{k}.{p}" for k in range(len(groups))
                                      for p in ("weight", "bias")}
    assert set(g_ref) == set(g_fast) == expected
    assert _rel_err(y_fast, y_ref) <= 1e-5
    assert _rel_err(gx_fast, gx_ref) <= 1e-5
    for name in expected:
        assert _rel_err(g_fast[name], g_ref[name]) <= 1e-5, name


def test_drop_masks_identical_and_really_dropping():
    """Same seed, same masks: and with p=0.5 over 16 samples some samples drop the branch."""
    base = nn.Linear(8, 8)
    layer = ConsolidatorLinear(base, (2, 4), drop_rate=0.5, init_range=0.5).train()
    x = torch.randn(16, 3, 8)
    torch.manual_seed(11)
    masks = layer.draw_masks(16)
    torch.manual_seed(11)
    again = torch.stack([grouped.keep_mask(16, 0.5) for _ in range(2)], 1)
    assert torch.equal(masks, again)
    assert 0 < int((masks == 0).sum()) < masks.numel()
    assert set(masks.unique().tolist()) <= {0.0, 2.0}
    y_ref, _, _ = _run(layer, "reference", x, seed=11)
    y_fast, _, _ = _run(layer, "fast", x, seed=11)
    assert _rel_err(y_fast, y_ref) <= 1e-5
    # A dropped sample sees the frozen layer alone.
    dropped = int(torch.nonzero((masks == 0).all(1)).flatten()[0]) if (masks == 0).all(1).any() \
        else None
    if dropped is not None:
        torch.testing.assert_close(y_fast[dropped], base(x[dropped]), rtol=0, atol=1e-6)


def test_eval_uses_no_mask_and_matches_merge():
    base = nn.Linear(12, 24)
    layer = ConsolidatorLinear(base, (4, 2), channel_shuffle=True, drop_rate=0.5,
                               init_range=0.3).eval()
    x = torch.randn(4, 5, 12)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert (layer(x) - y).abs().max() <= 1e-5


def test_weight_grad_from_block_structure_matches_dense():
    """grouped_weight_grad == the dense gradient read on the support, incl. shuffle/slices."""
    for in_f, out_f, g, shuffle, ro, vout in [(12, 24, 4, False, 0, None),
                                              (12, 24, 4, True, 0, None),
                                              (768, 768, 384, False, 768, 2304),
                                              (12, 10, 1, True, 5, 30),
                                              (48, 16, 8, True, 0, None)]:
        gout = torch.randn(9, out_f, dtype=torch.float64)
        x = torch.randn(9, in_f, dtype=torch.float64)
        fast = grouped.grouped_weight_grad(gout, x, g, shuffle, row_offset=ro, virtual_out=vout)
        dense = grouped.dense_to_grouped(gout.t() @ x, g, shuffle, row_offset=ro,
                                         virtual_out=vout)
        torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)


def test_no_dense_weight_gradient_and_frozen_weight_untouched():
    base = nn.Linear(16, 32)
    base.weight.requires_grad_(False)
    layer = ConsolidatorLinear(base, (8,), init_range=0.1).train()
    w0 = base.weight.clone()
    x = torch.randn(3, 4, 16, requires_grad=True)
    layer(x).sum().backward()
    assert base.weight.grad is None
    assert layer.branches[0].weight.grad.shape == (32, 2)
    assert torch.equal(base.weight, w0)


def test_unfrozen_base_weight_gets_its_dense_gradient():
    base = nn.Linear(12, 8)
    layer = ConsolidatorLinear(base, (4,), init_range=0.2, drop_rate=0.3).train()
    x = torch.randn(6, 12)
    ref = _run(layer, "reference", x, seed=5)
    fast = _run(layer, "fast", x, seed=5)
    assert "base_layer.weight" in fast[2]
    assert _rel_err(fast[2]["base_layer.weight"], ref[2]["base_layer.weight"]) <= 1e-5


def test_biasless_base_and_branches():
    base = nn.Linear(8, 8, bias=False)
    layer = ConsolidatorLinear(base, (2,), branch_bias=False, init_range=0.3).train()
    x = torch.randn(5, 8)
    ref = _run(layer, "reference", x, seed=0)
    fast = _run(layer, "fast", x, seed=0)
    assert _rel_err(fast[0], ref[0]) <= 1e-5
    assert set(fast[2]) == {"base_layer.weight", "branches.0.weight"}
    for k in fast[2]:
        assert _rel_err(fast[2][k], ref[2][k]) <= 1e-5


def test_bf16_autocast_cpu_runs_and_is_close():
    torch.manual_seed(0)
    base = nn.Linear(64, 128)
    base.weight.requires_grad_(False)
    layer = ConsolidatorLinear(base, (32,), drop_rate=0.25, init_range=0.05).train()
    x = torch.randn(4, 10, 64)
    y32, gx32, g32 = _run(layer, "reference", x, seed=1)
    layer.impl = "fast"
    layer.zero_grad(set_to_none=True)
    xb = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    w0 = base.weight.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xb)
    assert y.dtype == torch.bfloat16
    (y.float() * torch.linspace(-1.0, 2.0, y.numel()).view_as(y)).sum().backward()
    assert torch.equal(base.weight, w0) and base.weight.dtype == torch.float32
    assert xb.grad.dtype == torch.float32
    assert layer.branches[0].weight.grad.dtype == torch.float32
    assert _rel_err(y.float(), y32) < 3e-2
    assert _rel_err(xb.grad, gx32) < 3e-2
    for name, p in layer.named_parameters():
        if p.grad is not None:
            assert _rel_err(p.grad, g32[name]) < 5e-2, name


def test_config_impl_validated_and_passed_to_layers():
    assert ConsolidatorConfig().impl == "fast"
    with pytest.raises(ValueError, match="impl"):
        ConsolidatorConfig(impl="turbo")
    with pytest.raises(ValueError, match="impl"):
        ConsolidatorLinear(nn.Linear(4, 4), (2,), impl="turbo")
    model = get_consolidator_model(tiny_vit(), ConsolidatorConfig(groups=(16,), impl="reference"))
    assert {l.impl for _, l in model.consolidator_layers()} == {"reference"}
    model = get_consolidator_model(tiny_vit(), ConsolidatorConfig(groups=(16,)))
    assert {l.impl for _, l in model.consolidator_layers()} == {"fast"}
    cfg = ConsolidatorConfig.from_dict(ConsolidatorConfig(impl="reference").to_dict())
    assert cfg.impl == "reference"


def _model_grads(build, impl: str, n_labels: int = 3, prepare=None, **config):
    """Every trainable gradient of one forward/backward of ``build()`` wrapped with ``impl``."""
    px, labels = pixels(4), torch.arange(4) % n_labels
    model = get_consolidator_model(build(), ConsolidatorConfig(impl=impl, **config))
    if prepare is not None:
        prepare(model)
    model.train()
    torch.manual_seed(7)
    model(pixel_values=px, labels=labels).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_model_grads_match(build, prepare=None, **config):
    ref = _model_grads(build, "reference", prepare=prepare, **config)
    fast = _model_grads(build, "fast", prepare=prepare, **config)
    assert fast.keys() == ref.keys()
    assert all(g is not None for g in fast.values())
    for name, g in ref.items():
        # (k_proj's bias gradients are zero up to rounding: softmax ignores a per-key shift;
        # their terms are ~1e-3, so fp32 rounding leaves ~1e-10 of either implementation.)
        err = (fast[name] - g).abs().max().item()
        assert err <= 1e-4 * max(g.abs().max().item(), 1e-5), name


def test_whole_model_fast_equals_reference_gradients():
    """Every trainable gradient of a tiny ViT (incl. stochastic drop) agrees across impls."""
    _assert_model_grads_match(tiny_vit, groups=(16, 8), drop_rate=0.3, init_range=0.05)


def test_default_impl_trains_and_merges_exactly():
    torch.manual_seed(0)
    model = get_consolidator_model(tiny_vit(), ConsolidatorConfig(groups=(16,), drop_rate=0.1))
    labels = torch.arange(12) % 3
    # A learnable problem: the class shifts the image's brightness.
    px = torch.randn(12, 3, 16, 16) + (labels.float() - 1.0).view(-1, 1, 1, 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(pixel_values=px, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    branch_moved = max(l.branches[0].weight.abs().max().item()
                       for _, l in model.consolidator_layers())
    assert branch_moved > 1e-3 + 1e-4  # the branches trained beyond their init range
    model.eval()
    with torch.no_grad():
        unmerged = model(pixel_values=px).logits
        merged = model.merge_and_unload()(pixel_values=px).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    assert F.cross_entropy(merged, labels).item() < losses[0]


BLOCK_CASES = [
    # (in, out, groups, shuffle, row_offset, virtual_out)
    (12, 24, 4, False, 0, None),
    (12, 24, 4, True, 0, None),
    (768, 768, 384, False, 768, 2304),   # k of a fused ViT-B qkv
    (12, 10, 1, True, 5, 30),            # a slice starting and ending inside a group
    (48, 16, 8, True, 0, None),
    (12, 12, 3, True, 12, 36),
]


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_forward_and_input_grad_match_reference(case):
    """The block-structured products the fast path uses on dropped rows equal the oracle."""
    in_f, out_f, g, shuffle, ro, vout = case
    w = torch.randn(out_f, in_f // g, dtype=torch.float64)
    x = torch.randn(7, in_f, dtype=torch.float64, requires_grad=True)
    ref = grouped.grouped_forward_reference(x, w, g, shuffle, row_offset=ro, virtual_out=vout)
    fast = grouped.grouped_forward_blocks(x.detach(), w, g, shuffle, row_offset=ro,
                                          virtual_out=vout)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn_like(ref)
    ref.backward(gout)
    gin = grouped.grouped_input_grad(gout, w, in_f, g, shuffle, row_offset=ro, virtual_out=vout)
    torch.testing.assert_close(gin, x.grad, rtol=1e-12, atol=1e-12)


def test_weight_grad_over_row_ranges_and_from_a_row_function():
    gout = torch.randn(40, 24, dtype=torch.float64)
    x = torch.randn(40, 12, dtype=torch.float64)
    ranges = [(0, 5), (17, 33)]
    rows = torch.cat([torch.arange(a, b) for a, b in ranges])
    dense = grouped.dense_to_grouped(gout[rows].t() @ x[rows], 4, True)
    got = grouped.grouped_weight_grad(gout, x, 4, True, row_ranges=ranges)
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)
    calls = []

    def x_rows(a, b):
        calls.append((a, b))
        return x[a:b]

    lazily = grouped.grouped_weight_grad(gout, x_rows, 4, True, row_ranges=ranges, in_features=12)
    torch.testing.assert_close(lazily, dense, rtol=1e-12, atol=1e-12)
    assert calls and all(a >= s and b <= e for a, b in calls
                         for s, e in [next(r for r in ranges if r[0] <= a < r[1])])
    with pytest.raises(ValueError, match="in_features"):
        grouped.grouped_weight_grad(gout, x_rows, 4, True)


@pytest.mark.parametrize("ranges", [None, [(0, 40)], [(3, 9)], []],
                         ids=["all", "full-range", "one", "none"])
def test_weight_grad_minus_rows_is_the_sum_without_them(ranges):
    """``minus=(g rows, x rows)`` takes those rows' products out of the sum: over all rows minus
    a scattered set of rows equals the dense gradient over the rest; with other row ranges (or
    none) each row counts +1 per range it is in and -1 if subtracted; on a slice of a virtual
    layer."""
    gout = torch.randn(40, 10, dtype=torch.float64)
    x = torch.randn(40, 12, dtype=torch.float64)
    dropped = torch.tensor([1, 4, 5, 20, 38])
    plan = grouped.block_plan(12, 10, 4, row_offset=5, virtual_out_features=30)
    got = grouped.weight_grad_blocks(gout, x, plan, 4, True, 12, ranges,
                                     minus=(gout[dropped], x[dropped]))
    summed = torch.zeros(40, dtype=torch.bool)
    for a, b in [(0, 40)] if ranges is None else ranges:
        summed[a:b] = True
    sign = summed.double() - torch.isin(torch.arange(40), dropped).double()
    dense = (gout * sign[:, None]).t() @ x
    want = grouped.dense_to_grouped(dense, 4, True, row_offset=5, virtual_out_features=30)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class _Block(nn.Module):
    """A transformer-style block: LayerNorm read by q and k, LayerNorm -> fc1 -> GELU -> fc2."""

    def __init__(self, d: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.act = nn.GELU()

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.q(h) * self.k(h).sigmoid()
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def _consolidated_block(impl: str, drop_rate: float, **kw) -> nn.Module:
    block = _Block(**kw).train()
    for name in ("q", "k", "fc1", "fc2"):
        base = getattr(block, name)
        base.weight.requires_grad_(False)
        setattr(block, name, ConsolidatorLinear(base, (4, 2), channel_shuffle=True,
                                                drop_rate=drop_rate, init_range=0.2, impl=impl))
    return block


def _saved_bytes(fn) -> int:
    """Bytes of distinct non-parameter storages autograd saves while ``fn`` runs forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("drop_rate", [0.0, 0.5])
def test_inputs_rebuilt_from_layernorm_and_gelu_keep_gradients_exact(drop_rate):
    """q/k (one LayerNorm output, two readers), fc1 (LayerNorm) and fc2 (GELU) rebuild their
    input in backward: every gradient still equals the reference path's."""
    x = torch.randn(6, 5, 16)
    grads = {}
    for impl in ("reference", "fast"):
        block = _consolidated_block(impl, drop_rate)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        out = block(xi)
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        grads[impl] = {"input": xi.grad, **{n: p.grad for n, p in block.named_parameters()
                                            if p.grad is not None}}
    assert grads["fast"].keys() == grads["reference"].keys()
    for name, g in grads["reference"].items():
        assert _rel_err(grads["fast"][name], g) <= 1e-5, name


def test_fast_path_saves_no_activation_the_frozen_layers_do_not():
    """Peak-memory claim, checked by storage: with inputs rebuilt, the fast path saves exactly
    the storages that the same block with plain frozen nn.Linear layers saves."""
    x = torch.randn(4, 9, 16, requires_grad=True)
    floor = _Block()
    for lin in (floor.q, floor.k, floor.fc1, floor.fc2):
        lin.weight.requires_grad_(False)
    param_ptrs = lambda m: {p.untyped_storage().data_ptr() for p in m.parameters()}  # noqa: E731
    _, floor_saved = _saved_bytes(lambda: floor(x))
    fast = _consolidated_block("fast", 0.0)
    _, fast_saved = _saved_bytes(lambda: fast(x))
    floor_act = sum(v for k, v in floor_saved.items() if k not in param_ptrs(floor))
    fast_act = sum(v for k, v in fast_saved.items() if k not in param_ptrs(fast))
    # Besides the floor's activations the fast path may keep only masks (none here).
    assert fast_act == floor_act
    # A producer it does not know (SiLU keeps its input, not its output): fc2's input is
    # saved instead, one more activation.
    fast.act = nn.SiLU()
    _, tanh_saved = _saved_bytes(lambda: fast(x))
    assert sum(v for k, v in tanh_saved.items() if k not in param_ptrs(fast)) > fast_act


def test_rebuilt_input_changed_in_place_raises():
    block = _consolidated_block("fast", 0.0)
    x = torch.randn(3, 4, 16, requires_grad=True)
    u = x * 1.0
    h = block.norm2(u)
    y = block.fc1(h)
    with torch.no_grad():
        u.add_(1.0)  # what fc1 would rebuild its input from
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_fast_path_leaves_frozen_weight_version_alone():
    """The weight is patched through .data: autograd's version counter on W0 never moves, so
    another op that saved W0 is not invalidated (and the weight is restored bit for bit)."""
    base = nn.Linear(12, 24)
    base.weight.requires_grad_(False)
    layer = ConsolidatorLinear(base, (4,), drop_rate=0.5, init_range=0.3).train()
    w0, version = base.weight.clone(), base.weight._version
    x = torch.randn(8, 3, 12, requires_grad=True)
    other = x @ base.weight.t()  # saves W0 for its own backward
    (layer(x).sum() + other.sum()).backward()
    assert base.weight._version == version
    assert torch.equal(base.weight, w0)


def test_vit_fast_path_saves_what_the_floor_saves():
    """On the installed transformers ViT the fast path's saved activations are the floor's
    (same model, only biases + LayerNorms + head trainable): no layer input is kept."""
    px = pixels(2)

    def activation_bytes(model) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        _, saved = _saved_bytes(lambda: model(pixel_values=px).logits)
        return sum(v for k, v in saved.items() if k not in params)

    model = get_consolidator_model(tiny_vit(), ConsolidatorConfig(groups=(16,))).train()
    wanted = {n for n, _ in model.trained_base_parameters()}
    floor = tiny_vit().train()
    for n, p in floor.named_parameters():
        p.requires_grad_(n in wanted)
    assert activation_bytes(model) == activation_bytes(floor)


def test_rebuilt_inputs_under_bf16_autocast():
    """Rebuilt fp32 LayerNorm/GELU outputs are cast to the autocast dtype like the saved ones."""
    x = torch.randn(4, 5, 16)
    grads = {}
    for impl in ("reference", "fast"):
        block = _consolidated_block(impl, 0.25)
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        (out.float() * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        grads[impl] = {n: p.grad.float() for n, p in block.named_parameters() if p.grad is not None}
    for name, g in grads["reference"].items():
        assert _rel_err(grads["fast"][name], g) < 5e-2, name


@pytest.mark.parametrize("family", ["deit", "dinov2"])
def test_other_families_fast_equals_reference(family):
    from tiny import tiny_deit, tiny_dinov2

    build = {"deit": tiny_deit, "dinov2": tiny_dinov2}[family]
    _assert_model_grads_match(build, groups=(16,), drop_rate=0.3, init_range=0.05)


def test_gradient_checkpointing_fast_equals_reference():
    """Trainer(gradient_checkpointing=True) path: the forward is replayed in backward (saved
    tensors behind the checkpoint's hooks, masks re-drawn from the restored RNG state)."""
    def checkpointed(model):
        model.base_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})

    _assert_model_grads_match(tiny_vit, prepare=checkpointed, groups=(16,), drop_rate=0.3,
                              init_range=0.05)


def test_backward_twice_with_retained_graph():
    """The shared rebuild of q/k's input is released after its last reader; a second backward
    through a retained graph rebuilds again and gets the same gradients."""
    block = _consolidated_block("fast", 0.0)
    out = block(torch.randn(3, 4, 16))
    out.sum().backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad()
    out.sum().backward()
    for n, g in first.items():
        torch.testing.assert_close(dict(block.named_parameters())[n].grad, g)


def test_unreadable_producer_falls_back_to_saving_the_input_with_one_warning(monkeypatch):
    """If a torch build hides what LayerNorm saved, the input is kept (same gradients) and the
    user is told once that the fast path now costs activation memory."""
    from consolidator_hf import fast_path as _fast

    class NativeLayerNormBackward0:  # the node's type name, without the _saved_* attributes
        pass

    monkeypatch.setattr(_fast.InputRebuild, "_warned", False)
    x = torch.randn(2, 3)
    with pytest.warns(RuntimeWarning, match="does not expose what NativeLayerNormBackward0 saved"):
        assert _fast.InputRebuild._from_node(NativeLayerNormBackward0(), x) is None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fast.InputRebuild._from_node(NativeLayerNormBackward0(), x) is None  # once only

    # Through a layer: with rebuilding unavailable the gradients are still the reference's.
    monkeypatch.setattr(_fast.InputRebuild, "_from_node", classmethod(lambda cls, node, x: None))
    norm = nn.LayerNorm(8)
    layer = ConsolidatorLinear(nn.Linear(8, 8), (4,), drop_rate=0.0, init_range=0.3).train()
    layer.base_layer.weight.requires_grad_(False)
    inp = torch.randn(3, 5, 8)
    grads = {}
    for impl in ("fast", "reference"):
        layer.impl = impl
        layer.zero_grad()
        layer(norm(inp)).square().sum().backward()
        grads[impl] = layer.branches[0].weight.grad.clone()
    torch.testing.assert_close(grads["fast"], grads["reference"], rtol=1e-5, atol=1e-6)


def test_union_cache_follows_the_base_weight_it_patches():
    """The fast path caches where the branches sit in W0 (and a view it patches through), not
    W0's values: an in-place change of W0, one through ``.data`` (which moves no version
    counter of W0), a new tensor assigned to the parameter's ``.data`` and a replaced parameter
    must each be seen on the next forward (results = reference), and W0 is left as it was after
    every forward (no stale value written back over new weights)."""
    torch.manual_seed(0)
    layer = ConsolidatorLinear(nn.Linear(12, 24), (4, 2), drop_rate=0.0).train()
    layer.base_layer.weight.requires_grad_(False)
    x = torch.randn(3, 12)

    def check():
        before = layer.base_layer.weight.detach().clone()
        y_fast, _, g_fast = _run(layer, "fast", x, 0)
        y_ref, _, g_ref = _run(layer, "reference", x, 0)
        assert _rel_err(y_fast, y_ref) < 1e-6
        assert all(_rel_err(g_fast[k], g_ref[k]) < 1e-5 for k in g_ref)
        assert torch.equal(layer.base_layer.weight, before)

    check()
    with torch.no_grad():
        layer.base_layer.weight.mul_(-2.0)  # in place: the version counter moves
    check()
    new = torch.randn(24, 12)
    layer.base_layer.weight.data.copy_(new)  # in place, no version counter of W0 moves
    check()
    assert torch.equal(layer.base_layer.weight, new)
    layer.base_layer.weight.data = torch.randn(24, 12)  # a new storage behind the parameter
    check()
    layer.base_layer.weight = nn.Parameter(torch.randn(24, 12), requires_grad=False)
    check()


# ------------------------------------------------------------------ gathered drop corrections
class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """aten ops dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _oracle(x, w0, b0, weights, biases, geometries, keep, drop_rate):
    """``x W0^T + b0 + sum_k m_k (B_k P_k x + c_k)`` read off the formulas (autograd does the
    gradients), ``m_k[n] = keep[k][n] / (1 - p)``."""
    y = F.linear(x, w0, b0)
    for k, geom in enumerate(geometries):
        m = torch.tensor(keep[k], dtype=x.dtype).view(-1, *([1] * (x.dim() - 1))) / (1 - drop_rate)
        y = y + m * (grouped.grouped_forward_reference(x, weights[k], **geom._asdict())
                     + biases[k])
    return y


def _fast_and_oracle(keep, case=(12, 24, (4, 2), 0, None), tokens=3, seed=0):
    """Output and gradients of ``fast_linear`` and of :func:`_oracle` for explicit keep flags
    (the layer input a LayerNorm output, so the fast path rebuilds it), with the aten ops the
    fast path's forward + backward dispatched."""
    from consolidator_hf.fast_path import fast_linear
    from consolidator_hf.union_patch import UnionCache
    from consolidator_hf.grouped import Geometry

    in_f, out_f, groups, row_offset, vout = case
    torch.manual_seed(seed)
    batch = len(keep[0])
    u = torch.randn(batch, tokens, in_f)
    norm = nn.LayerNorm(in_f)
    w0 = torch.randn(out_f, in_f)
    b0 = torch.randn(out_f, requires_grad=True)
    geometries = tuple(Geometry(g, True, row_offset, vout) for g in groups)
    weights = [(0.3 * torch.randn(out_f, in_f // g)).requires_grad_(True) for g in groups]
    biases = [(0.3 * torch.randn(out_f)).requires_grad_(True) for _ in groups]
    gy = torch.randn(batch, tokens, out_f)
    results, counts = [], None
    for fast in (True, False):
        ui = u.clone().requires_grad_(True)
        for p in (b0, *weights, *biases):
            p.grad = None
        if fast:
            cache = UnionCache()
            fast_linear(norm(ui), w0, b0, weights, biases, geometries, keep, 0.5,
                        cache).backward(gy)  # cache filled, as in any step after the first
            ui.grad = None
            for p in (b0, *weights, *biases):
                p.grad = None
            mode = _CountOps()
            with mode:
                y = fast_linear(norm(ui), w0, b0, weights, biases, geometries, keep, 0.5, cache)
                y.backward(gy)
            counts = mode.ops
        else:
            y = _oracle(norm(ui), w0, b0, weights, biases, geometries, keep, 0.5)
            y.backward(gy)
        results.append([y.detach(), ui.grad] + [p.grad for p in (b0, *weights, *biases)])
    return results[0], results[1], counts


@pytest.mark.parametrize("case", CASES)
def test_gathered_drop_corrections_equal_the_formulas(case):
    """Dropped samples in many runs are corrected through one gather per branch (forward, input
    gradient, bias and weight gradient: all rows minus the dropped ones); outputs and every
    gradient equal the formulas', also with every sample dropped or kept by a branch."""
    from consolidator_hf.fast_path import sample_runs

    n = len(case[2])
    patterns = [
        [[i % 2 == 0 for i in range(12)], [i % 3 != 1 for i in range(12)]],   # many runs
        [[i % 2 == 0 for i in range(12)], [True] * 12],                       # one branch kept
        [[False] * 12, [i % 4 < 2 for i in range(12)]],                       # one all dropped
    ]
    for keep in patterns:
        keep = keep[:n]
        fast, oracle, counts = _fast_and_oracle(keep, case)
        gathered = sum(len(sample_runs([not v for v in f])) >= 2 for f in keep)
        assert counts.get("index_add_", 0) == 2 * gathered, counts  # forward + input gradient
        for got, want in zip(fast, oracle):
            assert _rel_err(got, want) <= 1e-5


def test_host_work_of_the_drop_corrections_does_not_grow_with_the_runs():
    """The same number of aten ops whether a branch's 16 dropped samples form 2 runs or 16,
    and as many as for 4 runs of 4 (before: about 20 more per run)."""
    batch = 32
    shapes = {
        "2 runs": [i < 8 or 16 <= i < 24 for i in range(batch)],
        "16 runs": [i % 2 == 0 for i in range(batch)],
        "4 runs": [(i // 4) % 2 == 0 for i in range(batch)],
    }
    totals = {}
    for name, flags in shapes.items():
        keep = [[not v for v in flags], [not v for v in flags]]
        fast, oracle, counts = _fast_and_oracle(keep)
        for got, want in zip(fast, oracle):
            assert _rel_err(got, want) <= 1e-5, name
        totals[name] = sum(counts.values())
    assert len(set(totals.values())) == 1, totals


@pytest.mark.parametrize("gather_runs", [1, 10 ** 9], ids=["gathered", "run_by_run"])
def test_block_fast_equals_reference_gathered_or_run_by_run(monkeypatch, gather_runs):
    """Through a block whose inputs are rebuilt (shared q/k input, fc1 LayerNorm, fc2 GELU),
    both ways of correcting the dropped samples give the reference path's gradients."""
    from consolidator_hf import fast_path

    monkeypatch.setattr(fast_path, "GATHER_RUNS", gather_runs)
    x = torch.randn(16, 3, 16)
    grads, counts = {}, {}
    for impl in ("reference", "fast"):
        block = _consolidated_block(impl, 0.5)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        mode = _CountOps()
        with mode:
            out = block(xi)
            (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        counts[impl] = mode.ops
        grads[impl] = {"input": xi.grad, **{n: p.grad for n, p in block.named_parameters()
                                            if p.grad is not None}}
    assert (counts["fast"].get("index_add_", 0) > 0) == (gather_runs == 1)
    for name, g in grads["reference"].items():
        assert _rel_err(grads["fast"][name], g) <= 1e-5, name
