"""The VTAB-1k results table: our per-task accuracies beside the paper's, in the paper's layout.

Reads ``<runs_dir>/*/metrics.json`` (as written by ``scripts/finetune.py``: ``"task"`` and
``"accuracy"`` in [0, 1]) and writes Markdown, CSV and a PNG bar chart. Tasks follow the registry
order, grouped natural / specialized / structured, then the group means, the paper's average
(mean of the group means) and the plain mean over tasks. Missing tasks show as ``-`` and are left
out of every mean, ours and the paper's alike, so the two columns always average the same tasks.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .io import atomic_path, atomic_write_text
from .data.registry import GROUPS, get_task, paper_results, registry, tasks
from .metrics.aggregate import vtab_aggregate

MISSING = "-"


def read_run_metrics(runs_dir: str) -> Tuple[Dict[str, float], List[str]]:
    """``({task: accuracy in %}, [notes])`` from ``runs_dir/*/metrics.json``.

    Raises ``ValueError`` naming the file for unreadable JSON, a missing or out-of-range
    ``accuracy``, or two runs of the same task. Runs of tasks outside the registry are skipped
    with a note.
    """
    if not os.path.isdir(runs_dir):
        raise FileNotFoundError(f"runs directory {runs_dir!r} does not exist")
    scores: Dict[str, float] = {}
    sources: Dict[str, str] = {}
    notes: List[str] = []
    found = sorted(glob.glob(os.path.join(runs_dir, "*", "metrics.json")))
    if not found:
        notes.append(f"{runs_dir}: no <task>/metrics.json found, nothing to collect")
    for path in found:
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        name = data.get("task") or os.path.basename(os.path.dirname(path))
        try:
            task = get_task(str(name)).name
        except ValueError:
            notes.append(f"{path}: task {name!r} is not a VTAB-1k task, skipped")
            continue
        accuracy = data.get("accuracy")
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"{path}: 'accuracy' must be a number in [0, 1], got {accuracy!r}")
        if task in scores:
            raise ValueError(f"{path}: a second run of task {task!r} (first: {sources[task]})")
        scores[task] = 100.0 * float(accuracy)
        sources[task] = path
    return scores, notes


@dataclass
class ResultsTable:
    """Rows of the table: one per task, then summary rows; ``None`` marks a missing value."""

    task_rows: List[Tuple[str, str, Optional[float], float]]            # group, task, ours %, paper %
    group_rows: List[Tuple[str, Optional[float], Optional[float]]]      # group, ours, paper (same tasks)
    average: Tuple[Optional[float], Optional[float]]                    # mean of group means: ours, paper
    mean: Tuple[Optional[float], Optional[float]]                       # plain mean over tasks: ours, paper
    missing: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def build_table(ours: Dict[str, float], notes: Optional[List[str]] = None) -> ResultsTable:
    """The table for ``ours`` ({task: accuracy %}, training or folder names)."""
    ours = {get_task(k).name: float(v) for k, v in ours.items()}
    paper = paper_results()
    task_rows = [(t.group, t.name, ours.get(t.name), paper[t.name]) for t in tasks()]
    if ours:
        agg_ours = vtab_aggregate(ours)
        agg_paper = vtab_aggregate({t: paper[t] for t in ours})  # the paper over the same tasks
        group_rows = [(g, agg_ours["group_means"].get(g), agg_paper["group_means"].get(g)) for g in GROUPS]
        average = (agg_ours["average"], agg_paper["average"])
        mean = (agg_ours["mean"], agg_paper["mean"])
    else:
        group_rows = [(g, None, None) for g in GROUPS]
        average = mean = (None, None)
    missing = [t.name for t in tasks() if t.name not in ours]
    return ResultsTable(task_rows, group_rows, average, mean, missing, list(notes or []))


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _diff(a: Optional[float], b: Optional[float]) -> str:
    return MISSING if a is None or b is None else f"{a - b:+.2f}"


def _summary_rows(table: ResultsTable) -> List[Tuple[str, str, Optional[float], Optional[float]]]:
    rows = [(g, f"{g} mean", o, p) for g, o, p in table.group_rows]
    rows.append(("all", "average (mean of group means)", *table.average))
    rows.append(("all", "mean of tasks", *table.mean))
    return rows


def _missing_note(table: ResultsTable) -> str:
    if not table.missing:
        return ""
    n = len(table.task_rows) - len(table.missing)
    return (f"Missing ({len(table.missing)}): {', '.join(table.missing)}. They are left out of every mean; "
            f"the paper's means are taken over the same {n} tasks (over all {len(table.task_rows)}: "
            f"average {registry()['paper_average']:.2f}, mean {registry()['paper_mean_of_19_tasks']:.2f}).")


def to_markdown(table: ResultsTable, title: str = "VTAB-1k top-1 accuracy (%)") -> str:
    lines = [f"## {title}", ""]
    if table.notes:  # what was skipped and why: first, not below a table of dashes
        lines += ["Skipped:", ""] + [f"- {n}" for n in table.notes] + [""]
    # the paper's Table 1 layout: one row per method, tasks as columns
    header = [t for _, t, _, _ in table.task_rows] + [f"{g} mean" for g in GROUPS] + ["average", "mean"]
    ours_row = [_fmt(o) for _, _, o, _ in table.task_rows] + [_fmt(o) for _, o, _ in table.group_rows] + \
        [_fmt(table.average[0]), _fmt(table.mean[0])]
    paper_row = [_fmt(p, 1) for _, _, _, p in table.task_rows] + [_fmt(p) for _, _, p in table.group_rows] + \
        [_fmt(table.average[1]), _fmt(table.mean[1])]
    lines += ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|",
              "| Consolidator (ours) | " + " | ".join(ours_row) + " |",
              "| Consolidator (paper) | " + " | ".join(paper_row) + " |", ""]
    # one task per row, ours beside the paper's
    lines += ["| group | task | ours | paper | ours - paper |", "|---|---|---:|---:|---:|"]
    for group, task, o, p in table.task_rows:
        lines.append(f"| {group} | {task} | {_fmt(o)} | {_fmt(p, 1)} | {_diff(o, p)} |")
    for group, label, o, p in _summary_rows(table):
        lines.append(f"| {group} | **{label}** | {_fmt(o)} | {_fmt(p)} | {_diff(o, p)} |")
    lines.append("")
    lines.append("Paper: Consolidator, ViT-B/16 ImageNet-21k (Hao et al., ICLR 2023, Table 1), from the registry.")
    if table.missing:
        lines.append(_missing_note(table))
    return "\n".join(lines) + "\n"


def to_csv(table: ResultsTable) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "task", "ours", "paper", "ours_minus_paper"])
    for group, task, o, p in table.task_rows:
        writer.writerow([group, task, _fmt(o, 4), _fmt(p, 4), _diff(o, p)])
    for group, label, o, p in _summary_rows(table):
        writer.writerow([group, label, _fmt(o, 4), _fmt(p, 4), _diff(o, p)])
    return buf.getvalue()


def plot_png(table: ResultsTable, path: str, title: str = "VTAB-1k top-1 accuracy (%)") -> None:
    """A bar chart, ours beside the paper per task (missing tasks: paper bar only), written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = [t for _, t, _, _ in table.task_rows]
    x = list(range(len(names)))
    width = 0.4
    fig, ax = plt.subplots(figsize=(14, 5))
    ax.bar([i - width / 2 for i in x], [p for *_, p in table.task_rows], width, label="paper", color="#9e9e9e")
    have = [(i, o) for i, (_, _, o, _) in enumerate(table.task_rows) if o is not None]
    ax.bar([i + width / 2 for i, _ in have], [o for _, o in have], width, label="ours", color="#1f77b4")
    for i in range(1, len(names)):  # a dotted line between the three groups
        if table.task_rows[i][0] != table.task_rows[i - 1][0]:
            ax.axvline(i - 0.5, color="black", linestyle=":", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    subtitle = f"average (mean of group means): ours {_fmt(table.average[0])}, paper {_fmt(table.average[1])}"
    ax.set_title(f"{title}\n{subtitle}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_results(runs_dir: str, out_dir: Optional[str] = None, stem: str = "vtab_results",
                  plot: bool = True) -> Dict[str, str]:
    """Read the runs, write ``<stem>.md``, ``<stem>.csv`` (and ``<stem>.png``); returns their paths."""
    out_dir = out_dir or runs_dir
    ours, notes = read_run_metrics(runs_dir)
    table = build_table(ours, notes)
    paths = {"markdown": os.path.join(out_dir, f"{stem}.md"), "csv": os.path.join(out_dir, f"{stem}.csv")}
    atomic_write_text(paths["markdown"], to_markdown(table))
    atomic_write_text(paths["csv"], to_csv(table))
    if plot:
        paths["png"] = os.path.join(out_dir, f"{stem}.png")
        plot_png(table, paths["png"])
    return paths


__all__ = ["ResultsTable", "build_table", "plot_png", "read_run_metrics", "to_csv", "to_markdown", "write_results"]
