"""Reading a written mini-VTAB report back (``--extend``): types restored, bad files named."""

import pytest

from consolidator_apps.mini_vtab.benchmark import read_report, write_report

RUN = {"task": "digits", "group": "natural", "method": "linear", "seed": 0, "learning_rate": 0.01,
       "weight_decay": 1e-4, "drop_rate": 0.0, "val_accuracy": 0.9, "test_accuracy": 0.896,
       "trainable_params": 3850, "stored_params": 3850, "base_params": 21531274,
       "train_runtime_s": 53.5, "machine": "AMD EPYC, 2 CPUs visible"}
SELECTION = {"task": "digits", "method": "linear", "learning_rate": 0.01, "weight_decay": 1e-4,
             "drop_rate": 0.0, "val_accuracy": 0.9, "grid_size": 2, "val_accuracies": [0.725, 0.9]}


def test_a_written_report_reads_back_with_its_types(tmp_path):
    write_report({"runs": [RUN], "selection": [SELECTION]}, str(tmp_path), tasks=["digits"],
                 header="- machine: Intel Xeon\n")
    prior = read_report(str(tmp_path))
    assert prior.selection == {("digits", "linear"): SELECTION}
    assert prior.runs == {("digits", "linear", 0): RUN}


def test_an_old_report_without_the_machine_column_takes_its_header_line(tmp_path):
    old = {k: v for k, v in RUN.items() if k != "machine"}
    write_report({"runs": [old], "selection": [SELECTION]}, str(tmp_path), tasks=["digits"],
                 header="## results\n\n- machine: AMD EPYC, 2 CPUs visible; 2 worker processes\n")
    run = read_report(str(tmp_path)).runs[("digits", "linear", 0)]
    assert run["machine"] == "AMD EPYC, 2 CPUs visible; 2 worker processes"


def test_bad_reports_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="selection.csv: no such file"):
        read_report(str(tmp_path))
    write_report({"runs": [RUN, RUN], "selection": [SELECTION]}, str(tmp_path), tasks=["digits"])
    path = tmp_path / "results.csv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",0.896,", ",high,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"results\.csv, line 3: column 'test_accuracy': 'high'"):
        read_report(str(tmp_path))


def test_a_selection_outside_this_runs_grid_is_refused_before_training(tmp_path):
    from consolidator_apps.mini_vtab.benchmark import BenchmarkConfig, MethodSpec, _run_unit

    write_report({"runs": [RUN], "selection": [SELECTION]}, str(tmp_path), tasks=["digits"])
    cfg = BenchmarkConfig(backbone="unused", data_dir="unused", output_dir=str(tmp_path / "out"),
                          tasks=["digits"], seeds=[0, 1], prior=read_report(str(tmp_path)),
                          methods=[MethodSpec("linear", "linear", learning_rates=(1e-3,), weight_decays=(1e-4,))])
    with pytest.raises(ValueError, match=r"selection\.csv: digits / linear chose .*'learning_rate': 0\.01"):
        _run_unit(cfg, "digits", cfg.methods[0])
    assert not (tmp_path / "out").exists()
