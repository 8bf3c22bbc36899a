#!/usr/bin/env bash
# The reproduction study of docs/RESULTS.md, step by step; rerun it to continue after an interruption
# (finished steps are skipped, interrupted searches resumed). Needs $LTSEARCH_DATA (real CIFAR-10) and
# about 2 h of a 2-core machine. Pairs of single runs go side by side, one thread each.
#   LTSEARCH_DATA=/tmp/ltdata bash search_spaces/repro_c10lt/run_study.sh [OUT]     (OUT: runs/repro_c10lt)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/repro_c10lt}
SPACES=search_spaces/repro_c10lt
PY=${PYTHON:-python}
mkdir -p "$OUT"

step() { echo "$(date -u +%FT%TZ) $*" | tee -a "$OUT/steps.log"; }

train_pair() {  # name, then --set values shared by seeds 0 and 1
  local name=$1; shift
  local pids=()
  for seed in 0 1; do
    local dir="$OUT/$name-s$seed"
    [ -f "$dir/metrics.json" ] && continue
    local resume=(); [ -f "$dir/checkpoint/state.pt" ] && resume=(--resume)
    $PY -m ltsearch train "$SPACES/experiment.yaml" --out "$dir" "${resume[@]}" \
      --set trainer.seed=$seed --set trainer.num_threads=1 "$@" > "$OUT/$name-s$seed.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

search() {  # space file, experiment name, extra arguments
  local space=$1 name=$2; shift 2
  [ -f "$OUT/$name/summary.json" ] && return
  local resume=(); [ -d "$OUT/$name" ] && resume=(--resume)
  $PY run_search.py "$SPACES/$space" --storage "$OUT" --name "$name" "${resume[@]}" "$@" > "$OUT/$name.log" 2>&1
}

step "1 naive baseline: CE, WD 0";             train_pair naive --set stage1.weight_decay=0
step "2a stage 1, the paper's WD 5e-3";       train_pair wd5e-3 --set stage1.weight_decay=5e-3
step "2b stage-1 WD search (ASHA + Optuna)";   search wd_search.yaml wd_search
WD=$($PY -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['stage1']['weight_decay'])" \
     "$OUT/wd_search/best_config.yaml")
step "   searched stage-1 WD: $WD"
for seed in 0 1; do
  step "4 two-stage, stage-2 values searched on cached features, seed $seed"
  search two_stage.yaml two_stage-s$seed --set stage1.weight_decay=$WD --set trainer.seed=$seed
done
step "5 NBN on, searched WD";                  train_pair nbn --set stage1.weight_decay=$WD --set model.nbn=true
for seed in 0 1; do
  step "3 tau searched on the searched-WD stage 1, seed $seed"
  search tau.yaml tau-s$seed --set stage1.weight_decay=$WD --set trainer.seed=$seed
done
step "done"
