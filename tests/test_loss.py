"""litft/fast/chunked_loss.py against torch's own cross-entropy, computed in float64 on the same inputs, and which of
its two branches each precision takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from litft.fast.chunked_loss import chunked_next_token_loss


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_gradient_keeps_confident_targets(precision):
    """Fine-tuned models predict most targets with p ≈ 1, where the gradient's target term p − 1 is tiny.
    In bf16, p rounds to 1 there (its spacing near 1 is 2⁻⁸), so p − 1 must not be formed from a bf16 p."""
    g = torch.Generator().manual_seed(0)
    V = C = 64
    weight, _ = torch.linalg.qr(torch.randn(V, C, generator=g))  # orthonormal rows: logit_j = h · w_j
    labels = torch.randint(0, V, (1, 25), generator=g)
    hidden = 11 * weight[labels.roll(-1, dims=1)] + 0.3 * torch.randn(1, 25, C, generator=g)  # p(target) ≈ 0.999
    head = torch.nn.Linear(C, V, bias=False).requires_grad_(False)
    head.weight.data.copy_(weight)
    if precision == "bf16-true":
        head, hidden = head.bfloat16(), hidden.bfloat16()
    hidden.requires_grad_(True)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = chunked_next_token_loss(head, hidden, labels, chunk_tokens=8)
    loss.backward()

    h64 = hidden.detach().to(torch.bfloat16).double().requires_grad_(True)  # what the bf16 matmul sees
    logits = h64[0, :-1] @ head.weight.detach().to(torch.bfloat16).double().T
    expected = F.cross_entropy(logits, labels[0, 1:])
    expected.backward()
    p_target = logits.softmax(-1).gather(1, labels[0, 1:, None])
    assert p_target.min() > 0.998, "the test needs confident targets"
    assert abs(loss.item() - expected.item()) < 0.02 * expected.item()
    error = (hidden.grad.double() - h64.grad).norm() / h64.grad.norm()
    assert error < 0.03, float(error)


@pytest.mark.parametrize("case,forward_gradients", [
    ("fp32", True), ("bf16-autocast", True), ("fp16-autocast", False), ("fp16-weights", False), ("lora-head", False)])
def test_which_branch_the_chunked_loss_takes(case, forward_gradients):
    """Gradients formed in the forward pass (LinearCrossEntropy) for a plain output layer in fp32 or bf16; the
    checkpointed slices where float16 is in play (loss scaling reaches gradients only in backward) or the head
    has trainables of its own. Both give the same values, so only the autograd graph tells them apart."""
    from litft.lora import LoRAConfig, LoRALinear

    head = torch.nn.Linear(16, 50, bias=False)
    if case == "lora-head":
        head = LoRALinear(head, LoRAConfig(r=2, alpha=4, targets=["lm_head"], dropout=0.0))
    hidden = torch.randn(2, 8, 16, requires_grad=True)
    if case == "fp16-weights":
        head, hidden = head.half(), hidden.detach().half().requires_grad_(True)
    labels = torch.randint(0, 50, (2, 8))
    dtype = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(case)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = chunked_next_token_loss(head, hidden, labels, chunk_tokens=8)
    total = loss.grad_fn.next_functions[0][0]  # the summed loss, before the division by the label count
    assert (type(total).__name__ == "LinearCrossEntropyBackward") == forward_gradients, type(total).__name__


@pytest.mark.parametrize("trainable_head", [True, False], ids=["full", "lora"])
def test_evaluation_computes_the_logits_and_no_gradient(trainable_head):
    """Under torch.no_grad (validation), the chunked loss costs what the plain loss does, F.cross_entropy of the
    logits (torch's FLOP counter), however the head trains: a full fine-tune's trainable lm_head once made every
    validation batch also form a (V, C) weight gradient, twice the matmul work and a vocabulary-sized buffer."""
    from torch.utils.flop_counter import FlopCounterMode

    head = torch.nn.Linear(32, 500, bias=False).requires_grad_(trainable_head)
    hidden, labels = torch.randn(2, 24, 32), torch.randint(0, 500, (2, 24))
    plain = lambda: F.cross_entropy(head(hidden[:, :-1]).flatten(0, 1), labels[:, 1:].flatten())  # noqa: E731
    chunked = lambda: chunked_next_token_loss(head, hidden, labels, chunk_tokens=16)  # noqa: E731
    flops = {}
    with torch.no_grad():
        for name, loss_fn in (("chunked", chunked), ("plain", plain)):
            with FlopCounterMode(display=False) as counter:
                loss = loss_fn()
            flops[name] = (counter.get_total_flops(), loss.item())
    assert flops["chunked"][0] <= 2 * 32 * 500 * 2 * 24  # every position's logits, the last one's too
    assert flops["chunked"][0] < 1.1 * flops["plain"][0]
    assert flops["chunked"][1] == pytest.approx(flops["plain"][1], rel=1e-5)
