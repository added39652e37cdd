"""Distributed and compiled training, verified by numbers: DDP on 2 CPU ranks (accelerate,
gloo) against one process over the same global batch, FSDP2 on 2 CPU ranks (fully_shard under
torchrun) against one process and across a checkpoint/resume, ``torch_compile`` against eager,
and ``bf16`` on the CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from consolidator_hf import ConsolidatorModel
from consolidator_hf.training import FinetuneConfig, run_finetune
from tiny_vtab import write_tiny_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "finetune.py")
WORKER = os.path.join(ROOT, "tests", "fsdp_worker.py")
UNUSED_WARNING = "find_unused_parameters=True"


def _env():
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path,
                HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_workdir(tmp_path_factory.mktemp("dist"))


def _fields(tiny, out, **kw):
    # drop 0 (no random masks), no warmup; 30 training images divide into global batches of 6
    return dict(model=str(tiny / "backbone"), task="tiny_task", data_dir=str(tiny / "vtab"),
                num_classes=3, groups=(8,), drop_rate=0.0, num_train_epochs=1, learning_rate=0.01,
                warmup_epochs=0, save_strategy="no", logging_steps=1, use_cpu=True,
                output_dir=str(out), **kw)


def _flags(fields):
    out = []
    for k, v in fields.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif isinstance(v, tuple):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def _logits(model, pixel_values):
    with torch.no_grad():
        return model.eval()(pixel_values=pixel_values).logits


def test_ddp_on_two_cpu_ranks_equals_one_process_over_the_global_batch(tiny):
    ddp_out, single_out = tiny / "ddp", tiny / "single"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", SCRIPT, *_flags(_fields(tiny, ddp_out, batch_size=3))]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    # Per-device batch 3 on 2 ranks: accelerate hands consecutive sampler batches to the ranks,
    # so each global batch is the single process's batch of 6 (same seed, same order).
    run_finetune(FinetuneConfig(**_fields(tiny, single_out, batch_size=6)))
    ddp = json.load(open(ddp_out / "metrics.json"))
    single = json.load(open(single_out / "metrics.json"))
    assert ddp["world_size"] == 2 and ddp["parallel_mode"] == "distributed"
    assert single["world_size"] == 1
    assert ddp["global_step"] == single["global_step"] == 5
    assert UNUSED_WARNING not in log  # find_unused_parameters=False: nothing unused in a ViT

    a = load_file(ddp_out / "adapter" / "consolidator_model.safetensors")
    b = load_file(single_out / "adapter" / "consolidator_model.safetensors")
    base = load_file(tiny / "backbone" / "model.safetensors")
    assert sorted(a) == sorted(b)
    # The key projections' biases have an exactly-zero true gradient (softmax is unchanged by a
    # shift shared by all keys): what AdamW steps them by is normalised fp32 rounding noise,
    # which differs between an all-reduced and a one-process sum. Every other tensor must match.
    key_bias = [k for k in a if k.endswith("k_proj.bias")]
    assert key_bias
    for k in a:
        if k not in key_bias:
            assert (a[k] - b[k]).abs().max().item() <= 1e-5, k
    assert max((a[k] - base[k]).abs().max().item() for k in a if k in base) > 1e-3  # it trained
    # and the key biases do not change what the models compute
    x = torch.randn(4, 3, 16, 16)
    la = _logits(ViTForImageClassification.from_pretrained(ddp_out / "merged"), x)
    lb = _logits(ViTForImageClassification.from_pretrained(single_out / "merged"), x)
    assert (la - lb).abs().max().item() <= 1e-5


def test_fsdp2_on_two_cpu_ranks_trains_resumes_and_writes_loadable_outputs(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           WORKER, str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.load(open(tmp_path / "result.json"))
    assert res["world_size"] == 2 and res["keys_match"]
    assert res["moved"] > 1e-2  # the adapter trained
    # the fast path's in-place patch of the (all-gathered) frozen weights leaves them bit-exact
    assert res["frozen_count"] > 0 and res["frozen_changed"] == 0.0
    for impl in ("fast", "reference"):
        assert res[f"{impl}_sharded_vs_single"] <= 1e-5, res
        assert res[f"{impl}_resumed_vs_straight"] <= 1e-6, res
    assert res["fast_vs_reference_sharded"] <= 1e-5, res
    # outputs of the sharded run load with plain transformers and match the adapter
    from tiny import tiny_vit

    x = torch.load(tmp_path / "x.pt", weights_only=True)
    merged = ViTForImageClassification.from_pretrained(tmp_path / "merged")
    adapter = ConsolidatorModel.from_pretrained(tiny_vit(seed=0), tmp_path / "adapter")
    assert (_logits(merged, x) - _logits(adapter, x)).abs().max().item() <= 1e-5


def test_accelerate_fsdp_config_on_cpu_is_refused(tiny, monkeypatch):
    # accelerate would silently run DDP: the run stops before training and says why
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP was requested"):
        run_finetune(FinetuneConfig(**_fields(tiny, tiny / "fsdp-cpu", batch_size=6, max_steps=1)))
    assert not os.path.exists(tiny / "fsdp-cpu" / "metrics.json")


def test_torch_compile_matches_eager(tiny):
    # the default impl (it compiles whole, tests/test_compile.py); drop 0 so that eager and
    # compiled draw no random numbers that could differ. aot_eager: dynamo + AOT autograd
    # through the Trainer without inductor's C++ build (~60 s cold); inductor's numerics on
    # the same models are tested in test_compile.py.
    kw = dict(batch_size=6, max_steps=3, torch_compile_backend="aot_eager")
    eager = run_finetune(FinetuneConfig(**_fields(tiny, tiny / "eager", **kw)))
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = run_finetune(FinetuneConfig(**_fields(tiny, tiny / "compiled", torch_compile=True,
                                                     **kw)))
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled the model
    assert compiled["config"]["torch_compile"] is True
    # one graph: no recompilation (problem_type unset used to recompile after the first forward)
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled["global_step"] == eager["global_step"] == 3
    for key in ("accuracy", "eval_loss", "train_loss"):
        assert compiled[key] == pytest.approx(eager[key], abs=1e-5), key
    a = load_file(tiny / "compiled" / "adapter" / "consolidator_model.safetensors")
    b = load_file(tiny / "eager" / "adapter" / "consolidator_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        if not k.endswith("k_proj.bias"):  # zero true gradient, see the DDP test
            assert (a[k] - b[k]).abs().max().item() <= 1e-5, k
    x = torch.randn(4, 3, 16, 16)
    la = _logits(ViTForImageClassification.from_pretrained(tiny / "compiled" / "merged"), x)
    lb = _logits(ViTForImageClassification.from_pretrained(tiny / "eager" / "merged"), x)
    assert (la - lb).abs().max().item() <= 1e-5


def test_torch_compile_with_drop_and_a_partial_last_batch_matches_eager(tiny):
    # drop 0.1 and batches of 7 from 30 images (the last one of 2 recompiles with a symbolic
    # batch size): aot_eager runs the graph's torch.rand on eager's CPU generator, so the
    # compiled run draws the eager run's masks and must end where it ends.
    kw = dict(batch_size=7, torch_compile_backend="aot_eager")
    fields = {**_fields(tiny, tiny / "eager-drop", **kw), "drop_rate": 0.1}
    eager = run_finetune(FinetuneConfig(**fields))
    compiled = run_finetune(FinetuneConfig(**{**fields, "output_dir": str(tiny / "compiled-drop"),
                                              "torch_compile": True}))
    assert compiled["global_step"] == eager["global_step"] == 5
    for key in ("accuracy", "eval_loss", "train_loss"):
        assert compiled[key] == pytest.approx(eager[key], abs=1e-5), key
    a = load_file(tiny / "compiled-drop" / "adapter" / "consolidator_model.safetensors")
    b = load_file(tiny / "eager-drop" / "adapter" / "consolidator_model.safetensors")
    for k in a:
        if not k.endswith("k_proj.bias"):  # zero true gradient, see the DDP test
            assert (a[k] - b[k]).abs().max().item() <= 1e-5, k


def test_bf16_finetune_on_cpu(tiny):
    m = run_finetune(FinetuneConfig(**_fields(tiny, tiny / "bf16", batch_size=6, max_steps=3,
                                              bf16=True)))
    assert m["config"]["bf16"] is True and m["global_step"] == 3
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in m["loss_history"])
    merged = ViTForImageClassification.from_pretrained(tiny / "bf16" / "merged")
    assert merged.dtype == torch.float32  # the weights stay fp32; autocast is compute only
    adapter = ConsolidatorModel.from_pretrained(
        ViTForImageClassification.from_pretrained(tiny / "backbone"), tiny / "bf16" / "adapter")
    x = torch.randn(4, 3, 16, 16)
    assert (_logits(merged, x) - _logits(adapter, x)).abs().max().item() <= 1e-5


def test_unused_trainable_parameters_finds_what_a_forward_does_not_reach():
    from consolidator_hf import ConsolidatorConfig
    from consolidator_hf.training.trainer import unused_trainable_parameters
    from tiny import pixels, tiny_dinov2, tiny_vit

    example = {"pixel_values": pixels(1)}
    adapted = ConsolidatorModel(tiny_vit(), ConsolidatorConfig(groups=(8,), drop_rate=0.5,
                                                               modules_to_save=["classifier"]))
    adapted.eval()
    state = torch.random.get_rng_state()
    assert unused_trainable_parameters(adapted, example) == []  # dropped branches still get grads
    assert torch.equal(torch.random.get_rng_state(), state)  # the data order is untouched
    assert all(p.grad is None for p in adapted.parameters()) and not adapted.training
    full = tiny_dinov2()  # every parameter trainable: Dinov2's mask token is used only with masks
    full.requires_grad_(True)
    assert unused_trainable_parameters(full, example) == ["dinov2.embeddings.mask_token"]
