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
import json
import os
import statistics
import subprocess
import sys

TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def spawn(tree: str, worker: str, args: argparse.Namespace) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), **TUNED_MALLOC_ENV)
    cmd = [sys.executable, os.path.join(os.path.abspath(tree), "scripts", "bench.py"),
           "--worker", worker, "--model-size", args.model_size, "--batch-size",
           str(args.batch_size), "--repeats", str(args.repeats), "--threads", "2",
           "--device", "cpu", "--warmup", "2", "--allocator", "tuned"]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            bufsize=1, env=env, cwd=os.path.abspath(tree))


def ask(proc: subprocess.Popen, cmd=None) -> dict:
    if cmd is not None:
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker exited (code {proc.wait()})")
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--model-size", default="base")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compiled", action="store_true")
    args = ap.parse_args()
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
            ask(proc)
        names = list(rows)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                steps[name].append(ask(procs[name], "step")["step_s"])
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{n} {steps[n][-1]:.3f}s" for n in names), file=sys.stderr, flush=True)
    finally:
        for proc in procs.values():
            try:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
    report = {}
    for name in rows:
        floor = "floor" + ("_compiled" if name.endswith("_compiled") else "")
        paired = [a / b for a, b in zip(steps[name], steps[floor])]
        report[name] = {"tree": rows[name][0], "worker": rows[name][1],
                        "median_s": statistics.median(steps[name]),
                        "x_floor": statistics.median(steps[name]) / statistics.median(steps[floor]),
                        "median_paired_x_floor": statistics.median(paired), "steps_s": steps[name]}
        print(f"{name:14s} {report[name]['median_s']:.3f} s  x{floor}: "
              f"{report[name]['x_floor']:.3f} (paired {report[name]['median_paired_x_floor']:.3f})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
