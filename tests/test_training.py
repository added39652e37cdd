"""consolidator_hf.training: the Trainer pipeline end to end on a tiny model and tiny data."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback, ViTForImageClassification

from consolidator_hf import ConsolidatorModel
from consolidator_hf.training import (
    TRAINABLE_WEIGHTS_NAME,
    FinetuneConfig,
    apply_recipe,
    run_finetune,
    warmup_cosine_lambda,
)
from tiny_vtab import tiny_finetune_config, write_tiny_workdir
from fresh_python import run_fresh


def _cfg(tmp, name, **kw):
    return tiny_finetune_config(tmp, name, **{
        **dict(method="consolidator", num_train_epochs=4, save_strategy="no"), **kw})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_tiny_workdir(tmp_path_factory.mktemp("finetune"))


@pytest.fixture(scope="module")
def consolidator_run(workdir):
    cfg = _cfg(workdir, "cons", drop_rate=0.1, save_strategy="steps", save_steps=5)
    return cfg, run_finetune(cfg)


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_consolidator_run_trains_and_writes_outputs(consolidator_run):
    cfg, m = consolidator_run
    out = cfg.output_dir
    for key in ("task", "method", "accuracy", "trainable_params", "stored_params",
                "train_runtime_s", "world_size"):
        assert key in m
    on_disk = json.load(open(os.path.join(out, "metrics.json")))
    assert on_disk["accuracy"] == m["accuracy"] and 0.0 <= m["accuracy"] <= 1.0
    assert m["num_train_examples"] == 30 and m["num_eval_examples"] == 12
    assert m["world_size"] == 1 and m["method"] == "consolidator"
    # 30 images / batch 8 -> 4 steps an epoch, 4 epochs
    assert m["global_step"] == 16
    losses = [l for _, l in m["loss_history"]]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    assert m["accuracy"] > 0.5  # a learnable task; chance is 1/3
    for f in ("adapter/consolidator_config.json", "adapter/consolidator_model.safetensors",
              "merged/config.json", "merged/model.safetensors",
              "merged/preprocessor_config.json", "merged/README.md"):
        assert os.path.isfile(os.path.join(out, f)), f
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(out, "merged", "README.md"))  # the publishing card
    assert "consolidator" in card.data.tags and "no inference overhead" in card.text
    results = card.data.eval_results
    assert any(r.metric_type == "accuracy" and r.metric_value == m["accuracy"] for r in results)
    assert f"{m['trainable_params']:,}" in card.text and f"{m['stored_params']:,}" in card.text
    adapter_card = ModelCard.load(os.path.join(out, "adapter", "README.md"))
    assert adapter_card.data.library_name == "consolidator_hf"


def test_checkpoint_holds_no_backbone_tensor(consolidator_run):
    cfg, m = consolidator_run
    ckpts = sorted(os.listdir(os.path.join(cfg.output_dir, "checkpoints")))
    assert ckpts, "no checkpoint written"
    ckpt = os.path.join(cfg.output_dir, "checkpoints", ckpts[-1])
    files = set(os.listdir(ckpt))
    assert {"consolidator_model.safetensors", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "training_args.bin"}
    keys = _keys(os.path.join(ckpt, "consolidator_model.safetensors"))
    # raw branches + adapted-layer biases + LayerNorms + head: exactly the trainable tensors
    assert sum(math.prod(s) for s in keys.values()) == m["trainable_params"]
    for k in keys:
        assert (".branches." in k or k.endswith(".bias") or "layernorm" in k.lower()
                or k.startswith("classifier.")), k
    assert not any("patch_embeddings" in k or "position_embeddings" in k or "cls_token" in k
                   or k.endswith("q_proj.weight") or k.endswith("fc1.weight") for k in keys)


_LOAD_MERGED = r"""
import sys, torch
from transformers import AutoModelForImageClassification
m = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(m(pixel_values=x).logits, sys.argv[3])
assert not any(n.startswith("consolidator_hf") for n in sys.modules), "imported consolidator_hf"
print(type(m).__name__)
"""


def test_merged_loads_without_the_library_and_matches_the_adapter(consolidator_run, tmp_path):
    cfg, _ = consolidator_run
    base = ViTForImageClassification.from_pretrained(cfg.model, num_labels=3)
    adapted = ConsolidatorModel.from_pretrained(base, os.path.join(cfg.output_dir, "adapter"))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = adapted.eval()(pixel_values=x).logits
    torch.save(x, tmp_path / "x.pt")
    # a clean interpreter: the worktree is not importable, so consolidator_hf cannot sneak in
    r = run_fresh(_LOAD_MERGED, os.path.join(cfg.output_dir, "merged"), str(tmp_path / "x.pt"),
                  str(tmp_path / "y.pt"), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ViTForImageClassification" in r.stdout
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert (got - expected).abs().max().item() <= 1e-5


class _KillAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt(f"killed after checkpoint-{state.global_step}")


def test_resume_after_kill_gives_the_same_adapter(workdir):
    kw = dict(drop_rate=0.2, max_steps=7, save_strategy="steps", save_steps=3, warmup_epochs=1,
              warmup_start_lr=1e-3, min_lr=1e-4)
    whole = run_finetune(_cfg(workdir, "uninterrupted", **kw))
    killed = _cfg(workdir, "killed", **kw)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(killed, callbacks=[_KillAfterFirstSave()])
    assert os.listdir(os.path.join(killed.output_dir, "checkpoints")) == ["checkpoint-3"]
    resumed = run_finetune(_cfg(workdir, "killed", resume_from_checkpoint="last", **kw))
    assert resumed["global_step"] == whole["global_step"] == 7
    a = _keys(os.path.join(workdir, "uninterrupted", "adapter", "consolidator_model.safetensors"))
    with safe_open(os.path.join(workdir, "uninterrupted", "adapter",
                                "consolidator_model.safetensors"), "pt") as fa, \
         safe_open(os.path.join(killed.output_dir, "adapter",
                                "consolidator_model.safetensors"), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys()) == set(a)
        worst = max((fa.get_tensor(k) - fb.get_tensor(k)).abs().max().item() for k in a)
    assert worst <= 1e-6
    # the resumed run logged the steps after the checkpoint with the same losses
    tail = dict((s, l) for s, l in whole["loss_history"])
    for step, loss in resumed["loss_history"]:
        assert abs(tail[step] - loss) <= 1e-5


@pytest.mark.parametrize("method", ["linear", "bitfit", "full", "lora"])
def test_every_method_runs(workdir, method):
    if method == "lora":
        pytest.importorskip("peft")
    cfg = _cfg(workdir, f"m-{method}", method=method, max_steps=2, save_strategy="steps",
               save_steps=2)
    m = run_finetune(cfg)
    model = ViTForImageClassification.from_pretrained(os.path.join(cfg.output_dir, "merged"))
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    expected = {"linear": head, "full": total}
    if method in expected:
        assert m["trainable_params"] == expected[method]
    else:
        assert head < m["trainable_params"] < total / 2
    ckpt = os.path.join(cfg.output_dir, "checkpoints", "checkpoint-2")
    if method != "full":
        assert "model.safetensors" not in os.listdir(ckpt)
        keys = _keys(os.path.join(ckpt, TRAINABLE_WEIGHTS_NAME))
        assert sum(math.prod(s) for s in keys.values()) == m["trainable_params"]
    if method == "bitfit":
        assert all(k.endswith(".bias") or "layernorm" in k or k.startswith("classifier.")
                   for k in keys)
    if method in ("linear", "bitfit"):
        assert os.path.isfile(os.path.join(cfg.output_dir, "adapter", TRAINABLE_WEIGHTS_NAME))
    if method == "lora":
        assert os.path.isfile(os.path.join(cfg.output_dir, "adapter", "adapter_config.json"))


def test_warmup_cosine_schedule():
    f = warmup_cosine_lambda(100, 10, base_lr=1e-3, warmup_start_lr=1e-6, min_lr=1e-5)
    assert f(0) * 1e-3 == pytest.approx(1e-6)
    assert f(5) * 1e-3 == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert f(10) == pytest.approx(1.0)
    assert f(55) * 1e-3 == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert f(100) * 1e-3 == pytest.approx(1e-5)
    g = warmup_cosine_lambda(10, 0, base_lr=1.0)
    assert g(0) == 1.0 and g(10) == pytest.approx(0.0, abs=1e-12)


def test_paper_recipe_fills_defaults_and_keeps_explicit_fields():
    from consolidator_hf.recipes import paper_recipe

    r = paper_recipe("cifar100")
    cfg = apply_recipe(FinetuneConfig(task="cifar", recipe="paper", batch_size=32))
    assert cfg.learning_rate == r.training["learning_rate"]
    assert cfg.weight_decay == r.training["weight_decay"]
    assert cfg.drop_rate == r.consolidator["drop_rate"]
    assert cfg.warmup_start_lr == 1e-6 and cfg.min_lr == 1e-5 and cfg.warmup_epochs == 10
    assert cfg.preprocess == "paper" and cfg.groups == (384,)
    assert cfg.qkv_grouping == r.consolidator["qkv_grouping"] == "fused"
    assert cfg.backbone_drop_path == r.consolidator["backbone_drop_path"] == 0.1
    assert cfg.batch_size == 32  # given explicitly: kept
    assert apply_recipe(FinetuneConfig(task="cifar100")).learning_rate == 1e-3  # custom: untouched
    with pytest.raises(ValueError, match="task"):
        apply_recipe(FinetuneConfig(recipe="paper"))


@pytest.mark.parametrize("field,value", [("method", "adalora"), ("preprocess", "timm"),
                                         ("learning_rate", 0.0), ("warmup_epochs", -1.0),
                                         ("save_strategy", "best")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        FinetuneConfig(**{field: value})


def test_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="learning_rat"):
        FinetuneConfig.from_dict({"learning_rat": 1e-3})
