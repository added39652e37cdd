import json
import os

from consolidator_hf.data import task_names
from script_module import load_script

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class Out:
    def __init__(self, returncode, stdout, stderr=""):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def dry(capsys, *args):
    """The sweep's main() in-process."""
    try:
        rc = load_script("vtab_sweep").main(list(args))
    except SystemExit as e:
        rc, captured = e.code, capsys.readouterr()
        return Out(1 if rc else 0, captured.out, str(rc) + captured.err)
    except ValueError as e:
        return Out(1, capsys.readouterr().out, str(e))
    captured = capsys.readouterr()
    return Out(rc, captured.out, captured.err)


def test_dry_run_prints_one_launch_per_task(tmp_path, capsys):
    out = dry(capsys, "--data-dir", "data/vtab-1k", "--output-dir", str(tmp_path), "--dry-run", "--model", "m", "--bf16")
    lines = [l for l in out.stdout.splitlines() if l.startswith("[")]
    assert len(lines) == 19
    for line, task in zip(lines, task_names()):
        assert f"] {task}: " in line
        cmd = line.split(": ", 1)[1].split()
        assert os.path.basename(cmd[0]) == "accelerate" and cmd[1] == "launch"
        assert cmd[2].endswith(os.path.join("scripts", "finetune.py"))
        assert cmd[cmd.index("--config") + 1].endswith(os.path.join("configs", "vtab", "vit_b16_in21k", f"{task}.yaml"))
        assert cmd[cmd.index("--data-dir") + 1] == "data/vtab-1k"
        assert cmd[cmd.index("--output-dir") + 1] == os.path.join(str(tmp_path), task)
        assert cmd[-3:] == ["--model", "m", "--bf16"]  # passed through
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_subset_skip_and_accelerate_config(tmp_path, capsys):
    os.makedirs(tmp_path / "svhn")
    (tmp_path / "svhn" / "metrics.json").write_text(json.dumps({"task": "svhn", "accuracy": 0.9}))
    out = dry(capsys, "--data-dir", "D", "--output-dir", str(tmp_path), "--dry-run", "--tasks", "svhn,cifar", "oxford_iiit_pet",
                "--config-set", "mocov3_vit_b16", "--accelerate-config", "configs/accelerate/cpu.yaml")
    lines = [l for l in out.stdout.splitlines() if l.startswith("[")]
    assert [l.split("]")[1].split(":")[0].strip() for l in lines] == ["cifar100", "svhn", "oxford_pet"]
    assert "svhn: skipped" in lines[1] and "metrics.json exists" in lines[1]
    assert "--config_file configs/accelerate/cpu.yaml" in lines[0]
    assert os.path.join("mocov3_vit_b16", "cifar100.yaml") in lines[0]


def test_sweep_refuses_per_task_flags_and_unknown_tasks(tmp_path, capsys):
    out = dry(capsys, "--data-dir", "D", "--output-dir", str(tmp_path), "--dry-run", "--task", "dtd")
    assert out.returncode != 0 and "--task is set per task by the sweep" in out.stderr
    out = dry(capsys, "--data-dir", "D", "--output-dir", str(tmp_path), "--dry-run", "--tasks", "imagenet")
    assert out.returncode != 0 and "unknown VTAB-1k task 'imagenet'" in out.stderr


def test_sweep_runs_accelerate_launch_and_resumes(tmp_path, capsys):
    # a stand-in training script: writes metrics.json from its arguments, fails for dtd
    fake = tmp_path / "fake_finetune.py"
    fake.write_text(
        "import argparse, json, os, sys, yaml\n"
        "p = argparse.ArgumentParser(); p.add_argument('--config'); p.add_argument('--data-dir')\n"
        "p.add_argument('--output-dir'); p.add_argument('--seed', type=int)\n"
        "a = p.parse_args(); cfg = yaml.safe_load(open(a.config))\n"
        "if cfg['task'] == 'dtd': sys.exit(3)\n"
        "os.makedirs(a.output_dir, exist_ok=True)\n"
        "json.dump({'task': cfg['task'], 'accuracy': 0.5, 'seed': a.seed, 'lr': cfg['learning_rate'],\n"
        "           'use_cpu': os.environ.get('ACCELERATE_USE_CPU')},\n"
        "          open(os.path.join(a.output_dir, 'metrics.json'), 'w'))\n")
    out_dir = tmp_path / "out"
    args = ["--data-dir", "D", "--output-dir", str(out_dir), "--tasks", "svhn,dtd", "--finetune-script", str(fake),
            "--accelerate-config", os.path.join(ROOT, "configs", "accelerate", "cpu.yaml"), "--seed", "7"]
    out = dry(capsys, *args)  # not a dry run: main() in-process, each task a real `accelerate launch`
    assert out.returncode == 1, out.stdout + out.stderr
    assert "dtd: FAILED (exit status" in out.stdout and "1 run, 0 skipped (already done), 1 failed: dtd" in out.stdout
    metrics = json.load(open(out_dir / "svhn" / "metrics.json"))
    assert metrics == {"task": "svhn", "accuracy": 0.5, "seed": 7, "lr": 0.01,
                       "use_cpu": "True"}  # cpu.yaml reached the launched process
    assert not (out_dir / "dtd").exists()
    out = dry(capsys, *args, "--tasks", "svhn")
    assert out.returncode == 0 and "svhn: skipped" in out.stdout and "0 run, 1 skipped" in out.stdout
