"""Tiny random-weight decoder models built from configs, one per supported family."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Small enough for a CPU test, large enough to have GQA, several blocks and a real vocabulary.
_COMMON = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# Per-layer structure is real where the family has it: sliding windows shorter than the test
# windows, mixed sliding/full layer_types, tied embeddings, softcaps and Granite's multipliers.
_MIXED = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
          "full_attention", "sliding_attention", "full_attention", "sliding_attention"]

FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16, "tie_word_embeddings": True},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "layer_types": _MIXED,
               "final_logit_softcapping": 5.0, "attn_logit_softcapping": 20.0, "tie_word_embeddings": True},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "layer_types": _MIXED,
                    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                    "tie_word_embeddings": True},
    "phi3": {"sliding_window": 8, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "olmo2": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "granite": {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                "logits_scaling": 0.5, "tie_word_embeddings": True},
}

# Gemma2 has no SDPA path (SDPA cannot softcap attention logits).
_EAGER = {"mistral", "gemma2"}


def tiny_config(family: str, **overrides):
    kwargs = {**_COMMON, **FAMILIES[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A random model in eval mode; weights are scaled up so blocks differ measurably."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager" if family in _EAGER else "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def random_tokens(model, n: int = 3, t: int = 17, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, t), generator=g)


def save_word_tokenizer(folder, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` ids, for folders that need one but not SmolLM2's
    (the GPU machine does not carry the SmolLM2 file)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
