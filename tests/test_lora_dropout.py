"""LoRA dropout against the definition of (inverted) dropout: each element zeroed with probability p, the rest
scaled by 1 / (1 - p), as torch.nn.functional.dropout does; and one mask per input tensor."""

from __future__ import annotations

import math

import pytest
import torch

from litft.fast.lora_dropout import SharedDropout, cpu_dropout


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_cpu_dropout_drops_each_element_with_probability_p(p):
    torch.manual_seed(0)
    x = torch.rand(999, 1001) + 1.0  # no zeros of its own; an odd count, not a multiple of 4
    out = cpu_dropout(x, p)
    dropped = out == 0
    sigma = math.sqrt(p * (1 - p) / x.numel())
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    for lane in range(4):  # each of the four elements cut from one 64-bit draw is dropped with probability p
        lane_dropped = dropped.flatten()[lane::4].float()
        assert abs(lane_dropped.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / lane_dropped.numel())
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - p), rtol=1e-4, atol=0)  # F.dropout's scale


def test_cpu_dropout_gradient_is_the_mask_times_the_scale():
    x = torch.randn(3, 5, 7, requires_grad=True)
    out = cpu_dropout(x, 0.5)
    out.sum().backward()
    kept = out != 0
    assert kept.any() and not kept.all()
    assert torch.equal(x.grad, kept.float() * 2.0)  # 1 / (1 - p), p = 0.5


def test_cpu_dropout_is_reproducible_under_a_seed():
    x = torch.ones(64, 64)
    torch.manual_seed(3)
    a = cpu_dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, cpu_dropout(x, 0.5))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_layers_reading_one_tensor_share_one_mask(autocast):
    """As q, k and v do: the second layer sees the same dropped copy; the test itself keeps no reference to it."""
    drop = SharedDropout(0.5, readers=2).train()
    x = torch.randn(2, 8, 16)
    lora_a = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h1 = drop(x) @ lora_a.T
        h2 = drop(x) @ lora_a.T  # equal to h1 only if the mask is the same
        h3 = drop(x) @ lora_a.T  # a third read of the same tensor is another step: another mask
    assert torch.equal(h1, h2) and not torch.equal(h1, h3)
    assert h1.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(SharedDropout(0.5).eval()(x), x)


def test_activation_checkpointing_recomputes_the_masks_the_forward_pass_used():
    """Loss and gradients of a checkpointed block must be those of the same block run plainly."""
    from torch.utils.checkpoint import checkpoint

    drop, x = SharedDropout(0.5, readers=2).train(), torch.randn(4, 16, requires_grad=True)
    a, b = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)

    def two_layers(x):  # both read x, as q and k do
        return drop(x) @ a.T + drop(x) @ b.T  # (4, 3)

    results = []
    for block in (two_layers, lambda x: checkpoint(two_layers, x, use_reentrant=False)):
        torch.manual_seed(0)
        loss = block(x * 1).pow(2).sum()  # nonlinear after the block: its backward reads the forward's output
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad, x.grad))
        a.grad = b.grad = x.grad = None
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_a_lora_model_with_dropout_trains_alike_with_and_without_checkpointing(fast):
    """The same model, seed and batch without activation checkpointing is the truth: each block's recomputation
    must draw the forward's masks again, and LoRA on lm_head, recomputed under checkpoint by the fast loss
    (litft/fast/chunked_loss.py), must redo the same operations. Same loss, same gradient for every A and B."""
    from litft.config import Config
    from litft.fast import for_training
    from litft.lora import LINEAR, LoRAConfig, add_lora
    from litft.model import Llama

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = add_lora(Llama(Config.from_name("tiny-gqa")), LoRAConfig(targets=[*LINEAR, "lm_head"], dropout=0.1))
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.05)  # B = 0 would leave A without a gradient
        loss_fn = for_training(model, fast)
        model.activation_checkpointing = checkpointing
        x = torch.randint(0, model.config.vocab_size, (2, 16))
        loss = loss_fn(model, x, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert all(g is not None and g.abs().sum() > 0 for g in results[0][1].values())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)


def test_fused_layers_share_one_dropout_per_input_tensor():
    """q, k and v read the attention input, gate and up the MLP input: one SharedDropout each; o and down their own."""
    from litft.config import Config
    from litft.fast.fused_lora import FusedLoRALinear, fuse_lora
    from litft.lora import LINEAR, LoRAConfig, add_lora
    from litft.model import Llama

    model = fuse_lora(add_lora(Llama(Config.from_name("tiny-gqa")), LoRAConfig(targets=list(LINEAR), dropout=0.1)))
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert all(type(m) is FusedLoRALinear for m in (attn.q_proj, attn.o_proj, mlp.up_proj, mlp.down_proj))
    assert attn.q_proj.dropout is attn.k_proj.dropout is attn.v_proj.dropout and attn.q_proj.dropout.readers == 3
    assert mlp.gate_proj.dropout is mlp.up_proj.dropout and mlp.up_proj.dropout.readers == 2
    assert attn.o_proj.dropout.readers == mlp.down_proj.dropout.readers == 1
    assert attn.o_proj.dropout is not attn.q_proj.dropout and attn.q_proj.dropout.p == 0.1


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_a_model_in_eval_mode_keeps_its_dropout_off_when_fused(quantized):
    """nn.Module's contract: a module made for a model in eval mode must not train. A QLoRA layer's new shared
    dropout had started in training mode under an eval-mode layer, so its outputs were random."""
    from litft.config import Config
    from litft.fast.fused_lora import fuse_lora
    from litft.lora import LINEAR, LoRAConfig, add_lora
    from litft.model import Llama
    from litft.qlora import quantize

    torch.manual_seed(0)
    model = add_lora(Llama(Config.from_name("tiny-gqa")), LoRAConfig(targets=list(LINEAR), dropout=0.5))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero, so that dropping A's inputs would change the output
            torch.nn.init.normal_(p)
    if quantized:
        quantize(model, "nf4")
    fuse_lora(model.eval())
    assert not any(m.training for m in model.modules())
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(model(x), model(x))
