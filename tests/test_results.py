import csv
import json
import os
import struct
import zlib

import pytest

from consolidator_hf.data import paper_results, registry, task_names
from consolidator_hf.results import build_table, read_run_metrics, to_csv
from script_module import load_script

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def write_runs(root, scores):
    for folder, acc in scores.items():
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        with open(os.path.join(root, folder, "metrics.json"), "w") as f:
            json.dump({"task": folder, "method": "consolidator", "accuracy": acc}, f)


def check_png(path):
    """A valid PNG: signature, then chunks with correct CRCs, IHDR first and IEND last."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_collect_with_missing_tasks(tmp_path, capsys):
    runs = tmp_path / "runs"
    # folder spelling "cifar" and training name "eurosat"; a non-VTAB run is ignored with a note
    write_runs(str(runs), {"cifar": 0.75, "svhn": 0.9, "eurosat": 0.96, "dmlab": 0.5, "kitti": 0.8, "digits": 0.99})
    assert load_script("collect_results").main([str(runs), "--out-dir", str(tmp_path / "table")]) == 0
    printed = capsys.readouterr().out
    assert "| natural | cifar100 | 75.00 | 74.2 | +0.80 |" in printed and "wrote png:" in printed
    md = open(tmp_path / "table" / "vtab_results.md").read()
    rows = list(csv.DictReader(open(tmp_path / "table" / "vtab_results.csv")))
    by_task = {r["task"]: r for r in rows}
    assert [r["task"] for r in rows[:19]] == task_names()
    assert [r["group"] for r in rows[:19]] == [t for t in ["natural"] * 7 + ["specialized"] * 4 + ["structured"] * 8]
    assert float(by_task["cifar100"]["ours"]) == 75.0 and float(by_task["cifar100"]["paper"]) == 74.2
    assert by_task["cifar100"]["ours_minus_paper"] == "+0.80"
    assert by_task["dtd"]["ours"] == "-" and float(by_task["dtd"]["paper"]) == 73.9
    # hand-computed: natural (75 + 90) / 2 = 82.5, specialized 96, structured (50 + 80) / 2 = 65
    assert float(by_task["natural mean"]["ours"]) == 82.5
    assert float(by_task["specialized mean"]["ours"]) == 96.0
    assert float(by_task["structured mean"]["ours"]) == 65.0
    assert float(by_task["average (mean of group means)"]["ours"]) == pytest.approx((82.5 + 96 + 65) / 3, abs=1e-4)
    assert float(by_task["mean of tasks"]["ours"]) == pytest.approx((75 + 90 + 96 + 50 + 80) / 5, abs=1e-4)
    # the paper's column over the same five tasks
    assert float(by_task["natural mean"]["paper"]) == pytest.approx((74.2 + 91.5) / 2, abs=1e-4)
    assert float(by_task["structured mean"]["paper"]) == pytest.approx((51.6 + 83.5) / 2, abs=1e-4)
    assert "| natural | cifar100 | 75.00 | 74.2 | +0.80 |" in md
    assert "| natural | dtd | - | 73.9 | - |" in md
    assert "| all | **average (mean of group means)** | 81.17 |" in md
    assert "Missing (14): caltech101, dtd," in md and "left out of every mean" in md
    assert "'digits' is not a VTAB-1k task, skipped" in md
    assert "| Consolidator (ours) | 75.00 | - |" in md  # the wide, Table-1 layout
    width, height = check_png(tmp_path / "table" / "vtab_results.png")
    assert width > 500 and height > 200


def test_all_tasks_paper_numbers_reproduce_the_paper_table(tmp_path):
    write_runs(str(tmp_path), {t: v / 100 for t, v in paper_results().items()})
    ours, notes = read_run_metrics(str(tmp_path))
    assert notes == [] and ours == pytest.approx(paper_results())
    table = build_table(ours)
    assert table.missing == []
    assert round(table.average[0], 2) == round(table.average[1], 2) == registry()["paper_average"] == 76.53
    assert round(table.mean[1], 2) == registry()["paper_mean_of_19_tasks"] == 74.16
    assert {g: round(p, 2) for g, _, p in table.group_rows} == registry()["paper_group_means"]
    rows = list(csv.reader(to_csv(table).splitlines()))
    assert rows[0] == ["group", "task", "ours", "paper", "ours_minus_paper"] and len(rows) == 1 + 19 + 5
    assert all(r[4] in ("+0.00", "-0.00") for r in rows[1:])


@pytest.mark.parametrize("payload, message", [
    ({"task": "svhn", "accuracy": 91.5}, r"'accuracy' must be a number in \[0, 1\], got 91.5"),
    ({"task": "svhn"}, r"'accuracy' must be a number in \[0, 1\], got None"),
    ("not json", "not a readable JSON file"),
])
def test_bad_metrics_files_name_the_file(tmp_path, payload, message):
    os.makedirs(tmp_path / "svhn")
    path = tmp_path / "svhn" / "metrics.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    with pytest.raises(ValueError, match=message) as err:
        read_run_metrics(str(tmp_path))
    assert str(path) in str(err.value)


def test_two_runs_of_one_task_are_refused(tmp_path):
    write_runs(str(tmp_path), {"cifar": 0.5, "cifar100": 0.6})
    with pytest.raises(ValueError, match="a second run of task 'cifar100'"):
        read_run_metrics(str(tmp_path))
