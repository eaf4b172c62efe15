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
give the same product (to fp32 rounding). With `--checkpoint_dir`, it then decodes greedily with the whole model in
each layout, alternating them for `rounds` rounds (tokens/s count the prompt's prefill too), and checks that the
three produce the same ids.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litft.checkpoint import load_lit_model  # noqa: E402
from litft.cli import run  # noqa: E402
from litft.fast.cpu_decoding import PackedLinear, prepare_for_cpu_decoding  # noqa: E402
from litft.generate import generate  # noqa: E402

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


class ColumnBlocks(nn.Module):
    """y = x Wᵀ with Wᵀ stored as (threads, d_in, d_out / threads): the layout before the packed one."""

    def __init__(self, linear: nn.Linear, threads: int) -> None:
        super().__init__()
        assert linear.bias is None, "column blocks are timed on bias-free weights (Llama's)"
        w = F.pad(linear.weight.detach(), (0, 0, 0, -linear.out_features % threads))  # rows: a multiple of threads
        self.blocks = w.t().reshape(w.size(1), threads, -1).transpose(0, 1).contiguous()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (threads, R, k) -> (..., d_out)
        y = torch.matmul(x.reshape(1, -1, x.size(-1)), self.blocks).transpose(0, 1)
        return y.reshape(*x.shape[:-1], -1)[..., : self.out_features]


def layouts(weights: list[torch.Tensor], threads: int) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    """Each layout's product for every weight, as functions of x."""
    def linear(w: torch.Tensor) -> nn.Linear:
        layer = nn.Linear(w.size(1), w.size(0), bias=False, device="meta")
        layer.weight = nn.Parameter(w, requires_grad=False)
        return layer

    return {"F.linear": [linear(w) for w in weights],
            "column blocks": [ColumnBlocks(linear(w), threads) for w in weights],
            "packed": [PackedLinear(linear(w)) for w in weights]}


def main(rows: list[int] = [1, 4, 16, 32], layers: int = 30, repeats: int = 5, checkpoint_dir: Optional[Path] = None,
         prompt_tokens: int = 128, new_tokens: int = 128, rounds: int = 6) -> None:
    """Print GFLOP/s per shape and row count. `layers` distinct weights per shape (3 for lm_head, 113 MB each).
    With `checkpoint_dir`, also greedy decode with the whole model in each layout."""
    products(rows, layers, repeats)
    if checkpoint_dir is not None:
        decode(checkpoint_dir, prompt_tokens, new_tokens, rounds)


def products(rows: list[int], layers: int, repeats: int) -> None:
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
            for layer_products in by_layout.values():
                torch.testing.assert_close(layer_products[0](x), expected, rtol=1e-4, atol=1e-4)
            rate = {layout: 2 * n * d_in * d_out / seconds_per_product([lambda p=p: p(x) for p in products],
                                                                        repeats) / 1e9
                    for layout, products in by_layout.items()}
            base = rate["F.linear"]
            print(f"{name:24} {n:4}  {base:9.1f}  {rate['column blocks']:8.1f} ({rate['column blocks'] / base:.2f}×)"
                  f"  {rate['packed']:8.1f} ({rate['packed'] / base:.2f}×)", flush=True)


def decode(checkpoint_dir: Path, prompt_tokens: int, new_tokens: int, rounds: int) -> None:
    """Greedy decode tokens/s of the model as loaded, in column blocks and packed, alternating."""
    models = {"nn.Linear": load_lit_model(checkpoint_dir).eval()}
    models["column blocks"] = load_lit_model(checkpoint_dir).eval()
    for name, m in list(models["column blocks"].named_modules()):
        if type(m) is nn.Linear:
            models["column blocks"].set_submodule(name, ColumnBlocks(m, torch.get_num_threads()))
    models["packed"] = prepare_for_cpu_decoding(load_lit_model(checkpoint_dir).eval())
    prompt = torch.randint(0, models["packed"].config.vocab_size, (prompt_tokens,),
                           generator=torch.Generator().manual_seed(0))
    rates, ids = {name: [] for name in models}, {}
    with torch.inference_mode():
        for r in range(rounds + 1):  # round 0 warms up, untimed
            for name in (list(models) if r % 2 else list(models)[::-1]):
                start = time.perf_counter()
                ids[name] = list(generate(models[name], prompt, new_tokens, temperature=0))
                if r:
                    rates[name].append((prompt_tokens + new_tokens) / (time.perf_counter() - start))
    assert ids["column blocks"] == ids["nn.Linear"] == ids["packed"], "the layouts decoded different ids"
    print(f"\n{checkpoint_dir.name}: prompt {prompt_tokens}, {new_tokens} new tokens, greedy, fp32, {rounds} rounds "
          "alternating; tokens/s (prefill included), median (ratio to nn.Linear) and each round")
    base = statistics.median(rates["nn.Linear"])
    for name, r in rates.items():
        print(f"{name:14} {statistics.median(r):6.1f} ({statistics.median(r) / base:.2f}×)  "
              + " ".join(f"{x:.1f}" for x in r))
    print(f"same greedy ids in the three layouts: {new_tokens}/{new_tokens}")


if __name__ == "__main__":
    run(main)
