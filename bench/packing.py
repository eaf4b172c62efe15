"""Packing against padding: trained tokens/s of one LoRA training step with and without packing, in one run.

    python bench/packing.py                          # data/games and the Alpaca-like set, ~4 min on 2 cores
    python bench/packing.py --steps 16               # less noise from which micro batches are drawn, ~6 min
    python bench/packing.py --steps 2 --warmup 1     # a smoke run

SmolLM2-135M's shapes (random weights: speed does not depend on their values), LoRA r 8 on all seven linear
layers of every block, litft's fast path (litft/fast: fused LoRA, chunked loss), fp32, AdamW: the step every
finetune/lora.py run takes. For each data set, one model trains on micro batches of `micro_batch_size` drawn at
random, alternately without packing (samples padded to the longest of their micro batch, as litft/data.py
collates them) and with packing (rows of litft/packing.py, padded to the longest row), so that both share the
machine's good and bad moments; the order flips every round. Reported per data set:

    padding share       padding's share of the micro batches of a whole epoch (the order the steps draw from),
                        without and with packing
    trained tokens/s    tokens with a loss (label != ignore index, litft/loss.py trained_tokens) over the seconds
                        of the timed steps (forward, backward, AdamW step), each way, and packed / unpacked
    ceiling             1 / (1 - padding share unpacked): the speed-up if packing removed every padding token
                        and a token cost the same in a packed row as in a padded one
    step s              the median step, each way; and the padding of the timed steps alone (unpacked / packed),
                        to show how far the few timed micro batches stand for the epoch

The data sets:

- games: data/games/train.pt, the real tokenized samples of the games task (2700 samples, 38-97 tokens,
  prompts masked), rows of 128 tokens (prepare it with `python data_prep/games.py`).
- Alpaca-like: NOT Alpaca. No instruction data ships with litft and this runs offline, so this is an assumed
  length distribution, generated: 52,000 samples (Alpaca's count) whose token lengths are log-normal with a
  median of 110 and a 95th percentile of 300 tokens (σ = ln(300/110) / 1.645 = 0.61 in log space), at least 8
  and cut at 512; about 92 % are under 256, in line with litgpt's tutorials/prepare_dataset.md, which reads
  Alpaca's histogram as favouring a 256-token cut-off. The first half of each sample's tokens is its prompt
  (masked), the rest its answer: also an assumption. Token ids are random. Rows of 512 tokens.

Results: bench/RESULTS.md, "Packing (issue 15)".
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch
from frameworks import base_state_dict

from litft import data as data_lib
from litft import packing
from litft.cli import run
from litft.config import Config
from litft.fast import for_training
from litft.lora import LoRAConfig, add_lora
from litft.loss import IGNORE_INDEX, LossFn, trained_tokens
from litft.model import Llama

ALPACA_LIKE = {"samples": 52_000, "median": 110, "p95": 300, "shortest": 8, "cut": 512, "prompt_share": 0.5}


def main(data: Path = Path("data/games"), model: str = "SmolLM2-135M", micro_batch_size: int = 4,
         steps: int = 8, warmup: int = 1, threads: int = 0, seed: int = 0) -> None:
    """Time LoRA steps with and without packing on two data sets; print a Markdown table.

    Args:
        data: the prepared games data (its train.pt).
        model: litft config name (shapes; random weights).
        micro_batch_size: samples (unpacked) or rows (packed) per step.
        steps: timed steps each way, per data set.
        warmup: untimed steps each way first.
        threads: torch CPU threads (0: torch's choice).
        seed: weights, batch order and the Alpaca-like samples.
    """
    if threads:
        torch.set_num_threads(threads)
    config = Config.from_name(model)
    sets = [("games", torch.load(data / "train.pt", weights_only=True), 128),
            ("Alpaca-like (assumed lengths)", alpaca_like_samples(seed, config.vocab_size), ALPACA_LIKE["cut"])]
    print(f"{model}, LoRA r 8, fp32, micro batch {micro_batch_size}, {warmup} warm-up + {steps} timed steps each way, "
          f"{torch.get_num_threads()} threads\n")
    print("| data | rows of | samples | packed rows | padding unpacked | padding packed | trained tokens/s unpacked "
          "| trained tokens/s packed | packed / unpacked | ceiling 1 / (1 - padding unpacked) | step s unpacked "
          "| step s packed | padding of the timed steps |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, samples, seq in sets:
        net, loss_fn = build_lora(config, seed)
        r = compare(net, loss_fn, samples, seq, micro_batch_size, steps, warmup, seed, name)
        print(f"| {name} | {seq} | {len(samples)} | {r['rows']} | {r['padding'][0]:.1%} | {r['padding'][1]:.1%} "
              f"| {r['speed'][0]:.1f} | {r['speed'][1]:.1f} | {r['speed'][1] / r['speed'][0]:.2f}× "
              f"| {1 / (1 - r['padding'][0]):.2f}× | {r['step'][0]:.2f} | {r['step'][1]:.2f} "
              f"| {r['timed_padding'][0]:.1%} / {r['timed_padding'][1]:.1%} |", flush=True)


def alpaca_like_samples(seed: int, vocab_size: int) -> list[dict]:
    """ALPACA_LIKE: log-normal token lengths (median, 95th percentile), clamped to [shortest, cut]; random ids; the
    first `prompt_share` of each sample masked as its prompt."""
    a = ALPACA_LIKE
    sigma = math.log(a["p95"] / a["median"]) / 1.645  # the 95th percentile of a normal is 1.645 σ above its median
    g = torch.Generator().manual_seed(seed)
    lengths = (math.log(a["median"]) + sigma * torch.randn(a["samples"], generator=g)).exp().round()
    samples = []
    for n in lengths.clamp(a["shortest"], a["cut"]).long().tolist():
        ids = torch.randint(2, vocab_size, (n,), generator=g)
        labels = ids.clone()
        labels[: int(n * a["prompt_share"])] = IGNORE_INDEX
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def build_lora(config: Config, seed: int) -> tuple[Llama, LossFn]:
    """SmolLM2-shaped Llama with shared random weights, LoRA r 8 (alpha 16, dropout 0.05) on all seven linear
    layers, litft's fast path; returns the model in training mode and its loss(model, x, y, packed_pos=)."""
    net = Llama(config)
    net.load_state_dict(base_state_dict(config, seed))
    add_lora(net, LoRAConfig(r=8, alpha=16, dropout=0.05))
    return net.train(), for_training(net, fast=True)


def compare(net: Llama, loss_fn: LossFn, samples: list[dict], seq: int, micro: int, steps: int, warmup: int,
            seed: int, name: str) -> dict:
    """Alternate steps unpacked / packed on one model; padding shares, trained tokens/s and median step seconds
    (each as (unpacked, packed)), padding's share of the timed steps alone, and the number of packed rows."""
    rows = packing.pack(samples, seq)
    ways = [(samples, lambda b: (*data_lib.collate(b, pad_id=0, max_seq_length=seq), None)),
            (rows, lambda b: packing.collate(b, pad_id=0))]
    orders = [epoch_order(len(items), micro, seed) for items, _ in ways]
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    seconds, trained = ([[], []], [[], []])
    for i in range(warmup + steps):
        for w in (0, 1) if i % 2 == 0 else (1, 0):
            items, collate = ways[w]
            s, n = timed_step(net, loss_fn, optimizer, collate([items[k] for k in orders[w][i]]))
            print(f"  {name} step {i + 1} {'packed' if w else 'unpacked'}: {s:.2f} s, {n} trained tokens",
                  file=sys.stderr, flush=True)
            if i >= warmup:
                seconds[w].append(s)
                trained[w].append(n)
    lengths = [[min(len(x["input_ids"]), seq) for x in items] for items, _ in ways]
    timed = [orders[w][warmup:warmup + steps] for w in (0, 1)]
    return {"rows": len(rows), "padding": [padding_share(lengths[w], orders[w]) for w in (0, 1)],
            "timed_padding": [padding_share(lengths[w], timed[w]) for w in (0, 1)],
            "speed": [sum(trained[w]) / sum(seconds[w]) for w in (0, 1)],
            "step": [statistics.median(seconds[w]) for w in (0, 1)]}


def epoch_order(n: int, micro: int, seed: int) -> list[list[int]]:
    """One epoch of micro batches: a seeded permutation of range(n) in groups of `micro` (a short rest dropped)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[k:k + micro] for k in range(0, n - micro + 1, micro)]


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Padding's share of `batches`, each padded to its longest item."""
    real = sum(lengths[k] for b in batches for k in b)
    return 1 - real / sum(max(lengths[k] for k in b) * len(b) for b in batches)


def timed_step(net: Llama, loss_fn: LossFn, optimizer: torch.optim.Optimizer, batch) -> tuple[float, int]:
    """One training step (forward, backward, AdamW step) on (x, y, packed_pos): its seconds and trained tokens."""
    x, y, packed_pos = batch
    start = time.perf_counter()
    loss = loss_fn(net, x, y, packed_pos=packed_pos)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, int(trained_tokens(y))


if __name__ == "__main__":
    run(main)
