"""NF4 storage (litft/nf4.py) against bitsandbytes' quantize_4bit / dequantize_4bit (nf4, block size 64), which runs
on a CPU: the same levels, the same bytes, the same absmaxes, the same dequantized weights."""

from __future__ import annotations

import pytest
import torch

from litft.nf4 import BLOCK, NF4Weight, dynamic_code, nf4_code, pack, unpack

bnb = pytest.importorskip("bitsandbytes.functional")


def test_the_levels_are_bitsandbytes_nf4_and_dynamic_codes():
    torch.testing.assert_close(nf4_code(), bnb.get_4bit_type("nf4", device="cpu"), atol=2e-7, rtol=0)
    code = nf4_code()
    assert code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1 and (code > 0).sum() == 8
    _, state = bnb.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(dynamic_code(), state.state2.code)


@pytest.mark.parametrize("double", [False, True], ids=["absmax-fp32", "double-quantized"])
@pytest.mark.parametrize("shape,dtype", [((96, 200), torch.float32), ((576, 1536), torch.bfloat16), ((7, 9), torch.float32)],
                         ids=["fp32", "bf16-smollm2-mlp", "odd-size"])
def test_bytes_absmax_and_weights_equal_bitsandbytes(shape, dtype, double):
    """The 4-bit bytes are bitsandbytes' exactly (odd sizes padded with the level 0, as it pads). The 8-bit absmax
    indices of double quantization are too, except where bitsandbytes' CPU search takes the farther of two
    neighbouring levels (13 of 6,912 in the bf16 case): there litft's index must be the nearer one."""
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = bnb.quantize_4bit(weight, blocksize=BLOCK, quant_type="nf4", compress_statistics=double)
    ours = NF4Weight.quantize(weight, double=double)
    assert torch.equal(ours.packed, packed.flatten())
    if double:
        assert torch.equal(ours.absmax_scale, state.state2.absmax)
        assert ours.absmax_offset.item() == pytest.approx(state.offset.item(), rel=1e-6)
        code, scale = dynamic_code(), ours.absmax_scale.repeat_interleave(256)[: ours.absmax.numel()]
        differ = code[ours.absmax.long()] * scale != code[state.absmax.long()] * scale  # the absmaxes they decode to
        assert differ.float().mean() < 0.005
        exact = NF4Weight.quantize(weight).absmax - ours.absmax_offset  # what the 8-bit indices stand for
        scaled = exact / scale
        ours_miss, their_miss = ((scaled - code[i.long()]).abs() for i in (ours.absmax, state.absmax))
        assert (ours_miss[differ] < their_miss[differ]).all()
        tolerance = (ours.block_absmax() - bnb.dequantize_blockwise(state.absmax, state.state2) - state.offset).abs()
        atol = tolerance.max().item() + 1e-6
    else:
        torch.testing.assert_close(ours.absmax, state.absmax.float(), atol=0, rtol=0)
        atol = 1e-6
    expected = bnb.dequantize_4bit(packed, state)
    assert expected.dtype == dtype
    torch.testing.assert_close(ours.dequantize(dtype).float(), expected.float(), atol=atol, rtol=1e-2 if dtype != torch.float32 else 1e-6)
    assert ours.dequantize().shape == weight.shape


def test_quantization_error_is_bounded_by_the_gaps_between_levels():
    """Every element lands on its nearest level: |w − ŵ| ≤ half the widest gap (0.16 of the block's absmax)."""
    torch.manual_seed(1)
    weight = torch.randn(64, 128)
    ours = NF4Weight.quantize(weight)
    half_gap = (nf4_code().diff().max() / 2).item()
    blocks = weight.flatten().view(-1, BLOCK)
    error = (ours.dequantize().flatten().view(-1, BLOCK) - blocks).abs()
    assert (error <= half_gap * blocks.abs().amax(dim=1, keepdim=True) + 1e-6).all()
    assert torch.equal(unpack(pack(torch.arange(16, dtype=torch.uint8)), 16), torch.arange(16, dtype=torch.uint8))


def test_storage_is_what_the_docstring_counts():
    """4 bits per weight + an fp32 absmax per 64 (4.5 bits), or + one byte per 64, an fp32 per 16,384 and the fp32
    mean (~4.127)."""
    weight = torch.randn(4096, 1024)
    n = weight.numel()
    assert NF4Weight.quantize(weight).nbytes() == n // 2 + 4 * n // 64
    assert NF4Weight.quantize(weight, double=True).nbytes() == n // 2 + n // 64 + 4 * n // (64 * 256) + 4
