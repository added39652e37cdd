"""Peak RSS against what glibc's malloc holds in use, per training step of one bench
configuration (ViT-B/16 random init, batch 8, 224², 2 threads), sampled every 2 ms (``speed.RssPeak``):
``rss`` (above the start), malloc's ``in use`` (``mallinfo2``: ``uordblks + hblkhd``) and its
``heap`` (arenas + mmapped chunks, ``arena + hblkhd``), each the running peak after each step.
When ``in use`` follows the tensors and ``heap`` follows RSS, the difference is freed memory
glibc keeps (fragmentation), not live memory. The measurement behind README's "Peak RSS is
glibc's heap, not tensors" (a one-off script, not a test; glibc only)::

    PYTHONPATH=. python docs/memory/heap_probe.py floor 6
    PYTHONPATH=. python docs/memory/heap_probe.py consolidator_fast 6
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \\
        PYTHONPATH=. python docs/memory/heap_probe.py consolidator_fast 6   # rss only
"""

import contextlib
import ctypes
import sys

import torch

from consolidator_apps import speed


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


def main(name: str, steps: int) -> None:
    torch.set_num_threads(2)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    glibc = speed.malloc_in_use() == "glibc"

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd if glibc else 0

    def held() -> int:
        m = libc.mallinfo2()
        return m.arena + m.hblkhd if glibc else 0

    model = speed.build_train_model(name, "base").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 224, 224, generator=g)
    y = torch.randint(0, speed.NUM_LABELS, (8,), generator=g)
    speed.release_free_memory()
    peaks = {"rss": speed.RssPeak(), "in use": speed.RssPeak(sample=in_use),
             "heap": speed.RssPeak(sample=held)}
    start = {k: p.sample() for k, p in peaks.items()}
    rows = []
    for _ in range(steps):
        with contextlib.ExitStack() as stack:
            for p in peaks.values():
                stack.enter_context(p)
            model(pixel_values=x, labels=y).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rows.append({k: round((p.peak - start[k]) / 2**20) for k, p in peaks.items()})
    print(f"{name} on {speed.malloc_in_use()}: running peaks in MiB after each step")
    for i, r in enumerate(rows, 1):
        print(f"  step {i}: " + ", ".join(f"{k} {v}" for k, v in r.items()
                                         if glibc or k == "rss"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6)
