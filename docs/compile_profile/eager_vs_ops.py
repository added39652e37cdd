"""One-off measurement (issue 14): eager floor, eager fast path, compiled floor and the compiled
"ops" formulation on a ViT-B-width model with L layers (default 2), batch 8, 224^2, fp32, 2
threads, R interleaved steps (default 9), medians; then a 5-step torch.profiler table (self CPU)
of the eager fast path and of the compiled ops, to compare their kernels. With DIFF=1 instead:
5 profiled steps of all four and, per op, the self CPU time per step of the consolidator minus
its floor (eager, then compiled; inductor's graphs, named by hash, in one row), largest first
(docs/performance.md, "what is left after block batching"; ~4 min on 2 cores).

    PYTHONPATH=. python docs/compile_profile/eager_vs_ops.py
    DIFF=1 PYTHONPATH=. python docs/compile_profile/eager_vs_ops.py
"""
import os, time, statistics, torch, collections
torch.set_num_threads(2)
from consolidator_apps import speed
speed.MODEL_SIZES["b2"] = dict(speed.MODEL_SIZES["base"], num_hidden_layers=int(os.environ.get("L", "2")))
torch.manual_seed(0)
x = torch.randn(8, 3, 224, 224); y = torch.randint(0, 100, (8,))
steps = {}
for name, comp in [("floor", False), ("consolidator_fast", False), ("floor", True), ("consolidator_fast", True)]:
    m = speed.build_train_model(name, "b2"); m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    cm = torch.compile(m) if comp else m
    def step(cm=cm, opt=opt):
        out = cm(pixel_values=x).logits
        torch.nn.functional.cross_entropy(out, y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    step(); step()
    steps[name + ("_c" if comp else "")] = step
ts = {k: [] for k in steps}
names = list(steps)
for r in range(int(os.environ.get("R", "9"))):
    for n in names[r % 4:] + names[:r % 4]:
        t = time.perf_counter(); steps[n](); ts[n].append(time.perf_counter() - t)
for n in names:
    print(f"{n:22s} {statistics.median(ts[n])*1e3:8.1f} ms  x{statistics.median(ts[n])/statistics.median(ts['floor']):.3f}")
from torch.profiler import profile, ProfilerActivity
if os.environ.get("DIFF"):
    P, self_ms = 5, {}
    for n in names:
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(P): steps[n]()
        d = collections.Counter()
        for e in p.key_averages():
            key = "inductor graphs (## Call CompiledFxGraph ...)" if "CompiledFxGraph" in e.key else e.key
            d[key] += e.self_cpu_time_total / 1e3 / P
        self_ms[n] = d
        print(n, "self CPU total per step", round(sum(d.values()), 1), "ms")
    for a, b in (("floor", "consolidator_fast"), ("floor_c", "consolidator_fast_c")):
        keys = sorted(set(self_ms[a]) | set(self_ms[b]), key=lambda k: -(self_ms[b][k] - self_ms[a][k]))
        print(f"===== {b} - {a}: total {sum(self_ms[b].values()) - sum(self_ms[a].values()):+.1f} ms/step")
        for k in keys[:18]:
            print(f"  {k[:60]:60s} {self_ms[a][k]:8.1f} {self_ms[b][k]:8.1f} {self_ms[b][k]-self_ms[a][k]:+8.1f}")
    raise SystemExit
for n in ("consolidator_fast", "consolidator_fast_c"):
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(5): steps[n]()
    print("=====", n)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
