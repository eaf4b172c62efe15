"""Low-Rank Adaptation (LoRA), Hu et al. 2021 — https://arxiv.org/abs/2106.09685

A frozen weight W (d_out × d_in) gets a trainable low-rank update:

    h = W x + (α / r) · B A x          A: r × d_in,  B: d_out × r,  r ≪ min(d_in, d_out)

A starts kaiming-uniform (PEFT's default; the paper draws it from a Gaussian) and B at zero, so B A = 0 and at
step 0 the model is exactly the pretrained one; only A and B are trained and saved. In training the branch reads
dropout(x), the frozen path x itself: h = W x + (α / r) · B A dropout(x).

rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by α / √r instead, so the update's size
does not shrink as r grows. Each adapted layer adds r · (d_in + d_out) parameters. Llama-2-7B (width 4096, MLP
11008, 32 layers) at r = 8 on q and v: 32 · 2 · 8 · (4096 + 4096) = 4,194,304; on all seven linear layers (q, k,
v, o, gate, up, down): 32 · 8 · (4 · 8192 + 3 · 15104) = 19,988,480 — 0.3 % of 6.7 B, about 40 MB in bf16.

An embedding (V × C) is adapted the same way with A: r × V looked up by token id and B: C × r; as in PEFT, A
starts at zero and B random (still B A = 0), and no dropout is applied to token ids.

LoRALinear and LoRAEmbedding keep the frozen `weight` under its own name, so a base checkpoint loads into a LoRA
model unchanged (tied embed and lm_head still share it); the new tensors are `lora_A` and `lora_B`. New tokens
(`new_tokens`) add trainable rows to embed and lm_head, saved next to A and B: litft/new_rows.py.

Merging folds W' = W + (α / r) · B A (and appends new rows): a plain Llama, no extra inference cost; on tied
embed or lm_head it *unties* them (exact). QLoRA keeps W in 4 bits: litft/qlora.py. Training runs
litft/fast/fused_lora.py by default (the same value at dropout 0; with dropout, layers reading one input share its
mask: fast/lora_dropout.py), fp32 generation merges, and `--fast false` runs this code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from litft.errors import UserError
from litft.files import read_settings, write_settings
from litft.model import Llama
from litft.new_rows import GrownEmbedding, GrownLinear, new_token_rows

FILE = "lora.yaml"  # the run's LoRAConfig
WEIGHTS = "lit_model_lora.pth"  # the run's trained tensors: A, B (and new-token rows)
LINEAR = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
TARGETS = (*LINEAR, "embed", "lm_head")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LINEAR))  # all linear layers of the blocks
    rslora: bool = False  # scale by α/√r instead of α/r
    new_tokens: list[str] = field(default_factory=list)  # tokens appended to the vocabulary (litft/new_tokens.py)
    quantize: str | None = None  # the base's frozen weights were stored in NF4 in training (QLoRA: litft/qlora.py)

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise UserError(f"unknown LoRA target {', '.join(map(repr, unknown))}; choose among {', '.join(TARGETS)}")
        if not self.targets:
            raise UserError(f"LoRA needs at least one target among {', '.join(TARGETS)}")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UserError(f"LoRA needs r ≥ 1, alpha > 0 and 0 ≤ dropout < 1 (got r={self.r}, alpha={self.alpha}, "
                            f"dropout={self.dropout})")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def save(self, directory: Path) -> None:
        write_settings(Path(directory) / FILE, self)

    @classmethod
    def from_dir(cls, directory: Path) -> "LoRAConfig":
        return read_settings(cls, Path(directory) / FILE, f"{directory} has no {FILE}; pass the {WEIGHTS} inside "
                             "the run's out_dir")


class LoRALinear(nn.Linear):
    """h = W x + (α/r) · B A dropout(x), with W (and a bias b, if the layer has one) frozen."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: keys and tying unchanged
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_in) -> (B, T, d_out)
        frozen = F.linear(x, self.weight, self.bias)  # W x (+ b)
        update = self.dropout(x) @ self.lora_A.T @ self.lora_B.T  # (B, T, d_in) -> (B, T, r) -> (B, T, d_out)
        return frozen + self.scaling * update

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with W' = W + (α/r) · B A; self is left unchanged."""
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (d_out, d_in)
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
        plain.bias = self.bias
        return plain


class LoRAEmbedding(nn.Embedding):
    """e = W[idx] + (α/r) · (A.T[idx]) B.T, with W frozen: A (r, V) is looked up by token id, B is (C, r)."""

    def __init__(self, base: nn.Embedding, config: LoRAConfig) -> None:
        super().__init__(base.num_embeddings, base.embedding_dim, padding_idx=base.padding_idx, device="meta")
        self.weight = w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(config.r, self.num_embeddings, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.embedding_dim, config.r, device=w.device, dtype=w.dtype))
        nn.init.normal_(self.lora_B)
        self.scaling = config.scaling

    def forward(self, idx: Tensor) -> Tensor:  # (B, T) -> (B, T, C)
        frozen = F.embedding(idx, self.weight, self.padding_idx)
        update = F.embedding(idx, self.lora_A.T) @ self.lora_B.T  # (B, T, r) -> (B, T, C)
        return frozen + self.scaling * update

    def merge(self) -> nn.Embedding:
        """A plain nn.Embedding with W' = W + (α/r) · (B A).T; self is left unchanged."""
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float()).T  # (V, C)
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device="meta")
        plain.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
        return plain


# LoRA on lm_head or embed together with new-token rows (litft/new_rows.py): the rows follow the LoRA layer's.
class GrownLoRALinear(GrownLinear, LoRALinear):
    def __init__(self, base: nn.Linear, config: LoRAConfig, new_rows: nn.Parameter) -> None:
        LoRALinear.__init__(self, base, config)
        self.new_rows = new_rows

    def merged_weight(self) -> Tensor:
        return LoRALinear.merge(self).weight


class GrownLoRAEmbedding(GrownEmbedding, LoRAEmbedding):
    def __init__(self, base: nn.Embedding, config: LoRAConfig, new_rows: nn.Parameter) -> None:
        LoRAEmbedding.__init__(self, base, config)
        self.new_rows = new_rows

    def merged_weight(self) -> Tensor:
        return LoRAEmbedding.merge(self).weight


def add_lora(model: Llama, config: LoRAConfig) -> Llama:
    """Replace the targeted layers with their LoRA versions (same frozen weights), add the new-token rows, and
    leave exactly those trainable. In place; returns the model."""
    if any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules()):
        raise ValueError("the model already has LoRA layers")
    for block in model.blocks:
        for target in (t for t in LINEAR if t in config.targets):
            block.set_submodule(LINEAR[target], LoRALinear(block.get_submodule(LINEAR[target]), config))
    embed_rows, head_rows = new_token_rows(model, len(config.new_tokens))
    if "embed" in config.targets:
        model.embed = LoRAEmbedding(model.embed, config) if embed_rows is None else \
            GrownLoRAEmbedding(model.embed, config, embed_rows)
    elif embed_rows is not None:
        model.embed = GrownEmbedding(model.embed, embed_rows)
    if "lm_head" in config.targets:
        model.lm_head = LoRALinear(model.lm_head, config) if head_rows is None else \
            GrownLoRALinear(model.lm_head, config, head_rows)
    elif head_rows is not None:
        model.lm_head = GrownLinear(model.lm_head, head_rows)
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad = is_lora_key(name)
    return model.train(model.training)  # new layers follow the model's train/eval mode


def is_lora_key(name: str) -> bool:
    """A, B and new-token rows: the tensors a LoRA run trains and saves."""
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "new_rows")


def lora_state_dict(model: Llama) -> dict[str, Tensor]:
    """Exactly the LoRA tensors (A, B and new-token rows); tied new rows are stored once, as embed's."""
    return {name: p.detach() for name, p in model.named_parameters() if is_lora_key(name)}


def merge_lora(model: Llama) -> Llama:
    """Fold every LoRA layer (and new rows) into the weights, in place: the same model, now a plain Llama."""
    cfg = model.config
    adapted_io = any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in (model.embed, model.lm_head))
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, LoRAEmbedding, GrownLinear, GrownEmbedding)):
            model.set_submodule(name, module.merge())
    tied = cfg.tie_embeddings and not adapted_io  # embed and lm_head still hold the same values
    if tied:
        model.lm_head.weight = model.embed.weight  # one Parameter again (new rows appended to both alike)
    model.config = replace(cfg, vocab_size=model.embed.num_embeddings, tie_embeddings=tied)
    return model
