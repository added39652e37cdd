"""One-off measurement (issue 14): compiled floor vs compiled Consolidator on a ViT-B-width model
with L layers (default 2), batch B (8), 224^2, fp32, 2 threads; R interleaved steps, medians;
PROF=1 adds a 5-step torch.profiler split of self CPU time (GEMMs, attention, inductor's compiled
kernels, other). F=ops|traced picks the compiled formulation (default: the CPU's, ops);
V=<name> swaps the traced formulation's branch product for one in variants.py (implies F=traced).

    PYTHONPATH=.:docs/compile_profile PROF=1 python docs/compile_profile/step.py
    PYTHONPATH=.:docs/compile_profile V=op python docs/compile_profile/step.py
"""
import os, sys, time, statistics, torch
torch.set_num_threads(2)
from consolidator_apps import speed
from consolidator_hf import compiled_path
speed.MODEL_SIZES["b2"] = dict(speed.MODEL_SIZES["base"], num_hidden_layers=int(os.environ.get("L", "2")))
variant = os.environ.get("V", "cur")
compiled_path.FORMULAS["cpu"] = os.environ.get("F", "traced" if variant != "cur" else "ops")
if variant != "cur":
    import variants
    compiled_path.branch_product = getattr(variants, variant)
names = sys.argv[1:] or ["floor", "consolidator_fast"]
torch.manual_seed(0)
B = int(os.environ.get("B", "8"))
x = torch.randn(B, 3, 224, 224); y = torch.randint(0, 100, (B,))
models = {}
for n in names:
    m = speed.build_train_model(n, "b2"); m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    cm = torch.compile(m)
    def step(cm=cm, opt=opt):
        out = cm(pixel_values=x).logits
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    t = time.perf_counter(); step(); step(); print(n, "compile+2 steps", round(time.perf_counter() - t, 1), flush=True)
    models[n] = step
times = {n: [] for n in names}
for r in range(int(os.environ.get("R", "7"))):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
        t = time.perf_counter(); models[n](); times[n].append(time.perf_counter() - t)
base = statistics.median(times[names[0]])
for n in names:
    md = statistics.median(times[n]); print(f"{n:24s} {md*1e3:8.1f} ms  x{md/base:.3f}")
if os.environ.get("PROF"):
    from torch.profiler import profile, ProfilerActivity
    for n in names:
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(5):
                models[n]()
        groups = {}
        for e in p.key_averages():
            key = ("compiled graph kernels (inductor)" if "CompiledFxGraph" in e.key else
                   "GEMMs (aten::mm/addmm/bmm)" if e.key in ("aten::mm", "aten::addmm", "aten::bmm") else
                   "attention" if "attention" in e.key else "other")
            groups[key] = groups.get(key, 0) + e.self_cpu_time_total / 5e3
        print("=====", n, "self CPU ms per step:", {k: round(v, 1) for k, v in sorted(groups.items())})
