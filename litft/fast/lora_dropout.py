"""LoRA's dropout, h = W x + (α/r) · B A dropout(x) (litft/lora.py), made cheap enough to leave on.

Dropout zeroes each element of the LoRA branch's input with probability p and scales the rest by 1 / (1 - p),
so the expected input is unchanged (Srivastava et al. 2014). The frozen path W x always sees x itself.
On a CPU at LoRA's usual p = 0.05 the random mask, not the multiply, is the cost; two things cut it:

1. One mask per input tensor (`SharedDropout`). q, k and v all read the attention norm's output, gate and up
   the MLP norm's: the layers that read one tensor get the same dropped copy, so a block draws four masks
   instead of seven (litgpt's fused qkv shares its mask the same way). Each layer's input is still dropped
   with probability p. The first reader draws the mask, the others reuse the copy, and after the last one
   it is let go: it lives on only as long as autograd needs it, and a recomputation under activation
   checkpointing repeats exactly the forward's draws (torch restores the random state) and operations.
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
    """Dropout that hands the `readers` layers reading one tensor the same dropped copy, one after another."""

    def __init__(self, p: float, readers: int = 1) -> None:
        super().__init__(p)
        self.readers = readers
        self.last: tuple[weakref.ref, Tensor, int] | None = None  # (input, dropped copy, reads left)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if self.last is not None and self.last[0]() is x:
            _, out, reads_left = self.last
        else:
            x_cast = to_autocast_dtype(x)
            out = cpu_dropout(x_cast, self.p) if x.is_cpu else super().forward(x_cast)
            reads_left = self.readers
        # Let go after the last reader: autograd keeps the copy if backward needs it, and a recomputation
        # (activation checkpointing) draws again, from the random state it restored, exactly as the forward did.
        self.last = (weakref.ref(x), out, reads_left - 1) if reads_left > 1 else None
        return out


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

