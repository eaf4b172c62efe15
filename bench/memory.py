"""Peak memory of LoRA against full fine-tuning, litft, same model, batch and precision, in one run.

    python bench/memory.py                                   # SmolLM2-135M shapes, seq 256, micro batch 4, fp32
    python bench/memory.py --seq 512 --allocators [glibc,tcmalloc]   # only these allocators

For each method, without and with activation checkpointing, one bench/worker.py process builds the model,
runs `steps` training steps (forward, backward, AdamW) and reports its peak resident memory, beside the peak
litft/memory.py planned for it before the model existed (what every finetune/ run prints) and their ratio. What differs
between the methods is what full fine-tuning keeps for every parameter: a gradient and AdamW's two moments,
3 × 4 bytes per parameter in fp32 (1.6 GB for 135 M parameters); LoRA keeps them for its 0.3 % of parameters
only. What both keep is the weights, the process itself (Python, torch: a few hundred MB) and the activations
of one micro batch — which at 135 M parameters are as large as the optimizer state, unless checkpointed.

Resident memory also counts what the C allocator keeps after torch frees it: glibc serves large blocks from
its heap once its mmap threshold has risen, and a freed block stays resident. Each setting is therefore run
twice: with glibc's defaults, and with MALLOC_MMAP_THRESHOLD_=65536, which maps every block over 64 KiB on its
own and returns it to the OS when freed, so the peak follows the tensors alive at once (what a GPU's
max_memory_allocated reports). Two other allocators run where their Debian packages are installed
(`apt-get install libtcmalloc-minimal4 libjemalloc2`), preloaded with LD_PRELOAD into the worker: tcmalloc and
jemalloc, which PyTorch's performance tuning guide suggests for CPU training and which give freed memory back
to the OS without an mmap per block.
"""

from __future__ import annotations

import ctypes.util
import sys
from typing import Literal

from lora_step import Worker

from litft.cli import run

ALLOCATORS = {  # name: (what the table calls it, its environment variables or the library to preload)
    "glibc": ("glibc default", {"LD_PRELOAD": ""}),  # not an allocator this shell may have preloaded
    "mmap": ("mmap over 64 KiB", {"MALLOC_MMAP_THRESHOLD_": "65536", "LD_PRELOAD": ""}),
    "tcmalloc": ("tcmalloc", "tcmalloc_minimal"),
    "jemalloc": ("jemalloc", "jemalloc"),
}


def allocator_env(name: str) -> dict[str, str] | None:
    """The environment that makes a worker use this allocator; None when its library is not installed."""
    env = ALLOCATORS[name][1]
    if isinstance(env, dict):
        return env
    library = ctypes.util.find_library(env)  # e.g. "libtcmalloc_minimal.so.4", which the dynamic loader finds
    return {"LD_PRELOAD": library} if library else None


def main(model: str = "SmolLM2-135M", seq: int = 256, micro_batch_size: int = 4,
         precision: str = "32-true", steps: int = 3, threads: int = 0,
         allocators: tuple[Literal["glibc", "mmap", "tcmalloc", "jemalloc"], ...] = ("glibc", "mmap", "tcmalloc",
                                                                                     "jemalloc")) -> None:
    """Print a Markdown table: peak RSS of LoRA and full fine-tuning, and their ratio.

    Args:
        model: litft config name (shapes; random weights).
        seq: tokens per sample.
        micro_batch_size: samples per step.
        precision: 32-true or bf16-mixed.
        steps: training steps per process (the optimizer state exists from the first step on).
        threads: torch CPU threads per worker (0: torch's choice).
        allocators: any of glibc, mmap, tcmalloc, jemalloc; one not installed is skipped with a line on stderr.
    """
    print(f"{model}, seq {seq}, micro batch {micro_batch_size}, {precision}, {steps} steps\n")
    print("| allocator | activation checkpointing | LoRA peak RSS MB | planned | full peak RSS MB | planned | LoRA / full "
          "| LoRA s/step | full s/step |\n|---|---|---|---|---|---|---|---|---|")
    for name in allocators:
        allocator, env = ALLOCATORS[name][0], allocator_env(name)
        if env is None:
            print(f"{name}: its library is not installed, skipped", file=sys.stderr)
            continue
        for checkpointing in (False, True):
            row = {}
            for method in ("lora", "full"):  # one process at a time: each has the machine to itself
                print(f"{method}, {allocator}, activation checkpointing {checkpointing} ...", file=sys.stderr,
                      flush=True)
                w = Worker("litft", env=env, method=method, model=model, seq=seq, micro_batch_size=micro_batch_size,
                           precision=precision, threads=threads, activation_checkpointing=checkpointing)
                w.wait_ready()
                seconds = w.ask(f"step {steps}")["seconds"]
                report = w.close()
                row[method] = (report["peak_rss_mb"], report["planned_mb"], min(seconds[1:] or seconds))
            (lora_mb, lora_plan, lora_s), (full_mb, full_plan, full_s) = row["lora"], row["full"]
            print(f"| {allocator} | {'on' if checkpointing else 'off'} | {lora_mb:.0f} | {lora_plan:.0f} "
                  f"({lora_plan / lora_mb:.2f}×) | {full_mb:.0f} | {full_plan:.0f} ({full_plan / full_mb:.2f}×) | "
                  f"{lora_mb / full_mb:.2f} | {lora_s:.2f} | {full_s:.2f} |", flush=True)


if __name__ == "__main__":
    run(main)
