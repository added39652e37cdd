"""The VTAB-1k aggregate: per-task scores, per-group means and the paper's average.

The paper's "average" is the mean of the three group means (natural, specialized, structured),
not the plain mean over the 19 tasks; both are reported.
"""

from __future__ import annotations

from statistics import fmean
from typing import Any, Dict, Mapping

from ..data.registry import GROUPS, get_task, task_names


def vtab_aggregate(per_task: Mapping[str, float]) -> Dict[str, Any]:
    """Aggregate per-task scores (any scale: fractions or percentages, used as given).

    Task keys may be training or folder names; they come back as training names, in registry
    order. Returns ``{"per_task", "group_means", "average", "mean", "missing"}``:
    ``group_means`` over the groups with at least one task present, ``average`` the mean of those
    group means, ``mean`` the plain mean over the tasks present, ``missing`` the registry tasks
    absent from ``per_task``.
    """
    if not per_task:
        raise ValueError("vtab_aggregate: no task scores given")
    scores: Dict[str, float] = {}
    for key, value in per_task.items():
        name = get_task(key).name  # ValueError naming the key for an unknown task
        if name in scores:
            raise ValueError(f"vtab_aggregate: task {name!r} given twice (as {key!r} and another spelling)")
        scores[name] = float(value)
    ordered = {n: scores[n] for n in task_names() if n in scores}
    by_group: Dict[str, list] = {g: [] for g in GROUPS}
    for name, value in ordered.items():
        by_group[get_task(name).group].append(value)
    group_means = {g: fmean(v) for g, v in by_group.items() if v}
    return {
        "per_task": ordered,
        "group_means": group_means,
        "average": fmean(group_means.values()),
        "mean": fmean(ordered.values()),
        "missing": [n for n in task_names() if n not in scores],
    }
