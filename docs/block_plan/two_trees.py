"""Training steps of two source trees side by side: ``scripts/bench.py``'s own train workers
(one process per configuration, the bench's tuned allocator), spawned from each tree with that
tree on ``PYTHONPATH``, asked for one step each in turn with the order rotated every repeat, as
``bench.py`` does within one tree. The floor (and the compiled floor, with ``--compiled``) comes
from the first tree. Prints per configuration the median step, its ratio to its floor, and the
median of the per-repeat ratios (each step against the floor's step of the same repeat).

    git worktree add /tmp/oldtree <rev>
    python docs/block_plan/two_trees.py /tmp/oldtree . --repeats 9 [--compiled]

The measurement behind README's "Block batching" (a one-off script, not a test).
"""

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys

from consolidator_apps import speed


@functools.lru_cache(maxsize=None)  # loaded once per tree, not once per worker
def bench_of(tree: str):
    """``scripts/bench.py`` of ``tree`` as a module: its ``_spawn`` starts that tree's workers."""
    path = os.path.join(os.path.abspath(tree), "scripts", "bench.py")
    spec = importlib.util.spec_from_file_location(f"bench_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spawn(tree: str, worker: str, args: argparse.Namespace):
    # the worker imports the package from its own tree (PYTHONPATH comes before the install)
    os.environ["PYTHONPATH"] = os.path.abspath(tree)
    return bench_of(tree)._spawn(args, worker)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--model-size", default="base")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compiled", action="store_true")
    args = ap.parse_args()
    # what bench.py's _spawn reads besides these: its defaults
    args.threads, args.device, args.warmup, args.allocator, args.bf16 = 2, "cpu", 2, "tuned", False
    ask = bench_of(args.new)._ask
    suffixes = ["", "_compiled"] if args.compiled else [""]
    rows = {}
    for suffix in suffixes:
        rows["floor" + suffix] = (args.old, "floor" + suffix)
        rows["old" + suffix] = (args.old, "consolidator_fast" + suffix)
        rows["new" + suffix] = (args.new, "consolidator_fast" + suffix)
    procs = {name: spawn(tree, worker, args) for name, (tree, worker) in rows.items()}
    steps = {name: [] for name in rows}
    try:
        for name, proc in procs.items():
            ask(proc, None, name)
        names = list(rows)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                steps[name].append(ask(procs[name], "step", name)["step_s"])
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{n} {steps[n][-1]:.3f}s" for n in names), file=sys.stderr, flush=True)
    finally:
        for proc in procs.values():
            try:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
                proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - a worker that will not quit is killed
                proc.kill()
    report = {}
    for name in rows:
        floor = "floor" + ("_compiled" if name.endswith("_compiled") else "")
        paired = speed.paired_ratios(steps[name], steps[floor])
        report[name] = {"tree": rows[name][0], "worker": rows[name][1],
                        "median_s": statistics.median(steps[name]),
                        "x_floor": statistics.median(steps[name]) / statistics.median(steps[floor]),
                        "paired_x_floor": paired, "steps_s": steps[name]}
        print(f"{name:14s} {report[name]['median_s']:.3f} s  x{floor}: "
              f"{report[name]['x_floor']:.3f} (per repeat {paired['median']:.3f} [{paired['q1']:.3f}-{paired['q3']:.3f}])")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
