"""The next-token loss (litft/loss.py) computed without ever holding all of the logits.

The logits are the largest tensor of a training step: B · T · vocab floats (micro batch 4, 256 tokens and
SmolLM2's 49,152-token vocabulary: 201 MB in fp32), stored for the backward pass together with their softmax
and, later, their gradient. `chunked_next_token_loss` never holds them all. With a plain output layer
(logits = h Wᵀ) it computes the gradients already in the forward pass, a slice of positions at a time:

    d loss_sum / d logits = softmax(logits) − onehot(target)      (zero rows where the target is ignored)
    d loss_sum / d h      = (softmax − onehot) W                  (n, V) @ (V, C) -> (n, C)
    d loss_sum / d W     += (softmax − onehot)ᵀ h                 (V, n) @ (n, C) -> (V, C), only if W trains

and keeps only those (the size of h and W); backward multiplies them by the incoming gradient. The same
matmuls as the plain loss, one (slice, vocab) block of logits alive at a time. An output layer with its own
trainable parts (LoRA on lm_head, new-token rows) is instead re-applied to each slice in the backward pass
(activation checkpointing), at the cost of one more lm_head matmul; so is any lm_head under float16, whose
loss scaling only reaches the gradients in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from litft.loss import IGNORE_INDEX, shift_labels

CHUNK_TOKENS = 256  # positions whose logits exist at once


def chunked_lm_loss(model: nn.Module, x: Tensor, y: Tensor, packed_pos: Tensor | None = None) -> Tensor:
    """causal_lm_loss (litft/loss.py), the fast way: the model's hidden states, then the chunked loss.

    Under Fabric, `model` is the wrapped model with hidden_states marked as a forward method, so that DDP's
    and FSDP's hooks run around it as they would around forward."""
    return chunked_next_token_loss(model.lm_head, model.hidden_states(x, packed_pos=packed_pos), y)


def chunked_next_token_loss(lm_head: nn.Module, hidden: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                            chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """next_token_loss(lm_head(hidden), labels), computed `chunk_tokens` positions at a time.

    hidden: (B, T, C), the final normalised hidden states; labels: (B, T). Same value and gradients as the
    plain loss (up to float summation order); the logits of one slice exist at a time.
    """
    h = hidden.flatten(0, 1)  # (B·T, C)
    targets = shift_labels(labels, ignore_index).flatten()  # (B·T,)
    count = (targets != ignore_index).sum()
    # exactly nn.Linear, not a subclass: a LoRA lm_head, or one grown by new-token rows, has trainables of its own
    if type(lm_head) is nn.Linear and lm_head.bias is None and not _half_precision(h):
        weight = lm_head.weight
        if not torch.is_grad_enabled():  # evaluation: forward must not form gradients (a full run's W is trainable)
            h, weight = h.detach(), weight.detach()
        total = LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_tokens)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, h.size(0), chunk_tokens):
            total = total + torch.utils.checkpoint.checkpoint(_summed_loss, lm_head, h[s : s + chunk_tokens],
                                                              targets[s : s + chunk_tokens], ignore_index,
                                                              use_reentrant=False)
    return total / count  # NaN when nothing is labelled, like F.cross_entropy's mean


def _half_precision(h: Tensor) -> bool:
    """float16 in play (16-mixed, 16-true): gradients formed in forward would be cast to fp16 before the loss
    scaler multiplies them, and tiny softmax values would underflow; such runs take the checkpointed path."""
    device = h.device.type
    return h.dtype == torch.float16 or (torch.is_autocast_enabled(device) and
                                        torch.get_autocast_dtype(device) == torch.float16)


def _cast_once_for_autocast(h: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Under autocast, h and W in its dtype once: left to autocast, each slice's two matmuls would cast the
    whole (frozen, so uncached) weight again."""
    device = h.device.type
    if not torch.is_autocast_enabled(device):
        return h, weight
    dtype = torch.get_autocast_dtype(device)
    return h.to(dtype), weight.to(dtype)


def _summed_loss(lm_head: nn.Module, h: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    logits = lm_head(h)  # (n, vocab)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(h Wᵀ, targets), its gradients for h and W computed slice by slice in forward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_tokens: int) -> Tensor:
        # h: (N, C), weight: (V, C), targets: (N,)
        grad_h = torch.zeros_like(h) if h.requires_grad else None  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None  # (V, C)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # grad_h has h's dtype, grad_w sums in fp32 (cast to W's dtype when saved); the matmuls use autocast's copies
        h_mm, w_mm = _cast_once_for_autocast(h, weight)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.size(0), chunk_tokens):
                h_s, t_s = h_mm[s : s + chunk_tokens], targets[s : s + chunk_tokens]  # (n, C), (n,)
                logits = h_s @ w_mm.T  # (n, V)
                ce = F.cross_entropy(logits.float(), t_s, ignore_index=ignore_index, reduction="none")  # (n,)
                total += ce.sum()
                if grad_h is None and grad_w is None:
                    continue
                keep = t_s != ignore_index  # (n,)
                grad = torch.softmax(logits, dim=-1)  # (n, V), in the logits' dtype
                # at the target, p − 1 = exp(−ce) − 1, from the fp32 loss: a bf16 p rounds to 1 once p > 0.998
                at_target = torch.arange(len(t_s), device=grad.device), torch.where(keep, t_s, 0)
                grad[at_target] = torch.expm1(-ce).to(grad.dtype)
                grad *= keep[:, None]
                if grad_h is not None:
                    grad_h[s : s + chunk_tokens] = grad @ w_mm  # (n, V) @ (V, C)
                if grad_w is not None:
                    grad_w += grad.T @ h_s  # (V, n) @ (n, C)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_total  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None, None
