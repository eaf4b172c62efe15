"""One training step, written the way each library's own recipe writes it, on the same weights and batch.

    litft                     Llama + add_lora + litft.fast.for_training and its loss (what every litft recipe uses)
    litft-plain               the same with --fast false: the textbook layers and loss
    litft-qlora               litft with the blocks' frozen weights in NF4: add_lora, then litft.qlora.quantize(model,
                              "nf4"), then for_training (the order of build_model in litft/train.py)
    litft-qlora-compiled      litft-qlora with --compile: every block through torch.compile (the first steps compile)
    transformers (+ peft)     LlamaForCausalLM (+ get_peft_model); loss = model(x, labels=x).loss
    transformers-qlora        the same model saved, loaded back by from_pretrained with bitsandbytes' 4-bit NF4
                              (BitsAndBytesConfig, on the CPU), prepare_model_for_kbit_training, get_peft_model
    litgpt                    litgpt.lora.GPT (or litgpt.model.GPT); loss as litgpt/finetune/lora.py computes it:
                              model(x, lm_head_chunk_size=128), then chunked_cross_entropy

All start from litft's randomly initialised weights (copied under each library's names), so with B = 0 at
step 0 their first losses agree: a check of the frozen forward pass and the loss, not of the LoRA branch, its
dropout or the backward pass (tests/test_lora.py compares those with peft at B ≠ 0). The two QLoRA builds agree
with each other: both round the weights to the same NF4 values, tests/test_qlora.py. Each library is
imported only when asked for, so a process that runs one library holds only that library in memory.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from litft.config import Config

FRAMEWORKS = ("litft", "litft-plain", "litft-qlora", "litft-qlora-compiled", "transformers", "transformers-qlora",
              "litgpt")
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
    compute_dtype: torch.dtype = torch.float32  # QLoRA's matmul dtype (bitsandbytes' bnb_4bit_compute_dtype)
    param_dtype: torch.dtype = torch.float32  # bfloat16 for --precision bf16-true


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
    builders = {"litft": build_litft, "litft-plain": partial(build_litft, fast=False),
                "litft-qlora": partial(build_litft, quantize="nf4"),
                "litft-qlora-compiled": partial(build_litft, quantize="nf4", compile=True),
                "transformers": build_transformers, "transformers-qlora": partial(build_transformers, quantize="nf4"),
                "litgpt": build_litgpt}
    if "qlora" in framework and spec.method != "lora":
        raise SystemExit(f"{framework} trains LoRA on a 4-bit base: --method lora only")
    return builders[framework](spec)


def litft_plan(framework: str, spec: StepSpec, micro_batch_size: int, seq: int):
    """litft/memory.py's plan for what build_litft builds and one step of it does (None for other libraries)."""
    from litft import memory
    from litft.fast import for_training
    from litft.lora import LoRAConfig, add_lora

    if not framework.startswith("litft"):
        return None
    prepare = (partial(add_lora, config=LoRAConfig(r=spec.r, alpha=spec.alpha, dropout=spec.dropout))
               if spec.method == "lora" else (lambda model: model.requires_grad_(True)))
    autocast = spec.compute_dtype if spec.compute_dtype != spec.param_dtype else None
    plan = memory.plan(spec.config, prepare, seq, dtype=spec.param_dtype, autocast=autocast,
                       quantize="nf4" if "qlora" in framework else None,
                       activation_checkpointing=spec.activation_checkpointing,
                       loss=lambda model: for_training(model, framework != "litft-plain"), device=torch.device("cpu"))
    return plan.with_micro_batch(micro_batch_size)


def build_litft(spec: StepSpec, fast: bool = True, quantize: str | None = None, compile: bool = False):
    """As finetune/*.py builds it: the method added, the blocks' frozen weights stored in NF4 when `quantize`
    (--quantize), then litft/fast's measures (or, fast=False, the plain path), the blocks compiled when `compile`."""
    from litft import qlora
    from litft.fast import for_training
    from litft.lora import LoRAConfig, add_lora
    from litft.model import Llama

    with torch.device("meta"):  # as litft/checkpoint.py builds it: the weights are allocated once, not twice
        model = Llama(spec.config)
    model.load_state_dict(base_state_dict(spec.config, spec.seed), assign=True)
    model.tie_weights()
    if spec.method == "lora":
        add_lora(model, LoRAConfig(r=spec.r, alpha=spec.alpha, dropout=spec.dropout))
    if quantize:  # each replaced layer's fp32 W goes with it: nothing else refers to it
        qlora.quantize(model, quantize)
    model.activation_checkpointing = spec.activation_checkpointing
    loss_fn = for_training(model, fast, compile)
    return model.train(), lambda x: loss_fn(model, x, x)


def build_transformers(spec: StepSpec, quantize: str | None = None):
    """LlamaForCausalLM (+ peft), its block weights in bitsandbytes' 4 bits when `quantize` (QLoRA)."""
    model = hf_model(spec) if quantize is None else hf_model_in_4_bits(spec, quantize)
    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                                 target_modules=LORA_TARGETS_HF))
    return model.train(), lambda x: model(input_ids=x, labels=x).loss


def hf_model(spec: StepSpec):
    """transformers' Llama holding the shared weights, in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from litft.convert_hf import lit_to_hf_state_dict

    model = LlamaForCausalLM(LlamaConfig(**spec.config.to_hf_config()))  # attention: SDPA (the default)
    missing, unexpected = model.load_state_dict(lit_to_hf_state_dict(base_state_dict(spec.config, spec.seed)),
                                                strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return model


def hf_model_in_4_bits(spec: StepSpec, quant_type: str):
    """hf_model(spec) as a QLoRA user gets it: saved, then loaded by from_pretrained with a BitsAndBytesConfig (the
    one way to apply it), which stores the blocks' linear weights in 4 bits; embedding, lm_head and norms stay fp32.
    The fp32 model is freed once saved, and the saved copy deleted once loaded."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_compute_dtype=spec.compute_dtype)
    with tempfile.TemporaryDirectory() as saved:
        hf_model(spec).save_pretrained(saved)
        model = LlamaForCausalLM.from_pretrained(saved, quantization_config=bnb, device_map="cpu", dtype=torch.float32)
    # peft's QLoRA recipe; checkpointing is left to build_transformers, as for the other builds
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


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
