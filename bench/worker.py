"""A process that holds ONE library's model and times its training step on command.

    python bench/worker.py --framework litft --method lora --seq 256 --precision bf16-mixed

It builds the model, prints `ready`, then reads commands on stdin, one per line, and answers each with one JSON
line on stdout:

    step N   ->  {"seconds": [...], "loss": ...}     N timed steps (forward, backward, AdamW step, zero_grad)
    quit     ->  {"peak_rss_mb": ..., ...}           peak resident memory of this process, then it exits

bench/lora_step.py starts one worker per library and alternates `step` commands between them, so the libraries
share the machine's good and bad moments alike, while each one's memory stays in a process of its own.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Literal

import torch

from frameworks import StepSpec, build
from litft.cli import run
from litft.config import Config


def rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(framework: Literal["litft", "transformers", "litgpt"], method: Literal["lora", "full"] = "lora",
         model: str = "SmolLM2-135M", seq: int = 256, micro_batch_size: int = 4, precision: Literal["32-true", "bf16-mixed"] = "32-true",
         dropout: float = 0.05, threads: int = 0, seed: int = 0) -> None:
    """Serve timed training steps of one library over stdin/stdout.

    Args:
        framework: which library builds and runs the step.
        method: LoRA (r 8, alpha 16, all seven linear layers of every block) or full fine-tuning.
        model: a litft config name (shapes only; the weights are random).
        seq: tokens per sample.
        micro_batch_size: samples per step.
        precision: 32-true (fp32) or bf16-mixed (fp32 weights, torch.autocast to bfloat16).
        dropout: LoRA dropout.
        threads: torch CPU threads (0: torch's choice).
        seed: weights and batch seed.
    """
    if threads:
        torch.set_num_threads(threads)
    spec = StepSpec(Config.from_name(model), method=method, dropout=dropout, seed=seed)
    net, loss_fn = build(framework, spec)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95))
    x = torch.randint(0, spec.config.vocab_size, (micro_batch_size, seq), generator=torch.Generator().manual_seed(seed))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    rss_built = rss_mb()

    def step() -> float:
        with autocast:
            loss = loss_fn(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    print("ready", flush=True)
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
            print(json.dumps({"peak_rss_mb": rss_mb(), "rss_after_build_mb": rss_built,
                              "trainable": sum(p.numel() for p in trainable), "threads": torch.get_num_threads()}),
                  flush=True)
            return


if __name__ == "__main__":
    run(main)
