"""Packing: several training samples in one row, so that a batch holds tokens instead of padding.

Instruction samples are short and uneven (data/games: 38–97 tokens, median 59), and a micro batch pads each to
its longest. Packing concatenates them, in their order, into rows of up to `max_seq_length` tokens:

    row        [ s1 s1 s1 s1 | s2 s2 s2 | s3 s3 s3 s3 s3 | pad ]
    packed_pos [ 0  1  2  3  | 0  1  2  | 0  1  2  3  4  | 0   ]     each token's position in its own sample
    labels     [ -  s1 s1 s1 | -  s2 s2 | -  s3 s3 s3 s3 | -   ]     (prompt tokens masked as before)

The model (litft/model.py, `packed_pos`) rotates each token by its position in its sample and lets it attend
only to the earlier tokens of that sample, so every token's loss is what it would be unpacked. The first label
of each sample is masked: unpacked, nothing predicts a sample's first token; packed, the previous sample's last
token would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from litft.data import cut
from litft.loss import IGNORE_INDEX


def pack(samples: list[dict], max_seq_length: int) -> list[dict]:
    """Samples (each cut to max_seq_length first) -> rows of whole samples, each row at most max_seq_length
    tokens, filled in order: a sample that does not fit in the current row starts the next one."""
    rows, current = [], []
    for s in samples:
        ids, labels = cut(s["input_ids"], s["labels"], max_seq_length)
        if current and sum(len(c[0]) for c in current) + len(ids) > max_seq_length:
            rows.append(join(current))
            current = []
        current.append((ids, labels))
    if current:
        rows.append(join(current))
    return rows


def join(samples: list[tuple[Tensor, Tensor]]) -> dict:
    labels = [torch.cat((torch.tensor([IGNORE_INDEX]), lab[1:])) for _, lab in samples]  # nothing predicts a start
    return {"input_ids": torch.cat([ids for ids, _ in samples]), "labels": torch.cat(labels),
            "packed_pos": torch.cat([torch.arange(len(ids)) for ids, _ in samples])}


def collate(rows: list[dict], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Packed rows -> (input_ids, labels, packed_pos), each (B, T), padded on the right to the longest row; each
    padding token is a one-token sample of its own (position 0) with no label."""
    T = max(len(r["input_ids"]) for r in rows)
    out = (torch.full((len(rows), T), pad_id), torch.full((len(rows), T), IGNORE_INDEX), torch.zeros(len(rows), T))
    for i, r in enumerate(rows):
        for tensor, key in zip(out, ("input_ids", "labels", "packed_pos")):
            tensor[i, : len(r[key])] = r[key]
    return out[0], out[1], out[2].long()
