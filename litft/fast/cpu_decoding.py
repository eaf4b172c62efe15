"""A weight layout for decoding on a CPU: each thread streams its own slice of every matrix.

Decoding one token multiplies a (1, d_in) row by every weight matrix of the model. That is matrix-vector
work: two FLOPs per weight read, so its speed is the rate at which weights come in from memory. With the
torch 2.13 CPU build, an fp32 `nn.Linear` on one row (y = x Wᵀ, W stored as (d_out, d_in)) measured the same
speed with 1 thread as with 2: 10–15 GB/s of weights on a 2-core Zen 4 that sums a tensor at ~50 GB/s.

`SplitLinear` stores Wᵀ cut into n column blocks, one per thread:

    blocks = [W₁ᵀ, W₂ᵀ, …, Wₙᵀ]                        (n, d_in, d_out / n), W padded to a multiple of n rows
    y = x Wᵀ = [x W₁ᵀ | x W₂ᵀ | … | x Wₙᵀ]             one batched matmul, which torch spreads over its threads

The arithmetic is the same; only the order of the additions inside each dot product may differ (results
agree to ~1e-5 relative). The prompt's prefill goes through the same layout, one (T, d_in) @ (d_in, d_out / n)
product per block. On SmolLM2-135M with 2 threads a decoding step took ~36 ms instead of ~55 ms (table per
matrix shape in bench/RESULTS.md); with n = 1 the layout is plain Wᵀ, which measured faster than W as well.
In bf16 on a CPU it measured no faster, and GPU kernels already use the whole device, so only fp32 CPU
models are converted. Many-core machines (small blocks) have not been measured.

`prepare_for_cpu_decoding(model)` swaps every plain fp32 `nn.Linear` of a CPU model for a `SplitLinear`, in
place, freeing each original weight once its copy exists — except a tied output head's, which is still the
embedding (SmolLM2-135M: 113 MB more). The model is then for generation only: the swapped weights are no
longer parameters, so it can be neither trained nor saved (saving raises). `for_generation` (litft/fast) merges an
fp32 LoRA first, so that its layers are plain `nn.Linear` too; other wrapped layers (LoRA unmerged, LLaMA-Adapter
v2's scaled layers) are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class SplitLinear(nn.Module):
    """y = x Wᵀ (+ b) with Wᵀ kept as `n` column blocks, (n, d_in, d_out / n), for an n-thread matmul."""

    def __init__(self, linear: nn.Linear, n: int) -> None:
        super().__init__()
        weight = linear.weight.detach()  # (d_out, d_in)
        self.out_features, d_in = weight.shape
        if self.out_features % n:
            weight = F.pad(weight, (0, 0, 0, -self.out_features % n))  # (n · k, d_in), k = ceil(d_out / n)
        blocks = weight.t().reshape(d_in, n, -1).transpose(0, 1)  # (n, d_in, k), a view: one copy below
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.register_state_dict_pre_hook(refuse_to_save)

    def forward(self, x: Tensor) -> Tensor:  # (..., d_in) -> (..., d_out)
        rows = x.reshape(1, -1, x.size(-1))  # (1, R, d_in), R = all leading dims
        y = torch.matmul(rows, self.blocks)  # (n, R, k): block i holds output columns i·k .. (i+1)·k - 1
        y = y.transpose(0, 1).reshape(*x.shape[:-1], -1)[..., : self.out_features]  # (..., d_out)
        return y if self.bias is None else y + self.bias


def refuse_to_save(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    raise RuntimeError(f"{prefix or 'this layer'} holds its weight in the CPU decoding layout, which is not "
                       "saved; save the model before prepare_for_cpu_decoding")


def uses_cpu_layout(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether prepare_for_cpu_decoding converts weights on this device in this dtype: fp32 on a CPU.

    for_generation loads such weights into memory instead of memory-mapping them (load_lit_model's mmap=False),
    so that each original is freed as soon as its copy exists."""
    return torch.device(device).type == "cpu" and dtype == torch.float32


def prepare_for_cpu_decoding(model: nn.Module, threads: int | None = None) -> nn.Module:
    """Swap every plain fp32 CPU `nn.Linear` in `model` for a `SplitLinear` over `threads` blocks, in place.

    `threads` defaults to torch.get_num_threads(). GPU and 16-bit layers are left as they are; calling it
    twice changes nothing more. Returns the same model.
    """
    n = threads or torch.get_num_threads()
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and uses_cpu_layout(m.weight.device, m.weight.dtype)]
    for name in names:  # one at a time, so each old weight can be freed as soon as its copy exists
        model.set_submodule(name, SplitLinear(model.get_submodule(name), n))
    return model
