"""The next-token loss of a causal language model.

The logits at position t predict the token at t + 1, so position t is scored against labels[t + 1]:

    loss = mean over scored positions t of  −log softmax(logits[t])[labels[t + 1]]

Positions whose target is IGNORE_INDEX (-100) are not scored: the prompt, when a recipe trains on the answer
only, and the padding of short samples. The last position predicts nothing and is never scored.

This is the loss written as its definition; litft/fast/chunked_loss.py computes the same value and gradients
without holding all of the (B, T, vocab) logits at once.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
LossFn = Callable[..., Tensor]  # (model, inputs (B, T), labels (B, T), packed_pos=None) -> mean loss


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """labels (B, T) -> targets (B, T): position t is scored against labels[t + 1]; the last one predicts nothing.

    The targets are shifted, not the logits: slicing (B, T, vocab) would copy it (and, in training, its gradient).
    """
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def trained_tokens(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """How many positions of labels (B, T) have a loss: every label but the first of a row, unless ignored."""
    return (labels[:, 1:] != ignore_index).sum()


def next_token_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> Tensor:
    """logits (B, T, vocab) at position t predict labels[t + 1]; positions labelled ignore_index are skipped."""
    targets = shift_labels(labels, ignore_index)  # (B, T)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction)


def causal_lm_loss(model: nn.Module, x: Tensor, y: Tensor, packed_pos: Tensor | None = None) -> Tensor:
    """The training loss of a batch: inputs x (B, T), labels y (B, T) (usually x with the prompt masked);
    packed_pos (B, T) for rows that pack several samples (litft/packing.py)."""
    return next_token_loss(model(x, packed_pos=packed_pos), y)
