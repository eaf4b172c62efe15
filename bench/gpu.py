"""LoRA on a Llama-2-7B-shaped model on one GPU: tokens/s, MFU, peak memory; then the same under FSDP.

    python bench/gpu.py                                      # H200: a few minutes, random weights
    python bench/gpu.py --device cpu --model tiny-gqa --seq 64 --peak_tflops 1   # checks the script's logic

Part 1 trains LoRA (r 8 on all seven linear layers, dropout 0.05, AdamW) through Fabric with bf16-true (weights,
activations and LoRA parameters in bfloat16), timing `steps` optimizer steps after `warmup`. MFU is achieved
FLOP/s over the card's dense bf16 peak (`--peak_tflops`; H200 and H100 SXM: 989), with the FLOPs a LoRA step
really needs (bench/flops.py: ≈ 4·N per token plus causal attention — not the 6·N of full fine-tuning).

Part 2 runs a few steps of the same model under Fabric's ModelParallelStrategy (FSDP2: fully_shard per Block,
then the root, exactly as finetune/*.py --strategy fsdp), one process: the sharded code path end to end.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from lightning.fabric import Fabric

from flops import step_flops_per_token
from litft.cli import run
from litft.config import Config
from litft.lora import LoRAConfig, add_lora, mark_only_lora_trainable
from litft.model import Llama
from litft.train import causal_lm_loss, shard_blocks


def random_lora_model(config: Config, device: torch.device, dtype: torch.dtype) -> Llama:
    """Llama with random bf16 weights, built directly on `device` (no fp32 copy), plus LoRA."""
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=device).to(dtype)
    model.tie_weights()
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
    model.requires_grad_(False)
    add_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05))
    mark_only_lora_trainable(model)
    return model.train()


def train_steps(fabric: Fabric, model, optimizer, x: torch.Tensor, steps: int) -> list[float]:
    """Seconds per optimizer step (forward, backward, AdamW), synchronised with the device."""
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = causal_lm_loss(model, x, x)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # CPU: the process's peak RSS


def run_part(fabric: Fabric, config: Config, seq: int, micro_batch_size: int, warmup: int, steps: int,
             peak_tflops: float, label: str) -> None:
    if fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(fabric.device)
    model = random_lora_model(config, fabric.device, torch.bfloat16)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                          lr=1e-4, betas=(0.9, 0.95)))
    x = torch.randint(0, config.vocab_size, (micro_batch_size, seq), device=fabric.device)
    train_steps(fabric, model, optimizer, x, warmup)
    seconds = statistics.median(train_steps(fabric, model, optimizer, x, steps))
    tokens_per_s = micro_batch_size * seq / seconds
    tflops = step_flops_per_token(config, seq, "lora") * tokens_per_s / 1e12
    print(f"{label}: {seconds:.3f} s/step, {tokens_per_s:,.0f} tokens/s, {tflops:.1f} TFLOP/s = "
          f"{tflops / peak_tflops:.1%} MFU of {peak_tflops:g}, peak memory {peak_memory_gb(fabric.device):.1f} GB",
          flush=True)
    del model, optimizer
    if fabric.device.type == "cuda":
        torch.cuda.empty_cache()


def main(device: str = "cuda", model: str = "Llama-2-7b-hf", seq: int = 2048, micro_batch_size: int = 4,
         warmup: int = 2, steps: int = 5, fsdp_steps: int = 3, peak_tflops: float = 989.0) -> None:
    """LoRA tokens/s, MFU and peak memory on one device, then a few FSDP steps.

    Args:
        device: cuda, or cpu to check the script with a tiny model.
        model: litft config name (shapes; weights are random).
        seq: tokens per sample.
        micro_batch_size: samples per step.
        warmup: untimed steps first.
        steps: timed steps (the median is reported).
        fsdp_steps: timed steps under FSDP (0 skips that part).
        peak_tflops: the device's dense bf16 TFLOP/s (H200 / H100 SXM: 989).
    """
    config = Config.from_name(model)
    accelerator = "cuda" if device == "cuda" else "cpu"
    name = torch.cuda.get_device_name() if accelerator == "cuda" else "cpu"
    print(f"{name}: {model}, LoRA r 8 on q k v o gate up down, bf16-true, micro batch {micro_batch_size} × seq {seq}",
          flush=True)
    fabric = Fabric(accelerator=accelerator, devices=1, precision="bf16-true")
    fabric.seed_everything(0, verbose=False)
    run_part(fabric, config, seq, micro_batch_size, warmup, steps, peak_tflops, "single device")
    if fsdp_steps:
        from lightning.fabric.strategies import ModelParallelStrategy

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        strategy = ModelParallelStrategy(parallelize_fn=shard_blocks, data_parallel_size=1, tensor_parallel_size=1)
        fabric = Fabric(accelerator=accelerator, devices=1, strategy=strategy, precision="bf16-true")
        fabric.launch()
        run_part(fabric, config, seq, micro_batch_size, 1, fsdp_steps, peak_tflops, "FSDP2 (1 process)")
    print(f"done ({sys.argv[0]})", file=sys.stderr)


if __name__ == "__main__":
    run(main)
