#!/usr/bin/env bash
# The GPU runs of docs/results.md's three claims, on one GPU, several runs at a time (a model this small
# leaves the GPU idle between one process's kernels; others fill the gaps). Two device calls, since a
# call may run 10 minutes:
#   bash dev/claims.sh train     dense, dense-768, moe, prmoe: 3 seeds each, 12 runs at once
#   bash dev/claims.sh distill   mos-7 and mos-6, distilled from prmoe-s0 and on the labels alone: 3
#                                seeds each, 12 runs at once (prmoe-s0 is trained first if a fresh
#                                machine lacks it)
# Each run is then scored by `minimoe eval --every 8` (an even eighth of the 7.8 M validation tokens).
# Prepare as dev/gpu_test_and_bench.sh says (.whl with NumPy 2.4 and the corpus .debs in .whl/data);
# the metrics, logs and scores come back in $OUT/claims-PHASE.tar.gz. Run names end in -s<seed>, so
# that `minimoe plot --compare` colours the seeds of a config alike.
set -uo pipefail
phase=$1
out=${OUT:-/tmp/minimoe-out}
runs=${RUNS:-/tmp/claims}
seeds=${SEEDS:-0 1 2}
deadline=${DEADLINE:-480}  # seconds after which running runs are stopped (Ctrl-C: they save and say so)
device=${DEVICE:-cuda}
read -ra extra <<< "${CLAIMS_SET:-}"  # more --set options (a CPU smoke test: DEVICE=cpu CLAIMS_SET="--set train.max_steps=2 ...")
mkdir -p "$out" "$runs"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
if [[ $device == cuda ]]; then  # the device machine: install there (a CPU smoke test runs where minimoe is)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site MINIMOE_CACHE=$PWD/.whl/data  # the device has no network
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
git log -1 --format='commit %H' 2>/dev/null || echo "commit: not a git checkout"
start=$SECONDS

train() {  # NAME CONFIG SEED [minimoe options...]: one run in the background, its log beside it
  local name=$1 config=$2 seed=$3
  shift 3
  python3 -m minimoe.cli "${@:-train}" --config "examples/claims/$config.toml" --set train.device="$device" \
    --set train.seed="$seed" --set model.init_seed="$seed" --set train.out_dir="\"$runs/$name-s$seed\"" \
    "${extra[@]}" --overwrite > "$runs/$name-s$seed.log" 2>&1 &
}

wait_or_stop() {  # wait for the background runs; past the deadline, Ctrl-C them so they save and stop
  while [[ -n $(jobs -rp) ]] && (( SECONDS - start < deadline )); do sleep 5; done
  if [[ -n $(jobs -rp) ]]; then
    echo "deadline: stopping $(jobs -rp | wc -l) runs at $((SECONDS - start)) s"
    kill -INT $(jobs -rp)
  fi
  wait
  echo "runs done at $((SECONDS - start)) s"
}

case $phase in
  train)
    for seed in $seeds; do
      for config in dense dense-768 moe prmoe; do train "$config" "$config" "$seed"; done
    done ;;
  distill)
    teacher=$runs/prmoe-s0/checkpoint.bin
    if [[ ! -f $teacher ]]; then
      echo "no teacher on this machine: training prmoe-s0 first"
      train prmoe prmoe 0
      wait
    fi
    for seed in $seeds; do
      for layers in 7 6; do
        train "mos$layers-kd" "mos-$layers" "$seed" distill --teacher "$teacher"
        train "mos$layers-labels" "mos-$layers" "$seed" train --set distill.alpha=0
      done
    done ;;
  *) echo "unknown phase $phase (train or distill)"; exit 2 ;;
esac
wait_or_stop
for log in "$runs"/*-s*.log; do
  run=${log%.log}
  [[ $phase == distill && $run != */mos* ]] && continue
  [[ $phase == train && $run == */mos* ]] && continue
  echo "== ${run##*/}: $(grep -m1 'parameters' "$log")"
  grep -E "validation loss|stopped|Error|error" "$log" | tail -2
  [[ -f $run/checkpoint.bin ]] &&
    python3 -m minimoe.cli eval "$run/checkpoint.bin" --every "${EVERY:-8}" --batch-size 64 --device "$device" > "$run.eval" 2>&1 &
  while (( $(jobs -rp | wc -l) >= 6 )); do sleep 1; done
done
wait
grep -H "loss" "$runs"/*.eval
echo "all done at $((SECONDS - start)) s"
(cd "$runs" && tar -czf "$out/claims-$phase.tar.gz" ./*.log ./*.eval ./*/metrics.jsonl)
