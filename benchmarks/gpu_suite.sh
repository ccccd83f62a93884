#!/usr/bin/env bash
# The device checks in one script: GPU tests, then the scoring and decode benchmarks, each
# step time-boxed so that stage "a" fits one ~8-minute device call (15 minutes of device
# time per session, start-up included) and stage "b" a second, shorter one.
#   a: GPU tests (Triton kernels, CUDA-graph runtime), scoring on SmolLM2 and Llama-7B
#      shapes (10 x 128, cold and warm), decode at batch 1 (runtime vs HF, dense vs pruned)
#   b: the 128 x 2048 calibration run, decode at batch 16/64, then the CUDA build of
#      depthcut._C and its GPU tests (nvcc takes minutes; the Triton path needs no build)
# Meant for the device image (Python 3.12, torch+CUDA, triton, transformers, nvcc, ninja,
# no internet). It lacks the pure-Python `gguf` package: on the CPU machine first run
# `pip download --no-deps -d .whl gguf==0.19.0` and name `.whl` in the run's carry.
# Usage: bash benchmarks/gpu_suite.sh [a|b|all] [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-a}
OUT=${2:-${OUT:-/tmp/depthcut-gpu}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
if ls .whl/*.whl >/dev/null 2>&1; then python -m pip install -q --no-index --no-deps .whl/*.whl; fi

step() { echo; echo "== $1 ($(date +%T))"; }
scoring() {  # name, timeout, args...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python benchmarks/bench_scoring.py --skip-naive --json "$OUT/scoring_$name.json" "$@" 2>/dev/null
}
decode() {  # shape, timeout, batch sizes
    timeout "$2" python benchmarks/bench_decode.py --shape "$1" --batch-sizes "$3" --new-tokens 128 \
        --warmup 2 --runs 3 --out "$OUT/decode_$1_b$3" 2>/dev/null | tail -8
}

if [[ $STAGE == a || $STAGE == all ]]; then
    step "GPU tests, Triton path (depthcut._C not built here)"
    DEPTHCUT_NO_EXT=1 timeout 150 python -m pytest -q -m gpu -x tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
    step "scoring: SmolLM2 shape, 10x128";   scoring smollm2 60 --shape smollm2
    step "scoring: Llama-7B shape, 10x128";  scoring llama7b 100 --shape llama7b
    step "decode: SmolLM2 shape, batch 1";   decode smollm2 60 1
    step "decode: Llama-7B shape, batch 1";  decode llama7b 100 1
fi
if [[ $STAGE == b || $STAGE == all ]]; then
    step "scoring: Llama-7B shape, 128x2048 (fused only)"
    scoring llama7b_sleb 90 --shape llama7b --n-samples 128 --seq-len 2048 --only fused
    step "decode: Llama-7B shape, batch 16 and 64"; decode llama7b 80 16,64
    step "build depthcut._C with CUDA, then its GPU tests"
    MAX_JOBS=16 timeout 200 python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
    python -c "import depthcut._ext as e; print('extension loaded:', e.HAS_EXT)"
    timeout 60 python -m pytest -q -m gpu -x tests/test_kernels_dispatch.py 2>&1 | tail -5 | tee "$OUT/gpu_tests_ext.txt"
fi
echo; echo "== done ($(date +%T)); results in $OUT"
