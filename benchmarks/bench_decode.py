"""Decode speed: depthcut runtime vs Hugging Face generate, dense vs pruned (docs/DESIGN.md, "Evaluation and speed protocols" and "Targets and what was measured").

A thin wrapper over ``depthcut bench`` so the benchmark and the CLI are one code path.
CPU default: the real SmolLM2-135M, batch 1, 32 and 128 new tokens, short warm-up,
runtime in the model dtype and fp16, pruned to 24 blocks. GPU: ``--shape llama7b`` or
``--shape smollm2`` builds a random-weight bf16 model on the device. Ratios are measured
within this one run.

    python benchmarks/bench_decode.py                      # CPU, real SmolLM2
    python benchmarks/bench_decode.py --shape llama7b --keep 26 --batch-sizes 1 --new-tokens 128
"""
import sys

from depthcut.cli import main  # building its parser imports no optional package (gguf, datasets)

if __name__ == "__main__":
    sys.exit(main(["bench", "--out", "benchmarks/results/decode", *sys.argv[1:]]))
