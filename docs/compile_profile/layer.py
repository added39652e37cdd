"""One-off measurement (issue 14): one adapted layer (LayerNorm -> linear FIN->FOUT, groups 384,
1576 rows, drop 0.1, SH=1 for shuffle) compiled alone, fwd+bwd, 15 interleaved steps, against the
compiled frozen linear, in the traced formulation. Arguments: formulations of its branch product
(cur, or names in variants.py).

    PYTHONPATH=.:docs/compile_profile FIN=768 FOUT=3072 python docs/compile_profile/layer.py cur blocks op
"""
import os, sys, time, statistics, torch
import torch.nn.functional as F
torch.set_num_threads(2)
from consolidator_hf import compiled_path, grouped
from consolidator_hf.grouped import Geometry
import variants as variants
n, fin, fout, G = 1576, int(os.environ.get("FIN", 768)), int(os.environ.get("FOUT", 3072)), 384
torch.manual_seed(0)
u = torch.randn(n // 197, 197, fin)
lnw = torch.ones(fin, requires_grad=True); lnb = torch.zeros(fin, requires_grad=True)
w0 = torch.randn(fout, fin) * 0.02; b0 = torch.zeros(fout, requires_grad=True)
wk = (torch.randn(fout, fin // G) * 0.02).requires_grad_(); ck = torch.zeros(fout, requires_grad=True)
geom = Geometry(G, bool(int(os.environ.get("SH", "0"))))
gout = torch.randn(n // 197, 197, fout)
def floor_f(u, m):
    return F.linear(F.layer_norm(u, (fin,), lnw, lnb), w0, b0)
def make(bp):
    def f(u, m):
        compiled_path.branch_product = bp
        return compiled_path.traceable_linear(F.layer_norm(u, (fin,), lnw, lnb), w0, b0, [wk], [ck], [geom], m)
    return f
forms = {"floor": floor_f}
for v in sys.argv[1:]:
    forms[v] = make(compiled_path.branch_product if v == "cur" else getattr(variants, v))
steps = {}
for name, f in forms.items():
    cf = torch.compile(f)
    def step(cf=cf):
        m = grouped.keep_masks(n // 197, 1, 0.1)
        y = cf(u, m); y.backward(gout)
    step(); step(); steps[name] = step
ts = {k: [] for k in steps}
for r in range(15):
    for k, s in steps.items():
        t = time.perf_counter(); s(); ts[k].append(time.perf_counter() - t)
b = statistics.median(ts["floor"])
for k in ts:
    md = statistics.median(ts[k]); print(f"{k:10s} {md*1e3:7.2f} ms  +{(md-b)*1e3:6.2f} ms")
