"""LoRA's layer (litft/lora.py) computed in fewer passes over memory, with one dropout mask per input tensor.

LoRALinear reads as its equation: W x + (α/r) · B A dropout(x), three matmuls, a scale and an add. FusedLoRALinear
computes the same value in another order:

    u = (dropout(x) A.T) · (α/r)                 (B, T, d_in) -> (B, T, r)     the scale on the small tensor
    h = addmm(u B.T, x, W.T)                     one GEMM computes x W.T and adds u B.T on the way out

so two (B, T, d_out) tensors are written (u B.T and the sum) where LoRALinear writes four (W x, B A x, its
scaled copy, the sum). The result agrees with LoRALinear to float rounding. Its dropout is a SharedDropout (litft/fast/lora_dropout.py):
q, k and v read the same tensor and get the same dropped copy, and so do gate and up.

`fuse_lora(model)` swaps every LoRALinear of the blocks for a FusedLoRALinear holding the same Parameters, so
state-dict keys, the optimizer's parameters and saved files do not change. QLoRA's layers keep their own
forward, whose matmul dequantizes the frozen weight and adds the update in the same GEMM, and get the shared
dropout too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from litft.fast.lora_dropout import SharedDropout
from litft.lora import LoRALinear
from litft.model import Llama
from litft.qlora import QLoRALinear

# The layers of a block that read one tensor: the attention input (q, k, v) and the MLP input (gate, up).
SAME_INPUT = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class FusedLoRALinear(LoRALinear):
    """LoRALinear's value, W x + (α/r) · B A dropout(x), with the frozen matmul adding the update in its GEMM."""

    @classmethod
    def from_lora(cls, layer: LoRALinear, dropout: nn.Module) -> "FusedLoRALinear":
        fused = cls.__new__(cls)
        nn.Linear.__init__(fused, layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        fused.weight, fused.bias = layer.weight, layer.bias
        fused.lora_A, fused.lora_B, fused.scaling, fused.dropout = layer.lora_A, layer.lora_B, layer.scaling, dropout
        return fused.train(layer.training)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_in) -> (B, T, d_out)
        u = self.dropout(x) @ self.lora_A.T * self.scaling  # (B, T, r)
        update = u @ self.lora_B.T  # (B, T, d_out)
        out = torch.addmm(update.flatten(0, -2), x.flatten(0, -2), self.weight.T).view(update.shape)
        return out if self.bias is None else out + self.bias.to(out.dtype)  # autocast's dtype, as F.linear gives


def fuse_lora(model: Llama) -> Llama:
    """Swap each block's LoRALinear layers for FusedLoRALinear, sharing dropout among layers with one input. A
    QLoRALinear (litft/qlora.py) keeps its layer, whose frozen matmul dequantizes, and gets the shared dropout."""
    for block in model.blocks:
        for part in ("attn", "mlp"):
            parent = block.get_submodule(part)
            adapted = {name: m for name, m in parent.named_children() if type(m) in (LoRALinear, QLoRALinear)}
            readers = [name for name in SAME_INPUT[part] if name in adapted]
            shared = shared_dropout(adapted[readers[0]].dropout, len(readers)) if readers else None
            for name, layer in adapted.items():
                dropout = shared if name in readers else shared_dropout(layer.dropout, 1)
                if type(layer) is QLoRALinear:
                    layer.dropout = dropout
                else:
                    setattr(parent, name, FusedLoRALinear.from_lora(layer, dropout))
    return model


def shared_dropout(dropout: nn.Module, readers: int) -> nn.Module:
    """The same probability as `dropout` (nn.Dropout or, for p = 0, nn.Identity), as a SharedDropout."""
    shared = SharedDropout(dropout.p, readers) if isinstance(dropout, nn.Dropout) else nn.Identity()
    return shared.train(dropout.training)  # in the mode of the model it joins
