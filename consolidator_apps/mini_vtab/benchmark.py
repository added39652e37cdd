"""The mini-VTAB benchmark: every method on every task through :func:`consolidator_hf.training.run_finetune`.

Protocol (the paper's, at small scale):

1. for each task and method, train on ``train800`` and evaluate on ``val200`` for every point of
   the method's small grid (learning rate x weight decay, and the branch drop rate for
   Consolidator), with the first seed;
2. pick the point with the best val200 accuracy (ties: the first in grid order);
3. with that point, train on ``train800val200`` once per seed and evaluate on ``test`` once.

Every run is a normal ``run_finetune`` output folder (``metrics.json`` and all); finished runs are
skipped when the benchmark is started again, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from consolidator_hf.io import atomic_path, atomic_write_text
from .tasks import get_task

GROUP_ORDER = ("natural", "specialized", "structured")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: a ``FinetuneConfig.method`` with fixed settings and its grid."""

    label: str
    method: str
    fixed: Dict[str, Any] = field(default_factory=dict)
    learning_rates: Tuple[float, ...] = ()
    weight_decays: Tuple[float, ...] = (1e-4, 1e-2)
    drop_rates: Tuple[float, ...] = (0.0,)

    def grid(self) -> List[Dict[str, float]]:
        """The grid points, in the order ties are broken."""
        return [{"learning_rate": lr, "weight_decay": wd, "drop_rate": dr}
                for lr, wd, dr in itertools.product(self.learning_rates, self.weight_decays, self.drop_rates)]


# Learning-rate ranges: one range for every method that trains a small part of the network
# (head, biases/norms, LoRA, Consolidator), ten times lower for full fine-tuning, as usual.
PEFT_LRS = (3e-3, 1e-2)
FULL_LRS = (3e-4, 1e-3)
CONSOLIDATOR_DROPS = (0.0, 0.5)


def default_methods(hidden_size: int, *, lora_r: int = 8) -> List[MethodSpec]:
    """The six rows: head only, BitFit, LoRA, full fine-tuning, and Consolidator with 2-channel
    blocks (``groups = hidden / 2``, the paper's ViT-B/16 setting 384 = 768 / 2) and with
    8-channel blocks (``groups = hidden / 8``)."""
    if hidden_size % 8:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by 8 for the two Consolidator rows")
    narrow, wide = hidden_size // 2, hidden_size // 8
    return [
        MethodSpec("linear", "linear", learning_rates=PEFT_LRS),
        MethodSpec("bitfit", "bitfit", learning_rates=PEFT_LRS),
        MethodSpec("lora", "lora", {"lora_r": lora_r}, learning_rates=PEFT_LRS),
        MethodSpec("full", "full", learning_rates=FULL_LRS),
        MethodSpec(f"consolidator-g{narrow}", "consolidator", {"groups": (narrow,)},
                   learning_rates=PEFT_LRS, drop_rates=CONSOLIDATOR_DROPS),
        MethodSpec(f"consolidator-g{wide}", "consolidator", {"groups": (wide,)},
                   learning_rates=PEFT_LRS, drop_rates=CONSOLIDATOR_DROPS),
    ]


def quick_methods(methods: Sequence[MethodSpec]) -> List[MethodSpec]:
    """The same rows with a one-point grid (each method's first lr, weight decay and drop rate)."""
    return [MethodSpec(m.label, m.method, dict(m.fixed), m.learning_rates[:1], m.weight_decays[:1],
                       m.drop_rates[:1]) for m in methods]


@dataclass
class BenchmarkConfig:
    """What to run; ``train_kwargs`` go to every ``FinetuneConfig`` (epochs, batch size...)."""

    backbone: str
    data_dir: str
    output_dir: str
    tasks: Sequence[str]
    methods: Sequence[MethodSpec]
    seeds: Sequence[int] = (0, 1, 2)
    train_kwargs: Dict[str, Any] = field(default_factory=dict)
    # a previous report's outcome (``read_report``): its selected points replace the grid, its
    # final runs replace training those seeds again (to extend a report with more seeds)
    prior: Optional["PriorReport"] = None


@dataclass(frozen=True)
class PriorReport:
    """What a written report holds: ``selection`` keyed by (task, method label), ``runs`` keyed
    by (task, method label, seed), and where it came from."""

    path: str
    selection: Dict[Tuple[str, str], Dict[str, Any]]
    runs: Dict[Tuple[str, str, int], Dict[str, Any]]


UNKNOWN_MACHINE = "unknown (not recorded)"  # a run from before machines were recorded

_INT_FIELDS = {"seed", "grid_size", "trainable_params", "stored_params", "base_params"}
_FLOAT_FIELDS = {"learning_rate", "weight_decay", "drop_rate", "val_accuracy", "test_accuracy",
                 "train_runtime_s"}


def _read_csv(path: str) -> List[Dict[str, Any]]:
    """Rows of a ``write_report`` CSV with their types back; a malformed cell names file and line."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for line, raw in enumerate(csv.DictReader(f), start=2):
            row: Dict[str, Any] = {}
            for key, value in raw.items():
                try:
                    if key in _INT_FIELDS:
                        row[key] = int(value) if value not in ("", None) else None
                    elif key in _FLOAT_FIELDS:
                        row[key] = float(value)
                    elif key == "val_accuracies":
                        row[key] = [float(v) for v in json.loads(value)]
                    else:
                        row[key] = value
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path}, line {line}: column {key!r}: {value!r} is not valid ({e})") from None
            rows.append(row)
    return rows


def read_report(report_dir: str) -> PriorReport:
    """Read ``selection.csv`` and ``results.csv`` of a report written by :func:`write_report`."""
    paths = [os.path.join(report_dir, n) for n in ("selection.csv", "results.csv")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (a folder written by mini_vtab.py is expected)")
    selection = {(r["task"], r["method"]): r for r in _read_csv(paths[0])}
    # reports from before the per-run machine column name it once, in results.md's header
    machine = UNKNOWN_MACHINE
    md = os.path.join(report_dir, "results.md")
    if os.path.isfile(md):
        with open(md, encoding="utf-8") as f:
            for line in f:
                if line.startswith("- machine: "):
                    machine = line[len("- machine: "):].strip()
                    break
    runs = {}
    for r in _read_csv(paths[1]):
        r.setdefault("machine", machine)
        runs[(r["task"], r["method"], r["seed"])] = r
    return PriorReport(report_dir, selection, runs)


def _run_dir(cfg: BenchmarkConfig, task: str, label: str, name: str) -> str:
    return os.path.join(cfg.output_dir, "runs", task, label, name)


def _point_name(point: Dict[str, float]) -> str:
    """A grid point's folder name, by value (so that a changed grid never reuses a wrong run)."""
    return f"grid-lr{point['learning_rate']:g}-wd{point['weight_decay']:g}-drop{point['drop_rate']:g}"


def _finetune(cfg: BenchmarkConfig, task: str, spec: MethodSpec, point: Dict[str, float], *,
              seed: int, train_split: str, eval_split: str, out: str,
              log: Callable[[str], None]) -> Dict[str, Any]:
    """One ``run_finetune`` call; reuses ``out/metrics.json`` when a previous run finished with
    exactly the same settings (anything else is trained again)."""
    from consolidator_hf.training import FinetuneConfig, apply_recipe, run_finetune

    fields = dict(cfg.train_kwargs)
    fields.update(spec.fixed)
    fields.update(point if spec.method == "consolidator" else
                  {k: v for k, v in point.items() if k != "drop_rate"})
    ft = FinetuneConfig(model=cfg.backbone, task=task, data_dir=cfg.data_dir,
                        num_classes=get_task(task).num_classes, train_split=train_split,
                        eval_split=eval_split, method=spec.method, seed=seed, output_dir=out,
                        overwrite_output_dir=True,  # a changed setting retrains into its folder
                        **fields)
    done = os.path.join(out, "metrics.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            previous = json.load(f)
        # JSON round trip: tuples become lists, as in the stored copy; where the folder lives
        # is not a setting (an output folder may be moved)
        wanted = json.loads(json.dumps(apply_recipe(ft).to_dict()))
        stored = dict(previous.get("config") or {})
        stored["output_dir"] = wanted["output_dir"]
        if stored == wanted:
            try:
                with open(os.path.join(out, "machine.txt"), encoding="utf-8") as f:
                    previous["machine"] = f.read().strip()
            except OSError:  # a run from before this file existed, or killed before writing it
                previous["machine"] = UNKNOWN_MACHINE
            return previous
        log(f"  {out}: settings changed since the stored run, training again")
    t0 = time.perf_counter()
    metrics = run_finetune(ft)
    # where it ran (the same seed gives different numbers on different CPUs): kept beside the run
    metrics["machine"] = machine_description()
    atomic_write_text(os.path.join(out, "machine.txt"), metrics["machine"] + "\n")
    log(f"  {task:20s} {spec.label:18s} {train_split}->{eval_split} seed {seed} "
        f"lr {point['learning_rate']:g} wd {point['weight_decay']:g}"
        + (f" drop {point['drop_rate']:g}" if spec.method == "consolidator" else "")
        + f": acc {metrics['accuracy']:.4f} ({time.perf_counter() - t0:.1f} s)")
    return metrics


def _run_unit(cfg: BenchmarkConfig, task: str, spec: MethodSpec,
              log: Callable[[str], None] = print) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """The protocol for one (task, method): grid on val200, then one test run per seed."""
    info = get_task(task)
    prior = cfg.prior
    if prior is not None and (task, spec.label) in prior.selection:
        selection = prior.selection[(task, spec.label)]
        point = {k: selection[k] for k in ("learning_rate", "weight_decay", "drop_rate")}
        if point not in spec.grid():
            raise ValueError(f"{prior.path}/selection.csv: {task} / {spec.label} chose {point}, which is "
                             f"not a point of this run's grid {spec.grid()} (different settings?)")
    else:
        # 1-2: the grid on train800 -> val200, first seed
        scores = []
        for i, point in enumerate(spec.grid()):
            m = _finetune(cfg, task, spec, point, seed=cfg.seeds[0], train_split="train800",
                          eval_split="val200", out=_run_dir(cfg, task, spec.label, _point_name(point)), log=log)
            scores.append(m["accuracy"])
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        point = spec.grid()[best]
        selection = {"task": task, "method": spec.label, **point, "val_accuracy": scores[best],
                     "grid_size": len(scores), "val_accuracies": scores}
    # 3: retrain on train800val200 per seed, test once
    runs = []
    for seed in cfg.seeds:
        stored = prior.runs.get((task, spec.label, seed)) if prior is not None else None
        if stored is not None:
            runs.append(dict(stored))
            continue
        m = _finetune(cfg, task, spec, point, seed=seed, train_split="train800val200",
                      eval_split="test", out=_run_dir(cfg, task, spec.label, f"final-seed{seed}"), log=log)
        runs.append({"task": task, "group": info.group, "method": spec.label, "seed": seed,
                     **point, "val_accuracy": selection["val_accuracy"], "test_accuracy": m["accuracy"],
                     "trainable_params": m["trainable_params"], "stored_params": m["stored_params"],
                     "base_params": m.get("base_params"), "train_runtime_s": m["train_runtime_s"],
                     "machine": m["machine"]})
    return selection, runs


def _worker_init(threads: int, parent_pid: int) -> None:
    import torch

    from ..workers import die_with_parent

    die_with_parent(parent_pid)  # a killed benchmark takes its workers with it
    torch.set_num_threads(threads)


def _worker_unit(args):
    cfg, task, spec = args
    return _run_unit(cfg, task, spec, log=lambda s: print(s, flush=True))


def run_benchmark(cfg: BenchmarkConfig, log: Callable[[str], None] = print, *,
                  jobs: int = 1, threads_per_job: int = 1) -> Dict[str, Any]:
    """Run the protocol; returns ``{"runs": [...final test runs...], "selection": [...], "skipped": [...]}``.

    ``jobs > 1`` runs that many (task, method) units at once in worker processes with
    ``threads_per_job`` torch threads each: on a small CPU, two one-thread processes get more
    done than one two-thread process (the matrices of a small ViT parallelise poorly).
    """
    from consolidator_hf.training import peft_available

    skipped: List[str] = []
    methods = list(cfg.methods)
    if any(m.method == "lora" for m in methods) and not peft_available():
        skipped.append("lora: skipped, the optional dependency peft is not installed (pip install peft)")
        methods = [m for m in methods if m.method != "lora"]
    units = [(cfg, task, spec) for task in cfg.tasks for spec in methods]
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads_per_job, os.getpid())) as pool:
            results = list(pool.map(_worker_unit, units))
    else:
        results = [_run_unit(c, t, m, log) for c, t, m in units]
    return {"runs": [r for _, rows in results for r in rows],
            "selection": [sel for sel, _ in results], "skipped": skipped}


# ----------------------------------------------------------------------------- summary
def summarize(runs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per method: per-task mean/std of test accuracy (%), group means, the mean of group means
    (``average``, the paper's number), the plain ``mean``, parameters and train time."""
    out: Dict[str, Dict[str, Any]] = {}
    for label in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == label]
        per_task: Dict[str, Tuple[float, float, int]] = {}
        for task in dict.fromkeys(r["task"] for r in mine):
            accs = [100.0 * r["test_accuracy"] for r in mine if r["task"] == task]
            per_task[task] = (statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, len(accs))
        groups: Dict[str, List[float]] = {}
        for task, (mean, _, _) in per_task.items():
            groups.setdefault(get_task(task).group, []).append(mean)
        group_means = {g: statistics.fmean(groups[g]) for g in GROUP_ORDER if g in groups}
        out[label] = {
            "per_task": per_task,
            "group_means": group_means,
            "average": statistics.fmean(group_means.values()),
            "mean": statistics.fmean(m for m, _, _ in per_task.values()),
            "trainable_params": max(r["trainable_params"] for r in mine),
            "stored_params": max(r["stored_params"] for r in mine),
            "train_time_s": statistics.fmean(r["train_runtime_s"] for r in mine),
            "base_params": max((r.get("base_params") or 0) for r in mine) or None,
        }
    return out


def _fmt_params(n: int, base: Optional[int]) -> str:
    return f"{n:,}" + (f" ({100.0 * n / base:.2f} %)" if base else "")


def markdown_table(summary: Dict[str, Dict[str, Any]], tasks: Sequence[str]) -> str:
    """Methods as rows; tasks (grouped), group means, average, mean, parameters (and their share
    of the backbone's), time as columns."""
    tasks = sorted(tasks, key=lambda t: (GROUP_ORDER.index(get_task(t).group), list(tasks).index(t)))
    groups = [g for g in GROUP_ORDER if any(get_task(t).group == g for t in tasks)]
    head = (["method"] + [f"{t} ({get_task(t).group[:4]}.)" for t in tasks] + [f"{g} mean" for g in groups]
            + ["**average** (mean of group means)", "mean", "trainable params", "stored params",
               "train time / run (s)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in summary.items():
        cells = [label]
        for t in tasks:
            mean, std, _ = s["per_task"].get(t, (None, None, 0))
            cells.append("-" if mean is None else f"{mean:.1f} ± {std:.1f}")
        cells += [f"{s['group_means'][g]:.1f}" if g in s["group_means"] else "-" for g in groups]
        cells += [f"**{s['average']:.1f}**", f"{s['mean']:.1f}", _fmt_params(s["trainable_params"], s["base_params"]),
                  _fmt_params(s["stored_params"], s["base_params"]), f"{s['train_time_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: Dict[str, Any], output_dir: str, *, tasks: Sequence[str],
                 header: str = "") -> Dict[str, str]:
    """``results.md``, ``results.csv`` (one row per final run), ``summary.json``, ``selection.csv``
    and ``results.png`` in ``output_dir``; returns their paths."""
    runs, selection = result["runs"], result["selection"]
    summary = summarize(runs)
    paths = {name: os.path.join(output_dir, name) for name in
             ("results.md", "results.csv", "selection.csv", "summary.json", "results.png")}

    def to_csv(rows: Sequence[Dict[str, Any]]) -> str:
        buf = io.StringIO()
        keys = list(rows[0]) if rows else []
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})
        return buf.getvalue()

    atomic_write_text(paths["results.csv"], to_csv(runs))
    atomic_write_text(paths["selection.csv"], to_csv(selection))
    atomic_write_text(paths["summary.json"], json.dumps(
        {k: {**v, "per_task": {t: {"mean": m, "std": s, "n": n} for t, (m, s, n) in v["per_task"].items()}}
         for k, v in summary.items()}, indent=2))
    sel_lines = ["| task | method | lr | weight decay | drop rate | val200 acc (best of grid) |",
                 "|---|---|---|---|---|---|"]
    for s in selection:
        sel_lines.append(f"| {s['task']} | {s['method']} | {s['learning_rate']:g} | {s['weight_decay']:g} | "
                         f"{s['drop_rate']:g} | {100 * s['val_accuracy']:.1f} (of {s['grid_size']}) |")
    md = [header.rstrip() + "\n" if header else "",
          "Test top-1 accuracy (%), mean ± std over seeds; hyperparameters chosen on val200.\n",
          markdown_table(summary, tasks)]
    if result.get("skipped"):
        md.append("\n" + "\n".join(f"- {s}" for s in result["skipped"]) + "\n")
    md.append("\n### Selected hyperparameters\n\n" + "\n".join(sel_lines) + "\n")
    atomic_write_text(paths["results.md"], "\n".join(md))
    _plot(summary, tasks, paths["results.png"])
    return paths


def _plot(summary: Dict[str, Dict[str, Any]], tasks: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(tasks) + ["average"]
    labels = list(summary)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) + 2), 3.8))
    for i, label in enumerate(labels):
        s = summary[label]
        means = [s["per_task"].get(t, (0.0, 0.0, 0))[0] for t in tasks] + [s["average"]]
        stds = [s["per_task"].get(t, (0.0, 0.0, 0))[1] for t in tasks] + [0.0]
        xs = [c + (i - (len(labels) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(xs, means, width, yerr=stds, label=label, capsize=1.5)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=20, ha="right")
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("mini-VTAB: test accuracy per task (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            cpu = models[0]
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs visible, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {platform.system()} {platform.release()}")
