"""QLoRA: LoRA on a base whose frozen weights are stored in 4 bits — Dettmers et al. 2023, https://arxiv.org/abs/2305.14314

LoRA (litft/lora.py) trains A and B and only ever reads W. QLoRA therefore stores every frozen linear weight of
the blocks in NF4 (litft/nf4.py: 4 bits per weight and a scale per 64) and rebuilds it, in the compute dtype,
each time a matmul needs it:

    h = Ŵ x + (α/r) · B A dropout(x)          Ŵ = dequantize(NF4(W)), one layer's at a time, in the compute dtype

Gradients reach A, B and x (through Ŵᵀ in the backward pass, which dequantizes W once more) but never Ŵ, so the
4-bit weights need neither gradients nor optimizer state. The embedding, lm_head and the norms stay in full
precision: a small share of a large model, and the most sensitive to rounding.

LLaMA-Adapter (v1, v2) trains on a 4-bit base the same way, since it too only reads W: v1's prompts add no layer,
and v2's scale and shift wrap each NF4 layer as they wrap a Linear, s ⊙ (Ŵ x + b) (ScaledNF4Linear below).

What trains on Ŵ learns to correct Ŵ, not W. A run trained on a 4-bit base is therefore always used with Ŵ:
served in 4 bits (--quantize nf4), served with Ŵ dequantized into full precision (the default: the same function,
more memory), or, for LoRA, merged as W' = Ŵ + (α/r)·B A (scripts/merge_lora.py).

Memory, Llama-2-7B (the arithmetic is in litft/nf4.py): the frozen model takes ~3.9 GB in NF4 instead of 13.5 GB
in bf16; the LoRA tensors, their gradients and AdamW's two moments come on top in full precision.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from litft.adapter_v2 import ScaledLinear
from litft.errors import UserError
from litft.lora import LoRAConfig, LoRALinear
from litft.model import Llama
from litft.nf4 import SCHEMES, NF4Weight, Workspace, check_scheme


class FrozenNF4Matmul(torch.autograd.Function):
    """x Ŵᵀ (+ add, summed inside the one GEMM), with Ŵ dequantized again for the backward pass instead of saved:
    autograd would otherwise keep every layer's full-precision Ŵ from its forward pass until its backward pass —
    the memory QLoRA exists to save. Each time, Ŵ is rebuilt in the workspace all NF4 layers of the model share
    (litft/nf4.py Workspace)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "NF4Linear", add: Tensor | None) -> Tensor:  # (..., d_in) -> (..., d_out)
        ctx.layer = layer
        w = layer.rebuilt(x.dtype)  # (d_out, d_in)
        if add is None:
            return x @ w.T
        return torch.addmm(add.flatten(0, -2), x.flatten(0, -2), w.T).view(add.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, Tensor | None]:  # dL/dx = dL/dh Ŵ, dL/d(add) = dL/dh
        return grad @ ctx.layer.rebuilt(grad.dtype), None, grad if ctx.needs_input_grad[2] else None


class NF4Linear(nn.Module):
    """A frozen linear layer, y = Ŵ x (+ b), with W stored in NF4.

    Its tensors are Parameters that need no gradient rather than buffers, so that FSDP shards them across
    processes like the weights they replace. The fp32 ones (absmaxes, their scales) are kept as their bits in
    int32, so that converting the model to bf16 (--precision bf16-true) leaves them exact."""

    def __init__(self, linear: nn.Linear, double: bool, workspace: Workspace) -> None:
        super().__init__()
        self.workspace = workspace  # shared by the model's NF4 layers: where Ŵ is rebuilt for each matmul
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q = NF4Weight.quantize(linear.weight, double=double)
        self.nf4 = frozen(q.packed)  # uint8 (d_out · d_in / 2,)
        self.absmax = frozen(q.absmax if double else as_bits(q.absmax))  # (d_out · d_in / 64,)
        self.absmax_scale = frozen(as_bits(q.absmax_scale)) if double else None
        self.absmax_offset = frozen(as_bits(q.absmax_offset)) if double else None
        self.bias = linear.bias  # frozen b (Qwen2's q, k, v), or None
        # Ŵ is rebuilt eagerly even inside a compiled block: compiled, the byte-pair gather made a CPU step 8× slower
        # (bench run 14). Wrapped here, not by a decorator on the class, so that importing this module does not
        # import torch._dynamo (~2 s at the start of every command, quantized or not).
        self.eager_rebuild = torch.compiler.disable(NF4Linear.rebuild)

    def stored(self) -> NF4Weight:
        absmax = self.absmax if self.absmax_scale is not None else as_fp32(self.absmax)
        return NF4Weight(self.nf4, torch.Size((self.out_features, self.in_features)), absmax,
                         as_fp32(self.absmax_scale), as_fp32(self.absmax_offset))

    def dequantize(self, dtype: torch.dtype) -> Tensor:  # Ŵ: (d_out, d_in), a tensor of its own
        return self.stored().dequantize(dtype)

    def rebuild(self, dtype: torch.dtype) -> Tensor:  # Ŵ: (d_out, d_in), valid until the next layer's matmul
        return self.stored().dequantize(dtype, self.workspace)

    def rebuilt(self, dtype: torch.dtype) -> Tensor:  # rebuild, never compiled
        return self.eager_rebuild(self, dtype)

    def forward(self, x: Tensor, add: Tensor | None = None) -> Tensor:  # Ŵ x (+ add) (+ b): (..., d_in) -> (..., d_out)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = FrozenNF4Matmul.apply(x.to(dtype), self, None if add is None else add.to(dtype))
        return y if self.bias is None else y + self.bias.to(dtype)

    def dequantized(self, dtype: torch.dtype) -> nn.Linear:
        """A plain nn.Linear holding Ŵ: the same function in full precision."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        plain.bias = self.bias
        return plain


class QLoRALinear(NF4Linear):
    """h = Ŵ x + (α/r) · B A dropout(x): a LoRALinear (litft/lora.py) whose frozen W is stored in NF4. A and B keep
    their names, so a QLoRA run saves, loads and exports its LoRA tensors as any LoRA run does."""

    def __init__(self, lora: LoRALinear, double: bool, workspace: Workspace) -> None:
        super().__init__(lora, double, workspace)
        self.lora_A, self.lora_B, self.scaling, self.dropout = lora.lora_A, lora.lora_B, lora.scaling, lora.dropout

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_in) -> (B, T, d_out)
        u = self.dropout(x) @ self.lora_A.T * self.scaling  # (B, T, r): the scale on the small tensor
        return super().forward(x, add=u @ self.lora_B.T)  # Ŵ x + (α/r) · B A dropout(x), summed in Ŵ x's GEMM

    def dequantized(self, dtype: torch.dtype) -> LoRALinear:
        """The LoRALinear over Ŵ with the same A, B, scaling and dropout."""
        lora = LoRALinear(super().dequantized(dtype), LoRAConfig(r=self.lora_A.shape[0]))
        lora.lora_A, lora.lora_B, lora.scaling, lora.dropout = self.lora_A, self.lora_B, self.scaling, self.dropout
        return lora


class ScaledNF4Linear(NF4Linear):
    """y = s ⊙ (Ŵ x + b₀ + b): adapter v2's ScaledLinear (litft/adapter_v2.py) whose frozen W is stored in NF4. s and b
    keep their names, so the run saves and loads them as any adapter v2 run does."""

    def __init__(self, scaled: ScaledLinear, double: bool, workspace: Workspace) -> None:
        super().__init__(scaled, double, workspace)
        self.adapter_bias, self.adapter_scale = scaled.adapter_bias, scaled.adapter_scale

    scale_and_shift = ScaledLinear.scale_and_shift

    def forward(self, x: Tensor) -> Tensor:  # (..., d_in) -> (..., d_out)
        return self.scale_and_shift(super().forward(x))

    def dequantized(self, dtype: torch.dtype) -> ScaledLinear:
        """The ScaledLinear over Ŵ with the same s and b."""
        scaled = ScaledLinear(super().dequantized(dtype))
        scaled.adapter_bias, scaled.adapter_scale = self.adapter_bias, self.adapter_scale
        return scaled


def quantize(model: Llama, scheme: str) -> Llama:
    """Store every linear weight of the blocks in NF4, frozen, in place: LoRALinear -> QLoRALinear, adapter v2's
    ScaledLinear -> ScaledNF4Linear, nn.Linear -> NF4Linear. A layer of another kind is refused."""
    check_scheme(scheme)
    workspace = Workspace()
    for block in model.blocks:
        for name, layer in list(block.named_modules()):
            if type(layer) is LoRALinear:
                replace(block, name, QLoRALinear(layer, SCHEMES[scheme], workspace))
            elif type(layer) is ScaledLinear:
                replace(block, name, ScaledNF4Linear(layer, SCHEMES[scheme], workspace))
            elif type(layer) is nn.Linear:
                replace(block, name, NF4Linear(layer, SCHEMES[scheme], workspace))
            elif isinstance(getattr(layer, "weight", None), nn.Parameter) and layer.weight.dim() == 2:
                raise UserError(f"--quantize {scheme} stores the blocks' linear layers in 4 bits, but {name} is a "
                                f"{type(layer).__name__}; quantize a base model, a full fine-tune, a LoRA or an "
                                "adapter run")
    return model


def dequantize(model: Llama) -> Llama:
    """Replace every NF4 layer by its full-precision form holding Ŵ (QLoRALinear -> LoRALinear), in place: the
    same function, in the dtype of the model's embedding."""
    dtype = model.embed.weight.dtype
    for block in model.blocks:
        for name, layer in list(block.named_modules()):
            if isinstance(layer, NF4Linear):
                replace(block, name, layer.dequantized(dtype))
    return model


def as_used(model: Llama, trained: str | None, requested: str | None) -> Llama:
    """The model as it is to be used, in place: its frozen weights in NF4 when `requested` (--quantize); else, for
    a LoRA or adapter trained on an NF4 base (`trained`), on Ŵ in full precision, the weights it learnt to correct."""
    check_scheme(requested)
    if trained is not None and requested not in (None, trained):
        raise UserError(f"this run was trained on an {trained} base: use it with --quantize {trained}, or without "
                        "--quantize for the same weights dequantized to full precision")
    if requested is not None:
        return quantize(model, requested)
    return dequantize(quantize(model, trained)) if trained is not None else model


def weight_count(model: nn.Module) -> int:
    """The model's parameters, an NF4 layer's counted as the d_out · d_in weights it stores (not its bytes)."""
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(p.numel() for p in model.parameters() if p.is_floating_point()) + \
        sum(m.in_features * m.out_features for m in nf4)


def replace(root: nn.Module, name: str, layer: nn.Module) -> None:
    root.set_submodule(name, layer.train(root.training))


def frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def as_bits(t: Tensor | None) -> Tensor | None:  # fp32 -> int32 holding the same 32 bits
    return None if t is None else t.view(torch.int32)


def as_fp32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.view(torch.float32)
