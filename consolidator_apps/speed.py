"""What ``scripts/bench.py`` measures with: the benchmark's models (random-init ViTs of three
sizes, the floor, Consolidator, full fine-tuning, LoRA), memory probes (RSS, its peak, the bytes of
activations autograd saves) and the per-layer host-cost probes (time and aten-op counts of one
adapted layer at negligible arithmetic). The script runs them in worker processes and reports;
nothing here starts a process or prints.
"""

from __future__ import annotations

import collections
import os
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional

MODEL_SIZES: Dict[str, Dict[str, int]] = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, image_size=224, patch_size=16),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                  intermediate_size=1536, image_size=224, patch_size=16),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, image_size=32, patch_size=8),
}
NUM_LABELS = 100


# ---------------------------------------------------------------------- models
def build_base(size: str):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**MODEL_SIZES[size], num_labels=NUM_LABELS))


def consolidator_config(size: str, impl: str = "fast"):
    from consolidator_hf import ConsolidatorConfig

    # Blocks of 2 channels, the paper's ViT-B/16 ratio (groups=384 at hidden size 768).
    return ConsolidatorConfig(groups=(MODEL_SIZES[size]["hidden_size"] // 2,), drop_rate=0.1,
                              impl=impl)


def build_train_model(name: str, size: str):
    """The model of one training configuration, its trainable parameters set."""
    from consolidator_hf import get_consolidator_model

    base = build_base(size)
    if name in ("consolidator_fast", "consolidator_reference"):
        return get_consolidator_model(base, consolidator_config(size, name.split("_")[1]))
    if name == "floor":
        # Exactly what Consolidator trains besides its branches, read off a wrapped copy.
        probe = get_consolidator_model(build_base(size), consolidator_config(size))
        wanted = {n for n, _ in probe.trained_base_parameters()}
        for n, p in base.named_parameters():
            p.requires_grad_(n in wanted)
        return base
    if name == "full_ft":
        return base
    if name == "lora_r8_qv":
        from peft import LoraConfig, get_peft_model

        from consolidator_hf.targets import head_module_name, lora_target_modules

        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=lora_target_modules(base),
                         modules_to_save=[head_module_name(base)])
        return get_peft_model(base, cfg)
    raise ValueError(f"unknown configuration {name!r}")


# ---------------------------------------------------------------------- memory
def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Hand the heap's free memory back to the kernel (glibc ``malloc_trim``; a no-op elsewhere),
    so that RSS counts live memory before the first step even with the tuned allocator."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")


def find_jemalloc() -> Optional[str]:
    """A jemalloc shared library to ``LD_PRELOAD`` into a worker (Debian/Ubuntu:
    ``apt install libjemalloc2``): its path, else the soname the dynamic loader's cache knows
    (``ctypes.util.find_library``; ``LD_PRELOAD`` resolves a bare soname the same way), or
    ``None``."""
    import ctypes.util

    for path in JEMALLOC_PATHS:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("jemalloc")


def malloc_in_use() -> str:
    """Which malloc this process runs on: ``"jemalloc"`` or ``"tcmalloc"`` when one is mapped
    into it (preloaded), else ``"glibc"``."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    return next((name for name in ("jemalloc", "tcmalloc") if name in maps), "glibc")


class RssPeak:
    """Peak RSS while active, sampled by a thread (torch ops release the GIL); ``sample``
    another byte count to follow its peak the same way (e.g. malloc's in-use bytes)."""

    def __init__(self, interval: float = 0.002,
                 sample: Callable[[], int] = current_rss) -> None:
        self.interval, self.sample, self.peak = interval, sample, 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RssPeak":
        self._stop.clear()
        self.peak = max(self.peak, self.sample())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def peak_tensor_bytes(fn, device) -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs, above what was live before it: the
    allocator-level peak, unlike RSS, which also counts freed memory glibc's heap keeps
    (fragmented; with its default settings as with the bench's tuned ones), so a configuration
    that allocates more distinct sizes shows a higher RSS for the same tensors. On CUDA
    ``torch.cuda.max_memory_allocated``; on the CPU the profiler's memory events (``+n`` per
    allocation, ``-n`` per free, summed in time order: what ``max_memory_allocated`` would say
    if the CPU allocator kept the statistic)."""
    import torch

    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"peak_tensor_bytes: device {device} (only cpu and cuda are measured)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto's raw events: FunctionEvent lists attribute memory to ops, not to time order
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def saved_activation_bytes(model, x, y, params) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(pixel_values=x, labels=y).loss
    loss.backward()  # free the graph the same way a step does
    for p in params:
        p.grad = None
    return sum(seen.values())


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def paired_ratios(steps: List[float], floor_steps: List[float]) -> Dict[str, float]:
    """Each repeat's step over the floor's step of the same repeat (the bench asks every worker
    for one step per repeat, so a slow spell of the machine hits both): ``{"median", "q1",
    "q3"}`` of those ratios. Beside the ratio of the medians, how far the spread of a noisy
    machine reaches (the quartiles are the median itself below two repeats)."""
    if len(steps) != len(floor_steps) or not steps:
        raise ValueError(f"paired_ratios: {len(steps)} steps against {len(floor_steps)} floor "
                         "steps; one step of each per repeat is needed")
    ratios = [a / b for a, b in zip(steps, floor_steps)]
    median = statistics.median(ratios)
    if len(ratios) < 2:
        return {"median": median, "q1": median, "q3": median}
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def median_time(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _probe_layers(device, features: int, rows: int):
    """``LayerNorm``, input, output gradient and the probed layers: a frozen ``nn.Linear`` with a
    trainable bias (what the floor runs), a ``ConsolidatorLinear`` (2-channel blocks, drop
    0.1) per ``impl``, and the fast one at drop 0 (``fast_nodrop``: what the drop corrections
    on the rows of dropped samples add is the difference to ``fast``)."""
    import torch

    from consolidator_hf import ConsolidatorLinear

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(features).to(device)
    x = torch.randn(rows // 4, 4, features, device=device, requires_grad=True)
    grad = torch.randn(rows // 4, 4, features, device=device)
    layers = {"plain": torch.nn.Linear(features, features)}
    for name, impl, drop in (("fast", "fast", 0.1), ("fast_nodrop", "fast", 0.0),
                             ("reference", "reference", 0.1)):
        layers[name] = ConsolidatorLinear(torch.nn.Linear(features, features), (features // 2,),
                                          drop_rate=drop, impl=impl).train()
    for layer in layers.values():
        layer.to(device)
        for name, param in layer.named_parameters():
            if name.endswith("weight") and "branches" not in name:
                param.requires_grad_(False)
    return norm, x, grad, layers


def layer_overhead_us(device, repeats: int = 300, features: int = 64,
                      rows: int = 32) -> Dict[str, float]:
    """Median microseconds of forward + backward through ``LayerNorm -> linear`` at a size where
    the arithmetic is negligible, per probed layer (:func:`_probe_layers`), interleaved."""
    norm, x, grad, layers = _probe_layers(device, features, rows)
    times: Dict[str, List[float]] = {k: [] for k in layers}
    for r in range(repeats + 20):
        for name, layer in layers.items():
            sync(device)
            t = time.perf_counter()
            layer(norm(x)).backward(grad)
            sync(device)
            if r >= 20:  # warm-up
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def layer_op_counts(device, steps: int = 20, features: int = 64,
                    rows: int = 32) -> Dict[str, Dict[str, float]]:
    """What bounds the host time: the aten ops one forward + backward of each probed layer
    dispatches (LayerNorm included, as in :func:`layer_overhead_us`), mean over ``steps`` steps
    with fresh drop draws. Each op costs the dispatcher and autograd about the same few
    microseconds whatever its size, so at negligible arithmetic the host time follows this count.
    Returns ``{layer: {"forward": n, "backward": n, "total": n, "top": {op: n per step}}}``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    norm, x, grad, layers = _probe_layers(device, features, rows)
    out: Dict[str, Dict[str, float]] = {}
    for name, layer in layers.items():
        for _ in range(3):  # caches filled, as in a training step after the first
            layer(norm(x)).backward(grad)
        fwd, bwd = _Count(), _Count()
        torch.manual_seed(1)
        for _ in range(steps):
            with fwd:
                y = layer(norm(x))
            with bwd:
                y.backward(grad)
        total = fwd.ops + bwd.ops
        out[name] = {"forward": sum(fwd.ops.values()) / steps,
                     "backward": sum(bwd.ops.values()) / steps,
                     "total": sum(total.values()) / steps,
                     "top": {op: n / steps for op, n in total.most_common(6)}}
    return out
