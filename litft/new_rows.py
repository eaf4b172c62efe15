"""New tokens, the model side: trainable rows appended to the embedding and to the output layer.

A run may add tokens to the vocabulary (markers that structure a task's data; the Anyscale Llama-2 study grew
32,000 to 32,004). The tokenizer side is litft/new_tokens.py: token i gets id V + i. Here the model gets one
new row per token in the embedding (V × C -> (V + n) × C) and in the output layer (C -> V + n logits):

    embed(id) = W[id] if id < V else new_rows[id − V]
    logits    = [W_head h | new_rows h]              (B, T, V) and (B, T, n) -> (B, T, V + n)

The V pretrained rows stay frozen and keep their shape, so the base checkpoint loads unchanged; only the n new
rows train and are saved (`embed.new_rows`, `lm_head.new_rows`). They start at the mean of the pretrained
rows, which keeps the new tokens' initial probabilities in line with the others (Hewitt 2021,
https://nlp.stanford.edu/~johnhew/vocab-expansion.html). With tied embeddings both layers share the one
`new_rows`, saved once as embed's.

GrownEmbedding and GrownLinear extend whatever layer they grow through `super()`: a plain layer here, a LoRA
layer in litft/lora.py (GrownLoRAEmbedding, GrownLoRALinear). Merging appends the rows to the (merged) weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from litft.model import Llama


def new_token_rows(model: Llama, n: int) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """Rows for `n` new tokens (embedding's, output layer's), each starting at its layer's mean row; with tied
    embeddings the two are one Parameter. (None, None) when n is 0."""
    if n == 0:
        return None, None
    embed_rows = _mean_rows(model.embed.weight, n)
    head_rows = embed_rows if model.config.tie_embeddings else _mean_rows(model.lm_head.weight, n)
    return embed_rows, head_rows


def _mean_rows(weight: Tensor, n: int) -> nn.Parameter:
    mean = weight.detach().float().mean(0)  # (C,)
    return nn.Parameter(mean.expand(n, -1).clone().to(weight.dtype))  # (n, C)


class GrownEmbedding(nn.Embedding):
    """Ids below V look up the layer's own rows; ids V .. V + n − 1 look up `new_rows` (n, C)."""

    def __init__(self, base: nn.Embedding, new_rows: nn.Parameter) -> None:
        super().__init__(base.num_embeddings, base.embedding_dim, padding_idx=base.padding_idx, device="meta")
        self.weight = base.weight  # the same frozen Parameter: keys and tying unchanged
        self.new_rows = new_rows

    def forward(self, idx: Tensor) -> Tensor:  # (B, T) -> (B, T, C)
        V = self.num_embeddings
        old = super().forward(idx.clamp(max=V - 1))  # (B, T, C), meaningful where idx < V
        new = F.embedding((idx - V).clamp(min=0), self.new_rows)  # (B, T, C), meaningful where idx ≥ V
        return torch.where((idx >= V).unsqueeze(-1), new.to(old.dtype), old)

    def merged_weight(self) -> Tensor:
        """The first V rows as a plain layer would hold them (a LoRA layer folds its update in)."""
        return self.weight

    def merge(self) -> nn.Embedding:
        """A plain nn.Embedding of V + n rows; self is left unchanged."""
        weight = self.merged_weight()
        weight = torch.cat((weight, self.new_rows.to(weight.dtype)))  # (V + n, C)
        plain = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=self.padding_idx, device="meta")
        plain.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return plain


class GrownLinear(nn.Linear):
    """The layer's own d_out outputs, then one more per new row: (…, C) -> (…, d_out + n)."""

    def __init__(self, base: nn.Linear, new_rows: nn.Parameter) -> None:
        if base.bias is not None:
            raise ValueError("new-token rows are added to a bias-free output layer only")
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # with tied embeddings, still the embedding matrix
        self.new_rows = new_rows

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((super().forward(x), F.linear(x, self.new_rows)), dim=-1)  # (…, d_out + n)

    def merged_weight(self) -> Tensor:
        return self.weight

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with d_out + n outputs; self is left unchanged."""
        weight = self.merged_weight()
        weight = torch.cat((weight, self.new_rows.to(weight.dtype)))  # (d_out + n, C)
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        plain.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return plain
