"""Packing (litft/packing.py and `packed_pos` in litft/model.py): several samples in one row, each token's loss what
it is unpacked.

Truth: transformers' Llama on each sample alone. The per-token losses of a packed batch must equal those; a
token that could see another sample, or a position that did not restart, would change them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script
from test_lora import tiny_pair
from test_train import finetune, history, tiny  # noqa: F401  (tiny is a fixture)

from litft.data import collate as pad_collate
from litft.data import cut
from litft.fast.chunked_loss import chunked_lm_loss
from litft.loss import IGNORE_INDEX, causal_lm_loss, shift_labels
from litft.model import additive_mask
from litft.packing import best_fit_decreasing, collate, pack

transformers = pytest.importorskip("transformers")


def samples(lengths=(40, 3, 17, 6, 25, 9), seed: int = 3) -> list[dict]:
    torch.manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(2, 256, (n,))
        labels = ids.clone()
        labels[: n // 3] = IGNORE_INDEX  # a masked prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def pieces(rows: list[dict]) -> list[tuple[int, int, int]]:
    """(row, start, length) of each sample in packed rows, read from packed_pos alone (a sample starts at 0)."""
    out = []
    for r, row in enumerate(rows):
        starts = (row["packed_pos"] == 0).nonzero().flatten().tolist() + [len(row["packed_pos"])]
        out += [(r, a, b - a) for a, b in zip(starts, starts[1:])]
    return out


def where_each_sample_is(data: list[dict], rows: list[dict]) -> list[tuple[int, int, int]]:
    """(row, start, length) of data[k], for each k, found by its tokens; fails unless each is there once, whole."""
    found = {tuple(rows[r]["input_ids"][a:a + n].tolist()): (r, a, n) for r, a, n in pieces(rows)}
    assert len(found) == len(pieces(rows)) == len(data)
    return [found[tuple(s["input_ids"].tolist())] for s in data]


def test_rows_hold_each_sample_once_whole_and_mask_each_start():
    data = samples()
    rows = pack(data, max_seq_length=48)
    assert [len(r["input_ids"]) for r in rows] == [43, 48, 9]  # 40+3 | 25+17+6 | 9: longest first, tightest fit
    for s, (r, a, n) in zip(data, where_each_sample_is(data, rows)):
        assert n == len(s["input_ids"])
        labels = rows[r]["labels"][a:a + n]
        assert labels[0] == IGNORE_INDEX and torch.equal(labels[1:], s["labels"][1:])
        assert torch.equal(rows[r]["packed_pos"][a:a + n], torch.arange(n))


def test_the_worked_example_of_the_docstring():
    assert best_fit_decreasing([90, 70, 60, 50, 40, 30], 128) == [[0, 5], [1, 3], [2, 4]]


def best_fit_by_scanning(lengths: list[int], capacity: int) -> list[int]:
    """Reference: the rows' lengths when each sample, longest first, goes to the fullest row it fits (every row
    scanned)."""
    rows: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [r for r, used in enumerate(rows) if used + n <= capacity]
        if fits:
            best = max(fits, key=lambda r: rows[r])
            rows[best] += n
        else:
            rows.append(n)
    return sorted(rows)


@pytest.mark.parametrize("capacity,longest", [(128, 97), (64, 64), (512, 900)])
def test_random_lengths_fill_rows_as_a_full_scan_would(capacity, longest):
    """Every sample in exactly one row, whole (cut to the row first); no row over capacity; the rows' lengths are
    those of a best fit that scans every row (rows with equal room are interchangeable, so this pins the rule)."""
    torch.manual_seed(capacity)
    data = samples(lengths=torch.randint(8, longest + 1, (300,)).tolist())  # 8+ random tokens: none alike
    rows = pack(data, max_seq_length=capacity)
    cut_data = [dict(zip(("input_ids", "labels"), cut(s["input_ids"], s["labels"], capacity))) for s in data]
    where_each_sample_is(cut_data, rows)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    assert lengths[-1] <= capacity
    assert lengths == best_fit_by_scanning([len(s["input_ids"]) for s in cut_data], capacity)


def in_order_rows(lengths: list[int], capacity: int) -> list[int]:
    """Reference: rows filled in sample order (what litft did before), as the rows' lengths."""
    rows = [0]
    for n in lengths:
        if rows[-1] and rows[-1] + n > capacity:
            rows.append(0)
        rows[-1] += n
    return rows


def padding_share(row_lengths: list[int], micro_batch_size: int = 4) -> float:
    """Padding's share of micro batches of randomly drawn rows, each padded to its longest (as litft/train.py
    counts it)."""
    order = torch.randperm(len(row_lengths), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [[row_lengths[i] for i in order[k:k + micro_batch_size]]
               for k in range(0, len(order) - micro_batch_size + 1, micro_batch_size)]
    return 1 - sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)


@pytest.fixture(scope="module")
def games_train(tmp_path_factory, smollm2_gguf) -> Path:
    """data/games/train.pt as `python data_prep/games.py` writes it; prepared here when the checkout has none."""
    path = Path(__file__).resolve().parents[1] / "data" / "games" / "train.pt"
    if path.is_file():
        return path
    from litft.gguf import metadata, open_gguf, tokenizer_files

    tmp = tmp_path_factory.mktemp("games")
    (tmp / "smollm2").mkdir()  # data preparation reads only the tokenizer
    for name, contents in tokenizer_files(metadata(open_gguf(smollm2_gguf))).items():
        (tmp / "smollm2" / name).write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    run_script("data_prep/games.py", "--checkpoint_dir", tmp / "smollm2", "--destination_path", tmp / "games",
               check=True)
    return tmp / "games" / "train.pt"


def test_on_the_games_data_rows_are_almost_full(games_train):
    """data/games (2700 real samples, 38-97 tokens) in rows of 128: in sample order 1663 rows, 17.9 % of the micro
    batches padding (the 17.1 % of the packed run in howto/train.md section 7); best fit 1333 rows, 5.0 %. The
    fewest possible rows is ceil(162112 / 128) = 1267."""
    data = torch.load(games_train, weights_only=True)
    rows = pack(data, max_seq_length=128)
    where_each_sample_is(data, rows)
    tokens = sum(len(s["input_ids"]) for s in data)
    ordered = in_order_rows([len(s["input_ids"]) for s in data], 128)
    assert len(ordered) == 1663 and len(rows) <= 11 / 9 * math.ceil(tokens / 128) + 1
    packed = padding_share([len(r["input_ids"]) for r in rows])
    assert padding_share(ordered) > 0.15 and packed < 0.06


def test_packing_52000_samples_is_fast():
    lengths = torch.randint(20, 512, (52_000,), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    rows = best_fit_decreasing(lengths, 512)
    assert time.perf_counter() - start < 2  # ~0.04 s here; a scan over every row would take minutes
    assert sorted(i for row in rows for i in row) == list(range(52_000))


def per_token_losses(logits, labels):  # (B, T, V), (B, T) -> (B, T): position t's loss for labels[t + 1]
    targets = shift_labels(labels)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


@pytest.mark.parametrize("packed_forward", ["forward", "hidden_states"])
def test_packed_per_token_losses_equal_each_sample_alone_in_transformers(packed_forward):
    hf, ours = tiny_pair("tiny-gqa")
    data = samples()
    rows = pack(data, max_seq_length=48)
    x, y, pos = collate(rows, pad_id=0)
    with torch.no_grad():
        if packed_forward == "forward":
            logits = ours(x, packed_pos=pos)
        else:
            logits = ours.lm_head(ours.hidden_states(x, packed_pos=pos))
        packed = per_token_losses(logits, y)  # (rows, T)
        unpacked = [per_token_losses(hf(s["input_ids"][None]).logits, s["labels"][None])[0] for s in data]
    compared = 0
    for k, (r, start, n) in enumerate(where_each_sample_is(data, rows)):
        trained = shift_labels(data[k]["labels"][None])[0] != IGNORE_INDEX  # (n,)
        torch.testing.assert_close(packed[r, start:start + n][trained], unpacked[k][trained], atol=1e-5, rtol=0)
        compared += int(trained.sum())
    assert compared == sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in data)


def test_packed_rows_under_bf16_autocast_keep_each_sample_apart():
    """--precision bf16-mixed: the mask is built in autocast's dtype (attention would reject an fp32 one given
    bf16 queries, or copy it in every layer). The losses stay those of each sample alone, within bf16 rounding."""
    hf, ours = tiny_pair("tiny-gqa")
    data = samples()
    rows = pack(data, max_seq_length=48)
    x, y, pos = collate(rows, pad_id=0)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            packed = per_token_losses(ours(x, packed_pos=pos).float(), y)  # (rows, T)
        unpacked = [per_token_losses(hf(s["input_ids"][None]).logits, s["labels"][None])[0] for s in data]
    for k, (r, start, n) in enumerate(where_each_sample_is(data, rows)):
        # bf16 moves these losses by < 2e-3; a sample that sees the one before it moves them by ~0.1
        torch.testing.assert_close(packed[r, start:start + n], unpacked[k], atol=1e-2, rtol=0)


def test_the_shared_mask_is_the_boolean_one_with_rows_aligned_for_cuda():
    """13 positions: the float mask is 0 where the boolean one allows and -inf elsewhere, and its rows start every
    16 entries. CUDA's memory-efficient attention copies a mask whose strides are not multiples of 8 into a padded
    one, in every layer (preprocess_mask in torch's attention.cpp), undoing the sharing."""
    allowed = torch.rand(2, 1, 13, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    mask = additive_mask(allowed, like=torch.zeros(1))
    assert mask.shape == allowed.shape and mask.stride() == (13 * 16, 13 * 16, 16, 1)  # rows of 16, cut to 13
    assert torch.equal(mask == 0, allowed) and bool((mask[~allowed] == float("-inf")).all())


def test_without_packed_pos_later_samples_see_earlier_ones():
    """The same packed rows run as one sequence each: every sample after a row's first gets other losses."""
    _, ours = tiny_pair("tiny-gqa")
    x, y, pos = collate(pack(samples(), max_seq_length=48), pad_id=0)
    with torch.no_grad():
        right, wrong = per_token_losses(ours(x, packed_pos=pos), y), per_token_losses(ours(x), y)
    later = (pos.cumsum(1) > 0) & ((pos == 0).cumsum(1) > 1) & (shift_labels(y) != IGNORE_INDEX)
    assert later.any() and ((right - wrong).abs()[later] > 1e-4).all()


@pytest.mark.parametrize("loss_fn", [causal_lm_loss, chunked_lm_loss], ids=["plain", "fast"])
def test_the_loss_of_packed_rows_is_the_mean_over_the_same_trained_tokens(loss_fn):
    """Both losses of the loop, on packed rows, equal transformers' loss of the samples in one padded batch."""
    hf, ours = tiny_pair("tiny-gqa")
    data = samples()
    x, y, pos = collate(pack(data, max_seq_length=48), pad_id=0)
    xu, yu = pad_collate(data, pad_id=0)
    with torch.no_grad():
        expected = hf(input_ids=xu, labels=yu).loss
        torch.testing.assert_close(loss_fn(ours, x, y, packed_pos=pos), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_packed_run_trains(tiny, tmp_path):
    out = tmp_path / "run"
    proc = finetune(tiny, out, "--packing", "true", "--max_seq_length", "40", "--max_steps", "8")
    assert "packing: 108 samples in" in proc.stderr and "rows of up to 40 tokens" in proc.stderr
    losses = [h["train_loss"] for h in history(out) if "train_loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["padding_share"] < 0.2
