import dataclasses
import filecmp
import glob
import os

import pytest
import yaml

from consolidator_hf.data import BACKBONES, get_task, shared_recipe, task_names
from consolidator_hf.training import FinetuneConfig
from script_module import load_script

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VTAB = os.path.join(ROOT, "configs", "vtab")
ACCELERATE = os.path.join(ROOT, "configs", "accelerate")
FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)}


def test_regenerating_the_configs_gives_identical_files(tmp_path, capsys):
    load_script("make_configs").main(["--out-dir", str(tmp_path)])
    assert "wrote 38 config files" in capsys.readouterr().out
    for backbone in BACKBONES:
        fresh = sorted(os.listdir(tmp_path / backbone))
        assert fresh == sorted(os.listdir(os.path.join(VTAB, backbone))) == sorted(f"{t}.yaml" for t in task_names())
        match, mismatch, errors = filecmp.cmpfiles(str(tmp_path / backbone), os.path.join(VTAB, backbone),
                                                   fresh, shallow=False)
        assert mismatch == [] and errors == [], f"stale configs (rerun scripts/make_configs.py): {mismatch}"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_configs_hold_the_registry_recipe(backbone):
    shared = shared_recipe()
    for name in task_names():
        cfg = yaml.safe_load(open(os.path.join(VTAB, backbone, f"{name}.yaml")))
        assert set(cfg) <= FIELDS, set(cfg) - FIELDS
        recipe = get_task(name).recipe(backbone)
        assert cfg["task"] == name and cfg["method"] == "consolidator"
        assert (cfg["learning_rate"], cfg["weight_decay"], cfg["drop_rate"]) == \
            (recipe["learning_rate"], recipe["weight_decay"], recipe["drop_rate"])
        assert cfg["groups"] == shared["groups"] == [384] and cfg["channel_shuffle"] is False
        assert (cfg["num_train_epochs"], cfg["batch_size"], cfg["warmup_epochs"]) == (100, 64, 10)
        assert (cfg["warmup_start_lr"], cfg["min_lr"]) == (1e-6, 1e-5)
        assert (cfg["qkv_grouping"], cfg["backbone_drop_path"]) == \
            ("fused", shared["backbone_stochastic_depth"])
        assert (cfg["preprocess"], cfg["image_size"]) == ("paper", 224)
        assert (cfg["train_split"], cfg["eval_split"]) == ("train800val200", "test")
        expected_model = {"vit_b16_in21k": "google/vit-base-patch16-224-in21k",
                          "mocov3_vit_b16": "checkpoints/mocov3_vit_b16"}[backbone]
        assert cfg["model"] == expected_model
    # the two sets really differ where the paper's scripts do
    a = yaml.safe_load(open(os.path.join(VTAB, "vit_b16_in21k", "cifar100.yaml")))
    b = yaml.safe_load(open(os.path.join(VTAB, "mocov3_vit_b16", "cifar100.yaml")))
    assert (a["weight_decay"], a["drop_rate"]) != (b["weight_decay"], b["drop_rate"])


def test_configs_are_the_paper_recipe_as_finetune_config():
    """A config alone gives the same run settings as --recipe paper."""
    from consolidator_hf.training import apply_recipe

    for path in glob.glob(os.path.join(VTAB, "vit_b16_in21k", "*.yaml")):
        cfg = yaml.safe_load(open(path))
        cfg["groups"] = tuple(cfg["groups"])
        from_file = FinetuneConfig(**cfg)
        via_recipe = apply_recipe(FinetuneConfig(task=cfg["task"], recipe="paper"))
        for f in dataclasses.fields(FinetuneConfig):
            if f.name in cfg and f.name != "image_size":  # the recipe leaves the size to the model
                assert getattr(from_file, f.name) == getattr(via_recipe, f.name), (path, f.name)


@pytest.mark.parametrize("name, distributed, use_cpu, processes", [
    ("cpu", "NO", True, 1), ("single_gpu", "NO", False, 1), ("multi_gpu", "MULTI_GPU", False, 2),
    ("fsdp", "FSDP", False, 2)])
def test_accelerate_configs_parse_with_accelerate(name, distributed, use_cpu, processes):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = os.path.join(ACCELERATE, f"{name}.yaml")
    raw = yaml.safe_load(open(path))
    config = ClusterConfig.from_yaml_file(path)  # rejects unknown keys
    assert config.distributed_type.value == distributed == raw["distributed_type"]
    assert config.use_cpu is use_cpu and config.num_processes == processes
    # what `accelerate launch --config_file <path> script.py` makes of it, without launching
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", path, "x.py"]))
    assert args.num_processes == processes and bool(args.use_cpu) is use_cpu
    assert args.multi_gpu is (distributed == "MULTI_GPU") and args.use_fsdp is (distributed == "FSDP")
    if name == "fsdp":
        dests = {a.dest for a in launch_command_parser()._actions}
        assert set(raw["fsdp_config"]) <= dests  # every key is a launch option accelerate reads
        assert args.fsdp_version == 2 and args.fsdp_transformer_layer_cls_to_wrap == "ViTLayer"
