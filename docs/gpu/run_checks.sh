#!/usr/bin/env bash
# Issue 14's GPU checks as one prepared run, for a session that is lent a GPU (nothing here
# installs anything: the GPU image has torch, transformers, peft, pytest and matplotlib, and the
# package is used from the checkout). Through the device tool, from the repository root:
#   run(command="bash docs/gpu/run_checks.sh", timeout_s=560)
# About 8 minutes; writes gpu.txt, cuda_tests.log, bench.log, bench.json, bench.png under $OUT
# (gpu_out/ when OUT is unset).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__,
torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
# 1. the CUDA-only tests: no synchronisation inside an eager training step; inductor's gradients
#    equal the reference's for both compiled formulations, fp32 and bf16
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 0 tests/test_compile.py -k cuda 2>&1 \
    | tee "$out/cuda_tests.log"
# 2. ViT-B/16, batch 64, bf16 autocast: eager and both compiled formulations side by side
timeout 380 python3 scripts/bench.py --device cuda --model-size base --batch-size 64 --bf16 \
    --repeats 9 --warmup 3 --configs floor consolidator_fast floor_compiled \
    consolidator_ops_compiled consolidator_traced_compiled --output-dir "$out" 2>&1 \
    | tee "$out/bench.log"
