"""The key/value cache of generation: each layer's keys and values of the tokens seen so far, kept by position.

Without it, every new token would run the whole sequence through the model again. With it, a decoding step runs
one token per row: its keys and values are written at its position, and its query attends over everything cached
(litft/model.py's Attention). The cache is static, allocated for a number of positions up front, so a step
allocates nothing; `grow` makes room for more when a sequence outruns it.

    k, v    (B, n_query_groups, S, head_size) each: S positions for each of the B rows of the batch

Batched decoding (litft/batch_generate.py) also reshapes the batch as it runs: `extend` appends the rows of
sequences that join it, `keep` drops the rows of those that ended.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from litft.config import Config


class Positions(NamedTuple):
    """Where a forward pass's tokens go in the cache. `end` is read from the device once per forward pass, by the
    model: reading it in every layer would make the host wait for the GPU there, 30 times a step on a 30-layer
    model, and the GPU would then wait in turn for the host to queue the next layer's work."""

    index: Tensor  # (T,), or (B, T): a position per row
    end: int  # index.max() + 1: the positions attention reads, 0..end-1


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_length: int, config: Config, device, dtype) -> None:
        super().__init__()
        shape = (batch_size, config.n_query_groups, max_seq_length, config.head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def length(self) -> int:
        """S, the positions there is room for."""
        return self.k.size(2)

    def update(self, positions: Positions, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nkv, T, hs) at the positions; return the cache up to the last one, (B, nkv, end, hs)."""
        pos = positions.index
        if pos.dim() == 1:
            self.k.index_copy_(2, pos, k.to(self.k.dtype))
            self.v.index_copy_(2, pos, v.to(self.v.dtype))
        else:  # row b's tokens go to its own positions pos[b]
            rows = torch.arange(pos.size(0), device=pos.device)[:, None]  # (B, 1)
            self.k[rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed as (B, T, nkv, hs)
            self.v[rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:, :, :positions.end], self.v[:, :, :positions.end]

    def grow(self, length: int) -> None:
        """Room for `length` positions, those cached kept: (B, nkv, S, hs) -> (B, nkv, max(S, length), hs)."""
        if length > self.length:
            pad = (0, 0, 0, length - self.length)  # zeros after the last position
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)

    def extend(self, other: "KVCache") -> None:
        """Append other's rows after ours; the longer of the two lengths is kept."""
        length = max(self.length, other.length)
        self.grow(length)
        other.grow(length)
        self.k, self.v = torch.cat((self.k, other.k)), torch.cat((self.v, other.v))

    def copy_start(self, other: "KVCache", rows: Tensor) -> None:
        """Our row b's first positions become other's row rows[b], all of other's positions (rows sharing a start,
        litft/shared_prefix.py: past a row's own start they are padding, overwritten before a mask shows them)."""
        n = other.length
        self.k[:, :, :n], self.v[:, :, :n] = other.k[rows], other.v[rows]

    def keep(self, rows: Tensor) -> None:
        """Keep these rows of the batch, in this order (the others have finished)."""
        self.k, self.v = self.k[rows], self.v[rows]
