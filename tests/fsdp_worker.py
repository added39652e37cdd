"""One rank of the FSDP2 check in tests/test_distributed.py (run with torchrun, 2 CPU ranks, gloo).

accelerate applies its FSDP plugin only to GPU-type distributed runs (on CPU ranks it silently
trains DDP), so this drives ``torch.distributed.fsdp.fully_shard`` directly, the way
accelerate's FSDP2 path wraps a model: one shard unit per ``ViTLayer``, then the root.

For each impl ("fast", "reference"), with a tiny consolidated ViT and a fixed global batch of 8
split over the ranks:
  * ``straight``: 5 sharded SGD steps;
  * ``resumed``: 3 sharded steps, a torch.distributed.checkpoint save of model + optimizer, a
    fresh sharded model and optimizer loaded from it, 2 more steps;
  * ``single``: the same 5 steps on one rank, unsharded, over the whole global batch.
Rank 0 writes ``<out>/result.json`` (max differences) and, from the full state dict of the
``straight`` fast run, ``<out>/adapter`` and ``<out>/merged``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import tiny_vit  # noqa: E402

from consolidator_hf import ConsolidatorConfig, ConsolidatorModel  # noqa: E402

STEPS, SPLIT, BATCH, LR = 5, 3, 8, 0.5


def build(impl):
    config = ConsolidatorConfig(groups=(8, 4), channel_shuffle=True, drop_rate=0.0, impl=impl,
                                init_range=0.05, modules_to_save=["classifier"])
    return ConsolidatorModel(tiny_vit(seed=0), config).train()


def shard(model):
    for layer in model.base_model.vit.encoder.layer if hasattr(model.base_model.vit, "encoder") \
            else model.base_model.vit.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 3, 16, 16, generator=g)
    y = torch.randint(0, 3, (STEPS, BATCH), generator=g)
    return x, y


def log(*a):
    if os.environ.get("FSDP_WORKER_DEBUG"):
        print(f"[rank {os.environ.get('RANK')}]", *a, flush=True)


def step(model, opt, x, y):
    log("step")
    loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
    loss.backward()
    opt.step()
    opt.zero_grad()


def optimizer(model):
    # SGD: the key projection's bias has an exactly-zero true gradient (softmax ignores a shift
    # shared by all keys); Adam would turn its fp32 rounding noise into lr-sized steps.
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


def local(x, y, rank, world):
    n = BATCH // world
    return x[:, rank * n:(rank + 1) * n], y[:, rank * n:(rank + 1) * n]


def full_state(model):
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data()
    xl, yl = local(x, y, rank, world)
    results, states = {}, {}
    for impl in ("fast", "reference"):
        model = shard(build(impl))
        opt = optimizer(model)
        for s in range(STEPS):
            step(model, opt, xl[s], yl[s])
        log(impl, "trained")
        states[impl, "straight"] = full_state(model)
        log(impl, "gathered")
        straight_model = model

        model = shard(build(impl))
        opt = optimizer(model)
        for s in range(SPLIT):
            step(model, opt, xl[s], yl[s])
        ckpt = os.path.join(out, f"ckpt-{impl}")
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=ckpt)
        log(impl, "saved")
        del model, opt
        model = shard(build(impl))
        opt = optimizer(model)
        model_sd, opt_sd = get_state_dict(model, opt)
        loaded = {"model": model_sd, "optim": opt_sd}
        dcp.load(loaded, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        for s in range(SPLIT, STEPS):
            step(model, opt, xl[s], yl[s])
        states[impl, "resumed"] = full_state(model)
        if impl == "fast":
            fast_model = straight_model

    if rank == 0:
        for impl in ("fast", "reference"):
            single = build(impl)
            opt = optimizer(single)
            for s in range(STEPS):
                step(single, opt, x[s], y[s])
            states[impl, "single"] = {k: v.detach().clone() for k, v in single.state_dict().items()}

        def diff(a, b):
            return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

        fresh = build("fast")
        init = fresh.state_dict()
        frozen = [n for n, p in fresh.named_parameters() if not p.requires_grad]
        results = {
            "keys_match": all(set(states[k]) == set(init) for k in states),
            "moved": diff(states["fast", "straight"], init),
            # the fast path patches W0 in place for its GEMM: it must come back bit for bit
            "frozen_changed": max(diff({n: states[k][n] for n in frozen}, init) for k in states),
            "frozen_count": len(frozen),
            **{f"{impl}_sharded_vs_single": diff(states[impl, "straight"], states[impl, "single"])
               for impl in ("fast", "reference")},
            **{f"{impl}_resumed_vs_straight": diff(states[impl, "resumed"], states[impl, "straight"])
               for impl in ("fast", "reference")},
            "fast_vs_reference_sharded": diff(states["fast", "straight"],
                                              states["reference", "straight"]),
            "world_size": world,
        }
        # The outputs of a sharded run: gather to one unsharded model, then the usual writers.
        model = build("fast")
        model.load_state_dict(states["fast", "straight"], strict=True)
        model.save_pretrained(os.path.join(out, "adapter"))
        model.eval().merge_and_unload().save_pretrained(os.path.join(out, "merged"))
        torch.save(x[0], os.path.join(out, "x.pt"))
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump(results, fh)
    del fast_model
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
