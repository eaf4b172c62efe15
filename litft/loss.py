"""The next-token loss, and the same loss computed without ever holding all of the logits.

A causal language model's logits at position t predict the token at t + 1:

    loss = mean over labelled positions t of  −log softmax(logits[t])[labels[t + 1]]

The logits are the largest tensor of a training step: B · T · vocab floats (micro batch 4, 256 tokens and
SmolLM2's 49,152-token vocabulary: 201 MB in fp32), stored for the backward pass together with their softmax
and, later, their gradient. `chunked_next_token_loss` instead applies lm_head to a slice of positions at a
time and recomputes that slice's logits in the backward pass (activation checkpointing for the output layer),
so only one slice of logits exists at any moment. The extra cost is one more lm_head matmul per slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """labels (B, T) -> targets (B, T): position t is scored against labels[t + 1]; the last one predicts nothing.

    The targets are shifted, not the logits: slicing (B, T, vocab) would copy it (and, in training, its gradient).
    """
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def next_token_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """logits (B, T, vocab) at position t predict labels[t + 1]; positions labelled ignore_index are skipped."""
    targets = shift_labels(labels, ignore_index)  # (B, T)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction)


def chunked_next_token_loss(lm_head: nn.Module, hidden: Tensor, labels: Tensor, ignore_index: int = -100,
                            chunk_tokens: int = 512) -> Tensor:
    """next_token_loss(lm_head(hidden), labels), computed `chunk_tokens` positions at a time.

    hidden: (B, T, C), the final normalised hidden states; labels: (B, T). Same value and gradients as the
    plain loss (up to float summation order); peak memory holds one (chunk_tokens, vocab) slice of logits.
    """
    h = hidden.flatten(0, 1)  # (B·T, C)
    targets = shift_labels(labels, ignore_index).flatten()  # (B·T,)
    count = (targets != ignore_index).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.size(0), chunk_tokens):
        h_chunk, t_chunk = h[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:  # recompute this slice's logits in backward
            total = total + torch.utils.checkpoint.checkpoint(
                _summed_loss, lm_head, h_chunk, t_chunk, ignore_index, use_reentrant=False)
        else:
            total = total + _summed_loss(lm_head, h_chunk, t_chunk, ignore_index)
    return total / count  # NaN when nothing is labelled, like F.cross_entropy's mean


def _summed_loss(lm_head: nn.Module, h: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    logits = lm_head(h)  # (N, vocab)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
