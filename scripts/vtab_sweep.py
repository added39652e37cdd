#!/usr/bin/env python
"""Run the 19 VTAB-1k tasks one after the other, one output folder per task.

Each task is `accelerate launch [--config_file A] scripts/finetune.py --config configs/vtab/<set>/<task>.yaml
--data-dir D --output-dir OUT/<task> ...`; every argument this script does not know is passed on to
finetune.py (e.g. --model PATH, --bf16, --seed 1). A task whose OUT/<task>/metrics.json exists is
skipped, so rerunning after an interruption resumes the sweep. A failed task does not stop the sweep
(unless --stop-on-error); the exit status is 1 if any task failed.

    python scripts/vtab_sweep.py --data-dir data/vtab-1k --output-dir outputs/vtab/vit_b16_in21k
    python scripts/vtab_sweep.py --data-dir data/vtab-1k --output-dir out --tasks cifar100,svhn --dry-run
    python scripts/vtab_sweep.py --config-set mocov3_vit_b16 --data-dir data/vtab-1k --output-dir out \\
        --accelerate-config configs/accelerate/single_gpu.yaml --model checkpoints/mocov3_vit_b16
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import List, Optional, Sequence

from consolidator_hf.cli import HelpFormatter
from consolidator_hf.data import BACKBONES, get_task, task_names

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def accelerate_executable() -> str:
    """The ``accelerate`` CLI of this Python environment (then whatever is on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "accelerate")
    if os.path.isfile(beside):
        return beside
    found = shutil.which("accelerate")
    if found is None:
        raise FileNotFoundError("the `accelerate` command was not found (pip install accelerate)")
    return found


def parse_tasks(values: Optional[Sequence[str]]) -> List[str]:
    """Training names, in registry order, from ``--tasks`` values (comma or space separated,
    training or folder names)."""
    if not values:
        return task_names()
    wanted = {get_task(v.strip()).name for value in values for v in value.split(",") if v.strip()}
    return [t for t in task_names() if t in wanted]


def task_command(task: str, args: argparse.Namespace, extra: List[str]) -> List[str]:
    config = os.path.join(args.configs_dir, args.config_set, f"{task}.yaml")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"config {config!r} for task {task!r} does not exist "
                                "(python scripts/make_configs.py writes them)")
    launch = [accelerate_executable(), "launch"]
    if args.accelerate_config:
        launch += ["--config_file", args.accelerate_config]
    return launch + [args.finetune_script, "--config", config, "--data-dir", args.data_dir,
                     "--output-dir", os.path.join(args.output_dir, task)] + extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=HelpFormatter,
                                     epilog="Unknown arguments are passed on to finetune.py.")
    parser.add_argument("--data-dir", required=True, help="the vtab-1k folder (one sub-folder per task)")
    parser.add_argument("--output-dir", required=True, help="one <task>/ folder per task is written here")
    parser.add_argument("--config-set", default="vit_b16_in21k", choices=BACKBONES,
                        help="which configs/vtab/<set>/ to use (default: vit_b16_in21k)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="a subset of tasks (comma or space separated; default: all 19)")
    parser.add_argument("--accelerate-config", default=None,
                        help="passed to `accelerate launch --config_file` (e.g. configs/accelerate/single_gpu.yaml)")
    parser.add_argument("--configs-dir", default=os.path.join(ROOT, "configs", "vtab"), help=argparse.SUPPRESS)
    parser.add_argument("--finetune-script", default=os.path.join(ROOT, "scripts", "finetune.py"),
                        help="the training script (default: scripts/finetune.py)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--stop-on-error", action="store_true", help="stop at the first failed task")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    owned = [a for a in extra if a.split("=")[0].replace("_", "-") in
             ("--config", "--task", "--data-dir", "--output-dir")]
    if owned:
        raise SystemExit(f"vtab_sweep.py: {', '.join(owned)} is set per task by the sweep; "
                         "use --data-dir/--output-dir/--tasks/--config-set of this script")
    if not args.dry_run and not os.path.isfile(args.finetune_script):
        raise SystemExit(f"vtab_sweep.py: training script {args.finetune_script!r} does not exist")
    tasks = parse_tasks(args.tasks)
    done, failed, ran = [], [], []
    for i, task in enumerate(tasks, start=1):
        metrics = os.path.join(args.output_dir, task, "metrics.json")
        if os.path.isfile(metrics):
            print(f"[{i}/{len(tasks)}] {task}: skipped, {metrics} exists", flush=True)
            done.append(task)
            continue
        cmd = task_command(task, args, extra)
        if args.dry_run:
            print(f"[{i}/{len(tasks)}] {task}: {shlex.join(cmd)}", flush=True)
            continue
        print(f"[{i}/{len(tasks)}] {task}: {shlex.join(cmd)}", flush=True)
        start = time.time()
        rc = subprocess.call(cmd)
        elapsed = time.time() - start
        if rc == 0 and os.path.isfile(metrics):
            print(f"[{i}/{len(tasks)}] {task}: finished in {elapsed:.0f}s", flush=True)
            ran.append(task)
        else:
            why = f"exit status {rc}" if rc else f"no {metrics} written"
            print(f"[{i}/{len(tasks)}] {task}: FAILED ({why}) after {elapsed:.0f}s", flush=True)
            failed.append(task)
            if args.stop_on_error:
                break
    if not args.dry_run:
        print(f"sweep: {len(ran)} run, {len(done)} skipped (already done), {len(failed)} failed"
              + (f": {', '.join(failed)}" if failed else ""))
        print(f"table: python {os.path.join('scripts', 'collect_results.py')} {args.output_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
