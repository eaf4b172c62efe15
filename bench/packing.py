"""Packing against padding: trained tokens/s of one LoRA training step with and without packing, in one run.

    python bench/packing.py                          # data/games and the Alpaca-like set, ~4 min on 2 cores
    python bench/packing.py --steps 16               # less noise from which micro batches are drawn, ~6 min
    python bench/packing.py --steps 2 --warmup 1     # a smoke run
    python bench/packing.py --sets [alpaca-like] --micro_batch_size 8   # one data set, a larger micro batch
    python bench/packing.py --device cuda --precision bf16-true --model Llama-2-7b-hf --micro_batch_size 16 \
        --steps 16 --warmup 2       # one GPU, Llama-2-7B shapes in bf16

SmolLM2-135M's shapes (random weights: speed does not depend on their values), LoRA r 8 on all seven linear
layers of every block, litft's fast path (litft/fast: fused LoRA, chunked loss), fp32, AdamW: the step every
finetune/lora.py run takes. `--device cuda` runs it on a GPU, each step timed between two
torch.cuda.synchronize calls, and `--precision` sets the dtypes as finetune/lora.py's flag does: bf16-true
(weights, LoRA and activations in bf16) or bf16-mixed (fp32 weights, the forward pass under bf16 autocast). On a
GPU the random weights are made there, in their dtype: a 7B model never exists in fp32 or on the host. Micro
batch 16 for Llama-2-7B: a packed Alpaca-like step is 16 rows of 512 = 8192 tokens, as many as bench/gpu.py's
4 × 2048 (62.6 GB peak on an H200, bench/RESULTS.md "GPU").

For each data set, one model trains on micro batches of `micro_batch_size` drawn at random, alternately without
packing (samples padded to the longest of their micro batch, as litft/data.py collates them) and with packing
(rows of litft/packing.py, padded to the longest row), so that both share the machine's good and bad moments;
the order flips every round. Reported per data set:

    padding share       padding's share of the micro batches of a whole epoch (the order the steps draw from),
                        without and with packing
    trained tokens/s    tokens with a loss (label != ignore index, litft/loss.py trained_tokens) over the seconds
                        of the timed steps (forward, backward, AdamW step), each way, and packed / unpacked
    ceiling             1 / (1 - padding share unpacked): the speed-up if packing removed every padding token
                        and a token cost the same in a packed row as in a padded one
    step s              the median step, each way; and the padding of the timed steps alone (unpacked / packed),
                        to show how far the few timed micro batches stand for the epoch
    peak GB             on a GPU only: the most memory allocated during any timed step, each way (weights and
                        AdamW state included)

The data sets:

- games: data/games/train.pt, the real tokenized samples of the games task (2700 samples, 38-97 tokens,
  prompts masked), rows of 128 tokens (prepare it with `python data_prep/games.py`). Its ids come from
  SmolLM2's tokenizer (49,152 ids); for a model with fewer (Llama 2: 32,000) they are folded into its vocabulary
  (id mod vocab size): which ids a step sees does not change its speed.
- Alpaca-like: NOT Alpaca. No instruction data ships with litft and this runs offline, so this is an assumed
  length distribution, generated: 52,000 samples (Alpaca's count) whose token lengths are log-normal with a
  median of 110 and a 95th percentile of 300 tokens (σ = ln(300/110) / 1.645 = 0.61 in log space), at least 8
  and cut at 512; about 92 % are under 256, in line with litgpt's tutorials/prepare_dataset.md, which reads
  Alpaca's histogram as favouring a 256-token cut-off. The first half of each sample's tokens is its prompt
  (masked), the rest its answer: also an assumption. Token ids are random. Rows of 512 tokens.

Results: bench/RESULTS.md, "Packing (issue 15)".
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from frameworks import base_state_dict

from litft import data as data_lib
from litft import packing
from litft.cli import run
from litft.config import Config
from litft.errors import UserError
from litft.fast import for_training
from litft.lora import LoRAConfig, add_lora
from litft.loss import IGNORE_INDEX, LossFn, trained_tokens
from litft.model import Llama

ALPACA_LIKE = {"samples": 52_000, "median": 110, "p95": 300, "shortest": 8, "cut": 512, "prompt_share": 0.5}


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # base weights and LoRA A, B (add_lora makes them in the base weights' dtype)
    autocast: torch.dtype | None  # the dtype the forward pass runs in under torch.autocast; None: no autocast
    label: str  # as the header line names it


PRECISIONS = {"32-true": Precision(torch.float32, None, "fp32"),
              "bf16-true": Precision(torch.bfloat16, None, "bf16-true (weights and activations in bf16)"),
              "bf16-mixed": Precision(torch.float32, torch.bfloat16, "bf16-mixed (fp32 weights, bf16 autocast)")}


def main(data: Path = Path("data/games"), model: str = "SmolLM2-135M", micro_batch_size: int = 4,
         steps: int = 8, warmup: int = 1, threads: int = 0, seed: int = 0, device: str = "cpu",
         precision: Literal["32-true", "bf16-true", "bf16-mixed"] = "32-true",
         sets: tuple[Literal["games", "alpaca-like"], ...] = ("games", "alpaca-like")) -> None:
    """Time LoRA steps with and without packing on two data sets; print a Markdown table.

    Args:
        data: the prepared games data (its train.pt).
        model: litft config name (shapes; random weights).
        micro_batch_size: samples (unpacked) or rows (packed) per step.
        steps: timed steps each way, per data set.
        warmup: untimed steps each way first.
        threads: torch CPU threads (0: torch's choice).
        seed: weights, batch order and the Alpaca-like samples.
        device: where the steps run: cpu, or cuda (cuda:1, ...) for a GPU.
        precision: 32-true (fp32), bf16-true (weights, LoRA and activations in bfloat16, as finetune/lora.py
            --precision bf16-true) or bf16-mixed (fp32 weights, the forward pass under bf16 autocast).
        sets: the data sets to run, of games and alpaca-like.
    """
    if threads:
        torch.set_num_threads(threads)
    where = torch.device(device)
    if where.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch finds no CUDA GPU here (torch.cuda.is_available() is False)")
    config = Config.from_name(model)
    chosen = []
    if "games" in sets:
        chosen.append(("games", fit_vocab(torch.load(data / "train.pt", weights_only=True), config.vocab_size), 128))
    if "alpaca-like" in sets:
        chosen.append(("Alpaca-like (assumed lengths)", alpaca_like_samples(seed, config.vocab_size),
                       ALPACA_LIKE["cut"]))
    cuda = where.type == "cuda"
    print(f"{model}, LoRA r 8, {PRECISIONS[precision].label}, micro batch {micro_batch_size}, {warmup} warm-up + "
          f"{steps} timed steps each way, {machine(where)}\n")
    print(table_header(cuda))
    for name, samples, seq in chosen:
        net, loss_fn = build_lora(config, seed, where, PRECISIONS[precision].weights)
        r = compare(net, loss_fn, samples, seq, micro_batch_size, steps, warmup, seed, name, where,
                    PRECISIONS[precision].autocast)
        del net  # freed before the next data set's model is built
        print(table_row(name, seq, len(samples), r, cuda), flush=True)


def machine(device: torch.device) -> str:
    """What the steps ran on, for the header: the CPU threads, or the GPU's name."""
    if device.type == "cuda":
        return f"on {torch.cuda.get_device_name(device)}"
    return f"{torch.get_num_threads()} threads"


def table_header(cuda: bool) -> str:
    """The table's two header lines; on a GPU with the two peak-memory columns at the end."""
    names = ["data", "rows of", "samples", "packed rows", "padding unpacked", "padding packed",
             "trained tokens/s unpacked", "trained tokens/s packed", "packed / unpacked",
             "ceiling 1 / (1 - padding unpacked)", "step s unpacked", "step s packed", "padding of the timed steps"]
    if cuda:
        names += ["peak GB unpacked", "peak GB packed"]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def table_row(name: str, seq: int, n_samples: int, r: dict, cuda: bool) -> str:
    """One data set's row of the table (step seconds to 3 decimals on a GPU, whose steps are short)."""
    d = 3 if cuda else 2
    row = (f"| {name} | {seq} | {n_samples} | {r['rows']} | {r['padding'][0]:.1%} | {r['padding'][1]:.1%} "
           f"| {r['speed'][0]:.1f} | {r['speed'][1]:.1f} | {r['speed'][1] / r['speed'][0]:.2f}× "
           f"| {1 / (1 - r['padding'][0]):.2f}× | {r['step'][0]:.{d}f} | {r['step'][1]:.{d}f} "
           f"| {r['timed_padding'][0]:.1%} / {r['timed_padding'][1]:.1%} |")
    if cuda:
        row += f" {r['peak'][0] / 1e9:.1f} | {r['peak'][1] / 1e9:.1f} |"
    return row


def fit_vocab(samples: list[dict], vocab_size: int) -> list[dict]:
    """The samples themselves when every id fits the model's vocabulary; otherwise copies with each id, and each
    label that is not ignored, taken mod vocab_size (data/games holds SmolLM2 ids, up to 49,151; Llama 2 has
    32,000): a step's speed does not depend on which ids it sees."""
    top = max(int(torch.cat((s["input_ids"], s["labels"])).max()) for s in samples)
    if top < vocab_size:
        return samples
    return [{**s, "input_ids": s["input_ids"] % vocab_size,
             "labels": torch.where(s["labels"] == IGNORE_INDEX, IGNORE_INDEX, s["labels"] % vocab_size)}
            for s in samples]


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


def build_lora(config: Config, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Llama, LossFn]:
    """A Llama of `config`'s shapes with random weights (`random_llama`), LoRA r 8 (alpha 16, dropout 0.05) on all
    seven linear layers, litft's fast path; returns the model in training mode and its loss(model, x, y,
    packed_pos=)."""
    net = random_llama(config, seed, device, dtype)
    add_lora(net, LoRAConfig(r=8, alpha=16, dropout=0.05))  # A and B on the weights' device, in their dtype
    return net.train(), for_training(net, fast=True)


def random_llama(config: Config, seed: int, device: torch.device, dtype: torch.dtype) -> Llama:
    """Random weights, normal(0, 0.02) for matrices and ones for norms, in `dtype` on `device`.

    On the CPU, bench/frameworks.py's base_state_dict (the weights of every CPU bench, so results stay comparable)
    cast to `dtype`. On a GPU the model is built on the meta device (shapes, no memory), given uninitialised
    storage on the GPU already in `dtype`, and filled there: a 7B model never exists in fp32 or on the host."""
    if device.type == "cpu":
        net = Llama(config)
        net.load_state_dict(base_state_dict(config, seed))
        return net.to(dtype)  # fp32: the same model, no copy
    with torch.device("meta"):
        net = Llama(config)
    net.to(dtype).to_empty(device=device)
    net.tie_weights()  # to_empty gave embed and lm_head separate storage: tie them again (where the config ties)
    torch.manual_seed(seed)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
    return net


def compare(net: Llama, loss_fn: LossFn, samples: list[dict], seq: int, micro: int, steps: int, warmup: int,
            seed: int, name: str, device: torch.device, autocast: torch.dtype | None) -> dict:
    """Alternate steps unpacked / packed on one model; padding shares, trained tokens/s, median step seconds and
    peak bytes allocated (GPU; 0 on the CPU), each as (unpacked, packed), padding's share of the timed steps
    alone, and the number of packed rows."""
    rows = packing.pack(samples, seq)
    ways = [(samples, lambda b: (*data_lib.collate(b, pad_id=0, max_seq_length=seq), None)),
            (rows, lambda b: packing.collate(b, pad_id=0))]
    orders = [epoch_order(len(items), micro, seed) for items, _ in ways]
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    seconds, trained, peak = ([[], []], [[], []], [0, 0])
    for i in range(warmup + steps):
        for w in (0, 1) if i % 2 == 0 else (1, 0):
            items, collate = ways[w]
            batch = to_device(collate([items[k] for k in orders[w][i]]), device)
            s, n, p = timed_step(net, loss_fn, optimizer, batch, autocast)
            print(f"  {name} step {i + 1} {'packed' if w else 'unpacked'}: {s:.2f} s, {n} trained tokens",
                  file=sys.stderr, flush=True)
            if i >= warmup:
                seconds[w].append(s)
                trained[w].append(n)
                peak[w] = max(peak[w], p)
    lengths = [[min(len(x["input_ids"]), seq) for x in items] for items, _ in ways]
    timed = [orders[w][warmup:warmup + steps] for w in (0, 1)]
    return {"rows": len(rows), "padding": [padding_share(lengths[w], orders[w]) for w in (0, 1)],
            "timed_padding": [padding_share(lengths[w], timed[w]) for w in (0, 1)],
            "speed": [sum(trained[w]) / sum(seconds[w]) for w in (0, 1)],
            "step": [statistics.median(seconds[w]) for w in (0, 1)], "peak": peak}


def to_device(batch: tuple, device: torch.device) -> tuple:
    """(x, y, packed_pos), each (B, T) or packed_pos None, moved to `device` (on the CPU: the same tensors)."""
    return tuple(None if t is None else t.to(device) for t in batch)


def epoch_order(n: int, micro: int, seed: int) -> list[list[int]]:
    """One epoch of micro batches: a seeded permutation of range(n) in groups of `micro` (a short rest dropped)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[k:k + micro] for k in range(0, n - micro + 1, micro)]


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Padding's share of `batches`, each padded to its longest item."""
    real = sum(lengths[k] for b in batches for k in b)
    return 1 - real / sum(max(lengths[k] for k in b) * len(b) for b in batches)


def timed_step(net: Llama, loss_fn: LossFn, optimizer: torch.optim.Optimizer, batch,
               autocast: torch.dtype | None) -> tuple[float, int, int]:
    """One training step (forward, backward, AdamW step) on (x, y, packed_pos), already on the model's device:
    its seconds, trained tokens, and on a GPU the peak bytes allocated during it (0 on the CPU)."""
    x, y, packed_pos = batch
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(x.device)
        torch.cuda.synchronize(x.device)  # start the clock with nothing left queued on the GPU
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
        loss = loss_fn(net, x, y, packed_pos=packed_pos)  # under autocast as litft/train.py runs it
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(x.device)  # GPU kernels run asynchronously: wait for the step's last one
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(x.device) if cuda else 0
    return seconds, int(trained_tokens(y)), peak


if __name__ == "__main__":
    run(main)
