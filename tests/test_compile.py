"""The default training path under ``torch.compile`` and without host reads: one graph, no
recompiles with fresh drop masks, the reference's gradients (fp32 and bf16 autocast), and no
device synchronisation inside a training step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

from consolidator_hf import (ConsolidatorConfig, ConsolidatorLinear, compiled_path, fast_path,
                             get_consolidator_model)
from tiny import pixels, tiny_deit, tiny_dinov2, tiny_vit

FAMILIES = {"vit": tiny_vit, "deit": tiny_deit, "dinov2": tiny_dinov2}


def _model(build, drop_rate: float, groups=(16,)):
    return get_consolidator_model(build(), ConsolidatorConfig(
        groups=groups, drop_rate=drop_rate, init_range=0.05)).train()


def _grads(model, forward, px, seed: int = 5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = forward(px).float()
    (out * torch.linspace(-1.0, 2.0, out.numel()).view_as(out)).sum().backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference_grads(model, px, seed: int = 5):
    for _, layer in model.consolidator_layers():
        layer.impl = "reference"
    try:
        return _grads(model, lambda x: model(pixel_values=x).logits, px, seed)
    finally:
        for _, layer in model.consolidator_layers():
            layer.impl = "fast"


def _assert_close(got, ref, rel: float) -> None:
    assert got.keys() == ref.keys() and ref
    for name, g in ref.items():
        # k_proj's bias gradients are zero up to rounding (softmax ignores a per-key shift):
        # the bound is relative to the largest gradient of the model, not of that tensor.
        scale = max(r.abs().max().item() for r in ref.values())
        err = (got[name] - g).abs().max().item()
        assert err <= rel * max(g.abs().max().item(), 1e-2 * scale), (name, err)


@pytest.fixture(params=["ops", "traced"])
def formula(request, monkeypatch):
    """Both compiled formulations, on the CPU (the ops are its default)."""
    monkeypatch.setitem(compiled_path.FORMULAS, "cpu", request.param)
    return request.param


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
def test_training_forward_is_one_graph(family, drop_rate, formula):
    """Default impl, training mode: dynamo captures the whole forward with no graph break."""
    model = _model(FAMILIES[family], drop_rate)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x: model(pixel_values=x).logits)(pixels(2))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_steps_with_fresh_masks_do_not_recompile_and_match_reference(formula):
    """20 compiled training steps (forward, backward, AdamW) with a fresh drop draw each step
    compile once; the first step's gradients are the reference's under the same seed
    (aot_eager keeps eager's RNG stream, so the masks are the same numbers)."""
    model = _model(tiny_vit, 0.3, groups=(16, 8))
    px = pixels(4)
    ref = _reference_grads(model, px)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    got = _grads(model, lambda x: compiled(pixel_values=x).logits, px)
    _assert_close(got, ref, 1e-5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(20):
        opt.zero_grad()
        compiled(pixel_values=px).logits.square().sum().backward()
        opt.step()
    assert counter.frame_count == 1


def test_compiled_training_with_changing_batch_sizes(formula):
    """A smaller last batch (the Trainer keeps it by default) recompiles with a symbolic batch
    size; the drop masks' draw must accept it (torch.rand's generator overload did not), and
    every batch size gives the reference's gradients under the same seed."""
    model = _model(tiny_vit, 0.3, groups=(16, 8))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    for batch in (4, 3, 2, 5):
        px = pixels(batch)
        ref = _reference_grads(model, px)
        got = _grads(model, lambda x: compiled(pixel_values=x).logits, px)
        _assert_close(got, ref, 1e-5)


def test_traceable_formula_equals_reference_float64():
    """The traced formulation (broadcast block products, per-sample factors; the default on
    GPUs) is the reference forward, in float64, on every geometry the eager path is tested on."""
    cases = [(12, 24, (4,), 0, None), (12, 24, (4, 2), 0, None), (12, 12, (3,), 12, 36),
             (12, 24, (6, 2), 12, 36), (12, 10, (1,), 5, 30)]
    for in_f, out_f, groups, offset, vout in cases:
        for shuffle in (False, True):
            base = nn.Linear(in_f, out_f).double()
            layer = ConsolidatorLinear(base, groups, channel_shuffle=shuffle, drop_rate=0.5,
                                       init_range=0.3, row_offset=offset,
                                       virtual_out_features=vout).double().train()
            x = torch.randn(5, 7, in_f, dtype=torch.float64)
            torch.manual_seed(3)
            ref = layer.forward_reference(x)
            torch.manual_seed(3)
            masks = layer.draw_masks(5).double()
            got = compiled_path.traceable_linear(
                x, base.weight, base.bias, [b.weight for b in layer.branches],
                [b.bias for b in layer.branches], layer.geometries, masks)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("drop_rate, gather_runs", [(0.0, None), (0.5, None), (0.5, 1)],
                         ids=["drop0", "drop0.5", "drop0.5-gathered"])
def test_compiled_ops_equal_reference_float64(drop_rate, gather_runs, monkeypatch):
    """The custom ops the compiler sees (called eagerly here) give the reference forward and
    its gradients, in float64, on every geometry the eager path is tested on, with the base
    weight unfrozen too (its dense gradient), 2-D and 3-D inputs; W0 comes back unchanged.
    ``gather_runs=1``: every branch's dropped samples corrected through one gather."""
    if gather_runs is not None:
        monkeypatch.setattr(fast_path, "GATHER_RUNS", gather_runs)
    cases = [(12, 24, (4,), 0, None), (12, 24, (4, 2), 0, None), (12, 12, (3,), 12, 36),
             (12, 24, (6, 2), 12, 36), (12, 10, (1,), 5, 30)]
    dropped = kept = 0
    for in_f, out_f, groups, offset, vout in cases:
        for shuffle in (False, True):
            for shape in ((5, 7, in_f), (6, in_f)):
                base = nn.Linear(in_f, out_f).double()
                layer = ConsolidatorLinear(base, groups, channel_shuffle=shuffle,
                                           drop_rate=drop_rate, init_range=0.3,
                                           row_offset=offset,
                                           virtual_out_features=vout).double().train()
                params = [base.weight, base.bias, *layer.branches.parameters()]
                x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
                w0_before = base.weight.detach().clone()

                def run(forward):
                    torch.manual_seed(3)
                    y = forward()
                    grads = torch.autograd.grad((y * y.detach().cos()).sum(), [x, *params])
                    return y.detach(), grads

                ref = run(lambda: layer.forward_reference(x))
                masks = None

                def compiled():
                    nonlocal masks
                    masks = layer.host_masks(shape[0])
                    return compiled_path.compiled_linear(
                        x, base.weight, base.bias, [b.weight for b in layer.branches],
                        [b.bias for b in layer.branches], layer.geometries, masks, drop_rate)

                got = run(compiled)
                assert (masks is None) == (drop_rate == 0)
                if masks is not None:
                    assert masks.device.type == "cpu"
                    dropped += int((masks == 0).sum())
                    kept += int((masks > 0).sum())
                torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
                for g, r in zip(got[1], ref[1]):
                    torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
                assert torch.equal(base.weight.detach(), w0_before)
    assert drop_rate == 0 or (dropped > 20 and kept > 20), (dropped, kept)


class _Block(nn.Module):
    """LayerNorm -> linear -> GELU -> linear, the shape of a ViT MLP: the two adapted
    inputs are a LayerNorm's and a GELU's output, which the floor never keeps."""

    def __init__(self, adapted: bool):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 32)
        for lin in (self.fc1, self.fc2):
            lin.weight.requires_grad_(False)
        if adapted:
            self.fc1 = ConsolidatorLinear(self.fc1, (16,), channel_shuffle=True,
                                          drop_rate=0.25, init_range=0.05)
            self.fc2 = ConsolidatorLinear(self.fc2, (16,), channel_shuffle=True,
                                          drop_rate=0.25, init_range=0.05)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _saved_bytes(model, x) -> int:
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return sum(seen.values())


def test_inductor_rebuilds_adapted_inputs_instead_of_saving_them(monkeypatch):
    """Under inductor the joint-graph pass makes the partitioner rebuild the LayerNorm's and
    the GELU's outputs in backward: the adapted block saves what the floor (same block, plain
    frozen linears) saves, plus only the tiny masks; without the pass both inputs are kept."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    x = torch.randn(8, 16, 32)
    sizes = {}
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        for name, adapted, pass_on in (("floor", False, True), ("adapted", True, True),
                                       ("no pass", True, False)):
            if not pass_on:
                monkeypatch.setattr(compiled_path, "recompute_inputs", lambda graph: 0)
            torch._dynamo.reset()
            model = _Block(adapted).train()
            compiled = torch.compile(model)
            compiled(x).sum().backward()  # compile
            sizes[name] = _saved_bytes(compiled, x)
    activation = 8 * 16 * 4  # bytes of one feature over every row
    assert sizes["adapted"] <= sizes["floor"] + 64, sizes  # the masks: (8, 1) floats each
    assert sizes["no pass"] >= sizes["floor"] + activation * (32 + 128), sizes


class _AdaptedStack(nn.Module):
    """Two adapted linears the way a ViT block holds them: one whole layer, then one row slice
    of a fused 96-row projection (offset 32), each with two shuffled branches and a bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = ConsolidatorLinear(nn.Linear(32, 64), (16, 8), channel_shuffle=True,
                                    init_range=0.05)
        self.b = ConsolidatorLinear(nn.Linear(64, 32), (16, 8), channel_shuffle=True,
                                    init_range=0.05, row_offset=32, virtual_out_features=96)
        for layer in (self.a, self.b):
            layer.base_layer.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_the_pass_is_chained_ahead_of_a_configured_one(monkeypatch):
    """Installing the joint-graph pass keeps a user's pass running after it, caches only when
    that pass can be cached, and is idempotent."""
    import torch._inductor.config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    calls = []

    class UserPass(CustomGraphPass):
        def __call__(self, graph):
            calls.append("user")

        def uuid(self):
            return "user-pass-1"

    monkeypatch.setattr(compiled_path, "recompute_inputs", lambda graph: calls.append("ours"))
    # inductor's config is patched through its own context (monkeypatch would delete the entry)
    with inductor_config.patch(joint_custom_pre_pass=UserPass()):
        compiled_path._install_pass()
        installed = inductor_config.joint_custom_pre_pass
        compiled_path._install_pass()
        assert inductor_config.joint_custom_pre_pass is installed
        installed(torch.fx.Graph())
        assert calls == ["ours", "user"]
        assert installed.uuid()[1] == "user-pass-1"
    with inductor_config.patch(joint_custom_pre_pass=lambda graph: None):
        compiled_path._install_pass()
        assert inductor_config.joint_custom_pre_pass.uuid() is None  # a plain callable: no cache
    with inductor_config.patch(joint_custom_pre_pass=None):
        compiled_path._install_pass()
        assert inductor_config.joint_custom_pre_pass.uuid().startswith("consolidator_hf.")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_inductor_gradients_match_reference(autocast, formula):
    """torch.compile (inductor) of the default path gives the reference's gradients: fp32 to
    1e-4, bf16 autocast within bf16 tolerance (merges and sums in fp32 either way).

    Inductor compiles the adapted layers only: the whole-model capture (one graph, no
    recompiles, same gradients) is tested above with aot_eager, and inductor's cold C++ build of
    a whole tiny ViT cost ~60 s per dtype against ~20 s for these layers."""
    _check_inductor_gradients("cpu", autocast)


def _check_inductor_gradients(device: str, autocast: bool) -> None:
    model = _AdaptedStack().to(device).train()
    x = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(1)).to(device)
    layers = (model.a, model.b)
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if autocast else \
        (lambda: torch.autocast(device, enabled=False))
    for layer in layers:
        layer.impl = "reference"
    with ctx():
        ref = _grads(model, model, x)
    for layer in layers:
        layer.impl = "fast"
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with ctx():
        got = _grads(model, compiled, x)
    assert len(ref) == 8  # both layers' two branches: weight and bias each
    _assert_close(got, ref, 5e-2 if autocast else 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cuda_formula", ["ops", "traced"])
def test_cuda_inductor_gradients_match_reference(autocast, cuda_formula, monkeypatch):
    """The same on a GPU, for both compiled formulations (traced is the GPU default)."""
    monkeypatch.setitem(compiled_path.FORMULAS, "cuda", cuda_formula)
    _check_inductor_gradients("cuda", autocast)


class _NoHostReads(TorchDispatchMode):
    """Fails on every op that reads a tensor's value onto the host."""

    BANNED = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "unique",
              "_unique2", "masked_select"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.BANNED:
            raise AssertionError(f"host read of a tensor inside a training step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("drop_rate, gather_runs", [(0.0, None), (0.3, None), (0.3, 1)],
                         ids=["drop0", "drop0.3", "drop0.3-gathered"])
def test_eager_training_step_reads_nothing_back_to_the_host(drop_rate, gather_runs, monkeypatch):
    """A training forward and backward (eager, default impl, two branches) performs no host
    read of a tensor value (no item/tolist/nonzero/...): which samples dropped is known on the
    host because the layer drew the masks there (host memory, read before the tensor goes to
    the model's device), not read back from a tensor the step computed. ``gather_runs=1``: the
    dropped samples' ids go to the device as an index (built from host data)."""
    if gather_runs is not None:
        monkeypatch.setattr(fast_path, "GATHER_RUNS", gather_runs)
    model = _model(tiny_vit, drop_rate, groups=(16, 8))
    px = pixels(4)
    model(pixel_values=px)  # the union caches are built once, outside the step

    def banned(*_args, **_kwargs):
        raise AssertionError("Tensor.tolist inside a training step")

    monkeypatch.setattr(torch.Tensor, "tolist", banned)
    with _NoHostReads():
        model(pixel_values=px).logits.square().sum().backward()
    assert all(p.grad is not None for _, l in model.consolidator_layers()
               for p in l.branches.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("drop_rate, gather_runs", [(0.0, None), (0.3, None), (0.3, 1)],
                         ids=["drop0", "drop0.3", "drop0.3-gathered"])
def test_cuda_training_step_never_synchronises(drop_rate, gather_runs, monkeypatch):
    # gather_runs=1: the dropped samples' index goes to the GPU (pinned, non-blocking copy)
    if gather_runs is not None:
        monkeypatch.setattr(fast_path, "GATHER_RUNS", gather_runs)
    model = _model(tiny_vit, drop_rate, groups=(16, 8)).cuda()
    px = pixels(4).cuda()
    model(pixel_values=px).logits.sum().backward()  # warm-up: caches, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(pixel_values=px).logits.square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
