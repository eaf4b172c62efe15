"""How many of a LoRA A matrix's entries a small AdamW step leaves unchanged, in bf16 and in fp32.

    python bench/bf16_updates.py --lr 2e-5 --steps 10

Under --precision bf16-true every trained weight is held in bf16 (8 bits of mantissa): an update smaller than about
1/256 of the weight rounds back to the weight. A is 8 × 4096 (rank 8 on Llama-2-7B's width), initialised as
litft/lora.py does (kaiming uniform, a = √5); the gradients are random normals, the same for both dtypes.
"""

from __future__ import annotations

import math

import torch


def unchanged_share(dtype: torch.dtype, lr: float, steps: int) -> float:
    torch.manual_seed(0)
    start = torch.empty(8, 4096)
    torch.nn.init.kaiming_uniform_(start, a=math.sqrt(5))
    a = torch.nn.Parameter(start.to(dtype, copy=True))
    optimizer = torch.optim.AdamW([a], lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    gradients = torch.Generator().manual_seed(1)
    for _ in range(steps):
        a.grad = torch.randn(a.shape, generator=gradients).to(dtype)
        optimizer.step()
    return (a.detach() == start.to(dtype)).float().mean().item()


def main(lr: float = 2e-5, steps: int = 10) -> None:
    for dtype in (torch.bfloat16, torch.float32):
        print(f"{str(dtype).removeprefix('torch.')}: {unchanged_share(dtype, lr, steps):.0%} of A unchanged after "
              f"{steps} AdamW steps at lr {lr:g}")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
