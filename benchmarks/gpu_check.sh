#!/usr/bin/env bash
# One pass of the GPU checks (docs/scaling.md, "On a GPU"): the CUDA tests, the main recipe
# trained on CUDA, and the loss and training-step benchmarks against open_clip on the GPU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Run from the repository root. Every step has its own time limit and may fail without stopping
# the others; all output goes to OUT_DIR/steps.log, one line per step (status, seconds) to
# OUT_DIR/summary.txt, and the figures to OUT_DIR/{avd_eval.json, avd_metrics.jsonl,
# losses_cuda.json, train_step_cuda.json}.
#
# Where modalign is not installed: wheels of its missing dependencies (and of open-clip-torch,
# ftfy and wcwidth for the benchmarks) in .whl/ are installed into /tmp/site; datasets are read
# from $MODALIGN_DATA, else .gpudata/ (copies of mnist_t10k, mnist_mlxtend5k and fsdd).
# Knobs for a dry run on a CPU: GPU_CHECK_DEVICE=cpu, GPU_CHECK_SIZES, GPU_CHECK_CHUNKS,
# GPU_CHECK_BATCH, GPU_CHECK_ROUNDS, GPU_CHECK_TRAIN (extra overrides of the recipe run),
# GPU_CHECK_TESTS=0 (skip pytest).
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
LOG=$OUT/steps.log
SUMMARY=$OUT/summary.txt
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SIZES=${GPU_CHECK_SIZES:-4096x256 16384x256 65536x256}
CHUNKS=${GPU_CHECK_CHUNKS:-4096}
BATCH=${GPU_CHECK_BATCH:-256}
ROUNDS=${GPU_CHECK_ROUNDS:-5}
export PYTHONUNBUFFERED=1
: >"$LOG"
: >"$SUMMARY"

# step NAME LIMIT_S COMMAND...: run it under `timeout`, tee its output, record its status.
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "===== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$LOG" >>"$SUMMARY"
}

if [ -d .whl ] && ! $PY -c "import pydantic, webdataset, soundfile" 2>/dev/null; then
    step install 40 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${MODALIGN_DATA:-}" ] && [ -d .gpudata ]; then export MODALIGN_DATA=$PWD/.gpudata; fi

step env 20 bash -c "nvidia-smi -L; $PY -c 'import torch, modalign; print(torch.__version__, torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name(), modalign.__version__)'"

if [ "${GPU_CHECK_TESTS:-1}" = 1 ]; then
    extra=()
    $PY -c "import xdist" 2>/dev/null && extra+=(-n 8)
    $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
    step pytest 150 env OMP_NUM_THREADS=2 $PY -m pytest tests/gpu tests/data/test_transforms.py -m gpu -v \
        --tb=short -rfEs -p no:cacheprovider ${extra[@]+"${extra[@]}"}
fi

# shellcheck disable=SC2086  # GPU_CHECK_TRAIN is a list of overrides
step train_av_digits 100 $PY -m modalign train av-digits-clip "train.device=$DEVICE" train.num_workers=8 \
    eval.plots=false ${GPU_CHECK_TRAIN:-} --run-dir /tmp/gpu_check_avd --no-resume
cp /tmp/gpu_check_avd/eval.json "$OUT/avd_eval.json" 2>/dev/null
cp /tmp/gpu_check_avd/metrics.jsonl "$OUT/avd_metrics.jsonl" 2>/dev/null

# shellcheck disable=SC2086  # SIZES and CHUNKS are lists
step losses 60 $PY benchmarks/losses.py --device "$DEVICE" --sizes $SIZES --chunks $CHUNKS --threads 8 \
    --no-doc --out "$OUT/losses_cuda.json"
step train_step 60 $PY benchmarks/train_step.py --device "$DEVICE" --batch "$BATCH" --rounds "$ROUNDS" \
    --no-doc --out "$OUT/train_step_cuda.json"
cat "$SUMMARY"
