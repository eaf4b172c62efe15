"""The memory plan against a GPU's measured peak: what every finetune/ run prints before loading weights, beside
torch.cuda.max_memory_allocated of the same steps.

    python bench/gpu_memory.py                                 # a GPU: 12 rows
    python bench/gpu_memory.py --device cpu --model tiny-gqa   # the script's logic on a CPU (no peak to compare)

For each method (LoRA, QLoRA with --quantize nf4, full fine-tuning), sequence length and activation
checkpointing off and on, one row: litft/memory.py plans the step from the config alone (as memory.plan_run
does, with finetune's precision mapping), then the model is built as finetune/*.py builds it (random weights:
memory does not depend on their values), handed to Fabric with `precision` (bf16-mixed, finetune's default on a
GPU: fp32 weights, bf16 compute), and trained for `steps` optimizer steps of micro batch × seq tokens. Printed:
planned GB, measured GB (the peak allocated during the steps, the model's own bytes included; building it is
left out, since finetune/*.py builds and quantizes on the CPU) and planned / measured; issue 15 asks for
0.75-1.25×. bench/memory.py is the same comparison on a CPU, against resident memory.
"""

from __future__ import annotations

import gc
from functools import partial
from typing import Callable, Literal

import torch
from lightning.fabric import Fabric

from litft import memory, qlora
from litft.cli import run
from litft.config import Config
from litft.fast import for_training
from litft.lora import LoRAConfig, add_lora
from litft.model import Llama
from litft.precision import AUTOCAST, TRUE_DTYPES

LORA = partial(add_lora, config=LoRAConfig(r=8, alpha=16, dropout=0.05))  # finetune/lora.py's defaults
METHODS: dict[str, tuple[Callable[[Llama], None], str | None]] = {  # name: (prepare the model, --quantize)
    "lora": (LORA, None),
    "qlora": (LORA, "nf4"),
    "full": (lambda model: model.requires_grad_(True), None),
}


def planned_bytes(config: Config, method: str, seq: int, micro: int, precision: str, checkpointing: bool,
                  device: torch.device) -> float:
    prepare, quantize = METHODS[method]
    plan = memory.plan(config, prepare, seq, dtype=TRUE_DTYPES.get(precision, torch.float32),  # a random fp32 base
                       autocast=AUTOCAST.get(precision), quantize=quantize,
                       activation_checkpointing=checkpointing, loss=lambda model: for_training(model, True),
                       device=device)
    return plan.with_micro_batch(micro).total


def measured_bytes(fabric: Fabric, config: Config, method: str, seq: int, micro: int, checkpointing: bool,
                   steps: int) -> float:
    """Peak allocated bytes over `steps` real steps of the model finetune/*.py would build (on a CPU: 0)."""
    on_gpu = fabric.device.type == "cuda"
    gc.collect()
    with fabric.init_module():  # on the device, in the precision's parameter dtype
        model = Llama(config)
    model.requires_grad_(False)
    prepare, quantize = METHODS[method]
    prepare(model)
    if quantize:
        qlora.quantize(model, quantize)
    model.activation_checkpointing = checkpointing
    loss_fn = for_training(model, True)
    wrapped = fabric.setup_module(model)
    wrapped.mark_forward_method("hidden_states")
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    x = torch.randint(0, config.vocab_size, (micro, seq), device=fabric.device)
    if on_gpu:  # from here on: what the steps hold, the model and its optimizer included
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(fabric.device)
    for _ in range(steps):
        with fabric.autocast():
            loss = loss_fn(wrapped, x, x)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(fabric.device) if on_gpu else 0.0
    del wrapped, model, optimizer, loss
    return peak


def main(device: Literal["cuda", "cpu"] = "cuda", model: str = "SmolLM2-135M", seqs: list[int] = [128, 512],
         micro_batch_size: int = 4, precision: str = "bf16-mixed", steps: int = 3,
         methods: list[Literal["lora", "qlora", "full"]] = ["lora", "qlora", "full"]) -> None:
    """Print a Markdown table: planned and measured peak memory of training steps, and their ratio.

    Args:
        device: cuda, or cpu to check the script's logic (nothing is measured there).
        model: litft config name (shapes; random weights).
        seqs: tokens per sample, one set of rows each.
        micro_batch_size: samples per step.
        precision: bf16-mixed, bf16-true or 32-true, as finetune/*.py --precision.
        steps: optimizer steps per row (AdamW's moments exist from the first on).
        methods: which methods to run.
    """
    config = Config.from_name(model)
    fabric = Fabric(accelerator=device, devices=1, precision=precision)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}: {model}, micro batch {micro_batch_size}, {precision}, {steps} steps per row\n")
    print("| method | seq | checkpointing | planned GB | measured GB | planned / measured |\n|---|---|---|---|---|---|")
    for method in methods:
        for seq in seqs:
            for checkpointing in (False, True):
                plan = planned_bytes(config, method, seq, micro_batch_size, precision, checkpointing, fabric.device)
                peak = measured_bytes(fabric, config, method, seq, micro_batch_size, checkpointing, steps)
                ratio = f"{plan / peak:.2f}×" if peak else "–"
                print(f"| {method} | {seq} | {'on' if checkpointing else 'off'} | {plan / 1e9:.2f} | "
                      f"{peak / 1e9:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    run(main)
