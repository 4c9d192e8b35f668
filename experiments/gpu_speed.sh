#!/usr/bin/env bash
# Benchmarks on a lent GPU machine (device tool) that outlive a call: a named job runs its
# commands in the background (setsid) from a frozen copy of the work tree (a later call
# replaces the tree under a running job), on the GPUs it names, optionally after other
# jobs end; later calls poll and collect. Each job's commands write under $R
# ($HOME/speed/<job>/out) and its log is $HOME/speed/<job>/log.
#
#   bash experiments/gpu_speed.sh launch gemv 0 'python3 -m pytest -q -m gpu tests/test_gemv.py'
#   bash experiments/gpu_speed.sh launch spmd 0,1 --after gemv,batch 'python3 experiments/bench_spmd.py --out $R'
#   bash experiments/gpu_speed.sh poll 500          # until every job ended (or 500 s), then collect
#   bash experiments/gpu_speed.sh collect           # $OUT/speed.tgz + each log's tail
set -euo pipefail
cd "$(dirname "$0")/.."
SP=$HOME/speed
mkdir -p "$SP"

collect() {
  # results and logs only: not the frozen trees, the compile cache or profiler traces
  tar czf "${OUT:-/tmp}/speed.tgz" --exclude=src --exclude=jaxcache --exclude='*.pb' \
    --exclude='*.pb.gz' --exclude='*trace*' -C "$HOME" speed
  for d in "$SP"/*/; do
    [ -f "$d/log" ] || continue
    state=running; [ -f "$d/rc" ] && state="rc=$(cat "$d/rc")"
    echo "== $(basename "$d") ($state)"; tail -n "${TAIL:-8}" "$d/log" | cut -c1-300
  done
  return 0
}

cmd=${1:-}
shift || true
case "$cmd" in
  launch)                      # job gpus [--after job,job] 'commands'
    job=$1 gpus=$2
    shift 2
    after=""
    if [ "${1:-}" = --after ]; then after=$2; shift 2; fi
    dir=$SP/$job
    [ -e "$dir" ] && { echo "job $job exists: pick another name" >&2; exit 2; }
    mkdir -p "$dir/out" "$dir/src" "$SP/jaxcache"
    git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$dir/src"
    wait_for=""
    for j in ${after//,/ }; do wait_for+="until [ -f $SP/$j/rc ]; do sleep 3; done; "; done
    setsid nohup bash -c "$wait_for cd $dir/src && export R=$dir/out PYTHONPATH=$dir/src \
      PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=$gpus JAX_COMPILATION_CACHE_DIR=$SP/jaxcache;
      nvidia-smi --query-gpu=index,name,memory.total --format=csv; set -x; $*; echo \$? > $dir/rc" \
      > "$dir/log" 2>&1 < /dev/null &
    echo "launched $job on GPU(s) $gpus${after:+ after $after}" ;;
  poll)                        # seconds
    end=$((SECONDS + $1))
    while [ $SECONDS -lt $end ]; do
      left=0
      for d in "$SP"/*/; do [ -f "$d/log" ] && [ ! -f "$d/rc" ] && left=$((left + 1)); done
      [ $left -eq 0 ] && break
      sleep 10
    done
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    collect ;;
  collect)
    collect ;;
  *)
    echo "usage: $0 launch JOB GPUS [--after JOBS] 'COMMANDS' | poll SECONDS | collect" >&2
    exit 2 ;;
esac
