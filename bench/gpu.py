"""LoRA and QLoRA on a Llama-2-7B-shaped model on one GPU, litft beside transformers + peft and litgpt; then FSDP.

    python bench/gpu.py                                      # H200: a few minutes, random weights
    python bench/gpu.py --frameworks [litft,litft-qlora,transformers-qlora,litgpt-qlora] --fsdp_steps 0  # QLoRA
    python bench/gpu.py --plan_only true                     # litft/memory.py's plans alone, on any machine
    python bench/gpu.py --device cpu --model tiny-gqa --seq 64 --peak_tflops 1   # checks the script's logic

Part 1 trains LoRA (r 8 on all seven linear layers, dropout 0.05, AdamW) with weights and activations in
bfloat16, timing `steps` optimizer steps after `warmup`, for each library in turn, as its own recipe runs it:

    litft                 Fabric bf16-true; litft.fast.for_training's layers and loss
    litft-compiled        the same with every block compiled (finetune/*.py --compile true); warm-up compiles
    transformers + peft   LlamaForCausalLM in bf16 (SDPA) + get_peft_model with its defaults, which keep the
                          adapter weights in float32; loss = model(x, labels=x).loss
    litgpt                litgpt.lora.GPT in bf16; loss as litgpt/finetune/lora.py (lm_head in chunks of 128)

and QLoRA, the frozen linear weights in 4-bit NF4 (block size 64), compute in bf16:

    litft-qlora           litft with --quantize nf4: litft.qlora.quantize after add_lora (litft/train.py's order)
    transformers-qlora    peft's QLoRA recipe: the model saved and loaded back by from_pretrained with a
                          BitsAndBytesConfig (nf4, bf16 compute), prepare_model_for_kbit_training (which makes the
                          embedding, norms and lm_head fp32), get_peft_model; the step under bf16 autocast, as
                          transformers' Trainer(bf16=True) runs it (without it every activation would be fp32)
    litgpt-qlora          litgpt finetune/lora.py --quantize bnb.nf4: Fabric's BitsandbytesPrecision("nf4") swaps
                          every nn.Linear for bitsandbytes' 4-bit layer as the model is built (lm_head included)

A library that is not installed is reported as failed and the others go on. Beside each litft variant's
measured peak (torch.cuda.max_memory_allocated) stands the peak litft/memory.py planned for it, as every
finetune/ run prints it before loading weights. MFU is achieved FLOP/s over the card's dense bf16 peak
(`--peak_tflops`; H200 and H100 SXM: 989) and over the measured bf16 matmul rate on the model's own shapes, with
the FLOPs a LoRA step really needs (bench/flops.py: ≈ 4·N per token plus causal attention, not 6·N).

Part 2 runs a few steps of litft (and litft-compiled) under Fabric's ModelParallelStrategy (FSDP2: fully_shard
per Block, then the root, exactly as finetune/*.py --strategy fsdp), one process: the sharded path end to end.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Literal

import torch
from flops import matmul_rate, step_flops_per_token
from frameworks import LORA_TARGETS_HF, litgpt_shapes
from lightning.fabric import Fabric

from litft import memory, qlora
from litft.cli import run
from litft.config import Config
from litft.fast import for_training
from litft.lora import LoRAConfig, add_lora
from litft.model import Llama
from litft.train_setup import shard_blocks

R, ALPHA, DROPOUT = 8, 16.0, 0.05
Step = Callable[[torch.Tensor], None]  # one optimizer step on a batch


@contextmanager
def building_on(device: torch.device) -> Iterator[None]:
    """Create modules directly on `device` in bfloat16: no float32 copy of 7 B parameters on the host."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))


def plain_step(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Step:
    optimizer = adamw(model)

    def step(x: torch.Tensor) -> None:
        loss_fn(x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def litft_step(fabric: Fabric, config: Config, compile: bool = False, quantize: str | None = None) -> Step:
    with torch.device("meta"):
        model = Llama(config)
    model.to(torch.bfloat16).to_empty(device=fabric.device)  # bf16 on the meta device: no fp32 copy on the GPU
    model.tie_weights()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
    model.requires_grad_(False)
    add_lora(model, LoRAConfig(r=R, alpha=ALPHA, dropout=DROPOUT))
    if quantize:  # each block's frozen W replaced by its NF4 codes and scales, on the device
        qlora.quantize(model, quantize)
    loss_fn = for_training(model, fast=True, compile=compile)  # as finetune/*.py (--compile true)
    model = fabric.setup_module(model.train())
    model.mark_forward_method("hidden_states")
    optimizer = fabric.setup_optimizers(adamw(model))

    def step(x: torch.Tensor) -> None:
        with fabric.autocast():
            loss = loss_fn(model, x, x)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_llama(device: torch.device, config: Config) -> torch.nn.Module:
    """transformers' LlamaForCausalLM of `config`'s shapes, built on `device` in bf16 (SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with building_on(device):
        return LlamaForCausalLM(LlamaConfig(**config.to_hf_config(), attn_implementation="sdpa"))


def with_peft_lora(model: torch.nn.Module) -> torch.nn.Module:
    """get_peft_model with this script's LoRA (r, alpha, dropout; all seven linear layers), in training mode."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                            target_modules=LORA_TARGETS_HF)).train()


def transformers_step(device: torch.device, config: Config) -> Step:
    model = with_peft_lora(hf_llama(device, config))
    return plain_step(model, lambda x: model(input_ids=x, labels=x).loss)


def litgpt_lora_model(config: Config) -> torch.nn.Module:
    """litgpt.lora.GPT of `config`'s shapes with this script's LoRA on all seven linear layers, only LoRA trainable;
    built on the current default device and dtype."""
    from litgpt.lora import GPT, mark_only_lora_as_trainable
    from litgpt.lora import Config as LitGPTConfig

    model = GPT(LitGPTConfig(**litgpt_shapes(config), lora_r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                             lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True))
    mark_only_lora_as_trainable(model)
    return model


def litgpt_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """As litgpt/finetune/lora.py: lm_head in chunks of 128 positions, chunked cross-entropy on next tokens."""
    from litgpt.utils import chunked_cross_entropy

    logits = model(x, lm_head_chunk_size=128)
    logits[-1] = logits[-1][..., :-1, :]
    return chunked_cross_entropy(logits, x[..., 1:])


def litgpt_step(device: torch.device, config: Config) -> Step:
    with building_on(device):
        model = litgpt_lora_model(config)
    return plain_step(model.train(), lambda x: litgpt_loss(model, x))


def transformers_qlora_step(device: torch.device, config: Config) -> Step:
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = hf_llama(device, config)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=scratch_dir(2 * model.num_parameters())) as saved:
        model.save_pretrained(saved)  # from_pretrained is the one way to apply a BitsAndBytesConfig
        del model
        gc.collect()
        model = LlamaForCausalLM.from_pretrained(saved, quantization_config=bnb, device_map={"": device},
                                                 dtype=torch.bfloat16, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # norms, embedding in fp32
    model = with_peft_lora(model)

    def loss(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(input_ids=x, labels=x).loss

    return plain_step(model, loss)


def scratch_dir(nbytes: int) -> str | None:
    """/dev/shm (memory) when it can hold `nbytes` with room to spare, else the default temporary directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 1.2 * nbytes else None


def litgpt_qlora_step(config: Config) -> Step:
    from lightning.fabric.plugins import BitsandbytesPrecision

    fabric = Fabric(accelerator="cuda", devices=1, plugins=BitsandbytesPrecision("nf4", torch.bfloat16))
    with fabric.init_module(empty_init=False):  # on the GPU each linear layer is quantized as it is created
        model = litgpt_lora_model(config)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(adamw(model))

    def step(x: torch.Tensor) -> None:
        fabric.backward(litgpt_loss(model, x))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def planned_gb(config: Config, seq: int, micro_batch_size: int, quantize: str | None) -> float:
    """litft/memory.py's plan for litft_step's LoRA (QLoRA with `quantize`) step on a GPU, in GB."""
    prepare = partial(add_lora, config=LoRAConfig(r=R, alpha=ALPHA, dropout=DROPOUT))
    plan = memory.plan(config, prepare, seq, dtype=torch.bfloat16, autocast=None, quantize=quantize,
                       activation_checkpointing=False, loss=lambda model: for_training(model, True),
                       device=torch.device("cuda"))
    return plan.with_micro_batch(micro_batch_size).total / 1e9


def seconds_per_step(step: Step, x: torch.Tensor, warmup: int, steps: int) -> float:
    """Median wall time of one optimizer step (forward, backward, AdamW), synchronised with the device."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        step(x)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # CPU: the process's peak RSS (never resets)


def measure(label: str, build: Callable[[], Step], x: torch.Tensor, warmup: int, steps: int,
            flops_per_token: float, peak_tflops: float, matmul_tflops: float,
            planned: float | None = None) -> tuple[float, float] | None:
    """Build one library's step, time it, print a line; returns (seconds per step, peak GB), None if it failed."""
    device = x.device
    gc.collect()  # the previous library's model and optimizer
    torch._dynamo.reset()  # and the previous compiled variant's graphs, so each compiles afresh
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = seconds_per_step(build(), x, warmup, steps)
    except Exception as e:  # a library that is missing, does not fit this torch, or runs out of memory
        print(f"{label}: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
        return None
    tokens_per_s = x.numel() / seconds
    tflops = flops_per_token * tokens_per_s / 1e12
    peak = peak_memory_gb(device)
    plan = f" (planned {planned:.1f} GB: {planned / peak:.2f}×)" if planned else ""
    print(f"{label}: {seconds:.3f} s/step, {tokens_per_s:,.0f} tokens/s, {tflops:.1f} TFLOP/s = "
          f"{tflops / peak_tflops:.1%} MFU of {peak_tflops:g} ({tflops / matmul_tflops:.1%} of the measured "
          f"matmul rate), peak memory {peak:.1f} GB{plan}", flush=True)
    return seconds, peak


FRAMEWORKS = Literal["litft", "litft-compiled", "transformers", "litgpt", "litft-qlora", "transformers-qlora",
                     "litgpt-qlora"]
PAIRS = [("litft", "transformers"), ("litft", "litgpt"), ("litft-compiled", "transformers"),
         ("litft-compiled", "litgpt"), ("litft-qlora", "litft"), ("litft-qlora", "transformers-qlora"),
         ("litft-qlora", "litgpt-qlora")]


def main(device: str = "cuda", model: str = "Llama-2-7b-hf", seq: int = 2048, micro_batch_size: int = 4,
         warmup: int = 2, steps: int = 5, fsdp_steps: int = 3, peak_tflops: float = 989.0,
         frameworks: list[FRAMEWORKS] = ["litft", "litft-compiled", "transformers", "litgpt"],
         plan_only: bool = False) -> None:
    """LoRA tokens/s, MFU and peak memory of each library on one device, then a few litft steps under FSDP.

    Args:
        device: cuda, or cpu to check the script with a tiny model.
        model: litft config name (shapes; weights are random).
        seq: tokens per sample.
        micro_batch_size: samples per step.
        warmup: untimed steps first.
        steps: timed steps (the median is reported).
        fsdp_steps: timed steps under FSDP (0 skips that part).
        peak_tflops: the device's dense bf16 TFLOP/s (H200 / H100 SXM: 989).
        frameworks: which libraries to time, in this order.
        plan_only: print litft/memory.py's plans for litft's LoRA and QLoRA steps, and stop.
    """
    config = Config.from_name(model)
    plans = {"litft": planned_gb(config, seq, micro_batch_size, None),
             "litft-qlora": planned_gb(config, seq, micro_batch_size, "nf4")}
    print(f"litft/memory.py plans {plans['litft']:.1f} GB for the LoRA step, {plans['litft-qlora']:.1f} GB for "
          f"QLoRA ({model}, micro batch {micro_batch_size} × seq {seq}, bf16)", flush=True)
    if plan_only:
        return
    accelerator = "cuda" if device == "cuda" else "cpu"
    fabric = Fabric(accelerator=accelerator, devices=1, precision="bf16-true")
    fabric.seed_everything(0, verbose=False)
    matmul_tflops = matmul_rate(config, micro_batch_size * seq, torch.bfloat16, device=fabric.device) / 1e12
    name = torch.cuda.get_device_name() if accelerator == "cuda" else "cpu"
    print(f"{name}: {model}, LoRA r {R} on q k v o gate up down, bf16, micro batch {micro_batch_size} × seq {seq}; "
          f"bf16 matmul on the model's shapes {matmul_tflops:.0f} TFLOP/s", flush=True)
    x = torch.randint(0, config.vocab_size, (micro_batch_size, seq), device=fabric.device)
    builders = {"litft": lambda: litft_step(fabric, config),
                "litft-compiled": lambda: litft_step(fabric, config, compile=True),
                "transformers": lambda: transformers_step(fabric.device, config),
                "litgpt": lambda: litgpt_step(fabric.device, config),
                "litft-qlora": lambda: litft_step(fabric, config, quantize="nf4"),
                "transformers-qlora": lambda: transformers_qlora_step(fabric.device, config),
                "litgpt-qlora": lambda: litgpt_qlora_step(config)}
    flops = step_flops_per_token(config, seq, "lora", R)
    results = {f: measure(f, builders[f], x, warmup, steps, flops, peak_tflops, matmul_tflops, plans.get(f))
               for f in frameworks}
    for ours, other in PAIRS:
        if results.get(ours) and results.get(other):
            (s1, m1), (s2, m2) = results[ours], results[other]
            print(f"{ours} / {other}: {s1 / s2:.2f}× the step time, {m1 / m2:.2f}× the peak memory", flush=True)
    if fsdp_steps:
        under_fsdp(accelerator, config, [f for f in ("litft", "litft-compiled") if f in frameworks], x,
                   fsdp_steps, flops, peak_tflops, matmul_tflops)
    print(f"done ({sys.argv[0]})", file=sys.stderr)


def under_fsdp(accelerator: str, config: Config, variants: list[str], x: torch.Tensor, steps: int, flops: float,
               peak_tflops: float, matmul_tflops: float) -> None:
    """A few litft steps under Fabric's ModelParallelStrategy (FSDP2), one process: the sharded path end to end."""
    from lightning.fabric.strategies import ModelParallelStrategy

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    strategy = ModelParallelStrategy(parallelize_fn=shard_blocks, data_parallel_size=1, tensor_parallel_size=1)
    fabric = Fabric(accelerator=accelerator, devices=1, strategy=strategy, precision="bf16-true")
    fabric.launch()
    for ours in variants:
        measure(f"{ours}, FSDP2 (1 process)", lambda: litft_step(fabric, config, compile=ours != "litft"), x,
                2, steps, flops, peak_tflops, matmul_tflops)


if __name__ == "__main__":
    run(main)
