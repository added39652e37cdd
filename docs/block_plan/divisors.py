"""Time the block-structured weight gradient (``grouped.weight_grad_blocks``, what every adapted
layer's backward pays once per branch) for every batching ``c`` of a branch's groups on the
ViT-B/16 shapes (1,576 rows = batch 8 x 197 tokens; q/k/v/o 768->768, fc1 768->3072, fc2
3072->768) at groups 384, 192, 96 and 48, and mark the ``c`` that ``grouped.block_plan`` picks
and the one the rule before 2026-12-04 picked (``c*min(rows, s) >= 8``). Medians of 15 calls
after 3 warm-up ones, fp32, interleaved by shape, one process; writes ``divisors.json`` and
``divisors.png`` beside itself (or into the folder given as the first argument).

    PYTHONPATH=. python docs/block_plan/divisors.py            # ~2 min on 2 cores

The measurement behind README's "Block batching"; a one-off script, not a test.
"""

import json
import os
import statistics
import sys
import time

import torch

from consolidator_hf import grouped

ROWS = 1576
SHAPES = {"q/k/v/o 768->768": (768, 768), "fc1 768->3072": (768, 3072),
          "fc2 3072->768": (3072, 768)}
GROUPS = (384, 192, 96, 48)


def old_rule(plan: grouped.BlockPlan, n_groups: int) -> int:
    return next((d for d in range(1, n_groups + 1)
                 if n_groups % d == 0 and d * min(plan.rows, plan.s) >= 8), n_groups)


def median_ms(fn, repeats: int = 15) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    torch.set_num_threads(2)
    torch.manual_seed(0)
    results = []
    for groups in GROUPS:
        for name, (inf, outf) in SHAPES.items():
            g, x = torch.randn(ROWS, outf), torch.randn(ROWS, inf)
            plan = grouped.block_plan(inf, outf, groups)
            want = grouped.weight_grad_blocks(g, x, plan, groups, False, inf)
            times = {}
            for c in (d for d in range(1, 65) if groups % d == 0):
                p = plan._replace(c=c, batches=groups // c)
                got = grouped.weight_grad_blocks(g, x, p, groups, False, inf)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)  # same numbers
                times[c] = median_ms(lambda: grouped.weight_grad_blocks(g, x, p, groups, False, inf))
            row = {"groups": groups, "shape": name, "s": plan.s, "rows": plan.rows,
                   "picked": plan.c, "old": old_rule(plan, groups), "ms": times,
                   "best": min(times, key=times.get)}
            results.append(row)
            print(f"groups {groups:3d} {name:17s} s={plan.s:2d} rows={plan.rows:2d}: picked c={plan.c} "
                  f"{times[plan.c]:.2f} ms, old c={row['old']} {times[row['old']]:.2f} ms, "
                  f"best c={row['best']} {times[row['best']]:.2f} ms", flush=True)
    with open(os.path.join(out_dir, "divisors.json"), "w") as f:
        json.dump({"cpu": _cpu(), "torch": torch.__version__, "threads": 2, "rows": ROWS,
                   "results": results}, f, indent=1)
    _plot(results, os.path.join(out_dir, "divisors.png"))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4 * len(GROUPS), 3.4), sharey=False)
    for ax, groups in zip(axes, GROUPS):
        for row in (r for r in results if r["groups"] == groups):
            cs = sorted(row["ms"], key=int)
            line, = ax.plot(cs, [row["ms"][c] for c in cs], marker=".", label=row["shape"])
            ax.plot([row["picked"]], [row["ms"][row["picked"]]], "o", ms=10, mfc="none",
                    color=line.get_color())
            ax.plot([row["old"]], [row["ms"][row["old"]]], "x", ms=8, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_title(f"groups {groups}")
        ax.set_xlabel("c (groups per batched matmul)")
    axes[0].set_ylabel("weight gradient, ms (median)")
    axes[0].legend(fontsize=7, title="o picked, x old rule", title_fontsize=7)
    fig.suptitle(f"block weight gradient vs batching c, ViT-B/16 shapes, {ROWS} rows, "
                 f"fp32, 2 threads, {_cpu()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
