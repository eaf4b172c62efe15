"""How llama.cpp lays a Llama out in a GGUF file: the facts litft/gguf.py reads and litft/gguf_export.py writes.

    tensor names     token_embd.weight, blk.{i}.attn_q.weight, ..., output_norm.weight, output.weight
    q/k row order    per head, HF's rotate-half pairs (i, i + hs/2) stored as adjacent rows (2i, 2i + 1)
    RoPE scaling     Llama 3.1's as a tensor, rope_freqs.weight: one divisor of θ_i per channel pair
    token types      the numbering of sentencepiece's piece types (1 normal ... 6 byte)
    pre-tokenizers   tokenizer.ggml.pre names how text is split before byte-level BPE

llama.cpp's `llama` architecture rotates adjacent channel pairs, so its converter reorders q and k rows; its
`qwen2` architecture rotates halves like Hugging Face and keeps their order. Writing is `permute_qk`, reading
`unpermute_qk`, and one undoes the other exactly (they only move rows).
"""

from __future__ import annotations

import re

from torch import Tensor

from litft.errors import UserError

ARCHITECTURES = ("llama", "qwen2")  # qwen2: a Llama with q, k, v biases, its q/k rows not permuted
ROPE_FREQS = "rope_freqs.weight"
TOP_LEVEL = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}
PER_BLOCK = {
    "attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_BACK = {v: k for k, v in TOP_LEVEL.items()}
_BLOCK_BACK = {v: k for k, v in PER_BLOCK.items()}

# tokenizer.ggml.token_type values (the same numbering as sentencepiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# ---- names ------------------------------------------------------------------------------------------------

def lit_name(gguf_name: str) -> str:
    """blk.3.ffn_gate.weight -> blocks.3.mlp.gate_proj.weight"""
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m.group(2) not in PER_BLOCK:
        raise UserError(f"the GGUF has a tensor {gguf_name!r} that a plain Llama does not have; it cannot be converted")
    return f"blocks.{m.group(1)}.{PER_BLOCK[m.group(2)]}.{m.group(3)}"


def gguf_name(lit_name: str) -> str:
    """blocks.3.mlp.gate_proj.weight -> blk.3.ffn_gate.weight"""
    if lit_name in _TOP_BACK:
        return _TOP_BACK[lit_name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", lit_name)
    if m is None or m.group(2) not in _BLOCK_BACK:
        raise UserError(f"litft tensor {lit_name!r} has no GGUF name (is it a LoRA/adapter tensor? merge it first)")
    return f"blk.{m.group(1)}.{_BLOCK_BACK[m.group(2)]}.{m.group(3)}"


# ---- q/k rows -----------------------------------------------------------------------------------------------

def permute_qk(w: Tensor, n_heads: int) -> Tensor:
    """HF row order -> llama.cpp's: per head, halves (i, i + hs/2) -> interleaved pairs (2i, 2i + 1)."""
    rows, cols = w.shape
    hs = rows // n_heads
    w = w.reshape(n_heads, 2, hs // 2, cols)  # HF row j·hs/2 + i of each head
    return w.transpose(1, 2).reshape(rows, cols)  # GGUF row 2i + j


def unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's row order -> HF's: per head, interleaved pairs (2i, 2i+1) -> halves (i, i + hs/2)."""
    rows, cols = w.shape
    hs = rows // n_heads
    w = w.reshape(n_heads, hs // 2, 2, cols)  # GGUF row 2i + j of each head
    return w.transpose(1, 2).reshape(rows, cols)  # HF row j·hs/2 + i


# ---- pre-tokenizers ---------------------------------------------------------------------------------------

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre names how text is split before BPE; these are llama.cpp's splits for each name.
PRE_TOKENIZERS = {
    "default": [_GPT2_REGEX], "gpt2": [_GPT2_REGEX], "gpt-2": [_GPT2_REGEX],
    "smollm": [r"\p{N}", _GPT2_REGEX], "starcoder": [r"\p{N}", _GPT2_REGEX], "refact": [r"\p{N}", _GPT2_REGEX],
    "llama-bpe": [_LLAMA3_REGEX], "llama3": [_LLAMA3_REGEX], "llama-v3": [_LLAMA3_REGEX],
    "qwen2": [_QWEN2_REGEX],  # Qwen's tokenizer.json also normalizes to NFC first
}
NFC_PRE_TOKENIZERS = ("qwen2",)  # the names whose tokenizer normalizes text to NFC before splitting it
# The names whose words are looked up whole before any merge: llama.cpp's rule for Llama 3, whose tokenizer.json
# says `"ignore_merges": true` (some 600 of its words, " Việt" among them, are tokens no chain of merges reaches).
WHOLE_WORDS_FIRST = ("llama-bpe", "llama3", "llama-v3")
