"""The Llama architecture, written to be read top to bottom.

    x = embed(tokens)                                   (B, T) -> (B, T, C)
    for each block:
        x = x + attention(rmsnorm(x))                   causal self-attention with rotary positions (RoPE)
        x = x + mlp(rmsnorm(x))                         SwiGLU: down(silu(gate(x)) * up(x))
    logits = lm_head(rmsnorm(x))                        (B, T, C) -> (B, T, vocab)

Grouped-query attention (Ainslie et al. 2023): n_head query heads share n_query_groups key/value heads
(Llama-2-70B: 64 / 8, Mistral-7B: 32 / 8, SmolLM2-135M: 9 / 3); n_query_groups == n_head is ordinary
multi-head attention. Module names follow Hugging Face's LlamaForCausalLM closely, so converting weights is
mostly renaming (see litft/convert_hf.py). Qwen2 is the same network with a bias on q, k and v (`qkv_bias`).
Rotary positions, and the ways Llama 3.1, YaRN and others stretch them, are litft/rope.py.

For generation, `set_kv_cache` allocates a static key/value cache (litft/kv_cache.py); `forward(idx, input_pos)` then writes the
new keys and values at `input_pos` and attends over everything cached so far. With a (B, T) `input_pos` each row
of the batch is at its own position, so prompts of different lengths decode together (litft/batch_generate.py). For training on packed rows
(several samples in one row, litft/packing.py), `forward(idx, packed_pos=...)` gives each token its position
within its own sample, and a token attends only to the earlier tokens of that sample.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from litft.config import Config
from litft.kv_cache import KVCache, Positions
from litft.rope import apply_rope, rope_tables


class Llama(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.rope_cache: tuple[Tensor, Tensor] | None = None  # cos, sin: (positions, head_size)
        self.activation_checkpointing = False  # recompute each block in backward: less memory, ~30% more compute

    def tie_weights(self) -> None:
        """With tied embeddings the output projection *is* the embedding matrix (one Parameter, two uses)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, idx: Tensor, input_pos: Tensor | None = None, packed_pos: Tensor | None = None) -> Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab). input_pos: (T,) positions, or (B, T) a position per
        row, only when decoding with the KV cache (see set_kv_cache). packed_pos: (B, T) each token's position within its sample, for rows that
        pack several samples (0 where a sample starts)."""
        x = self.embed(idx)  # (B, T, C)
        x = self.norm(self.trunk(x, input_pos, packed_pos))
        return self.lm_head(x)  # (B, T, vocab)

    def hidden_states(self, idx: Tensor, input_pos: Tensor | None = None, packed_pos: Tensor | None = None) -> Tensor:
        """forward without lm_head: the final normalised hidden states (B, T, C) that lm_head reads."""
        return self.norm(self.trunk(self.embed(idx), input_pos, packed_pos))

    def trunk(self, x: Tensor, input_pos: Tensor | None = None, packed_pos: Tensor | None = None) -> Tensor:
        """Run the blocks: (B, T, C) -> (B, T, C)."""
        T = x.size(1)
        if packed_pos is not None:  # packed rows: each token at its place in its own sample, seeing only that sample
            cos, sin = self.rope(self.packed_length(packed_pos, T), x.device)
            pos, cos, sin = None, cos[packed_pos][:, None], sin[packed_pos][:, None]  # (B, 1, T, hs)
            sample = (packed_pos == 0).cumsum(dim=1)  # (B, T): which sample of the row each token belongs to
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            same_sample = (sample[:, :, None] == sample[:, None, :]) & causal  # (B, T, T) bool
            mask = additive_mask(same_sample[:, None], like=x)  # (B, 1, T, T) float, shared by every layer
        elif input_pos is None:  # training / plain forward: positions 0..T-1, causal mask
            cos, sin = self.rope(T, x.device)
            pos, mask, cos, sin = None, None, cos[:T], sin[:T]
        else:  # decoding: attend to every cached position <= our own (no backward pass: a boolean mask will do)
            end = int(input_pos.max()) + 1
            cos, sin = self.rope(end, x.device)
            pos, cos, sin = Positions(input_pos, end), cos[input_pos], sin[input_pos]
            seen = input_pos[..., None] >= torch.arange(end, device=x.device)  # (T, end) or (B, T, end)
            if input_pos.dim() == 2:  # a position per row (rows of different lengths decoded together)
                cos, sin, mask = cos[:, None], sin[:, None], seen[:, None]  # (B, 1, T, hs), (B, 1, T, end)
            else:
                mask = None if T == 1 else seen
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, pos, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, pos, mask)
        return x

    def packed_length(self, packed_pos: Tensor, T: int) -> int:
        """The sequence length RoPE tables are built for in packed rows: the row's, except where the frequencies
        depend on it (dynamic NTK scaling), where it is the batch's longest sample's (not exact for a shorter
        sample when another is past the original context). Reading it costs a device sync, so only then."""
        scaling = self.config.rope_scaling
        return int(packed_pos.max()) + 1 if scaling is not None and scaling.type == "dynamic" else T

    def rope(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin tables for at least `seq_len` positions, (≥ seq_len, head_size), float32 (litft/rope.py).

        Built once per device for block_size positions. Dynamic NTK scaling is the exception: past the original
        context its frequencies depend on the sequence length, so its tables are built for each length.
        """
        scaling = self.config.rope_scaling
        if scaling is not None and scaling.type == "dynamic" and seq_len > scaling.original_max_position:
            return rope_tables(self.config, seq_len, device)
        cached = self.rope_cache
        if cached is None or cached[0].device != device or cached[0].size(0) < seq_len:
            with torch.inference_mode(False):  # built while generating, the tables must still serve training
                self.rope_cache = rope_tables(self.config, max(seq_len, self.config.block_size), device, seq_len)
        return self.rope_cache

    def set_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> None:
        p = self.embed.weight
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, max_seq_length, self.config, device or p.device, dtype or p.dtype)

    def kv_caches(self) -> list[KVCache | None]:
        return [block.attn.kv_cache for block in self.blocks]

    def use_kv_caches(self, caches: list[KVCache | None]) -> None:
        """Put back caches taken with kv_caches(), one per layer: a generation that shares the model resumes."""
        for block, cache in zip(self.blocks, caches):
            block.attn.kv_cache = cache

    def join_kv_caches(self, earlier: list[KVCache]) -> None:
        """The cache becomes `earlier`'s rows followed by its own (sequences joining a batch being decoded)."""
        for block, cache in zip(self.blocks, earlier):
            cache.extend(block.attn.kv_cache)
            block.attn.kv_cache = cache

    def grow_kv_cache(self, length: int) -> None:
        """Room for `length` positions in every layer's cache, for a sequence about to outrun it."""
        for block in self.blocks:
            block.attn.kv_cache.grow(length)

    def keep_kv_rows(self, rows: Tensor) -> None:
        """Keep the cached rows `rows` (B',), in that order: the others are dropped (their sequences ended)."""
        for block in self.blocks:
            block.attn.kv_cache.keep(rows)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None


def additive_mask(allowed: Tensor, like: Tensor) -> Tensor:
    """(B, 1, T, T) bool -> the same shape in float, as attention adds it to its scores: 0 where allowed, -inf
    elsewhere, in the dtype attention computes in (autocast's where it is on, else `like`'s), on `like`'s device.
    Built once and shared by every layer: given a boolean mask, each layer would convert it and keep its own copy
    for the backward pass. Rows are allocated to a multiple of 8 entries and cut back to T: CUDA's memory-efficient
    attention needs that alignment and would otherwise pad a copy in every layer."""
    device_type = like.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else like.dtype
    T = allowed.size(-1)
    mask = torch.zeros(*allowed.shape[:-1], -(-T // 8) * 8, dtype=dtype, device=like.device)[..., :T]
    return mask.masked_fill_(~allowed, float("-inf"))


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Positions | None, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, pos, mask)
        return x + self.mlp(self.mlp_norm(x))


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        C, hs = config.n_embd, config.head_size
        self.n_head, self.n_kv, self.head_size = config.n_head, config.n_query_groups, hs
        self.q_proj = nn.Linear(C, config.n_head * hs, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, config.n_query_groups * hs, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, config.n_query_groups * hs, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * hs, C, bias=False)
        self.kv_cache: KVCache | None = None
        # An optional extra attention path (LLaMA-Adapter's learned prompt): called as prefix(self, q) with the
        # rotated queries, returns (B, n_head, T, hs) to add to the attention output. None for the plain model.
        self.prefix: nn.Module | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Positions | None, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if pos is not None:
            k, v = self.kv_cache.update(pos, k, v)  # (B, nkv, end, hs): every position so far
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pos is None and mask is None,
                                           enable_gqa=self.n_kv != self.n_head)  # (B, nh, T, hs)
        if self.prefix is not None:
            y = y + self.prefix(self, q)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, nh·hs)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, I) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight (Zhang & Sennrich 2019).

    In fp32, F.rms_norm equals transformers' LlamaRMSNorm bit for bit; in 16 bits it rounds once, at the end,
    where transformers also rounds before multiplying by the weight, so it is as close or closer to the exact value.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)  # an fp32 weight trained over 16 bits

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
