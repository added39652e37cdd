"""The first hour of a new user (issue 16): refused output folders, one-line CLI errors, defaults
in --help, did-you-mean task names, all list files validated, warmup clamping, quiet loading,
paper preprocessing at the model's size, honest cards and reports."""

import json
import os
import subprocess
import sys

import pytest

from consolidator_hf.cli import run_cli
from consolidator_hf.data import check_vtab_task, closest_task, get_task, load_vtab1k
from consolidator_hf.training import FinetuneConfig, clamp_warmup, existing_run, run_finetune
from script_module import load_script
from tiny_vtab import write_tiny_vtab, write_tiny_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_workdir(tmp_path_factory.mktemp("ux"))


def _cfg(tiny, out, **kw):
    base = dict(model=str(tiny / "backbone"), task="tiny_task", data_dir=str(tiny / "vtab"),
                num_classes=3, groups=(8,), batch_size=8, max_steps=1, warmup_epochs=0,
                save_strategy="no", output_dir=str(out), logging_steps=1)
    base.update(kw)
    return FinetuneConfig(**base)


def _cli(script, *args, env=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def _one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------- output folders
def test_a_folder_holding_another_run_is_refused_and_overwrite_clears_it(tiny):
    out = tiny / "shared-out"
    run_finetune(_cfg(tiny, out))
    assert json.load(open(out / "metadata.json"))["method"] == "consolidator"
    assert os.path.isfile(out / "adapter" / "consolidator_model.safetensors")
    with pytest.raises(ValueError) as e:  # before any work: no model loaded, nothing written
        run_finetune(_cfg(tiny, out, method="linear"))
    msg = str(e.value)
    assert "method consolidator" in msg and "task tiny_task" in msg and "from 20" in msg
    assert "--overwrite-output-dir" in msg and "--resume-from-checkpoint" in msg
    assert json.load(open(out / "metrics.json"))["method"] == "consolidator"  # untouched

    run_finetune(_cfg(tiny, out, method="linear", overwrite_output_dir=True))
    assert json.load(open(out / "metrics.json"))["method"] == "linear"
    # the old run's adapter files are gone, not mixed with the new ones
    assert sorted(os.listdir(out / "adapter")) == ["trainable_params.safetensors"]
    assert existing_run(str(out))["method"] == "linear"


def test_checkpoints_of_the_same_run_resume_only_when_asked(tiny):
    out = tiny / "ckpt-out"
    run_finetune(_cfg(tiny, out, max_steps=2, save_strategy="steps", save_steps=1,
                      save_total_limit=None))
    assert sorted(os.listdir(out / "checkpoints"))[:2] == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(ValueError, match="checkpoints of this run.*--resume-from-checkpoint last"):
        run_finetune(_cfg(tiny, out, max_steps=2, save_strategy="steps", save_steps=1))
    m = run_finetune(_cfg(tiny, out, max_steps=3, save_strategy="steps", save_steps=1,
                          resume_from_checkpoint="last"))
    assert m["global_step"] == 3
    # resuming another method's checkpoints is refused, naming what is there
    with pytest.raises(ValueError, match="holds another run.*method consolidator"):
        run_finetune(_cfg(tiny, out, method="linear", resume_from_checkpoint="last"))


def test_a_failed_resume_leaves_no_empty_folders(tiny):
    out = tiny / "never-made"
    with pytest.raises(ValueError, match="no checkpoint-\\* folder"):
        run_finetune(_cfg(tiny, out, resume_from_checkpoint="last"))
    assert not os.path.exists(out)
    # a run failing after the folder was made (a bad eval split) removes what it created
    with pytest.raises(FileNotFoundError):
        run_finetune(_cfg(tiny, out, eval_split="val200", data_dir=str(tiny / "nowhere")))
    assert not os.path.exists(out)


# ---------------------------------------------------------------------- command lines
def _in_process(script, *args, capsys, env=None, monkeypatch=None):
    """The script's own ``run_cli(main)`` in this process (no interpreter start-up):
    ``(exit status, stdout, stderr)``."""
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    code = run_cli(load_script(script).main, list(args), prog=f"{script}.py")
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_cli_prints_library_errors_as_one_line_with_exit_2(tiny, capsys, monkeypatch):
    # one real interpreter: the exit status and stderr as a shell sees them
    _one_line_error(_cli("finetune.py", "--task", "cifar1000", "--data-dir", str(tiny / "vtab")),
                    "finetune.py: error:", "did you mean 'cifar100'?")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = lambda *a, **kw: _in_process("finetune", *a, capsys=capsys, monkeypatch=monkeypatch, **kw)
    _one_line(*run("--task", "tiny_task", "--num-classes", "3", "--data-dir", str(tiny / "vtab"),
                   "--model", "/nonexistent")[::2], "no such folder '/nonexistent'")
    # the default backbone is a Hub id: offline, the message names the flag
    _one_line(*run("--task", "tiny_task", "--num-classes", "3",
                   "--data-dir", str(tiny / "vtab"))[::2],
              "the default of --model", "HF_HUB_OFFLINE=1", "--model FOLDER")
    with pytest.raises(SystemExit) as e:  # argparse's own error: names the flag, exit 2
        run("--task", "tiny_task", "--consolidator-kwargs", "{bad")
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "argument --consolidator-kwargs: not valid JSON" in err and "column 2" in err
    # --debug (or CONSOLIDATOR_DEBUG=1) shows the traceback
    code, _, err = run("--task", "cifar1000", "--debug")
    assert code == 2 and "Traceback" in err and "did you mean" in err
    code, _, err = run("--task", "cifar1000", env={"CONSOLIDATOR_DEBUG": "1"})
    assert code == 2 and "Traceback" in err


def test_a_folder_holding_a_run_is_refused_by_the_cli(tiny, capsys):
    out = tiny / "cli-out"
    run_finetune(_cfg(tiny, out))
    code, _, err = _in_process("finetune", "--task", "tiny_task", "--num-classes", "3",
                               "--data-dir", str(tiny / "vtab"), "--model", str(tiny / "backbone"),
                               "--method", "linear", "--output-dir", str(out), capsys=capsys)
    line = _one_line(code, err, "holds another run", "--overwrite-output-dir")
    assert "method consolidator" in line


HELP_DEFAULTS = {
    "finetune": ["(default: 10.0)", "(default: 384)", "(default: google/vit-base-patch16-224-in21k)",
                 "the default is a Hub id", "clamped", "(default: 0.001)"],
    "quickstart": ["(default: 150)", "1 on machines with <= 2 cores", "chance is 10 %"],
    "collect_results": ["(default: vtab_results)"],
    "push_merged": ["(default: vit)"],
    "convert_original": ["(default: hidden/64)"],
    "make_configs": ["(default: configs/vtab)"],
    "vtab_sweep": ["default"],
    "bench": ["(default: 8)", "(default: base)"],
}


@pytest.mark.parametrize("script", sorted(HELP_DEFAULTS))
def test_help_shows_the_defaults(script, capsys):
    mod = load_script(script)
    entry = getattr(mod, "build_parser", None)
    with pytest.raises(SystemExit) as e:
        if entry is not None:
            entry().parse_args(["--help"])
        elif hasattr(mod, "parse_args"):
            mod.parse_args(["--help"])
        else:
            mod.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for needle in HELP_DEFAULTS[script]:
        assert needle in text, (script, needle)


def test_quickstart_explains_its_numbers(capsys):
    code, out, err = _in_process("quickstart", "--steps", "3", "--threads", "1", capsys=capsys)
    assert code == 0, err
    assert "(chance: 0.100)" in out and "never trained on" in out
    assert "max |merged - unmerged| logits" in out
    _one_line(*_in_process("quickstart", "--steps", "0", capsys=capsys)[::2],
              "--steps and --threads must be >= 1")


# ---------------------------------------------------------------------- data and schedule
def test_task_typos_get_a_did_you_mean():
    assert closest_task("cifar1000") == "cifar100" and closest_task("zzzz") is None
    with pytest.raises(ValueError, match="did you mean 'cifar100'"):
        get_task("cifar1000")
    with pytest.raises(ValueError, match="did you mean 'oxford_pet'"):
        load_vtab1k("/nonexistent", "oxfordpet", "test")


def test_a_bad_label_in_any_list_file_fails_the_load(tmp_path):
    write_tiny_vtab(tmp_path)
    folder = tmp_path / "tiny_task"
    lines = (folder / "train800.txt").read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 7"
    (folder / "train800.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train800\.txt:3: label 7 outside \[0, 3\)"):
        load_vtab1k(tmp_path, "tiny_task", "train800val200", num_classes=3)
    with pytest.raises(ValueError, match=r"train800\.txt:3"):
        check_vtab_task(tmp_path, "tiny_task", num_classes=3)
    # opting out reads only the requested split
    ds = load_vtab1k(tmp_path, "tiny_task", "test", num_classes=3, validate_all_splits=False)
    assert len(ds) == 12


def test_warmup_longer_than_half_the_run_is_clamped(tiny):
    cfg = _cfg(tiny, tiny / "x", max_steps=-1, num_train_epochs=5, warmup_epochs=10)
    with pytest.warns(UserWarning, match="clamped to 2.5 epochs"):
        clamped = clamp_warmup(cfg, num_train_examples=30)  # 4 steps/epoch, 20 steps
    assert clamped.warmup_epochs == 2.5 and cfg.warmup_epochs == 10
    fine = _cfg(tiny, tiny / "x", max_steps=-1, num_train_epochs=5, warmup_epochs=2)
    assert clamp_warmup(fine, num_train_examples=30) is fine


# ---------------------------------------------------------------------- quiet, fitting runs
def test_runs_are_quiet_and_paper_preprocessing_uses_the_models_size(tiny, capfd):
    # the tiny backbone was saved with 3 labels; a 2-class head used to warn about id2label
    write_tiny_vtab(tiny / "two", task="two_task", num_classes=2)
    capfd.readouterr()
    m = run_finetune(_cfg(tiny, tiny / "paper-run", task="two_task", num_classes=2,
                          data_dir=str(tiny / "two"), preprocess="paper"))
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "incompatible to the `id2label`" not in err
    assert "falling back" not in err.lower() and "were not sharded" not in err
    assert m["image_size"] == 16  # the model's own size (was 224: a crash at the first forward)
    pre = json.load(open(tiny / "paper-run" / "merged" / "preprocessor_config.json"))
    assert pre["size"] == {"height": 16, "width": 16}


# ---------------------------------------------------------------------- reports and cards
def test_collect_results_says_what_it_skipped(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "metrics.json").write_text(json.dumps({"task": "digits_5to9", "accuracy": 0.9}))
    code, _, err = _in_process("collect_results", str(runs), "--no-plot", capsys=capsys)
    assert code == 0, err
    assert "skipped:" in err and "'digits_5to9' is not a VTAB-1k task" in err
    assert "no VTAB-1k run found" in err
    md = (runs / "vtab_results.md").read_text().splitlines()
    assert md[2] == "Skipped:" and "digits_5to9" in md[4]  # at the top, above the table
    _one_line(*_in_process("collect_results", str(tmp_path / "nowhere"), capsys=capsys)[::2],
              "does not exist")


def test_cards_have_no_placeholder_paths_or_empty_columns(tiny):
    out = tiny / "card-run"
    run_finetune(_cfg(tiny, out))
    for sub in ("merged", "adapter"):
        card = (out / sub / "README.md").read_text()
        assert "path/to" not in card and "<this folder" not in card
        assert str(out / sub) in card  # loads from the folder it sits in
        assert "|  |" not in card and "| |\n" not in card.replace("| | |", "")
    run_finetune(_cfg(tiny, tiny / "card-linear", method="linear"))
    card = (tiny / "card-linear" / "merged" / "README.md").read_text()
    assert "<this folder" not in card and str(tiny / "card-linear" / "merged") in card

    from consolidator_hf import ConsolidatorConfig, build_model_card, get_consolidator_model
    from tiny import tiny_vit

    model = get_consolidator_model(tiny_vit(), ConsolidatorConfig(groups=(8,)))
    card = str(build_model_card(model, metrics={"accuracy": 0.5}))  # no split known
    assert "| metric | value |" in card and "| accuracy | 0.5 |" in card
    assert "path/to" not in card
