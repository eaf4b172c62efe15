"""LLaMA-Adapter, Zhang et al. 2023 — https://arxiv.org/abs/2303.16199

The base model stays frozen. Each of the top layers (from `start_layer` up) gets a learnable *adaption
prompt* P: L rows of width C. The layer's queries also attend to the prompt, whose keys and values come from
the layer's own (frozen) projections, through a softmax of its own and a gate g that starts at zero:

    K_p = P W_k,  V_p = P W_v                              (L, C) -> (L, kv heads · hs)
    S_t = softmax(q Kᵀ / √hs + causal mask)               (T, T)  the layer's ordinary attention
    S_p = softmax(q K_pᵀ / √hs)                            (T, L)  attention to the prompt
    out = S_t V + g · S_p V_p                              per head, before the output projection

With g = 0 the layer is exactly the pretrained one, so training starts from the base model and the prompt's
influence grows only as fast as the gate learns it is useful ("zero-init attention"). The prompt has no
position: RoPE rotates the queries but not the prompt's keys, and every token sees all L prompt rows. Those
keys and values depend on weights only, so the KV cache needs nothing extra; they are recomputed each call
(an L-row matmul, negligible) instead of cached, so training and decoding share one code path. With grouped-
query attention the prompt's keys/values have n_query_groups heads, shared by query heads like K and V are.

The gate g is one number per attention head (as in the authors' code and lit-llama), so each head decides
how much of the prompt it lets in; it multiplies the prompt's attention as it is, as lit-llama's and peft's
AdaptionPrompt do (the authors' code applies tanh(g): the same near zero, bounded by ±1; peft keeps one gate per
layer). L here is the prompt length: the paper writes K for it, and L for the number of adapted layers.
The trainable parameters are

    (n_layer − start_layer) × (L × C + n_head)

Llama-2-7B, L = 10, start_layer = 2: 30 × (10 × 4096 + 32) = 1,229,760 — the paper's "1.2 M" (its count is
the prompts, 1,228,800; the 960 gates round away).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from litft.errors import UserError
from litft.files import read_settings, write_settings
from litft.model import Attention, Llama

FILE = "adapter.yaml"  # the run's AdapterConfig
WEIGHTS = "lit_model_adapter.pth"  # the run's trained tensors


@dataclass(frozen=True)
class AdapterConfig:
    """prompt_length: L, rows of the adaption prompt per layer. start_layer: the first layer that gets one.
    quantize: nf4 or nf4-dq when the frozen base was stored in 4 bits in training (litft/qlora.py)."""

    prompt_length: int = 10
    start_layer: int = 2
    quantize: str | None = None
    FILE: ClassVar[str] = FILE

    def __post_init__(self) -> None:
        if self.prompt_length <= 0:
            raise UserError(f"--prompt_length must be at least 1, got {self.prompt_length} (the paper uses 10)")
        if self.start_layer < 0:
            raise UserError(f"--start_layer must be >= 0, got {self.start_layer}")

    def check(self, n_layer: int) -> None:
        if self.start_layer >= n_layer:
            raise UserError(f"--start_layer {self.start_layer} leaves no layer to adapt: the model has {n_layer} "
                            f"layers; pass --start_layer {n_layer - 1} or less")

    def save(self, run_dir: Path) -> None:
        write_settings(Path(run_dir) / self.FILE, self)

    @classmethod
    def from_dir(cls, run_dir: Path):
        return read_settings(cls, Path(run_dir) / cls.FILE, f"{run_dir} has no {cls.FILE}; pass a weights file that "
                             "sits in its fine-tuning run directory")


class AdaptionPrompt(nn.Module):
    """One layer's prompt P (L, C) and per-head gate g (n_head,); the `Attention.prefix` hook."""

    def __init__(self, length: int, n_embd: int, n_head: int, device=None, dtype=None) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(length, n_embd, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.empty(n_head, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.prompt)  # unit scale, like the normalised hidden states the projections expect
        nn.init.zeros_(self.gate)  # zero-init attention: the model starts as the base model

    def forward(self, attn: Attention, q: Tensor) -> Tensor:  # q: (B, nh, T, hs), already rotated
        L, B = self.prompt.size(0), q.size(0)
        k = attn.k_proj(self.prompt).view(1, L, attn.n_kv, attn.head_size).transpose(1, 2)  # (1, nkv, L, hs)
        v = attn.v_proj(self.prompt).view(1, L, attn.n_kv, attn.head_size).transpose(1, 2)  # (1, nkv, L, hs)
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        # Every query sees every prompt row (no mask), in a softmax separate from the ordinary attention.
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=attn.n_kv != attn.n_head)  # (B, nh, T, hs)
        return (self.gate.view(1, -1, 1, 1) * y).to(y.dtype)  # the gate may be an fp32 master weight (mixed precision)


def add_adapter(model: Llama, config: AdapterConfig) -> Llama:
    """Give layers start_layer.. an adaption prompt; freeze everything else. Returns the same model."""
    config.check(model.config.n_layer)
    for block in model.blocks[config.start_layer:]:
        w = block.attn.q_proj.weight
        block.attn.prefix = AdaptionPrompt(config.prompt_length, model.config.n_embd, model.config.n_head,
                                           device=w.device, dtype=w.dtype)
    mark_only_adapter_trainable(model)
    return model


def is_adapter_key(name: str) -> bool:
    """State-dict and parameter names of the adapter: blocks.<i>.attn.prefix.{prompt,gate}."""
    return ".attn.prefix." in name


def mark_only_adapter_trainable(model: nn.Module, is_trainable: Callable[[str], bool] = is_adapter_key) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = is_trainable(name)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors only: what a fine-tuning run saves as lit_model_adapter.pth."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def load_adapter_state_dict(model: Llama, state_dict: dict[str, Tensor], source: Path) -> None:
    """Load a file saved by `adapter_state_dict` into a model that went through `add_adapter`."""
    check_method_file(model, state_dict, source, is_adapter_key)
    model.load_state_dict(state_dict, strict=False)


def check_method_file(model: Llama, state_dict: dict[str, Tensor], source: Path, is_key: Callable[[str], bool],
                      v2: bool = False) -> None:
    """One-line errors for a weights file that belongs to another method or another model."""
    check_not_other_method(state_dict, source, v2)
    method = "LLaMA-Adapter v2" if v2 else "LLaMA-Adapter"
    if foreign := [n for n in state_dict if not is_key(n)]:
        raise UserError(f"{source} holds {foreign[0]!r}, which is not a {method} weight; is it from another method?")
    widths = {t.shape[-1] for n, t in state_dict.items() if n.endswith(".prefix.prompt")}
    if widths and widths != {model.config.n_embd}:
        raise UserError(f"{source} was trained on a model of width {min(widths)}, but {model.config.name or 'this model'} "
                        f"has width {model.config.n_embd}; pass the --checkpoint_dir it was trained on")
    expected = {k: v for k, v in model.state_dict().items() if is_key(k)}
    for name, tensor in state_dict.items():
        if name not in expected:
            raise UserError(f"{source} has {name!r}, which this model lacks ({model.config.n_layer} layers, adapted "
                            "from the run's start_layer); pass the --checkpoint_dir it was trained on")
        if tensor.shape != expected[name].shape:
            raise UserError(f"{source}: {name} has shape {tuple(tensor.shape)} but this model expects "
                            f"{tuple(expected[name].shape)}; the file does not match its run's config")
    if missing := [n for n in expected if n not in state_dict]:
        raise UserError(f"{source} lacks {len(missing)} of this model's {method} tensors (first: {missing[0]}); "
                        "is it from another run or method?")


def check_not_other_method(state_dict: dict[str, Tensor], source: Path, v2: bool = False) -> None:
    """Cheap checks on the names alone, before any model is built."""
    method = "LLaMA-Adapter v2" if v2 else "LLaMA-Adapter"
    if any("lora_" in n for n in state_dict):
        raise UserError(f"{source} holds LoRA weights, not {method} weights; serve it with generate/lora.py --lora_path")
    if any(n.endswith(("adapter_wte.weight", "gating_factor")) for n in state_dict):
        raise UserError(f"{source} is a LLaMA-Adapter file in lit-llama's or LitGPT's naming (adapter_wte, "
                        "gating_factor); litft reads the files its own runs save (blocks.*.attn.prefix.*)")
    if not any(is_adapter_key(n) for n in state_dict):
        raise UserError(f"{source} holds no adaption prompt (blocks.*.attn.prefix.*), so it is not a {method} file; "
                        "a full fine-tune is served by generate/full.py")
    has_v2 = any(n.endswith(".adapter_scale") for n in state_dict)
    if has_v2 and not v2:
        raise UserError(f"{source} holds LLaMA-Adapter v2 weights; serve it with generate/adapter_v2.py")
    if v2 and not has_v2:
        raise UserError(f"{source} holds LLaMA-Adapter v1 weights; serve it with generate/adapter.py")
