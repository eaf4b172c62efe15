"""A process that holds ONE library's model and times its training step on command.

    python bench/worker.py --framework litft --method lora --seq 256 --precision bf16-mixed

It builds the model, prints `ready`, then reads commands on stdin, one per line, and answers each with one JSON
line on stdout:

    step N   ->  {"seconds": [...], "loss": ...}     N timed steps (forward, backward, AdamW step, zero_grad)
    quit     ->  {"peak_rss_mb": ..., ...}           peak resident memory during the steps (and resident memory
                                                  once built: the model as its library leaves it), then it exits

bench/lora_step.py starts one worker per library and alternates `step` commands between them, so the libraries
share the machine's good and bad moments alike, while each one's memory stays in a process of its own.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable, Literal

import torch
from frameworks import StepSpec, build, litft_plan

from litft.cli import run
from litft.config import Config


def peak_rss_mb() -> float:
    """Peak resident set size of this process since the last reset_peak_rss() (Linux: VmHWM)."""
    return status_mb("VmHWM")


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (in kB there), in MB: VmHWM (peak resident) or VmRSS (resident now)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def reset_peak_rss() -> None:
    """Forget the build: hand freed heap pages back to the OS and restart the peak counter (Linux).

    Building copies the shared random weights into each library's model, briefly holding two copies; the
    peak that matters is the one of training steps, the same for every library.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def main(framework: Literal["litft", "litft-plain", "litft-qlora", "litft-qlora-compiled", "transformers",
                           "transformers-qlora", "litgpt"],
         method: Literal["lora", "full"] = "lora",
         model: str = "SmolLM2-135M", seq: int = 256, micro_batch_size: int = 4,
         precision: Literal["32-true", "bf16-mixed", "bf16-true"] = "32-true",
         dropout: float = 0.05, threads: int = 0, seed: int = 0,
         activation_checkpointing: bool = False) -> None:
    """Serve timed training steps of one library over stdin/stdout.

    Args:
        framework: which library builds and runs the step (litft-plain: litft with --fast false; *-qlora: LoRA
            on the blocks' frozen weights in 4-bit NF4, litft's own or bitsandbytes').
        method: LoRA (r 8, alpha 16, all seven linear layers of every block) or full fine-tuning.
        model: a litft config name (shapes only; the weights are random).
        seq: tokens per sample.
        micro_batch_size: samples per step.
        precision: 32-true (fp32), bf16-mixed (fp32 weights, torch.autocast to bfloat16) or bf16-true (the model
            converted to bfloat16, as finetune/ --precision bf16-true; peft's QLoRA recipe keeps its parameters
            outside the 4-bit layers in fp32 whatever the precision). QLoRA dequantizes to bfloat16 in both.
        dropout: LoRA dropout.
        threads: torch CPU threads (0: torch's choice).
        seed: weights and batch seed.
        activation_checkpointing: recompute each block's activations in the backward pass.
    """
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float32 if precision == "32-true" else torch.bfloat16
    spec = StepSpec(Config.from_name(model), method=method, dropout=dropout, seed=seed,
                    activation_checkpointing=activation_checkpointing, compute_dtype=dtype,
                    param_dtype=torch.bfloat16 if precision == "bf16-true" else torch.float32)
    plan = litft_plan(framework, spec, micro_batch_size, seq)  # before the model exists, as finetune/ makes it
    net, loss_fn = build(framework, spec)
    if precision == "bf16-true" and framework != "transformers-qlora":
        net.to(torch.bfloat16)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95))
    x = torch.randint(0, spec.config.vocab_size, (micro_batch_size, seq), generator=torch.Generator().manual_seed(seed))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    build_peak_mb = peak_rss_mb()
    reset_peak_rss()
    built_mb = status_mb("VmRSS")

    def step() -> float:
        with autocast:
            loss = loss_fn(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    print("ready", flush=True)
    answer_commands(step, lambda: {"peak_rss_mb": peak_rss_mb(), "build_peak_rss_mb": build_peak_mb,
                                   "built_rss_mb": built_mb, "trainable": sum(p.numel() for p in trainable),
                                   "planned_mb": plan.total / 1e6 if plan else None,
                                   "threads": torch.get_num_threads()})


def answer_commands(step: Callable[[], float], report: Callable[[], dict]) -> None:
    """Read commands from stdin: `step N` runs N steps and prints a JSON line of their seconds and the first loss;
    `quit` prints report() as a JSON line and returns."""
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "step":
            seconds, losses = [], []
            for _ in range(int(arg[0])):
                t0 = time.perf_counter()
                losses.append(step())
                seconds.append(time.perf_counter() - t0)
            print(json.dumps({"seconds": seconds, "loss": losses[0]}), flush=True)
        elif cmd == "quit":
            print(json.dumps(report()), flush=True)
            return


if __name__ == "__main__":
    run(main)
