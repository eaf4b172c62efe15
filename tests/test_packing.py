"""Packing (litft/packing.py and `packed_pos` in litft/model.py): several samples in one row, each token's loss what
it is unpacked.

Truth: transformers' Llama on each sample alone. The per-token losses of a packed batch must equal those; a
token that could see another sample, or a position that did not restart, would change them.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_lora import tiny_pair
from test_train import finetune, history, tiny  # noqa: F401  (tiny is a fixture)

from litft.data import collate as pad_collate
from litft.fast.chunked_loss import chunked_lm_loss
from litft.loss import IGNORE_INDEX, causal_lm_loss, shift_labels
from litft.packing import collate, pack

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


def test_rows_hold_whole_samples_in_order_and_mask_each_start():
    data = samples()
    rows = pack(data, max_seq_length=48)
    assert [len(r["input_ids"]) for r in rows] == [43, 48, 9]  # 40+3 | 17+6+25 | 9
    assert torch.equal(torch.cat([r["input_ids"] for r in rows]), torch.cat([s["input_ids"] for s in data]))
    starts = torch.cat([r["packed_pos"] for r in rows]) == 0
    assert starts.sum() == len(data)
    labels = torch.cat([r["labels"] for r in rows])
    assert (labels[starts] == IGNORE_INDEX).all()
    assert torch.equal(labels[~starts], torch.cat([s["labels"][1:] for s in data]))


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
    k, compared = 0, 0
    for r, row in enumerate(rows):  # the samples, in order, fill the rows
        start = 0
        while start < len(row["input_ids"]):
            n = len(data[k]["input_ids"])
            trained = shift_labels(data[k]["labels"][None])[0] != IGNORE_INDEX  # (n,)
            torch.testing.assert_close(packed[r, start:start + n][trained], unpacked[k][trained], atol=1e-5, rtol=0)
            compared, start, k = compared + int(trained.sum()), start + n, k + 1
    assert compared == sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in data)


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
