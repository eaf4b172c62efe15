"""LLaMA-Adapter V2, Gao et al. 2023 — https://arxiv.org/abs/2304.15010

V1's gated adaption prompt (litft/adapter.py) touches only attention in the top layers. V2 unlocks more of
the model, still cheaply, with "bias tuning": every linear layer y = W x (Llama's have no bias) gets a
trainable per-output bias b and scale s, and every RMSNorm's weight becomes trainable:

    y = s ⊙ (W x + b)          W frozen;  s = 1, b = 0 at init, so the model starts as the base model

(Qwen2's q, k and v already have a frozen bias b₀; there y = s ⊙ (W x + b₀ + b).)

Trainable parameters, for the linear layers' output widths d_out and the norms' widths:

    prompts and gates (v1)  +  2 × Σ d_out (q, k, v, o, gate, up, down in every layer, and lm_head)
                            +  (2 × n_layer + 1) × C  (attn_norm and mlp_norm per layer, the final norm)

Llama-2-7B, L = 10, start_layer = 2: 1,229,760 + 2 × (32 × 42,496 + 32,000) + 65 × 4,096 = 4,279,744, about
4.3 M. The output head's bias and scale are 64,000 of them: a per-token shift and
stretch of the logits.

The frozen W keeps its state-dict name (`q_proj.weight`, ...), so a base lit checkpoint loads into an adapted
model unchanged, and the run saves only prompts, gates, s, b and the norms.

Merging into a plain checkpoint is not exact and is not offered: s ⊙ (W x + b) = (diag(s) W) x + s ⊙ b folds the
scale into W's rows, but a bias-free Llama layer has no place for s ⊙ b, and the adaption prompt is an extra
attention path a plain Llama does not have. Serve a V2 run with generate/adapter_v2.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from litft.adapter import AdapterConfig, add_adapter, check_method_file, is_adapter_key, mark_only_adapter_trainable
from litft.model import Llama

FILE = "adapter_v2.yaml"  # the run's AdapterV2Config
WEIGHTS = "lit_model_adapter_v2.pth"  # the run's trained tensors


@dataclass(frozen=True)
class AdapterV2Config(AdapterConfig):
    """The same fields as v1 (prompt_length, start_layer), saved as adapter_v2.yaml."""

    FILE: ClassVar[str] = FILE


class ScaledLinear(nn.Module):
    """y = s ⊙ (W x + b₀ + b) around an nn.Linear's frozen weight W (d_out, d_in) and bias b₀ (Qwen2's q, k, v;
    None elsewhere)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        w = base.weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = w  # the same Parameter under the same name: base checkpoints load as before
        self.register_parameter("bias", base.bias)  # frozen b₀, or None
        self.adapter_bias = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=w.dtype))
        self.adapter_scale = nn.Parameter(torch.ones(self.out_features, device=w.device, dtype=w.dtype))

    def forward(self, x: Tensor) -> Tensor:  # (..., d_in) -> (..., d_out)
        return self.scale_and_shift(F.linear(x, self.weight, self.bias))  # W x (+ b₀): autocast's dtype, if on

    def scale_and_shift(self, y: Tensor) -> Tensor:  # s ⊙ (y + b), in y's dtype: s and b may be fp32 master weights
        return (self.adapter_scale * (y + self.adapter_bias)).to(y.dtype)

    def reset_parameters(self) -> None:  # for the adapter's own parameters only; W comes from the checkpoint
        nn.init.zeros_(self.adapter_bias)
        nn.init.ones_(self.adapter_scale)


def add_adapter_v2(model: Llama, config: AdapterV2Config) -> Llama:
    """V1's prompts, plus s and b on every linear layer; trainable: those and the norms. Returns the model."""
    add_adapter(model, config)
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, ScaledLinear(child))
    model.lm_head = ScaledLinear(model.lm_head)  # with tied embeddings W stays the embedding matrix
    mark_only_adapter_v2_trainable(model)
    return model


def is_adapter_v2_key(name: str) -> bool:
    """Prompts and gates, every linear layer's adapter_bias/adapter_scale, every RMSNorm weight."""
    return is_adapter_key(name) or name.endswith((".adapter_bias", ".adapter_scale", "norm.weight"))


def mark_only_adapter_v2_trainable(model: nn.Module) -> None:
    mark_only_adapter_trainable(model, is_adapter_v2_key)


def adapter_v2_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The V2 tensors only: what a fine-tuning run saves as lit_model_adapter_v2.pth."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_v2_key(k)}


def load_adapter_v2_state_dict(model: Llama, state_dict: dict[str, Tensor], source: Path) -> None:
    """Load a file saved by `adapter_v2_state_dict` into a model that went through `add_adapter_v2`."""
    check_method_file(model, state_dict, source, is_adapter_v2_key, v2=True)
    model.load_state_dict(state_dict, strict=False)
