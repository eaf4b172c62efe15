"""Decoding's matrix products on a CPU, per weight shape: `F.linear` against litft's packed layout.

    python bench/cpu_linear.py --rows "[1, 4, 16, 32]"

Decoding multiplies a few rows (one per sequence of the batch) by every weight of the model. For each of
SmolLM2-135M's shapes this times y = x Wᵀ three ways, over `layers` distinct weights per shape so that, as in a
real model, they stream from memory rather than sit in cache:

- `F.linear(x, W)`: what nn.Linear does (in torch's x86 CPU wheels, an fp32 product goes to MKL);
- column blocks: Wᵀ stored as (threads, d_in, d_out / threads) and one batched matmul, so each thread reads its
  own block (the layout litft used before the packed one);
- packed: W reordered once into oneDNN's blocked layout and multiplied by oneDNN (litft/fast/cpu_decoding.py).

It prints GFLOP/s (2·rows·d_in·d_out per product) and each layout's ratio to `F.linear`, and checks that all three
give the same product (to fp32 rounding).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litft.cli import run  # noqa: E402
from litft.fast.cpu_decoding import PackedLinear  # noqa: E402

SHAPES = {"q, o (576 × 576)": (576, 576), "k, v (192 × 576)": (192, 576), "gate, up (1536 × 576)": (1536, 576),
          "down (576 × 1536)": (576, 1536), "lm_head (49152 × 576)": (49152, 576)}


def seconds_per_product(products: list[Callable[[], torch.Tensor]], repeats: int) -> float:
    for product in products:  # warm up: the first call of a shape sets up its kernel
        product()
    start = time.perf_counter()
    for _ in range(repeats):
        for product in products:
            product()
    return (time.perf_counter() - start) / (repeats * len(products))


def layouts(weights: list[torch.Tensor], threads: int) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    """Each layout's product for every weight, as functions of x."""
    def blocks(w: torch.Tensor) -> torch.Tensor:  # (d_out, d_in) -> (threads, d_in, d_out / threads)
        return w.t().reshape(w.size(1), threads, -1).transpose(0, 1).contiguous()

    def column_blocks(b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: torch.matmul(x[None], b).transpose(0, 1).reshape(x.size(0), -1)

    def packed(w: torch.Tensor) -> PackedLinear:
        linear = torch.nn.Linear(w.size(1), w.size(0), bias=False, device="meta")
        linear.weight = torch.nn.Parameter(w, requires_grad=False)
        return PackedLinear(linear)

    return {"F.linear": [lambda x, w=w: F.linear(x, w) for w in weights],
            "column blocks": [column_blocks(blocks(w)) for w in weights],
            "packed": [packed(w) for w in weights]}


def main(rows: list[int] = [1, 4, 16, 32], layers: int = 30, repeats: int = 5) -> None:
    """Print GFLOP/s per shape and row count. `layers` distinct weights per shape (3 for lm_head, 113 MB each)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"{threads} threads, torch {torch.__version__}; GFLOP/s (ratio to F.linear)")
    print(f"{'weight':24} {'rows':>4}  {'F.linear':>9}  {'column blocks':>16}  {'packed':>16}")
    for name, (d_out, d_in) in SHAPES.items():
        weights = [torch.randn(d_out, d_in) for _ in range(3 if d_out > 10_000 else layers)]
        by_layout = layouts(weights, threads)
        for n in rows:
            x = torch.randn(n, d_in)
            expected = by_layout["F.linear"][0](x)
            for products in by_layout.values():
                torch.testing.assert_close(products[0](x), expected, rtol=1e-4, atol=1e-4)
            rate = {layout: 2 * n * d_in * d_out / seconds_per_product([lambda p=p: p(x) for p in products],
                                                                        repeats) / 1e9
                    for layout, products in by_layout.items()}
            base = rate["F.linear"]
            print(f"{name:24} {n:4}  {base:9.1f}  {rate['column blocks']:8.1f} ({rate['column blocks'] / base:.2f}×)"
                  f"  {rate['packed']:8.1f} ({rate['packed'] / base:.2f}×)", flush=True)


if __name__ == "__main__":
    run(main)
