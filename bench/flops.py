"""The ceiling: how many FLOPs a training step needs, and how fast this machine multiplies matrices.

Counting (per token, multiply-add = 2 FLOPs; N = parameters of the matrices a token goes through: the seven
linear layers of every block plus lm_head; the embedding lookup is not a matmul):

    forward, dense layers           2·N
    full fine-tuning backward       4·N        input gradient 2·N + weight gradient 2·N        -> 6·N in all
    LoRA backward, frozen layers    2·N        input gradient only: frozen weights need none  -> 4·N in all
    LoRA's own matrices (N_lora)    6·N_lora   x·Aᵀ and ·Bᵀ forward, their input and weight gradients
    causal attention                6·L·T·C    forward QKᵀ and P·V: token t meets t + 1 keys, ≈ 2·T·C per layer
                                               on average; backward twice that (dQ, dK, dV, dP)

SmolLM2-135M: N = 30 · 576 · (2·576 + 2·192 + 3·1536) + 576 · 49152 = 134.5 M, N_lora = 2.4 M at r = 8, so a
LoRA step costs ~4·N (538 MFLOP per token plus 53 MFLOP of attention at T = 512): two thirds of full
fine-tuning's 6·N — the saving is only the frozen weights' gradients; every token still runs forward and
backward through all of the model.

`matmul_rate` times torch.mm on the model's own shapes (rows = the tokens of a micro batch), weighted by how
many FLOPs each shape accounts for: the rate a step could reach if it did nothing but its matmuls.
"""

from __future__ import annotations

import time

import torch

from litft.config import Config


def linear_shapes(config: Config) -> list[tuple[int, int, int]]:
    """(d_in, d_out, count) of every matrix a token is multiplied by."""
    C, hs, I = config.n_embd, config.head_size, config.intermediate_size
    kv = config.n_query_groups * hs
    L = config.n_layer
    return [(C, C, 2 * L), (C, kv, 2 * L), (C, I, 2 * L), (I, C, L), (C, config.vocab_size, 1)]


def dense_params(config: Config) -> int:
    return sum(i * o * n for i, o, n in linear_shapes(config))


def lora_params(config: Config, r: int) -> int:
    """r · (d_in + d_out) for each of the seven linear layers of every block."""
    return sum(r * (i + o) * n for i, o, n in linear_shapes(config)[:-1])


def step_flops_per_token(config: Config, seq: int, method: str, r: int = 8) -> float:
    attention = 6 * config.n_layer * seq * config.n_embd
    if method == "full":
        return 6 * dense_params(config) + attention
    return 4 * dense_params(config) + 6 * lora_params(config, r) + attention


def matmul_rate(config: Config, tokens: int, dtype: torch.dtype, seconds: float = 0.25,
                device: str | torch.device = "cpu") -> float:
    """FLOP/s of torch.mm over the model's shapes, (tokens × d_in) @ (d_in × d_out), FLOP-weighted."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    total_flops = total_time = 0.0
    for d_in, d_out, count in linear_shapes(config):
        a = torch.randn(tokens, d_in, dtype=dtype, device=device)
        b = torch.randn(d_in, d_out, dtype=dtype, device=device)
        torch.mm(a, b)
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            n += 1
            if n % 10 == 0:
                sync()
        sync()
        per_mm = (time.perf_counter() - t0) / n
        total_flops += 2 * tokens * d_in * d_out * count
        total_time += per_mm * count
    return total_flops / total_time
