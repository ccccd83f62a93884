#!/usr/bin/env bash
# One device call: build the extension, run the GPU tests, run the scoring and decode benchmarks,
# print a short table. Meant for the H100 image (Python 3.12, torch+CUDA, triton, transformers,
# nvcc, ninja, no internet). The image lacks the pure-Python `gguf` package: before the device
# call, on the CPU machine, `pip download --no-deps -d .whl gguf==0.19.0` and name `.whl` in the
# run's carry. Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/depthcut-gpu}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"

step() { echo; echo "== $1"; }

step "build engine._C (CUDA)"
if ls .whl/*.whl >/dev/null 2>&1; then python -m pip install -q --no-index --no-deps .whl/*.whl; fi
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python -c "import engine._ext as e; print('extension loaded:', e.HAS_EXT)"

step "GPU tests"
timeout 240 python -m pytest -q -m gpu -x tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"

step "scoring: SmolLM2 shape, 10x128"
timeout 120 python benchmarks/bench_scoring.py --shape smollm2 --skip-naive --json "$OUT/scoring_smollm2.json" 2>/dev/null

step "scoring: Llama-7B shape, 10x128"
timeout 180 python benchmarks/bench_scoring.py --shape llama7b --skip-naive --json "$OUT/scoring_llama7b.json" 2>/dev/null

step "scoring: Llama-7B shape, 128x2048 (fused only)"
timeout 240 python benchmarks/bench_scoring.py --shape llama7b --n-samples 128 --seq-len 2048 --only fused \
    --json "$OUT/scoring_llama7b_sleb.json" 2>/dev/null

step "decode"
for shape in smollm2 llama7b; do
    # a narrowed grid that fits one device call; the full SPEC §5 grid is the script's default
    timeout 180 python benchmarks/bench_decode.py --shape "$shape" --batch-sizes 1,16,64 --new-tokens 128 \
        --warmup 3 --runs 5 --out "$OUT/decode_$shape" 2>/dev/null | tail -12
done
