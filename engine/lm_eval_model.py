"""depthcut as an lm-evaluation-harness model type, "depthcut" (docs/DESIGN.md, "Zero-shot evaluation").

It is lm-eval's own `hf` model with the log-likelihood path replaced: tokenisation, context
windows, rolling windows and generation stay the harness's, so the requests are the same;
only the continuation tokens reach the head, through depthcut's fused linear + NLL op.

lm-eval 0.4 finds models only in its registry, filled when a module registers one: importing
this module registers "depthcut". lm-eval's own command line with the model registered:
``python -m depthcut.lm_eval_model run --model depthcut --model_args pretrained=DIR --tasks ...``.
"""
from __future__ import annotations

import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .errors import DepthcutError
from .evaluate import continuation_logprobs

AUTO_BATCH = 16  # requests per call when the harness asks for batch_size=auto
DTYPES = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@register_model("depthcut")
class DepthcutLM(HFLM):
    """model_args: pretrained (folder, hub name or .gguf; default the bundled SmolLM2), dtype
    (auto, fp32, bf16, fp16 or a torch name), device, batch_size (contexts per forward; their
    continuations follow in one more), max_length; or a loaded model and its tokenizer as
    pretrained= and tokenizer=. generate_until is the hf model's (Hugging Face generate)."""

    def __init__(self, pretrained=None, tokenizer=None, dtype: str = "auto", device: str | None = None,
                 batch_size: int | str = 1, **kwargs):
        from .models import load_model

        source = pretrained
        if pretrained is None or isinstance(pretrained, str):
            if str(dtype) not in DTYPES:
                raise DepthcutError(f"depthcut model: unknown dtype '{dtype}'; choose from {', '.join(DTYPES)}")
            pretrained, tokenizer = load_model(pretrained, dtype=DTYPES[str(dtype)], device=device)
        quiet = logging.getLogger("lm_eval.models.huggingface")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its warning that a loaded model ignores loading arguments
        try:
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        finally:
            quiet.setLevel(level)
        self.pretrained = source if isinstance(source, str) else "depthcut model"

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        rows = override_bs or (self.batch_size if isinstance(self.batch_size, int) else AUTO_BATCH)
        results = continuation_logprobs(self.model, [(ctx, cont) for _, ctx, cont in requests], self.max_length,
                                        batch_size=rows,
                                        progress=None if disable_tqdm or self.rank else "log-likelihoods")
        for (request, _, _), result in zip(requests, results):
            if request is not None:  # rolling windows carry no request strings
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results


if __name__ == "__main__":  # lm-eval's own command line (it reads sys.argv), "depthcut" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
