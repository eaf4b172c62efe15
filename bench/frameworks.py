"""One training step, written the way each library's own recipe writes it, on the same weights and batch.

    litft                     Llama + add_lora + litft.fast.for_training and its loss (what every litft recipe uses)
    litft-plain               the same with --fast false: the textbook layers and loss
    transformers (+ peft)     LlamaForCausalLM (+ get_peft_model); loss = model(x, labels=x).loss
    litgpt                    litgpt.lora.GPT (or litgpt.model.GPT); loss as litgpt/finetune/lora.py computes it:
                              model(x, lm_head_chunk_size=128), then chunked_cross_entropy

All three start from litft's randomly initialised weights (copied under each library's names), so with B = 0
at step 0 their first losses agree: a check that the three steps compute the same thing. Each library is
imported only when asked for, so a process that runs one library holds only that library in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from litft.config import Config

FRAMEWORKS = ("litft", "transformers", "litgpt")
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class StepSpec:
    config: Config
    method: str = "lora"  # "lora" (r on all seven linear layers of every block) or "full"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    seed: int = 0
    activation_checkpointing: bool = False  # recompute each block in backward (litft, transformers)


def base_state_dict(config: Config, seed: int) -> dict[str, Tensor]:
    """litft's randomly initialised weights, normal(0, 0.02) for matrices, ones for norms."""
    from litft.model import Llama

    torch.manual_seed(seed)
    model = Llama(config)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    return model.state_dict()


def build(framework: str, spec: StepSpec) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor]]:
    """The model (LoRA or full, trainable parameters marked) and its loss function loss(x) for next-token targets x."""
    builders = {"litft": build_litft, "litft-plain": partial(build_litft, fast=False), "transformers": build_transformers,
                "litgpt": build_litgpt}
    return builders[framework](spec)


def build_litft(spec: StepSpec, fast: bool = True):
    """As finetune/*.py builds it: the method added, then litft/fast's measures (or, fast=False, the plain path)."""
    from litft.fast import for_training
    from litft.lora import LoRAConfig, add_lora
    from litft.model import Llama

    model = Llama(spec.config)
    model.load_state_dict(base_state_dict(spec.config, spec.seed))
    if spec.method == "lora":
        add_lora(model, LoRAConfig(r=spec.r, alpha=spec.alpha, dropout=spec.dropout))
    model.activation_checkpointing = spec.activation_checkpointing
    loss_fn = for_training(model, fast)
    return model.train(), lambda x: loss_fn(model, x, x)


def build_transformers(spec: StepSpec):
    from transformers import LlamaConfig, LlamaForCausalLM

    from litft.convert_hf import lit_to_hf_state_dict

    model = LlamaForCausalLM(LlamaConfig(**spec.config.to_hf_config()))  # attention: SDPA (the default)
    missing, unexpected = model.load_state_dict(lit_to_hf_state_dict(base_state_dict(spec.config, spec.seed)),
                                                strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                                 target_modules=LORA_TARGETS_HF))
    return model.train(), lambda x: model(input_ids=x, labels=x).loss


def to_litgpt_state_dict(sd: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
    """litft names -> litgpt's (fused qkv = cat(q, k, v) rows; MLP fc_1 = gate, fc_2 = up, proj = down)."""
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.ln_f.weight": sd["norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(config.n_layer):
        b, t = f"blocks.{i}.", f"transformer.h.{i}."
        out[t + "attn.qkv.weight"] = torch.cat([sd[b + f"attn.{p}_proj.weight"] for p in "qkv"])
        out[t + "attn.proj.weight"] = sd[b + "attn.o_proj.weight"]
        out[t + "norm_1.weight"], out[t + "norm_2.weight"] = sd[b + "attn_norm.weight"], sd[b + "mlp_norm.weight"]
        for ours, theirs in (("gate", "fc_1"), ("up", "fc_2"), ("down", "proj")):
            out[t + f"mlp.{theirs}.weight"] = sd[b + f"mlp.{ours}_proj.weight"]
    return out


def litgpt_shapes(c: Config) -> dict:
    """litgpt Config fields for a litft config: a Llama (RMSNorm, SwiGLU, rotary on the whole head, no bias)."""
    return dict(name=c.name, n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, n_query_groups=c.n_query_groups,
                head_size=c.head_size, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                padded_vocab_size=c.vocab_size, block_size=c.block_size, rope_base=c.rope_base, norm_eps=c.norm_eps,
                rotary_percentage=1.0, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                parallel_residual=False)


def build_litgpt(spec: StepSpec):
    from litgpt.utils import chunked_cross_entropy

    if spec.activation_checkpointing:
        raise SystemExit("litgpt applies activation checkpointing through its FSDP strategy only; not benchmarked")
    c = spec.config
    shapes = litgpt_shapes(c)
    if spec.method == "lora":
        from litgpt.lora import GPT, mark_only_lora_as_trainable
        from litgpt.lora import Config as LoRAConfig

        model = GPT(LoRAConfig(**shapes, lora_r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                               lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True))
    else:
        from litgpt.model import GPT
        from litgpt.model import Config as PlainConfig

        model = GPT(PlainConfig(**shapes))
    missing, unexpected = model.load_state_dict(to_litgpt_state_dict(base_state_dict(c, spec.seed), c), strict=False)
    assert not unexpected and all("lora_" in k for k in missing), (missing, unexpected)
    # litgpt does not tie embeddings: its converter copies the embedding into lm_head, and so does this.
    if spec.method == "lora":
        mark_only_lora_as_trainable(model)

    def loss(x: Tensor) -> Tensor:  # as litgpt/finetune/lora.py
        logits = model(x, lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]
        return chunked_cross_entropy(logits, x[..., 1:])

    return model.train(), loss
