"""A weight layout for decoding on a CPU: every fp32 weight reordered once, for oneDNN's matrix kernels.

Decoding multiplies a few rows (one per sequence of the batch, one for plain generation) by every weight matrix
of the model: y = x Wᵀ with x of shape (rows, d_in). A library multiplying matrices first lays W out in the
blocked order its kernels read; `nn.Linear` hands W over as it is stored, (d_out, d_in), in every call.

`PackedLinear` does the reordering once, when the model is prepared:

    packed = reorder(W)                         oneDNN's blocked layout for W (torch.ops.mkldnn._reorder_linear_weight)
    y = oneDNN_linear(x, packed) (+ b)          (..., d_in) -> (..., d_out)

torch.compile's CPU freezing pass uses the same two ops for 16-bit weights. The arithmetic is y = x Wᵀ;
only the order of the additions inside each dot product differs (results agree to ~1e-6 relative). With the
torch 2.13 CPU build on a 2-core AMD EPYC (AVX-512), over 30 distinct weights per shape so that they stream
from memory as in a model, fp32 `F.linear` on SmolLM2-135M's shapes ran at 6–9 GFLOP/s for one row and
65–120 for 32 rows; the packed layout at 10–20 and 145–290. Greedy decoding of one sequence ran 1.8× faster
than with `nn.Linear` (`python bench/cpu_linear.py`; bench/RESULTS.md, "The CPU layout, packed for oneDNN"). Where
torch was built without oneDNN, layers are left as they are.

`prepare_for_cpu_decoding(model)` swaps every plain fp32 `nn.Linear` of a CPU model for a `PackedLinear`, in
place, freeing each original weight once its copy exists — except a tied output head's, which is still the
embedding (SmolLM2-135M: 113 MB more). The model is then for generation only: the swapped weights are no
longer parameters, so it can be neither trained nor saved (saving raises). `for_generation` (litft/fast) merges an
fp32 LoRA first, so that its layers are plain `nn.Linear` too; other wrapped layers (LoRA unmerged, LLaMA-Adapter
v2's scaled layers) keep their own products, and the plain `nn.Linear` inside them (a served LoRA's base
weight, litft/multi_lora.py) is swapped.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class PackedLinear(nn.Module):
    """y = x Wᵀ (+ b) with W kept in oneDNN's blocked layout, reordered once."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())  # (d_out, d_in), blocked
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.register_state_dict_pre_hook(refuse_to_save)

    def forward(self, x: Tensor) -> Tensor:  # (..., d_in) -> (..., d_out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def refuse_to_save(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    raise RuntimeError(f"{prefix or 'this layer'} holds its weight in the CPU decoding layout, which is not "
                       "saved; save the model before prepare_for_cpu_decoding")


def uses_cpu_layout(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether prepare_for_cpu_decoding converts weights on this device in this dtype: fp32 on a CPU, where torch
    has oneDNN.

    for_generation loads such weights into memory instead of memory-mapping them (load_lit_model's mmap=False),
    so that each original is freed as soon as its copy exists."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def prepare_for_cpu_decoding(model: nn.Module) -> nn.Module:
    """Swap every plain fp32 CPU `nn.Linear` in `model` for a `PackedLinear`, in place.

    GPU and 16-bit layers are left as they are; calling it twice changes nothing more. Returns the same model.
    """
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and uses_cpu_layout(m.weight.device, m.weight.dtype)]
    for name in names:  # one at a time, so each old weight can be freed as soon as its copy exists
        model.set_submodule(name, PackedLinear(model.get_submodule(name)))
    return model
