"""One-off measurement (issue 14): eager floor, eager fast path, compiled floor and the compiled
"ops" formulation on a ViT-B-width model with L layers (default 2), batch 8, 224^2, fp32, 2
threads, R interleaved steps (default 9), medians; then a 5-step torch.profiler table (self CPU)
of the eager fast path and of the compiled ops, to compare their kernels.

    PYTHONPATH=. python docs/compile_profile/eager_vs_ops.py
"""
import os, time, statistics, torch
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
for n in ("consolidator_fast", "consolidator_fast_c"):
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(5): steps[n]()
    print("=====", n)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
