"""LoRA dropout: h = W x + (α/r) · B A dropout(x), made cheap enough to leave on.

Dropout zeroes each element of the LoRA branch's input with probability p and scales the rest by 1 / (1 - p),
so the expected input is unchanged (Srivastava et al. 2014). The frozen path W x always sees x itself.
On a CPU at LoRA's usual p = 0.05 the random mask, not the multiply, is the cost; two things cut it:

1. One mask per input tensor (`SharedDropout`). q, k and v all read the attention norm's output, gate and up
   the MLP norm's: the layers that read one tensor get the same dropped copy, so a block draws four masks
   instead of seven (litgpt's fused qkv shares its mask the same way). Each layer's input is still dropped
   with probability p. The copy is held while its input tensor is alive (a weak reference tells when that
   goes), then only as long as autograd needs it. Sharing so depends on nothing but the input, which keeps
   activation checkpointing exact: its recomputation draws and shares the masks exactly as the forward did.
   Under bf16 autocast the input is cast *before* dropping, so the dropped copy is the very tensor the LoRA
   matmuls save (cast after, it would be cast and saved once per layer).
2. A cheaper mask (`cpu_dropout`): torch's CPU dropout draws one random number per element (bernoulli_);
   here one 64-bit draw gives four elements 15 random bits each, and an element is dropped when its bits
   fall below k = round(p · 2¹⁵) (at most 2¹⁵ - 1): with probability k / 2¹⁵ (p = 0.05: 0.049988). The rest
   are scaled by 2¹⁵ / (2¹⁵ - k), so the expected output is exactly x. A GPU uses torch's fused dropout.

On SmolLM2-135M (seq 256, micro batch 4) the two together took the bf16 training step from 4.2 to ~3.3 s;
see bench/RESULTS.md.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from torch import Tensor


class SharedDropout(nn.Dropout):
    """Dropout that hands every layer reading the same tensor the same dropped copy."""

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self.last: tuple[weakref.ref, Tensor] | None = None  # (input, dropped copy) of the latest call

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if self.last is not None and self.last[0]() is x:
            return self.last[1]
        x_cast = to_autocast_dtype(x)
        out = cpu_dropout(x_cast, self.p) if x.is_cpu else super().forward(x_cast)
        self.last = (weakref.ref(x, self.forget), out)  # the copy is held for as long as its input lives
        return out

    def forget(self, input_ref: weakref.ref) -> None:
        """Called when an input is freed: drop its copy (autograd keeps it if the backward pass needs it)."""
        if self.last is not None and self.last[0] is input_ref:
            self.last = None


def to_autocast_dtype(x: Tensor) -> Tensor:
    """x in the dtype autocast would give the next matmul (bf16 under bf16-mixed); x itself outside autocast."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def cpu_dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout whose mask costs one 64-bit random draw per four elements (see above)."""
    n, k = x.numel(), min(round(p * 2**15), 2**15 - 1)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # uniform on [0, 2⁶³)
    lanes = bits.view(torch.int16)[:n].view(x.shape) & 0x7FFF  # (…x.shape): 15 uniform bits per element
    return torch.where(lanes >= k, x * (2**15 / (2**15 - k)), 0)


def lora_dropout(p: float) -> nn.Module:
    return SharedDropout(p) if p > 0 else nn.Identity()
