"""What a C++ port of the fast path's op sequence would buy on the host: the same small aten ops
(the patch / GEMM / restore sequence: ``index_select``, ``index_copy_``, ``linear``,
``index_copy_``, ``sum`` on a 64x64 weight and 32 rows) issued from Python and from C++
(``torch.utils.cpp_extension.load_inline``, g++ and ninja needed; compiles in ~20 s), interleaved,
medians in microseconds per aten op (counted with a dispatch mode), beside the bench's probed
layers (``consolidator_apps.speed``: host time and aten ops per forward + backward). Prints what
the fast path's op count alone costs at the C++ per-op price against 2x a plain frozen linear's
whole host time: the measurement behind README's "Host time: what a fused op must do" (a one-off
script, not a test)::

    python docs/host_time/dispatch.py
"""

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.cpp_extension import load_inline

from consolidator_apps.speed import layer_op_counts, layer_overhead_us

_SOURCE = r"""
#include <torch/extension.h>
torch::Tensor sequence(torch::Tensor w, torch::Tensor idx, torch::Tensor vals, torch::Tensor x,
                       torch::Tensor b, int64_t n) {
  torch::Tensor y;
  auto flat = w.view({-1});
  for (int64_t i = 0; i < n; ++i) {
    auto native = flat.index_select(0, idx);
    flat.index_copy_(0, idx, vals);
    y = torch::linear(x, w, b);
    flat.index_copy_(0, idx, native);
    y = y.sum(0);
  }
  return y;
}
"""


def _python_sequence(w, idx, vals, x, b, n):
    flat = w.view(-1)
    for _ in range(n):
        native = flat.index_select(0, idx)
        flat.index_copy_(0, idx, vals)
        y = torch.nn.functional.linear(x, w, b)
        flat.index_copy_(0, idx, native)
        y = y.sum(0)
    return y


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main(repeats: int = 300, n: int = 10) -> None:
    torch.set_num_threads(2)
    start = time.time()
    cpp = load_inline("consolidator_dispatch_probe", cpp_sources=_SOURCE, functions=["sequence"],
                      extra_cflags=["-O2"])
    print(f"C++ probe compiled in {time.time() - start:.1f} s")
    w, idx, vals = torch.randn(64, 64), torch.arange(0, 4096, 2), torch.randn(2048)
    x, b = torch.randn(32, 64), torch.randn(64)
    args = (w, idx, vals, x, b, n)
    count = _Count()
    with count:
        _python_sequence(*args)
    ops = count.n
    times = {"python": [], "c++": []}
    for r in range(repeats + 20):
        for name, fn in (("python", _python_sequence), ("c++", cpp.sequence)):
            t = time.perf_counter()
            fn(*args)
            if r >= 20:
                times[name].append(time.perf_counter() - t)
    per_op = {k: statistics.median(v) * 1e6 / ops for k, v in times.items()}
    print(f"{ops} aten ops per call; us per aten op: "
          + ", ".join(f"{k} {v:.2f}" for k, v in per_op.items()))
    host = layer_overhead_us(torch.device("cpu"))
    counts = layer_op_counts(torch.device("cpu"))
    plain = host["plain"]
    print(f"plain frozen linear: {plain:.0f} us per fwd+bwd; the 2x target is {2 * plain:.0f} us")
    for name in ("fast", "fast_nodrop"):
        total = counts[name]["total"]
        floor = total * per_op["c++"]
        print(f"{name}: {host[name]:.0f} us now ({host[name] / plain:.2f}x), {total:.1f} aten ops; "
              f"the same ops issued from C++ alone: >= {floor:.0f} us ({floor / plain:.2f}x plain)")


if __name__ == "__main__":
    main()
