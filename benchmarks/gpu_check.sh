#!/usr/bin/env bash
# One check of ltsearch on a CUDA machine, in under 8 minutes:
#   1. the environment (nvidia-smi, torch, CUDA);
#   2. trainer throughput of ResNet-32 (CIFAR-100-LT shapes) in fp32, bf16 and fp16 AMP at batch 64, 128
#      and 512, then 4 processes training at once on the one GPU against one alone (what packing buys);
#   3. a 4-trial quick-start search (benchmarks/gpu_check_space.yaml, joint, 2 + 1 epochs, no ASHA) with
#      search.resources.gpus_per_worker=0.25: it must run the 4 trials at once, each on the GPU;
#   4. the CUDA-only tests (pytest -m cuda tests/test_gpu.py).
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine, from the repository root, venv active
#   bash benchmarks/gpu_check.sh --dry-run    # or GPU_CHECK_DRY_RUN=1: the same steps, tiny, on the CPU
#
# The dry run measures 3 steps of each precision the CPU has (fp32, bf16), searches 4 trials on a small
# synthetic CIFAR-10 with 0.25 of a GPU each on a Ray that is told it has 1 GPU (the trials then train on
# the CPU, 0.5 CPU each), and runs the CUDA tests, which skip. It proves the script and its checks work;
# CI runs it (tests/test_gpu.py). Data for step 3: $LTSEARCH_DATA when it holds CIFAR-10, else a copy decoded
# from ../shared/data, else synthetic full-size CIFAR-10 (timings real, accuracies meaningless).
# PYTHON (default: python) is the interpreter; WORK (default: a new temp dir, kept) holds the search.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d /tmp/gpu-check-XXXXXX)}
mkdir -p "$WORK"
START=$(date +%s)
BUDGET_S=480
step() { echo; echo "== [$(( $(date +%s) - START )) s] $*"; }

if [[ "$DRY_RUN" == 1 ]]; then
    echo "gpu_check: DRY RUN on the CPU (tiny; no GPU is used); work folder $WORK"
    THROUGHPUT=(--device cpu --precisions fp32 bf16 --batch-sizes 32 --steps 3 --warmup 1 --eval-images 512
                --threads 1 --concurrent 2)
    DATA=(--tiny)
    SEARCH=(--fake-gpus 1 --cpus 2 --expect-device cpu --set search.resources.cpus_per_worker=0.5
            --set data.imbalance_factor=10 --set data.val_per_class=5 --set trainer.eval_batch_size=256
            --set stage1.batch_size=64 --set stage2.batch_size=64)
else
    echo "gpu_check: CUDA run; work folder $WORK"
    THROUGHPUT=(--device cuda)
    DATA=()
    SEARCH=(--expect-device cuda)
fi

step "1/4 environment"
if [[ "$DRY_RUN" != 1 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available(),
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
if [[ "$DRY_RUN" != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: torch sees no CUDA device; run with --dry-run on a CPU machine" >&2
    exit 1
fi

step "2/4 trainer throughput: ResNet-32, CIFAR-100-LT shapes, data on the device"
timeout 150 "$PY" benchmarks/gpu_check.py throughput "${THROUGHPUT[@]}"

step "3/4 quick-start search: 4 trials, 0.25 GPU each, 2 + 1 epochs, no ASHA"
ROOT=$("$PY" benchmarks/gpu_check.py data "$WORK/data" "${DATA[@]}")
MONITOR=""
if [[ "$DRY_RUN" != 1 ]]; then  # GPU processes and utilisation every 2 s while the search runs
    ( while sleep 2; do
        echo "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l)" \
             "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits | head -1)"
      done ) > "$WORK/gpu_samples.txt" 2>/dev/null &
    MONITOR=$!
fi
timeout 270 "$PY" benchmarks/gpu_check.py search --root "$ROOT" --storage "$WORK/runs" --trials 4 \
    --gpus-per-trial 0.25 --set stage1.epochs=2 --set stage2.epochs=1 --set search.scheduler.enabled=false \
    "${SEARCH[@]}"
if [[ -n "$MONITOR" ]]; then
    kill "$MONITOR" 2>/dev/null || true
    awk '{ if ($1 > apps) apps = $1; gsub(",", "", $2); if ($2 > util) util = $2; if ($3 > mem) mem = $3 }
         END { printf "GPU during the search: at most %d processes on it, utilisation up to %d %%, memory up to %d MiB\n", apps, util, mem }' \
        "$WORK/gpu_samples.txt"
fi

step "4/4 CUDA-only tests (pytest -m cuda)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_gpu.py -rs

TOTAL=$(( $(date +%s) - START ))
echo
if (( TOTAL > BUDGET_S )); then
    echo "gpu_check: all steps passed but took ${TOTAL} s, over the ${BUDGET_S} s budget" >&2
    exit 1
fi
echo "gpu_check: all steps passed in ${TOTAL} s (budget ${BUDGET_S} s)$([[ "$DRY_RUN" == 1 ]] && echo ', dry run on the CPU')"
