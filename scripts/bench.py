"""Side-by-side training/inference benchmark of Consolidator against its floor and baselines.

    python scripts/bench.py --model-size base --batch-size 8 --repeats 5 --threads 2 \\
        --output-dir bench_out

Training configurations (each in its own worker process, so peak memory is its own):

* ``floor``: the same ViT with only what Consolidator also trains besides the branches
  (the adapted layers' biases, every LayerNorm, the head): backprop through the frozen
  backbone is paid anyway, so this is the cost to beat;
* ``consolidator_fast`` / ``consolidator_reference``: ``ConsolidatorConfig(impl=...)``;
* ``full_ft``: every parameter trains;
* ``lora_r8_qv``: PEFT LoRA r=8 on the q and v projections plus the head (if peft is installed);
* with ``--compile``: ``floor_compiled``, ``consolidator_fast_compiled``, ``lora_r8_qv_compiled``,
  the same models under ``torch.compile`` (compiled during the warm-up; the compile time is
  reported), side by side with the eager rows and also compared with ``floor_compiled``;
  ``consolidator_fast_compiled`` uses the device's default compiled formulation
  (``compiled_path.FORMULAS``), ``consolidator_ops_compiled`` / ``consolidator_traced_compiled``
  (by ``--configs`` only) force one.

The workers stay alive while the main process asks each for one training step in turn
(forward, backward, AdamW step), rotating the order every repeat, so a load spike on a shared
machine hits every configuration alike; medians and ratios to the floor are reported, of the
wall time and of the worker's CPU time (less sensitive to other processes on a shared machine),
and the median and quartiles of each repeat's step over the floor's step of the same repeat
(``speed.paired_ratios``: how far the machine's noise reaches; the chart's error bars). Peak
memory is the peak RSS of a worker during its steps minus its RSS before the first step
(optimizer state and gradients included; sampled every 2 ms), or ``max_memory_allocated``
minus the memory allocated before the first step on CUDA.

Three figures that the machine's noise cannot move are reported beside them: the peak bytes of
tensors live during one (extra, untimed) step above what was live before it
(``speed.peak_tensor_bytes``: the allocator-level peak; on the CPU the RSS peak also counts freed
heap memory malloc keeps, which varies with the sizes a configuration allocates), the bytes of
activations autograd saves in one forward pass (distinct storages, parameters excluded; what
the fast path's input rebuild is about) and the minor page faults per step (fresh memory the
allocator had to take from the kernel). By default the workers run with glibc's malloc told to
keep freed memory (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, the role jemalloc or
tcmalloc play in PyTorch's CPU tuning guides), the same for every configuration: with the
system defaults the page-fault count of one configuration varied 10x between identical runs
here, swamping the differences being measured. ``--allocator system`` measures the defaults,
``--allocator jemalloc`` preloads jemalloc into the workers (``LD_PRELOAD``; Debian's
``libjemalloc2``), where RSS stays near the live tensors (glibc's heap keeps freed, fragmented
memory: the RSS peak is then well above the tensor peak, more so for configurations that
allocate many distinct sizes).

A last worker times inference (plain model, merged model, unmerged wrapper), the time to
merge the whole model (``merge_and_unload``) and the adapter file size, and the host time one
adapted layer adds to a training step (forward + backward of LayerNorm -> linear at 64 features
and 32 rows, where the arithmetic is negligible): what the Python and the extra small ops of
each implementation cost per layer and step, the part of a step that does not shrink on a GPU. Everything is random
init from ``ViTConfig``: no Hub access. Writes ``bench.json`` and ``bench.png`` into
``--output-dir`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

from consolidator_apps import speed
from consolidator_apps.speed import (
    MODEL_SIZES, RssPeak, build_base, build_train_model, consolidator_config, current_rss,
    layer_op_counts, layer_overhead_us, median_time, peak_tensor_bytes, release_free_memory,
    saved_activation_bytes,
    sync)

TRAIN_CONFIGS = ["floor", "consolidator_fast", "consolidator_reference", "full_ft", "lora_r8_qv"]
# --compile adds these: the same models under torch.compile (default inductor), compiled in the
# warm-up steps; their ratios are also given against floor_compiled.
COMPILED_CONFIGS = ["floor_compiled", "consolidator_fast_compiled", "lora_r8_qv_compiled"]
COMPILED = "_compiled"
# One compiled formulation forced (consolidator_hf.compiled_path.FORMULAS), by --configs only.
FORMULA_CONFIGS = {"consolidator_ops_compiled": "ops", "consolidator_traced_compiled": "traced"}

# glibc: serve allocations up to 32 MiB (the largest threshold glibc accepts; a ViT-B/16 batch of
# 8 has no larger activation) from the heap and never hand freed memory back (see above).
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 25), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


# ---------------------------------------------------------------------- workers
def _send(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def train_worker(args: argparse.Namespace) -> None:
    """Serve ``step`` / ``report`` / ``quit`` lines on stdin for one configuration."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compiled = args.worker.endswith(COMPILED)
    name = args.worker[:-len(COMPILED)] if compiled else args.worker
    if args.worker in FORMULA_CONFIGS:
        from consolidator_hf import compiled_path

        compiled_path.FORMULAS[device.type] = FORMULA_CONFIGS[args.worker]
        name = "consolidator_fast"
    model = build_train_model(name, args.model_size).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    size = MODEL_SIZES[args.model_size]["image_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
    y = torch.randint(0, speed.NUM_LABELS, (args.batch_size,), generator=g).to(device)

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def step() -> Dict[str, float]:
        sync(device)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t, c = time.perf_counter(), time.process_time()
        with amp():
            loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        # CPU time of the worker's threads as well as wall time: on a shared machine the
        # wall clock also counts time spent descheduled.
        return {"step_s": time.perf_counter() - t, "step_cpu_s": time.process_time() - c,
                "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}

    release_free_memory()  # building the model left freed memory in the heap: not the step's
    rss0 = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        alloc0 = torch.cuda.memory_allocated(device)
    peak = RssPeak()
    compile_s = None
    with peak:
        for i in range(max(args.warmup, 2 if compiled else 0)):
            t = step()
            if i == 0 and compiled:
                compile_s = t["step_s"]  # the first step compiles forward and backward
    # After the warm-up steps, so that the peak RSS above is a training step's.
    with amp():
        saved = saved_activation_bytes(model, x, y, params)
    _send({"ready": True, "trainable_params": sum(p.numel() for p in params),
           "compile_s": compile_s, "malloc": speed.malloc_in_use()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            with peak:
                t = step()
            _send(t)
        elif cmd == "report":
            if device.type == "cuda":
                mem = torch.cuda.max_memory_allocated(device) - alloc0
            else:
                mem = peak.peak - rss0
            # one more (untimed) step for the allocator-level peak, which RSS is not on the
            # CPU; after the timed steps, whose RSS the profiler's own buffers would inflate
            tensor_peak = peak_tensor_bytes(step, device)
            _send({"peak_mem_bytes": mem, "peak_rss_bytes": peak.peak, "rss_before_bytes": rss0,
                   "saved_activation_bytes": saved, "peak_tensor_bytes": tensor_peak})
        elif cmd == "quit":
            return


def inference_worker(args: argparse.Namespace) -> None:
    """Inference of plain / merged / unmerged models, merge time, adapter size: one JSON line."""
    import copy

    import torch

    from consolidator_hf import WEIGHTS_NAME, get_consolidator_model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plain = build_base(args.model_size).to(device).eval()
    wrapped = get_consolidator_model(copy.deepcopy(plain), consolidator_config(args.model_size))
    wrapped = wrapped.to(device).eval()
    merged = copy.deepcopy(wrapped).merge_and_unload()
    size = MODEL_SIZES[args.model_size]["image_size"]
    x = torch.randn(args.batch_size, 3, size, size,
                    generator=torch.Generator().manual_seed(2)).to(device)
    models = {"plain": plain, "merged": merged, "unmerged": wrapped}
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(pixel_values=x)  # warm-up
        for r in range(args.repeats):
            names = list(models)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                sync(device)
                t = time.perf_counter()
                models[name](pixel_values=x)
                sync(device)
                times[name].append(time.perf_counter() - t)
        exact = (merged(pixel_values=x).logits - wrapped(pixel_values=x).logits).abs().max().item()
    # Merge time of the whole model: a fresh deep copy per repeat, merge_and_unload timed alone.
    merge_times = []
    for _ in range(max(1, min(args.repeats, 5))):
        fresh = copy.deepcopy(wrapped)
        merge_times.append(median_time(fresh.merge_and_unload, 1, device))
        del fresh
    with tempfile.TemporaryDirectory() as tmp:
        wrapped.save_pretrained(tmp)
        adapter_bytes = os.path.getsize(os.path.join(tmp, WEIGHTS_NAME))
    counts = wrapped.parameter_counts()
    overhead = layer_overhead_us(device)
    _send({
        "layer_overhead_us": overhead,
        "layer_op_counts": layer_op_counts(device),
        # 64 samples: several runs of dropped samples per branch (the GPU batch size)
        "layer_overhead_us_b64": layer_overhead_us(device, rows=256),
        "layer_op_counts_b64": layer_op_counts(device, rows=256),
        "adapted_layers": sum(1 for _ in wrapped.consolidator_layers()),
        "inference_s": {k: statistics.median(v) for k, v in times.items()},
        "inference_all_s": times,
        "merged_vs_unmerged_max_abs_logit_diff": exact,
        "merge_s": statistics.median(merge_times),
        "adapter_file_bytes": adapter_bytes,
        "stored_params": counts["stored"],
        "trainable_params": counts["trainable"],
        "base_params": counts["base"],
    })


# ---------------------------------------------------------------------- driver
def _spawn(args: argparse.Namespace, worker: str) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker,
           "--model-size", args.model_size, "--batch-size", str(args.batch_size),
           "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--device", args.device, "--warmup", str(args.warmup), "--allocator", args.allocator]
    if args.bf16:
        cmd.append("--bf16")
    env = dict(os.environ)
    if args.allocator == "tuned":
        env.update(TUNED_MALLOC_ENV)
    elif args.allocator == "jemalloc":
        env["LD_PRELOAD"] = ":".join(filter(None, [args.jemalloc_path, env.get("LD_PRELOAD")]))
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            bufsize=1, env=env)


def _ask(proc: subprocess.Popen, cmd: Optional[str], name: str) -> Dict[str, Any]:
    if cmd is not None:
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {name} exited (code {proc.wait()}) without answering {cmd!r}")
    return json.loads(line)


def machine_info(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": args.device,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
        info["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_training(args: argparse.Namespace, configs: List[str]) -> Dict[str, Dict[str, Any]]:
    procs = {c: _spawn(args, c) for c in configs}
    results: Dict[str, Dict[str, Any]] = {}
    try:
        for c, p in procs.items():
            ready = _ask(p, None, c)
            results[c] = {"trainable_params": ready["trainable_params"],
                          "compile_s": ready.get("compile_s"), "malloc": ready["malloc"],
                          "step_s_all": [], "step_cpu_s_all": [], "page_faults_all": []}
        for r in range(args.repeats):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for c in order:
                answer = _ask(procs[c], "step", c)
                results[c]["step_s_all"].append(answer["step_s"])
                results[c]["step_cpu_s_all"].append(answer["step_cpu_s"])
                results[c]["page_faults_all"].append(answer["page_faults"])
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{c} {results[c]['step_s_all'][-1]:.3f}s" for c in configs), file=sys.stderr)
        for c, p in procs.items():
            results[c].update(_ask(p, "report", c))
            p.stdin.write("quit\n")
            p.stdin.flush()
    finally:
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    floor = results["floor"]
    floor_t = statistics.median(floor["step_s_all"])
    floor_cpu = statistics.median(floor["step_cpu_s_all"])
    for c, res in results.items():
        res["step_s"] = statistics.median(res["step_s_all"])
        res["time_ratio_to_floor"] = res["step_s"] / floor_t
        # The fastest step of each: on a shared machine the least contaminated figure.
        res["step_s_min"] = min(res["step_s_all"])
        res["min_time_ratio_to_floor"] = res["step_s_min"] / min(floor["step_s_all"])
        res["step_cpu_s"] = statistics.median(res["step_cpu_s_all"])
        res["cpu_time_ratio_to_floor"] = res["step_cpu_s"] / floor_cpu
        res["mem_ratio_to_floor"] = res["peak_mem_bytes"] / floor["peak_mem_bytes"]
        res["tensor_mem_ratio_to_floor"] = res["peak_tensor_bytes"] / floor["peak_tensor_bytes"]
        res["saved_activation_ratio_to_floor"] = \
            res["saved_activation_bytes"] / floor["saved_activation_bytes"]
        res["page_faults_per_step"] = statistics.median(res["page_faults_all"])
        res["paired_ratio_to_floor"] = speed.paired_ratios(res["step_s_all"], floor["step_s_all"])
    if "floor_compiled" in results:
        fc = results["floor_compiled"]
        for c, res in results.items():
            if c.endswith(COMPILED):
                res["time_ratio_to_floor_compiled"] = res["step_s"] / fc["step_s"]
                res["paired_ratio_to_floor_compiled"] = speed.paired_ratios(
                    res["step_s_all"], fc["step_s_all"])
                res["cpu_time_ratio_to_floor_compiled"] = res["step_cpu_s"] / fc["step_cpu_s"]
                res["saved_activation_ratio_to_floor_compiled"] = \
                    res["saved_activation_bytes"] / fc["saved_activation_bytes"]
    return results


def _spread(paired: Dict[str, float]) -> str:
    return f"{paired['median']:.3f} [{paired['q1']:.3f}–{paired['q3']:.3f}]"


def markdown_table(report: Dict[str, Any]) -> str:
    lines = ["| configuration | trainable params | step time (s), median | × floor | per repeat × "
             "floor, median [quartiles] | fastest step × floor | step CPU time × floor | "
             "peak train memory (MiB) | × floor | peak tensor memory in a step (MiB) | × floor | "
             "saved activations (MiB) | × floor | page faults / step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    for c, r in report["train"].items():
        lines.append(f"| {c} | {r['trainable_params']:,} | {r['step_s']:.3f} | "
                     f"{r['time_ratio_to_floor']:.3f} | {_spread(r['paired_ratio_to_floor'])} | "
                     f"{r['min_time_ratio_to_floor']:.3f} | "
                     f"{r['cpu_time_ratio_to_floor']:.3f} | "
                     f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['mem_ratio_to_floor']:.3f} | "
                     f"{r['peak_tensor_bytes'] / 2**20:.1f} | "
                     f"{r['tensor_mem_ratio_to_floor']:.3f} | "
                     f"{r['saved_activation_bytes'] / 2**20:.1f} | "
                     f"{r['saved_activation_ratio_to_floor']:.3f} | "
                     f"{r['page_faults_per_step']:,.0f} |")
    compiled = {c: r for c, r in report["train"].items() if "time_ratio_to_floor_compiled" in r}
    if compiled:
        lines += ["", "| compiled configuration | compile (s) | step time (s) | × floor compiled | "
                      "per repeat × floor compiled, median [quartiles] | "
                      "step CPU time × floor compiled | saved activations × floor compiled |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c, r in compiled.items():
            lines.append(f"| {c} | {r['compile_s']:.0f} | {r['step_s']:.3f} | "
                         f"{r['time_ratio_to_floor_compiled']:.3f} | "
                         f"{_spread(r['paired_ratio_to_floor_compiled'])} | "
                         f"{r['cpu_time_ratio_to_floor_compiled']:.3f} | "
                         f"{r['saved_activation_ratio_to_floor_compiled']:.3f} |")
    inf = report["inference"]
    t = inf["inference_s"]
    lines += ["", "| inference (batch) | time (s) | × plain |", "| --- | ---: | ---: |"]
    for k in ("plain", "merged", "unmerged"):
        lines.append(f"| {k} | {t[k]:.3f} | {t[k] / t['plain']:.3f} |")
    o = inf["layer_overhead_us"]
    ops = inf.get("layer_op_counts", {})
    lines += ["", "| host time per adapted layer, fwd+bwd (64 features, 8 samples x 4 rows) | µs | "
                  f"× plain | extra per step ({inf['adapted_layers']} layers), ms | "
                  "aten ops fwd + bwd | × plain |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    probes = [("", o, ops)]
    if "layer_overhead_us_b64" in inf:
        probes.append((", 64 samples", inf["layer_overhead_us_b64"], inf["layer_op_counts_b64"]))
    for suffix, o, ops in probes:
        for k in [k for k in ("plain", "fast", "fast_nodrop", "reference") if k in o]:
            extra = (o[k] - o["plain"]) * inf["adapted_layers"] / 1e3
            n = ops.get(k)
            count = (f"{n['forward']:.0f} + {n['backward']:.0f} | "
                     f"{n['total'] / ops['plain']['total']:.2f}" if n else "- | -")
            lines.append(f"| {k}{suffix} | {o[k]:.0f} | {o[k] / o['plain']:.2f} | {extra:.1f} | "
                         f"{count} |")
    lines += ["", f"merge_and_unload of the whole model: {inf['merge_s']:.3f} s; "
                  f"adapter file: {inf['adapter_file_bytes']:,} bytes "
                  f"({inf['stored_params']:,} stored params); merged vs unmerged max |Δlogit| "
                  f"{inf['merged_vs_unmerged_max_abs_logit_diff']:.1e}"]
    return "\n".join(lines)


def write_chart(report: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = report["train"]
    names = list(train)
    overhead = report["inference"].get("layer_overhead_us")
    fig, axes = plt.subplots(1, 4 if overhead else 3, figsize=(20 if overhead else 15, 4.5))
    for ax, key, title in ((axes[0], "time_ratio_to_floor", "training step time / floor"),
                           (axes[1], "tensor_mem_ratio_to_floor",
                            "peak tensor memory in a step / floor")):
        vals = [train[n][key] for n in names]
        ax.bar(range(len(names)), vals, color=["grey"] + ["C0"] * (len(names) - 1))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=8)
        ax.set_title(title)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    # the machine's noise: median and quartiles of the per-repeat ratios beside the bars' ratio
    # of the medians
    spread = [train[n].get("paired_ratio_to_floor") for n in names]
    if all(spread):
        mid = [p["median"] for p in spread]
        axes[0].errorbar(range(len(names)), mid, fmt="o", ms=3, color="k", capsize=4, lw=0.8,
                         yerr=[[m - p["q1"] for m, p in zip(mid, spread)],
                               [p["q3"] - m for m, p in zip(mid, spread)]])
        axes[0].set_title("training step time / floor (dots: per repeat, median and quartiles)",
                          fontsize=10)
    inf = report["inference"]["inference_s"]
    keys = ["plain", "merged", "unmerged"]
    axes[2].bar(keys, [inf[k] / inf["plain"] for k in keys], color=["grey", "C2", "C1"])
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].set_title("inference time / plain model")
    if overhead:
        keys = [k for k in ("plain", "fast", "fast_nodrop", "reference") if k in overhead]
        series = [("8 samples", overhead)]
        if "layer_overhead_us_b64" in report["inference"]:
            series.append(("64 samples", report["inference"]["layer_overhead_us_b64"]))
        width = 0.8 / len(series)
        for j, (label, values) in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(keys))]
            axes[3].bar(xs, [values[k] for k in keys], width, label=label, color=f"C{j}")
            for x, k in zip(xs, keys):
                axes[3].text(x, values[k], f"{values[k] / values['plain']:.2f}x", ha="center",
                             va="bottom", fontsize=7)
        axes[3].set_xticks(range(len(keys)), keys, fontsize=8)
        axes[3].legend(fontsize=8)
        axes[3].set_title("host time per adapted layer, fwd+bwd (µs; labels: x plain)")
    m = report["machine"]
    fig.suptitle(f"consolidator_hf bench: ViT-{report['args']['model_size']}, batch "
                 f"{report['args']['batch_size']}, {m['device']}, {m['threads']} threads, "
                 f"{m.get('cpu_model', m['processor'])}", fontsize=9)
    fig.tight_layout()
    from consolidator_hf.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description's line breaks, and every default shown (consolidator_hf.cli's formatter,
    not imported here: this script sets thread and allocator settings before torch loads)."""

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is None and action.default not in (None, False):
            action.help = "(default: %(default)s)"  # argparse skips help-less options
        super().add_argument(action)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="base")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads per worker")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--configs", nargs="+",
                   choices=TRAIN_CONFIGS + COMPILED_CONFIGS + list(FORMULA_CONFIGS),
                   default=TRAIN_CONFIGS, help="training configurations (floor is always included)")
    p.add_argument("--compile", action="store_true",
                   help="also run " + ", ".join(COMPILED_CONFIGS) + " (torch.compile)")
    p.add_argument("--bf16", action="store_true",
                   help="training steps (and the saved-activation probe) under bf16 autocast; "
                        "weights and merges stay fp32, inference rows stay fp32")
    p.add_argument("--allocator", choices=["tuned", "system", "jemalloc"], default="tuned",
                   help="the workers' malloc: glibc tuned or as it is, or jemalloc preloaded "
                        "(see the module docstring)")
    p.add_argument("--output-dir", default="bench_out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        p.error("--batch-size, --repeats and --threads must be >= 1, --warmup >= 0")
    args.jemalloc_path = None
    if args.allocator == "jemalloc" and not args.worker:
        args.jemalloc_path = speed.find_jemalloc()
        if args.jemalloc_path is None:
            p.error("--allocator jemalloc: no libjemalloc.so.2 found (looked in "
                    + ", ".join(speed.JEMALLOC_PATHS) + "; Debian/Ubuntu: apt install libjemalloc2)")
    if args.worker == "inference":
        inference_worker(args)
        return {}
    if args.worker:
        train_worker(args)
        return {}

    configs = ["floor"] + [c for c in args.configs if c != "floor"]
    if args.compile:
        configs += [c for c in COMPILED_CONFIGS if c not in configs]
    if any(c.endswith(COMPILED) for c in configs) and "floor_compiled" not in configs:
        configs.append("floor_compiled")
    notes = []
    from consolidator_hf.training import peft_available

    if not peft_available():
        for c in ("lora_r8_qv", "lora_r8_qv_compiled"):
            if c in configs:
                configs.remove(c)
                notes.append(f"peft is not installed: {c} skipped")
    report: Dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "worker"},
                              "machine": machine_info(args), "notes": notes}
    report["train"] = run_training(args, configs)
    proc = _spawn(args, "inference")
    report["inference"] = _ask(proc, None, "inference")
    proc.wait()
    try:
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    os.makedirs(args.output_dir, exist_ok=True)
    from consolidator_hf.io import atomic_write_text

    atomic_write_text(os.path.join(args.output_dir, "bench.json"),
                      json.dumps(report, indent=2) + "\n")
    write_chart(report, os.path.join(args.output_dir, "bench.png"))
    print(markdown_table(report))
    for n in notes:
        print("note:", n)
    print(f"wrote {args.output_dir}/bench.json and bench.png")
    return report


if __name__ == "__main__":
    main()
