"""Low-Rank Adaptation (LoRA), Hu et al. 2021 — https://arxiv.org/abs/2106.09685

A frozen weight W (d_out × d_in) gets a trainable low-rank update:

    h = W x + (α / r) · B A x          A: r × d_in,  B: d_out × r,  r ≪ min(d_in, d_out)

A starts kaiming-uniform and B at zero, so B A = 0 and at step 0 the model is exactly the pretrained one;
only A and B are trained and saved; in training the branch reads dropout(x) (litft/lora_dropout.py).
rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by α / √r instead of α / r, so the
update's size does not shrink as r grows.

Parameter count: each adapted layer adds r · (d_in + d_out). Llama-2-7B (width 4096, MLP 11008, 32 layers)
at r = 8 on q and v: 32 · 2 · 8 · (4096 + 4096) = 4,194,304; on all seven linear layers (q, k, v, o, gate, up,
down): 32 · 8 · (4 · 8192 + 3 · 15104) = 19,988,480 — 0.3 % of 6.7 B, about 40 MB in bf16.

An embedding (V × C) is adapted the same way with A: r × V looked up by token id and B: C × r; as in PEFT, A
starts at zero and B random (still B A = 0), and no dropout is applied to token ids.

LoRALinear and LoRAEmbedding subclass nn.Linear / nn.Embedding and keep the frozen `weight` under its own name,
so a base lit checkpoint loads into a LoRA model unchanged; the new tensors are `lora_A` and `lora_B`.
With tied embeddings (SmolLM2) the wrapped embed and lm_head still share one frozen Parameter.

New tokens (e.g. Llama-2's 32,000 → 32,004 special tokens): `new_tokens` in the config appends one trainable
row per token to the embedding and to lm_head (`new_rows`, initialised to the mean embedding, Hewitt 2021);
the frozen rows keep their shape. Only the new rows are saved, next to A and B; with tied embeddings both
layers share the one `new_rows`.

Merging folds W' = W + (α / r) · B A (and appends new rows), leaving a plain Llama with no extra inference cost.
With tied embeddings, a merged LoRA on embed or lm_head gives the two uses different weights: merging then
*unties* them (the merged config says tie_embeddings: false), which is exact for both.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch import Tensor

from litft.errors import UserError
from litft.files import atomic_write_text, read_yaml_mapping
from litft.lora_dropout import lora_dropout
from litft.model import Llama

FILE = "lora.yaml"
WEIGHTS = "lit_model_lora.pth"
LINEAR = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
TARGETS = (*LINEAR, "embed", "lm_head")
SAME_INPUT = {"q": "attn", "k": "attn", "v": "attn", "gate": "mlp", "up": "mlp"}  # layers that read one tensor


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LINEAR))  # all linear layers of the blocks
    rslora: bool = False  # scale by α/√r instead of α/r
    new_tokens: list[str] = field(default_factory=list)  # special tokens appended to the vocabulary

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
        atomic_write_text(Path(directory) / FILE, yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def from_dir(cls, directory: Path) -> "LoRAConfig":
        path = Path(directory) / FILE
        d = read_yaml_mapping(path, f"{directory} has no {FILE}; pass the lit_model_lora.pth inside the run's out_dir")
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise UserError(f"{path} should map LoRA settings ({', '.join(sorted(known))})")
        return cls(**d)


class LoRALinear(nn.Linear):
    """y = W x + (α/r) · B A x, with W frozen. Optionally extra output rows (lm_head for new tokens)."""

    def __init__(self, base: nn.Linear, config: LoRAConfig, lora: bool = True, new_rows: nn.Parameter | None = None,
                 dropout: nn.Module | None = None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: keys and tying unchanged
        w, r = base.weight, config.r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype)) if lora else None
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype)) if lora else None
        if lora:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = config.scaling
        self.dropout = dropout if dropout is not None else lora_dropout(config.dropout)  # add_lora may share one
        self.new_rows = new_rows  # (n_new, d_in) or None

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, d_in)
        if self.lora_A is None:
            out = F.linear(x, self.weight, self.bias)  # (B, T, d_out), frozen
        else:  # scale the small (B, T, r) product; the frozen matmul then adds W x onto B A x in the same GEMM
            delta = (self.dropout(x) @ self.lora_A.T * self.scaling) @ self.lora_B.T  # (B,T,r) -> (B,T,d_out)
            out = torch.addmm(delta.flatten(0, -2), x.flatten(0, -2), self.weight.T).view(delta.shape)
            out = out if self.bias is None else out + self.bias
        if self.new_rows is not None:
            out = torch.cat((out, F.linear(x, self.new_rows)), dim=-1)  # (B, T, d_out + n_new)
        return out

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with W' = W + (α/r) · B A (and the new rows appended); self is left unchanged."""
        weight = self.weight
        if self.lora_A is not None:
            delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (d_out, d_in)
            weight = (weight.float() + delta).to(weight.dtype)
        if self.new_rows is not None:
            weight = torch.cat((weight, self.new_rows.to(weight.dtype)))  # (d_out + n_new, d_in)
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = nn.Parameter(weight.detach(), requires_grad=False), self.bias
        return plain


class LoRAEmbedding(nn.Embedding):
    """e = W[idx] + (α/r) · (A.T[idx]) B.T, with W frozen. Ids ≥ V (new tokens) look up `new_rows`."""

    def __init__(self, base: nn.Embedding, config: LoRAConfig, lora: bool = True, new_rows: nn.Parameter | None = None):
        super().__init__(base.num_embeddings, base.embedding_dim, padding_idx=base.padding_idx, device="meta")
        self.weight = base.weight
        w, r = base.weight, config.r
        self.lora_A = nn.Parameter(torch.zeros(r, self.num_embeddings, device=w.device, dtype=w.dtype)) if lora else None
        self.lora_B = nn.Parameter(torch.empty(self.embedding_dim, r, device=w.device, dtype=w.dtype)) if lora else None
        if lora:
            nn.init.normal_(self.lora_B)
        self.scaling = config.scaling
        self.new_rows = new_rows  # (n_new, C) or None

    def forward(self, idx: Tensor) -> Tensor:  # idx: (B, T)
        V = self.num_embeddings
        old = idx.clamp(max=V - 1) if self.new_rows is not None else idx
        out = F.embedding(old, self.weight, self.padding_idx)  # (B, T, C), frozen
        if self.lora_A is not None:
            out = out + self.scaling * (F.embedding(old, self.lora_A.T) @ self.lora_B.T)  # (B,T,r) -> (B,T,C)
        if self.new_rows is not None:
            new = F.embedding((idx - V).clamp(min=0), self.new_rows)  # (B, T, C)
            out = torch.where((idx >= V).unsqueeze(-1), new.to(out.dtype), out)
        return out

    def merge(self) -> nn.Embedding:
        """A plain nn.Embedding with W' = W + (α/r) · (B A).T (and the new rows appended)."""
        weight = self.weight
        if self.lora_A is not None:
            delta = self.scaling * (self.lora_B.float() @ self.lora_A.float()).T  # (V, C)
            weight = (weight.float() + delta).to(weight.dtype)
        if self.new_rows is not None:
            weight = torch.cat((weight, self.new_rows.to(weight.dtype)))  # (V + n_new, C)
        plain = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=self.padding_idx, device="meta")
        plain.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return plain


def add_lora(model: Llama, config: LoRAConfig) -> Llama:
    """Replace the targeted layers of `model` in place with their LoRA versions (same frozen weights)."""
    if any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules()):
        raise ValueError("the model already has LoRA layers")
    for block in model.blocks:
        targets = [t for t in LINEAR if t in config.targets]
        groups = Counter(SAME_INPUT.get(t, t) for t in targets)  # one dropout per input tensor: q, k, v share one
        dropouts = {group: lora_dropout(config.dropout, readers) for group, readers in groups.items()}
        for t in targets:
            sub, name = LINEAR[t].split(".")
            parent, drop = getattr(block, sub), dropouts[SAME_INPUT.get(t, t)]
            setattr(parent, name, LoRALinear(getattr(parent, name), config, dropout=drop))
    embed_rows = head_rows = None
    if config.new_tokens:  # new rows start at the mean embedding / mean output row
        n, w = len(config.new_tokens), model.embed.weight
        embed_rows = nn.Parameter(w.detach().float().mean(0).expand(n, -1).clone().to(w.dtype))  # (n, C)
        head_rows = embed_rows if model.config.tie_embeddings else nn.Parameter(
            model.lm_head.weight.detach().float().mean(0).expand(n, -1).clone().to(w.dtype))
    if "embed" in config.targets or embed_rows is not None:
        model.embed = LoRAEmbedding(model.embed, config, "embed" in config.targets, embed_rows)
    if "lm_head" in config.targets or head_rows is not None:
        model.lm_head = LoRALinear(model.lm_head, config, "lm_head" in config.targets, head_rows)
    return model.train(model.training)  # new layers follow the model's train/eval mode


def is_lora_key(name: str) -> bool:
    """A, B and new-token rows: the tensors a LoRA run trains and saves."""
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "new_rows")


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad = is_lora_key(name)


def lora_state_dict(model: Llama) -> dict[str, Tensor]:
    """Exactly the LoRA tensors (A, B and new-token rows); a tied lm_head's new rows are stored once, as embed's."""
    tied = isinstance(model.lm_head, LoRALinear) and model.lm_head.new_rows is not None and \
        isinstance(model.embed, LoRAEmbedding) and model.lm_head.new_rows is model.embed.new_rows
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k) and not (tied and k == "lm_head.new_rows")}


def merge_lora(model: Llama) -> Llama:
    """Fold every LoRA layer into its weight, in place; returns the same model, now a plain Llama."""
    cfg = model.config
    adapted_io = any(getattr(m, "lora_A", None) is not None for m in (model.embed, model.lm_head))
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.merge())
    tied = cfg.tie_embeddings and not adapted_io  # embed and lm_head still hold the same values
    if tied:
        model.lm_head.weight = model.embed.weight  # one Parameter again (new rows appended to both alike)
    vocab = model.embed.num_embeddings
    model.config = replace(cfg, vocab_size=vocab, tie_embeddings=tied)
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
