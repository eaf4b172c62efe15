"""What each optimizer step gets: its samples (`batch_indices`) and its learning rate (`lr_factor`).

Both depend only on the step's position in the run, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from litft.errors import UserError
from litft.train_args import TrainArgs


def batch_indices(n: int, micro_batch_size: int, world_size: int, rank: int, seed: int,
                  start: int = 0) -> Iterator[list[int]]:
    """Yield this process's sample indices, one micro batch at a time, forever; resumable at `start`.

    Epoch e is a fresh permutation seeded with seed + e (so --seed 2 starts with the order of --seed 1's second
    epoch). Micro batch i of the whole job covers permutation slots [i·m·W, (i+1)·m·W); process `rank` takes its
    m of them, and the last n mod (m·W) slots of each epoch are skipped. So, when n is a multiple of m·W, one
    process accumulating W micro batches of m sees the same samples in the same order as W processes together.
    """
    check_fills_a_micro_batch(n, micro_batch_size, world_size)
    per_iter = micro_batch_size * world_size
    per_epoch = n // per_iter
    position, epoch, perm = start, -1, None
    while True:
        e, i = divmod(position, per_epoch)
        if e != epoch:
            epoch, perm = e, torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))
        first = i * per_iter + rank * micro_batch_size
        yield perm[first:first + micro_batch_size].tolist()
        position += 1


def check_fills_a_micro_batch(n: int, micro_batch_size: int, world_size: int, rows_of: int | None = None) -> None:
    """Refuse a training split of fewer rows than one micro batch on every process; `rows_of`: the samples that
    --packing put in those n rows."""
    if n < micro_batch_size * world_size:
        what = (f"--packing put the {rows_of} training samples in {n} rows" if rows_of
                else f"the training split has {n} samples")
        raise UserError(f"{what}, fewer than one micro batch across all processes ({micro_batch_size * world_size}); "
                        "lower --micro_batch_size or prepare more data")


def lr_factor(step: int, args: TrainArgs) -> float:
    """Multiplier on learning_rate after `step` optimizer steps: linear warmup, then cosine to min_lr."""
    if step < args.warmup_steps:
        return (step + 1) / (args.warmup_steps + 1)
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    floor = args.min_lr / args.learning_rate
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
