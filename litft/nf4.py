"""4-bit NormalFloat (NF4) weights, the storage format of QLoRA — Dettmers et al. 2023, https://arxiv.org/abs/2305.14314

Pretrained weights are close to normally distributed, so NF4 spends its 16 levels where a normal distribution
puts its mass: the levels are quantiles of N(0, 1), scaled to [−1, 1], with an exact zero.

    code      8 positive levels: the quantiles Φ⁻¹(p) at p evenly spaced from 0.5 to δ = 1 − ½(1/30 + 1/32) ≈ 0.9677,
              7 negative levels from 0.5 to δ on the other side (the asymmetry buys the exact 0), divided by Φ⁻¹(δ)
    quantize  cut the flattened weight into blocks of 64; per block keep s = max |w| (the absmax, fp32) and, per
              element, the index of the level nearest w / s: 4 bits, two to a byte (the first in the high nibble)
    weight    ŵ = code[index] · s, computed again (in the compute dtype) every time the layer runs

Double quantization stores the absmaxes themselves in 8 bits: their mean is subtracted, and the rest is cut
into blocks of 256, each with an fp32 scale of its own and one byte per absmax on the "dynamic" 8-bit code of
Dettmers 2022 (https://arxiv.org/abs/2110.02861): a sign, a run of zero bits that sets a power of ten, and a
linear fraction, so that small and large absmaxes keep the same relative precision.

Memory, Llama-2-7B: the linear layers of the 32 blocks hold 32 · (4 · 4096² + 3 · 4096 · 11008) = 6.48 B weights.
In bf16 that is 12.96 GB. In NF4: 6.48 B · 4 bits = 3.24 GB, plus one fp32 absmax per 64 weights, 405 MB
(0.5 bits per weight); double quantization makes that one byte per 64 weights plus one fp32 per 16,384: 101 MB
+ 1.6 MB (0.127 bits per weight). The embedding and lm_head (2 · 32000 · 4096) stay in bf16, 524 MB. So the
frozen model takes ~4.2 GB in NF4 (~3.9 GB with double quantization) instead of 13.5 GB, plus the workspace its
largest layer is rebuilt in (below: 45 M weights · 8 bytes in bf16, 0.36 GB); LoRA's A and B come on top in full
precision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from litft.errors import UserError

SCHEMES = {"nf4": False, "nf4-dq": True}  # the --quantize names -> whether the absmaxes are double-quantized
BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmaxes per scale, with double quantization
ZERO = 7  # the index of the level 0: what an odd-sized weight's last nibble holds


def check_scheme(scheme: str | None, flag: str = "--quantize") -> None:
    if scheme is not None and scheme not in SCHEMES:
        raise UserError(f"{flag} {scheme}: choose {' or '.join(SCHEMES)} (4-bit NormalFloat; the second also stores "
                        "its scales in 8 bits)")


@functools.cache
def nf4_code() -> Tensor:
    """The 16 NF4 levels, ascending, from −1 to 1 with an exact 0 (see above). float32 (16,)."""
    delta = 1 - 0.5 * (1 / 30 + 1 / 32)  # 0.9677083: where the outermost levels sit
    normal_quantile = torch.special.ndtri  # Φ⁻¹
    positive = normal_quantile(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels > 0
    negative = -normal_quantile(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels < 0
    levels = torch.cat((negative, torch.zeros(1, dtype=torch.float64), positive)).sort().values
    return (levels / levels.abs().max()).float()


@functools.cache
def dynamic_code() -> Tensor:
    """The signed dynamic 8-bit code: 256 levels, ascending, in [−1, 1]. float32 (256,).

    For e = 0 … 6 the levels 10^(e − 6) · m, where m runs over the 2^e midpoints of [0.1, 1] cut into 2^e equal
    steps: more fraction levels where the exponent leaves more bits. Both signs (2 · 127
    levels), then 0 and 1: all 256 byte values."""
    levels = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2
        levels += (10.0 ** (e - 6) * mids).tolist() + (-(10.0 ** (e - 6)) * mids).tolist()
    levels += [0.0, 1.0]
    levels += [0.0] * (256 - len(levels))
    return torch.tensor(sorted(levels), dtype=torch.float32)


def quantize_blocks(x: Tensor, code: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Flattened x in blocks of `block` -> (index of the nearest level of `code` per element (uint8), absmax per
    block (fp32)). The last block is padded with zeros."""
    flat = x.detach().float().flatten()
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % block)).view(-1, block)  # (n_blocks, block)
    absmax = flat.abs().amax(dim=1)  # (n_blocks,)
    scaled = flat / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    midpoints = (code[1:] + code[:-1]) / 2  # a value is nearest to level i when it falls between midpoints i-1, i
    index = torch.bucketize(scaled, midpoints.to(scaled.device))  # (n_blocks, block)
    return index.to(torch.uint8).flatten()[: x.numel()], absmax


def dequantize_blocks(index: Tensor, absmax: Tensor, code: Tensor, block: int) -> Tensor:
    """code[index] · absmax of the index's block, flattened, fp32."""
    values = code.to(absmax.device)[index.long()]  # (n,)
    values = torch.nn.functional.pad(values, (0, -values.numel() % block)).view(-1, block) * absmax[:, None]
    return values.flatten()[: index.numel()]


@dataclass
class NF4Weight:
    """A weight matrix in NF4: the packed 4-bit indices and the per-block absmaxes (or their 8-bit form)."""

    packed: Tensor  # uint8 (ceil(n / 2),): two indices per byte, the first in the high nibble
    shape: torch.Size
    absmax: Tensor  # fp32 (n_blocks,), or with double quantization uint8 indices into dynamic_code()
    absmax_scale: Tensor | None = None  # fp32 (ceil(n_blocks / 256),): double quantization only
    absmax_offset: Tensor | None = None  # fp32 (1,): the mean absmax, subtracted before double quantization

    @classmethod
    def quantize(cls, weight: Tensor, double: bool = False) -> "NF4Weight":
        index, absmax = quantize_blocks(weight, nf4_code(), BLOCK)  # (n,), (n_blocks,)
        packed = pack(index, fill=ZERO)
        if not double:
            return cls(packed, weight.shape, absmax)
        offset = absmax.mean().reshape(1)
        absmax_index, scale = quantize_blocks(absmax - offset, dynamic_code(), ABSMAX_BLOCK)
        return cls(packed, weight.shape, absmax_index, scale, offset)

    def block_absmax(self) -> Tensor:
        if self.absmax_scale is None:
            return self.absmax
        return dequantize_blocks(self.absmax, self.absmax_scale, dynamic_code(), ABSMAX_BLOCK) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype = torch.float32, workspace: "Workspace | None" = None) -> Tensor:
        """ŵ = code[index] · absmax, in `dtype`, with the original shape: a new tensor, or with a workspace a view
        of its memory, valid until the workspace's next use.

        One lookup per byte rather than per index: a byte holds two indices, so a table of the 256 possible
        bytes' level pairs, each pair one 64-bit entry, turns the packed weight into its levels in one gather
        (on a (1536, 576) weight, 2 CPU threads: 0.32 ms, against 0.82 ms from a (256, 2) table and 1.4 ms
        unpacking the nibbles and looking each up)."""
        n, device = self.shape.numel(), self.packed.device
        space = workspace or Workspace()  # a fresh one allocates new tensors, which the caller then owns
        index = space.tensor("index", self.packed.shape, torch.int32, device).copy_(self.packed)  # (bytes,)
        pairs = space.tensor("levels", self.packed.shape, torch.int64, device)  # (bytes,)
        levels = torch.index_select(byte_levels(device), 0, index, out=pairs).view(torch.float32)  # (2·bytes,)
        if levels.numel() % BLOCK:  # a last block shorter than 64
            levels = torch.nn.functional.pad(levels, (0, -levels.numel() % BLOCK))
        levels = levels.view(-1, BLOCK).mul_(self.block_absmax()[:, None])  # (n_blocks, 64)
        weight = levels.flatten()[:n].view(self.shape)  # fp32
        return weight if dtype == torch.float32 else space.tensor("weight", self.shape, dtype, device).copy_(weight)

    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Workspace:
    """Memory that the NF4 layers of one model rebuild their weights in, each in turn, reused from one matmul to
    the next. Layers run one at a time and are done with their ŵ before the next one starts, so the model holds
    one layer's rebuilding memory (its largest layer's: the bytes as int32 indices, the fp32 levels and, in 16
    bits, ŵ again: 6 or 8 bytes a weight, which litft/memory.py counts with the weights) instead of allocating
    fresh tensors for every matmul: on a CPU, freeing those back and forth among a step's activations leaves
    glibc's heap fragmented and resident (see bench/RESULTS.md)."""

    def __init__(self) -> None:
        self.slots: dict[str, Tensor] = {}

    def tensor(self, slot: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor in `slot`'s memory, which grows to the largest shape asked for."""
        nbytes = shape.numel() * dtype.itemsize
        memory = self.slots.get(slot)
        if memory is None or memory.numel() < nbytes or memory.device != device:
            memory = self.slots[slot] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return memory[:nbytes].view(dtype).view(shape)


@functools.cache
def byte_levels(device: torch.device) -> Tensor:
    """(256,) int64: the two fp32 NF4 levels a packed byte stands for, high nibble first, as the bits of one 64-bit
    entry, so that a gather copies a whole pair at once. Cached, like the codes (litft/memory.py builds them
    before its fake-tensor probe, so that the cache holds real tensors)."""
    code = nf4_code().to(device)
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)  # (256, 2) fp32
    return pairs.view(torch.int64).flatten()


def pack(index: Tensor, fill: int = 0) -> Tensor:
    """4-bit indices (n,) -> bytes (ceil(n / 2),): element 2i in the high nibble, 2i + 1 in the low one; an odd n
    is padded with `fill`."""
    index = torch.nn.functional.pad(index, (0, index.numel() % 2), value=fill).view(-1, 2)
    return (index[:, 0] << 4) | index[:, 1]


def unpack(packed: Tensor, n: int) -> Tensor:
    """The inverse of pack: (ceil(n / 2),) bytes -> (n,) indices."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=1).flatten()[:n]
