"""The learning-rate schedule and the order of training samples, each on its own.

`lr_factor` against the schedule's formula — linear warmup to the peak, then cosine annealing (Loshchilov &
Hutter 2017, https://arxiv.org/abs/1608.03983, eq. 5: η = η_min + ½ (η_max − η_min)(1 + cos(π t / T))) — at steps
whose values are worked out by hand, and at every step against torch's own LinearLR + CosineAnnealingLR.
`batch_indices` against what it promises: every sample once per epoch, disjoint between processes, the same
order for one process as for W together, a resume that continues the same stream.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from litft.errors import UserError
from litft.schedule import batch_indices, lr_factor
from litft.train_args import TrainArgs


def schedule(warmup_steps=10, max_steps=110, learning_rate=1e-3, min_lr=1e-4) -> TrainArgs:
    return TrainArgs(warmup_steps=warmup_steps, max_steps=max_steps, learning_rate=learning_rate, min_lr=min_lr)


# ---- lr_factor ----------------------------------------------------------------------------------------------


def test_lr_factor_at_hand_computed_steps():
    args = schedule()  # warmup 10 steps, cosine over the 100 after them, floor min_lr / lr = 0.1
    expected = {
        0: 1 / 11,  # warmup: (step + 1) / (warmup + 1), never 0 so the first step learns
        4: 5 / 11,
        9: 10 / 11,
        10: 1.0,  # the peak: cos(0) = 1
        35: 0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)),  # a quarter of the way: cos(π/4)
        60: 0.1 + 0.9 * 0.5,  # half way: cos(π/2) = 0, halfway between the peak and the floor
        85: 0.1 + 0.9 * 0.5 * (1 - math.sqrt(0.5)),  # three quarters: cos(3π/4)
        110: 0.1,  # the end: cos(π) = -1, the floor min_lr
        111: 0.1, 500: 0.1,  # past max_steps it stays at the floor (it does not swing back up)
    }
    for step, factor in expected.items():
        assert lr_factor(step, args) == pytest.approx(factor, rel=1e-12, abs=0), step


def test_lr_factor_decays_to_zero_without_a_floor_and_has_no_warmup_when_asked():
    args = schedule(warmup_steps=0, max_steps=4, min_lr=0.0)
    assert [lr_factor(s, args) for s in range(5)] == pytest.approx([1.0, (1 + math.sqrt(0.5)) / 2, 0.5,
                                                                    (1 - math.sqrt(0.5)) / 2, 0.0], abs=1e-15)


def test_a_floor_equal_to_the_peak_is_a_constant_schedule_and_a_floor_above_it_is_refused(tmp_path):
    """--min_lr "must not exceed --learning_rate": equal is allowed (after warmup the rate stays at the peak)."""
    flat = TrainArgs(warmup_steps=10, max_steps=110, learning_rate=1e-3, min_lr=1e-3, out_dir=tmp_path / "run")
    flat.validate()
    assert [lr_factor(s, flat) for s in range(10, 200)] == [1.0] * 190
    above = TrainArgs(warmup_steps=10, max_steps=110, learning_rate=1e-3, min_lr=2e-3, out_dir=tmp_path / "run")
    with pytest.raises(UserError, match="--min_lr"):
        above.validate()


@pytest.mark.parametrize("warmup,max_steps,min_lr", [(10, 110, 1e-4), (3, 20, 0.0), (0, 7, 5e-4)])
def test_lr_factor_equals_torchs_linear_warmup_then_cosine_annealing(warmup, max_steps, min_lr):
    """torch.optim.lr_scheduler is the outside implementation: LinearLR from 1/(w+1) to 1 over w steps, then
    CosineAnnealingLR over the remaining max_steps − w steps down to eta_min = min_lr."""
    args = schedule(warmup, max_steps, 1e-3, min_lr)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps - warmup, eta_min=min_lr)
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
        reference = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
    else:
        reference = cosine
    for step in range(max_steps + 1):
        assert args.learning_rate * lr_factor(step, args) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                                           rel=1e-9, abs=1e-15), step
        optimizer.step()
        reference.step()


# ---- batch_indices ------------------------------------------------------------------------------------------


def take(n, micro_batch_size, world_size, rank, count, seed=7, start=0) -> list[list[int]]:
    return list(itertools.islice(batch_indices(n, micro_batch_size, world_size, rank, seed, start), count))


def test_every_sample_once_per_epoch_and_processes_never_share_one():
    n, m, W = 24, 2, 3  # 4 micro batches per process per epoch
    per_rank = [take(n, m, W, rank, count=8) for rank in range(W)]  # two epochs
    assert all(len(batch) == m for batches in per_rank for batch in batches)
    for epoch in (slice(0, 4), slice(4, 8)):
        seen = [i for batches in per_rank for batch in batches[epoch] for i in batch]
        assert sorted(seen) == list(range(n))  # each sample exactly once, across all processes
    first_epoch = [sum(batches[:4], []) for batches in per_rank]
    assert all(set(a).isdisjoint(b) for a, b in itertools.combinations(first_epoch, 2))
    order = [i for step in range(4) for rank in range(W) for i in per_rank[rank][step]]
    order_next = [i for step in range(4, 8) for rank in range(W) for i in per_rank[rank][step]]
    assert order != order_next  # each epoch is a fresh shuffle
    assert order != list(range(n))  # and a shuffle at all


def test_samples_that_do_not_fill_a_micro_batch_on_every_process_wait_for_the_next_epoch():
    n, m, W = 23, 2, 3  # 23 // 6 = 3 micro batches per process per epoch: 18 samples, 5 left out
    epoch = [i for rank in range(W) for batch in take(n, m, W, rank, count=3) for i in batch]
    assert len(epoch) == len(set(epoch)) == 18 and set(epoch) <= set(range(n))


def test_one_process_sees_the_same_samples_in_the_same_order_as_w_processes_together():
    n, m, W = 24, 2, 3
    alone = take(n, m, 1, 0, count=2 * n // m)  # two epochs on one process
    together = [take(n, m, W, rank, count=2 * n // (m * W)) for rank in range(W)]
    assert alone == [together[rank][step] for step in range(2 * n // (m * W)) for rank in range(W)]


@pytest.mark.parametrize("start", [0, 3, 4, 9])  # inside the first epoch, at an epoch boundary, in the third
def test_a_resume_at_position_k_continues_the_uninterrupted_stream(start):
    n, m, W = 24, 2, 3
    for rank in range(W):
        uninterrupted = take(n, m, W, rank, count=start + 6)
        assert take(n, m, W, rank, count=6, start=start) == uninterrupted[start:]


def test_the_seed_decides_the_order():
    assert take(24, 2, 1, 0, count=12, seed=1) == take(24, 2, 1, 0, count=12, seed=1)
    assert take(24, 2, 1, 0, count=12, seed=1) != take(24, 2, 1, 0, count=12, seed=2)


def test_fewer_samples_than_one_micro_batch_on_every_process_is_a_user_error():
    with pytest.raises(UserError, match="fewer than one micro batch"):
        take(5, 2, 3, 0, count=1)
