"""scripts/bench.py runs end to end at tiny size and writes a valid report (no timing asserted)."""

import json
import os
import subprocess
import sys

import pytest
from script_module import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_writes_json_and_chart(tmp_path):
    out = tmp_path / "bench"
    configs = ["floor", "consolidator_fast", "consolidator_reference"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--model-size", "tiny",
         "--batch-size", "2", "--repeats", "2", "--warmup", "1", "--threads", "1",
         "--configs", *configs, "--output-dir", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| consolidator_fast |" in proc.stdout

    report = json.loads((out / "bench.json").read_text())
    assert set(report) >= {"args", "machine", "train", "inference", "notes"}
    assert report["args"]["model_size"] == "tiny"
    assert {"cpu_count", "torch", "threads", "device"} <= set(report["machine"])
    assert list(report["train"]) == configs
    for name, r in report["train"].items():
        assert len(r["step_s_all"]) == 2 and all(t > 0 for t in r["step_s_all"])
        assert {"step_s", "time_ratio_to_floor", "step_cpu_s", "cpu_time_ratio_to_floor",
                "step_s_min", "min_time_ratio_to_floor",
                "peak_mem_bytes", "mem_ratio_to_floor", "trainable_params",
                "saved_activation_bytes", "saved_activation_ratio_to_floor",
                "page_faults_per_step"} <= set(r)
        assert r["peak_mem_bytes"] >= 0 and r["saved_activation_bytes"] > 0
        assert r["peak_tensor_bytes"] > 0 and "tensor_mem_ratio_to_floor" in r
        assert len(r["page_faults_all"]) == 2 and min(r["page_faults_all"]) >= 0
    # Inputs are rebuilt, not kept, and the drop masks stay host flags: the fast path saves
    # exactly the floor's activations; the reference path keeps its branches' intermediates.
    train = report["train"]
    assert train["consolidator_fast"]["saved_activation_bytes"] == \
        train["floor"]["saved_activation_bytes"]
    assert train["consolidator_reference"]["saved_activation_ratio_to_floor"] > 1.01
    # the allocator-level peak follows: the reference's dense branch matrices and intermediates
    assert train["consolidator_reference"]["peak_tensor_bytes"] > \
        train["consolidator_fast"]["peak_tensor_bytes"]
    assert "| peak tensor memory in a step (MiB) |" in proc.stdout
    assert report["args"]["allocator"] == "tuned"
    assert {r["malloc"] for r in train.values()} == {"glibc"}
    assert report["train"]["floor"]["time_ratio_to_floor"] == 1.0
    # per-repeat ratios: this repeat's step over the floor's step of the same repeat
    for r in train.values():
        ratios = sorted(a / b for a, b in zip(r["step_s_all"], train["floor"]["step_s_all"]))
        paired = r["paired_ratio_to_floor"]
        assert paired["median"] == pytest.approx(sum(ratios) / 2)
        assert paired["q1"] <= paired["median"] <= paired["q3"]
    assert train["floor"]["paired_ratio_to_floor"] == {"median": 1.0, "q1": 1.0, "q3": 1.0}
    assert "| per repeat × floor, median [quartiles] |" in proc.stdout
    # Branches add trainable parameters on top of the floor; both impls train the same set.
    fast, ref = report["train"]["consolidator_fast"], report["train"]["consolidator_reference"]
    assert fast["trainable_params"] == ref["trainable_params"] > \
        report["train"]["floor"]["trainable_params"]

    inf = report["inference"]
    assert set(inf["inference_s"]) == {"plain", "merged", "unmerged"}
    assert inf["merged_vs_unmerged_max_abs_logit_diff"] <= 1e-5
    assert inf["merge_s"] > 0
    assert inf["adapted_layers"] == 2 * 6
    assert set(inf["layer_overhead_us"]) == {"plain", "fast", "fast_nodrop", "reference"}
    assert all(v > 0 for v in inf["layer_overhead_us"].values())
    ops = inf["layer_op_counts"]
    assert set(ops) == {"plain", "fast", "fast_nodrop", "reference"}
    for n in ops.values():
        assert n["total"] == n["forward"] + n["backward"] and n["forward"] >= 2  # LayerNorm + linear
    # a frozen linear's step: one addmm forward, an mm for the input gradient and a bias sum at least
    assert ops["plain"]["top"].get("addmm") == 1 and ops["plain"]["backward"] >= 2
    assert ops["fast"]["total"] > ops["plain"]["total"]  # the branches' work is counted, not lost
    # the dropped samples' corrections are what drop 0.1 adds (20 steps of 8 samples: some drop)
    assert ops["plain"]["total"] < ops["fast_nodrop"]["total"] < ops["fast"]["total"]
    # 64 samples: several runs of dropped samples per branch, gathered into one correction each
    ops64 = inf["layer_op_counts_b64"]
    assert set(ops64) == set(inf["layer_overhead_us_b64"]) == set(ops)
    assert ops64["plain"]["total"] == ops["plain"]["total"]
    assert ops64["fast_nodrop"]["total"] == ops["fast_nodrop"]["total"]
    # corrected run by run, 64 samples dispatched ~3.5x the ops of 8 (about 6 runs per branch
    # against < 1); gathered, a fixed number per branch that drops any sample
    assert ops64["fast"]["total"] < 2 * ops["fast"]["total"]
    assert "| host time per adapted layer" in proc.stdout and "| fast, 64 samples |" in proc.stdout
    # The adapter file holds the stored parameters in fp32 plus a header.
    assert inf["stored_params"] * 4 < inf["adapter_file_bytes"] < inf["stored_params"] * 4 + 64_000

    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_worker_bf16_steps_under_autocast(tmp_path):
    """--bf16: a training worker steps under bf16 autocast (the fast path included), so the
    activations its forward saves shrink against the same worker in fp32."""
    def worker(*extra):
        # stderr to a file: a pipe nobody reads could fill up and stall the worker
        err = open(tmp_path / f"stderr{len(extra)}.txt", "w")
        return subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--worker",
             "consolidator_fast", "--model-size", "tiny", "--batch-size", "2", "--warmup", "1",
             "--threads", "1", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    procs = {"fp32": worker(), "bf16": worker("--bf16")}
    saved = {}
    for name, proc in procs.items():
        def ask(cmd):
            proc.stdin.write(cmd + "\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        ready = json.loads(proc.stdout.readline())
        step, report = ask("step"), ask("report")
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        code = proc.wait(timeout=120)
        assert code == 0, (tmp_path / f"stderr{int(name == 'bf16')}.txt").read_text()[-3000:]
        assert ready["ready"] and step["step_s"] > 0
        saved[name] = report["saved_activation_bytes"]
    assert 0 < saved["bf16"] < 0.9 * saved["fp32"], saved


def test_peak_tensor_bytes_is_the_allocator_peak_on_the_cpu():
    """Live tensor bytes summed over the profiler's allocation and free events, in time order:
    4 MiB and 2 MiB live together, then 2 MiB + 1 MiB: the peak is exactly 6 MiB."""
    import torch

    from consolidator_apps.speed import peak_tensor_bytes

    before = torch.empty(1 << 22)  # live before the call: not counted

    def work():
        a = torch.empty(1 << 20)
        b = torch.empty(1 << 19)
        del a
        c = torch.empty(1 << 18)
        return b, c

    assert peak_tensor_bytes(work, torch.device("cpu")) == 6 << 20
    assert before.numel() == 1 << 22
    with pytest.raises(ValueError, match="device meta"):
        peak_tensor_bytes(work, torch.device("meta"))


def test_bench_jemalloc_allocator_preloads_it_or_says_what_is_missing(tmp_path, monkeypatch,
                                                                      capsys):
    """``--allocator jemalloc``: the workers run on jemalloc (read off their memory maps), or,
    where no libjemalloc is installed, the script stops with an error naming the library."""
    from consolidator_apps import speed

    bench = load_script("bench")
    monkeypatch.setattr(speed, "find_jemalloc", lambda: None)
    with pytest.raises(SystemExit):
        bench.main(["--allocator", "jemalloc", "--output-dir", str(tmp_path / "none")])
    assert "--allocator jemalloc: no libjemalloc.so.2 found" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    monkeypatch.undo()
    if speed.find_jemalloc() is None:
        pytest.skip("no libjemalloc.so.2 on this machine (the error path above ran)")
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--model-size", "tiny",
         "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--threads", "1",
         "--allocator", "jemalloc", "--configs", "floor", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["train"]["floor"]["malloc"] == "jemalloc"


def test_paired_ratios_are_per_repeat_ratios_to_the_floor():
    """Each repeat's step over the floor's step of the same repeat: median and inclusive
    quartiles; one repeat gives the ratio three times; mismatched lengths are refused."""
    from consolidator_apps import speed

    got = speed.paired_ratios([2.0, 3.0, 5.0, 4.0, 6.0], [1.0, 2.0, 5.0, 2.0, 4.0])
    # ratios 2.0, 1.5, 1.0, 2.0, 1.5 -> sorted 1.0, 1.5, 1.5, 2.0, 2.0
    assert got == {"median": 1.5, "q1": 1.5, "q3": 2.0}
    assert speed.paired_ratios([3.0], [2.0]) == {"median": 1.5, "q1": 1.5, "q3": 1.5}
    with pytest.raises(ValueError, match="2 steps against 3 floor steps"):
        speed.paired_ratios([1.0, 2.0], [1.0, 2.0, 3.0])


def test_bench_tables_the_compiled_rows_against_the_compiled_floor(tmp_path):
    """The compiled table: each compiled row over ``floor_compiled`` (ratio of medians and the
    per-repeat median and quartiles), from a report built here (compiling real workers takes
    minutes); the chart is written with the quartile bars."""
    bench = load_script("bench")
    from consolidator_apps import speed

    def row(steps, compile_s=None):
        return {"trainable_params": 10, "step_s_all": steps, "step_s": sorted(steps)[1],
                "time_ratio_to_floor": 1.0, "min_time_ratio_to_floor": 1.0,
                "cpu_time_ratio_to_floor": 1.0, "peak_mem_bytes": 2**20, "mem_ratio_to_floor": 1.0,
                "peak_tensor_bytes": 2**20, "tensor_mem_ratio_to_floor": 1.0,
                "saved_activation_bytes": 2**20, "saved_activation_ratio_to_floor": 1.0,
                "page_faults_per_step": 0, "compile_s": compile_s, "step_cpu_s": 1.0,
                "paired_ratio_to_floor": speed.paired_ratios(steps, [1.0, 1.0, 1.0])}

    fc, cc = row([1.0, 2.0, 1.0], 30), row([1.1, 2.4, 1.3], 50)
    for r, floor_row in ((fc, fc), (cc, fc)):
        r["time_ratio_to_floor_compiled"] = r["step_s"] / floor_row["step_s"]
        r["paired_ratio_to_floor_compiled"] = speed.paired_ratios(r["step_s_all"],
                                                                  floor_row["step_s_all"])
        r["cpu_time_ratio_to_floor_compiled"] = r["saved_activation_ratio_to_floor_compiled"] = 1.0
    report = {"train": {"floor": row([1.0, 1.0, 1.0]), "floor_compiled": fc,
                        "consolidator_fast_compiled": cc},
              "inference": {"inference_s": {"plain": 1.0, "merged": 1.0, "unmerged": 1.1},
                            "layer_overhead_us": {"plain": 10.0, "fast": 30.0},
                            "adapted_layers": 2, "merge_s": 0.1, "adapter_file_bytes": 100,
                            "stored_params": 25, "merged_vs_unmerged_max_abs_logit_diff": 0.0},
              "args": {"model_size": "tiny", "batch_size": 2},
              "machine": {"device": "cpu", "threads": 1, "processor": "x86_64"}}
    table = bench.markdown_table(report)
    # medians 1.3 / 1.0; per repeat 1.1, 1.2, 1.3 -> median 1.2, quartiles 1.15 and 1.25
    assert "| consolidator_fast_compiled | 50 | 1.300 | 1.300 | 1.200 [1.150–1.250] | 1.000 | " \
           "1.000 |" in table
    assert "| floor_compiled | 30 | 1.000 | 1.000 | 1.000 [1.000–1.000] |" in table
    bench.write_chart(report, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
