"""Which GGML type each tensor of a GGUF export gets (docs/DESIGN.md, "GGUF export": "K-quant mixes").

A qtype names either one type for every matrix (the legacy ``q8_0`` ... ``f16``) or a K-quant
mix (``q4_k_m`` ...) whose base type is raised for the tensors quantisation hurts most, by the
rules llama.cpp's quantiser applies to the mixes of the same names (dense models): the attention
value projection and the FFN down projection in the first and last eighth of the blocks and every
third block between (``more_bits``), the attention output for the 2/3-bit mixes, and the output
head in Q6_K. A K type needs rows that are a whole number of 256-value super-blocks; other tensors
fall back to the legacy type of about the same size (FALLBACK), and to f16 when even that block
does not divide the row. The IQ4 types ``iq4_nl`` and ``iq4_xs`` are mixes in the same sense (their
own rules: attn_v in Q5_K under GQA >= 4, the first eighth's ffn_down in Q5_K without an
importance matrix; IQ4_XS off the 256 grid falls back to IQ4_NL). Types are
gguf.GGMLQuantizationType member names, so that this module imports without the optional ``gguf`` package.
"""
from __future__ import annotations

from dataclasses import dataclass

QK_K = 256
LEGACY_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# mix -> its base type; general.file_type is LlamaFileType.MOSTLY_<MIX>.
K_MIXES = {"q2_k": "Q2_K", "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K", "q4_k_s": "Q4_K",
           "q4_k_m": "Q4_K", "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K",
           "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS"}
# A K type on rows off the 256 grid -> the legacy type llama.cpp uses instead (block of 32);
# IQ4_XS -> IQ4_NL, and IQ4_NL off the 32 grid -> F16.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            "IQ4_XS": "IQ4_NL", "IQ4_NL": "F16"}
_BLOCK = {"F16": 1, "BF16": 1, "F32": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
          "Q2_K": QK_K, "Q3_K": QK_K, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K, "IQ4_NL": 32, "IQ4_XS": QK_K}


@dataclass(frozen=True)
class TensorRole:
    """What the type rules look at: the gguf base name (``attn_v``, ``ffn_down``, ``output`` ...),
    the row length, the block index (None outside blocks) and whether it is the output head
    (``output``, or ``token_embd`` when the embeddings are tied)."""

    kind: str
    cols: int
    block: int | None
    is_head: bool


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's 'use more bits' layers: the first and last eighth, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _raised(mix: str, role: TensorRole, n_blocks: int, n_gqa: int, has_imatrix: bool) -> str | None:
    """The mix's higher type for this tensor, or None for the base type."""
    i, kind = role.block, role.kind
    if mix in ("iq4_nl", "iq4_xs"):
        if kind in ("attn_v", "attn_qkv"):
            return "Q5_K" if n_gqa >= 4 else None
        return "Q5_K" if kind == "ffn_down" and i < n_blocks // 8 and not has_imatrix else None
    if kind in ("attn_v", "attn_qkv"):  # llama.cpp treats the fused qkv as a value projection
        return {"q2_k": "Q4_K" if n_gqa >= 4 else "Q3_K",
                "q3_k_m": "Q5_K" if i < 2 else "Q4_K",
                "q3_k_l": "Q5_K",
                "q4_k_m": "Q6_K" if more_bits(i, n_blocks) else None,
                "q5_k_m": "Q6_K" if more_bits(i, n_blocks) else None,
                "q4_k_s": "Q5_K" if i < 4 else None}.get(mix)
    if kind == "ffn_down":
        return {"q2_k": "Q3_K",
                "q3_k_m": "Q5_K" if i < n_blocks // 16 else "Q4_K",
                "q3_k_l": "Q5_K",
                "q4_k_m": "Q6_K" if more_bits(i, n_blocks) else None,
                "q5_k_m": "Q6_K" if more_bits(i, n_blocks) else None,
                "q4_k_s": "Q5_K" if i < n_blocks // 8 else None}.get(mix)
    if kind == "attn_output":
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(mix)
    return None


def tensor_type(qtype: str, role: TensorRole, n_blocks: int, n_gqa: int,
                has_imatrix: bool = False) -> tuple[str, str | None]:
    """(type, fallback note or None) of one 2-D weight under ``qtype`` (``has_imatrix``: the
    export is weighted by an importance matrix, which some rules look at)."""
    if qtype in LEGACY_TYPES:
        # the output head in q8_0 below 8 bits: the logits are the most quantisation-sensitive product
        wanted = "Q8_0" if role.is_head and qtype[:2] in ("q4", "q5") else qtype.upper()
        return _fit(wanted, role.cols, fallback="F16")
    if role.is_head:  # Q6_K, or Q8_0 when its rows are off the 256 grid (llama.cpp's head rule)
        return ("Q6_K", None) if role.cols % QK_K == 0 else ("Q8_0", None)
    wanted = (_raised(qtype, role, n_blocks, n_gqa, has_imatrix) if role.block is not None else None) or K_MIXES[qtype]
    return _fit(wanted, role.cols, fallback=FALLBACK[wanted])


def _fit(wanted: str, cols: int, fallback: str) -> tuple[str, str | None]:
    if cols % _BLOCK[wanted] == 0:
        return wanted, None
    got = fallback if cols % _BLOCK[fallback] == 0 else "F16"
    return got, f"{wanted}->{got} (rows of {cols})"
