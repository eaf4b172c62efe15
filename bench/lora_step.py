"""Training-step speed and memory: litft against transformers + peft and litgpt, in one run.

    python bench/lora_step.py --seqs [256] --precisions [32-true]                  # one setting, ~3 min on 2 cores
    python bench/lora_step.py --method full --frameworks [litft,transformers]      # full fine-tuning
    python bench/lora_step.py --seqs [256] --frameworks [litft,litft-qlora,transformers-qlora] \
        --pairs [litft-qlora/litft,litft-qlora/transformers-qlora]                # QLoRA (NF4 base)

For every (sequence length, precision) it starts one bench/worker.py process per library (its own memory,
its own imports), warms each up, then alternates timed steps A B C A B C … and between rounds times this
machine's matmul rate on the model's shapes (bench/flops.py). It prints every round to stderr and a Markdown
table to stdout: median and best step seconds with each library's time relative to litft, tokens/s, achieved
FLOP/s and its fraction of the measured matmul rate (from the medians), peak RSS of each process during the
steps and its resident memory once the model was built; then, for each `--pairs` entry a/b, a's median step,
best step and peak RSS over b's. On a machine
shared with other work the best step is the cleaner estimate (contention only ever adds time). Weights are
random (speed does not depend on the values) but shared: at step 0 the LoRA product B·A is zero, so all first
losses agree (which checks the frozen forward pass and the loss only); the table prints them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from flops import matmul_rate, step_flops_per_token

from litft.cli import run
from litft.config import Config

WORKER = Path(__file__).with_name("worker.py")


class Worker:
    def __init__(self, framework: str, env: dict[str, str] | None = None, **flags) -> None:
        args = [f"--{k}={v}" for k, v in flags.items()]
        self.name = framework
        self.proc = subprocess.Popen([sys.executable, str(WORKER), f"--framework={framework}", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})

    def ready(self) -> bool:
        """Whether the worker started: one whose library is not installed (or fails to build) is skipped in one
        line, as bench/gpu.py and bench/decode.py skip it."""
        if self.proc.stdout.readline().strip() == "ready":
            return True
        self.proc.wait()
        print(f"{self.name}: failed to start (its traceback is above); skipped", file=sys.stderr, flush=True)
        return False

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"{self.name} worker died on {command!r} (see its traceback above)")
        return json.loads(answer)

    def close(self) -> dict:
        summary = self.ask("quit")
        self.proc.wait()
        return summary


def compare(frameworks: list[str], rounds: int, warmup: int, flags: dict, config: Config) -> list[dict]:
    """Alternate timed steps across one worker per framework; return a row per framework."""
    workers = [w for w in [Worker(f, **flags) for f in frameworks] if w.ready()]
    if not workers or workers[0].name != frameworks[0]:
        raise RuntimeError(f"{frameworks[0]}, the reference of the ratios, failed to start")
    frameworks = [w.name for w in workers]
    first_loss = {w.name: w.ask(f"step {warmup}")["loss"] for w in workers}
    times: dict[str, list[float]] = {f: [] for f in frameworks}
    rates = []
    dtype = torch.float32 if flags["precision"] == "32-true" else torch.bfloat16
    tokens = flags["micro_batch_size"] * flags["seq"]
    for r in range(rounds):
        for w in workers:
            seconds = w.ask("step 1")["seconds"][0]
            times[w.name].append(seconds)
            print(f"  round {r + 1} {w.name:>12}: {seconds:6.2f} s", file=sys.stderr, flush=True)
        rates.append(matmul_rate(config, tokens, dtype))
        print(f"  round {r + 1} matmul rate: {rates[-1] / 1e9:.1f} GFLOP/s", file=sys.stderr, flush=True)
    summaries = {w.name: w.close() for w in workers}
    rate = statistics.median(rates)
    flops = step_flops_per_token(config, flags["seq"], flags["method"]) * tokens
    rows = []
    for f in frameworks:
        median = statistics.median(times[f])
        best = min(times[f])  # on a shared machine, noise only ever adds time: the best step is the cleanest
        rows.append({"framework": f, "seconds": median, "vs_litft": median / statistics.median(times[frameworks[0]]),
                     "best": best, "best_vs": best / min(times[frameworks[0]]),
                     "tokens_per_s": tokens / median, "gflops": flops / median / 1e9,
                     "of_matmul": flops / median / rate, "matmul_gflops": rate / 1e9,
                     "peak_rss_mb": summaries[f]["peak_rss_mb"], "built_rss_mb": summaries[f]["built_rss_mb"],
                     "first_loss": first_loss[f]})
    return rows


def pair_ratios(rows: list[dict], pairs: list[str]) -> list[tuple[str, float, float, float]]:
    """For each "a/b" of `pairs`: (the pair, a's median step / b's, best step / best step, peak RSS / peak RSS)."""
    by_name = {row["framework"]: row for row in rows}
    out = []
    for pair in pairs:
        if not all(name in by_name for name in pair.split("/")):
            continue  # a library that failed to start
        a, b = (by_name[name] for name in pair.split("/"))
        out.append((pair, a["seconds"] / b["seconds"], a["best"] / b["best"], a["peak_rss_mb"] / b["peak_rss_mb"]))
    return out


def main(method: str = "lora", seqs: list[int] = [256, 512], precisions: list[str] = ["32-true", "bf16-mixed"],
         frameworks: list[str] = ["litft", "transformers", "litgpt"], model: str = "SmolLM2-135M",
         micro_batch_size: int = 4, dropout: float = 0.05, rounds: int = 3, warmup: int = 1, threads: int = 0,
         activation_checkpointing: bool = False, pairs: list[str] = []) -> None:
    """Time one training step (forward, backward, AdamW) of each library, alternating, and print a table.

    Args:
        method: lora (r 8, alpha 16, all seven linear layers) or full.
        seqs: sequence lengths to run.
        precisions: 32-true, bf16-mixed (torch.autocast to bfloat16) and/or bf16-true (the model in bfloat16).
        frameworks: libraries to compare (bench/frameworks.py); the first is the reference of the ratios.
        model: litft config name (shapes).
        micro_batch_size: samples per step.
        dropout: LoRA dropout (0.05 is litft's and litgpt's recipe default).
        rounds: timed steps per library.
        warmup: untimed steps per library first.
        threads: torch CPU threads per worker and for the matmul rate (0: torch's choice).
        activation_checkpointing: recompute each block in the backward pass (not litgpt).
        pairs: "a/b" ratios of two of the frameworks to print in a second table, e.g. litft-qlora/transformers-qlora.
    """
    cfg = Config.from_name(model)
    if threads:  # the matmul rate is measured in this process
        torch.set_num_threads(threads)
    for pair in pairs:  # checked now, not after the run
        if pair.count("/") != 1 or not set(pair.split("/")) <= set(frameworks):
            raise SystemExit(f"--pairs {pair}: write a/b with a and b among --frameworks {frameworks}")
    print(f"| method | seq | precision | library | median s | vs {frameworks[0]} | best s | vs {frameworks[0]} | tokens/s "
          f"| GFLOP/s | of matmul rate | peak RSS MB | built RSS MB | first loss |\n"
          f"|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for seq in seqs:
        for precision in precisions:
            print(f"{method}, seq {seq}, {precision}:", file=sys.stderr, flush=True)
            flags = dict(method=method, model=model, seq=seq, micro_batch_size=micro_batch_size,
                         precision=precision, dropout=dropout, threads=threads,
                         activation_checkpointing=activation_checkpointing)
            rows = compare(frameworks, rounds, warmup, flags, cfg)
            for row in rows:
                print(f"| {method} | {seq} | {precision} | {row['framework']} | {row['seconds']:.2f} | "
                      f"{row['vs_litft']:.2f} | {row['best']:.2f} | {row['best_vs']:.2f} | {row['tokens_per_s']:.0f} | {row['gflops']:.1f} | "
                      f"{row['of_matmul']:.0%} of {row['matmul_gflops']:.1f} | {row['peak_rss_mb']:.0f} | "
                      f"{row['built_rss_mb']:.0f} | {row['first_loss']:.4f} |", flush=True)
            ratios += [(seq, precision, *r) for r in pair_ratios(rows, pairs)]
    if ratios:
        print("\n| seq | precision | a / b | median step | best step | peak RSS |\n|---|---|---|---|---|---|")
        for seq, precision, pair, median, best, rss in ratios:
            print(f"| {seq} | {precision} | {pair} | {median:.2f} | {best:.2f} | {rss:.2f} |")


if __name__ == "__main__":
    run(main)
