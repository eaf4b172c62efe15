"""Serving under load: concurrent requests over several LoRAs, against one-at-a-time serving and transformers + PEFT.

    python bench/serve_load.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

1. Writes `loras` LoRA runs on the base (ranks 4, 8, 16, ...; different targets; random nonzero B, seeded) under
   --out_dir, as finetune/lora.py leaves them.
2. Starts scripts/serve.py on a free port of 127.0.0.1 and sends `requests` chat requests (request i names LoRA
   i mod `loras`; greedy; max_tokens each), first one at a time, then all at once from as many threads. Every
   request has a time limit, and the server is stopped at the end whatever happens.
3. Runs the same prompts (the same token ids) through transformers + PEFT's batched
   `generate(..., adapter_names=...)`, all rows in one batch, the LoRAs exported with scripts/export_peft.py
   (`--verify false`). Like litft's server, PEFT first answers the first request alone, untimed. With
   `--peft_alone true` PEFT also answers each request alone (in-process like its batch: only the `generate`
   calls are timed, where litft's one-at-a-time row goes through HTTP), to show how often its own batched answers
   equal those (in 16 bits the batch's shapes change the rounding, for PEFT as for litft).

With `--rounds N` the all-at-once phase and PEFT's batch alternate N times (litft, PEFT, litft, PEFT, ...), and
each side's fastest round is reported: on a machine whose load comes and goes, a slow minute then costs both sides
alike, and contention only ever adds time.

It prints aggregate tokens/s of each, their ratios (against PEFT by time as well: where the answers differ, so
do the numbers of tokens), time to first token and per-request tokens/s, and whether every concurrent answer
equals its one-at-a-time answer (and PEFT's; with `--peft_alone`, PEFT's batched answers against its own one at
a time).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from litft.base_checkpoint import record_base  # noqa: E402
from litft.checkpoint import load_lit_model  # noqa: E402
from litft.cli import run  # noqa: E402
from litft.conversation import encode_conversation  # noqa: E402
from litft.errors import UserError  # noqa: E402
from litft.files import save_state_dict  # noqa: E402
from litft.lora import LoRAConfig, add_lora, lora_state_dict  # noqa: E402
from litft.prompts import resolve_style  # noqa: E402
from litft.tokenizer import Tokenizer  # noqa: E402

TOPICS = ["the sea", "a mountain", "coffee", "a library", "rain", "a bicycle", "the moon", "bread", "a train",
          "winter", "a garden", "music", "a river", "chess", "a lighthouse", "autumn", "a violin", "the desert",
          "a market", "snow", "a forest", "the city", "a bridge", "tea", "a museum", "the wind", "a harbor",
          "spring", "a clock", "a candle", "the stars", "a meadow"]
TARGETS = [["q", "v"], ["q", "k", "v", "o"], ["q", "k", "v", "o", "gate", "up", "down"], ["gate", "up", "down"]]


DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16}


def main(checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), requests: int = 32,
         loras: int = 4, max_tokens: int = 64, out_dir: Path = Path("out/bench/serve"), peft: bool = True,
         precision: str = "32-true", rounds: int = 1, peft_alone: bool = False, min_shared: int = 16) -> None:
    """Print the load test's table and write it to out_dir/report.json.

    Args:
        checkpoint_dir: the base's lit checkpoint.
        requests: chat requests, sent one at a time, then all at once.
        loras: LoRA runs written on the base; request i names LoRA i mod loras.
        max_tokens: new tokens per request at most.
        out_dir: where the LoRAs, their PEFT exports, the transformers checkpoint and the report go.
        peft: also run transformers + PEFT's batched generate on the same prompts.
        precision: 32-true or bf16-true, for litft's server and transformers + PEFT alike (both on the GPU when
            there is one).
        rounds: how many times the all-at-once phase and PEFT's batch alternate; the fastest of each is reported.
        peft_alone: also run each request alone through transformers + PEFT (after the rounds), and count how many
            of PEFT's batched answers equal those.
        min_shared: the server's --min_shared (requests of one LoRA joining together that begin with at least this
            many equal tokens, here the chat template's system turn and "Write two sentences about", compute them
            once; 0: never).
    """
    if peft_alone and not peft:
        raise UserError("--peft_alone true runs transformers + PEFT: drop --peft false, or --peft_alone")
    runs = make_loras(checkpoint_dir, out_dir / "loras", loras)
    questions = [f"Write two sentences about {TOPICS[i % len(TOPICS)]}." for i in range(requests)]
    names = [f"lora{i % loras}" for i in range(requests)]
    peft_batch = peft_generator(checkpoint_dir, runs, out_dir, names, questions, max_tokens,
                                DTYPES[precision]) if peft else None
    together, peft_runs = [], []  # per round: (answers, seconds); (texts, seconds, tokens)
    with Server(checkpoint_dir, runs, precision, min_shared) as server:
        server.ask(names[0], questions[0], max_tokens)  # warm-up
        t0 = time.perf_counter()
        alone = [server.ask(n, q, max_tokens) for n, q in zip(names, questions)]
        alone_s = time.perf_counter() - t0
        for _ in range(rounds):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(requests) as pool:
                answers = list(pool.map(lambda nq: server.ask(*nq, max_tokens), zip(names, questions)))
            together.append((answers, time.perf_counter() - t0))
            if peft_batch:
                peft_runs.append(peft_batch())
    answers, together_s = min(together, key=lambda r: r[1])
    report = {"requests": requests, "loras": loras, "max_tokens": max_tokens, "precision": precision,
              "min_shared": min_shared, "rounds": rounds, "one_at_a_time": summary(alone, alone_s),
              "concurrent": summary(answers, together_s), "concurrent_seconds_each_round": [s for _, s in together],
              "concurrent_equal_one_at_a_time": min(sum(a["text"] == b["text"] for a, b in zip(alone, answers))
                                                    for answers, _ in together)}
    if peft_runs:
        texts, seconds, tokens = min(peft_runs, key=lambda r: r[1])
        report["peft_batched"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                                  "seconds_each_round": [s for _, s, _ in peft_runs]}
        report["peft_equal_litft"] = min(sum(a["text"] == t for a, t in zip(alone, texts)) for texts, _, _ in peft_runs)
        if peft_alone:
            singles = [peft_batch([i]) for i in range(requests)]  # (texts, seconds, tokens) of a batch of one
            alone_s, alone_n = sum(s for _, s, _ in singles), sum(n for _, _, n in singles)
            report["peft_one_at_a_time"] = {"seconds": alone_s, "tokens": alone_n, "tokens_per_s": alone_n / alone_s}
            report["peft_batched_equal_peft_alone"] = min(sum(t == single[0][0] for t, single in zip(batched, singles))
                                                          for batched, _, _ in peft_runs)
    print_report(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))


def make_loras(checkpoint_dir: Path, directory: Path, n: int) -> dict[str, Path]:
    """n LoRA runs on the base, each with its own rank and targets and a random nonzero B."""
    runs = {}
    for i in range(n):
        run_dir, config = directory / f"lora{i}", LoRAConfig(r=4 * 2 ** (i % 3), alpha=16, targets=TARGETS[i % 4])
        runs[f"lora{i}"] = run_dir / "lit_model_lora.pth"
        if runs[f"lora{i}"].is_file():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(i)
        model = add_lora(load_lit_model(checkpoint_dir), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(std=0.02)
        save_state_dict(lora_state_dict(model), runs[f"lora{i}"])
        config.save(run_dir)
        model.config.save(run_dir)
        record_base(run_dir, checkpoint_dir)
    return runs


class Server:
    """scripts/serve.py on a free port of 127.0.0.1, stopped on exit; requests through the official openai client."""

    def __init__(self, checkpoint_dir: Path, runs: dict[str, Path], precision: str, min_shared: int = 16) -> None:
        import openai

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/serve.py"), "--checkpoint_dir",
                                      str(checkpoint_dir), "--port", str(port), "--max_batch_size", "64", "--precision",
                                      precision, "--min_shared", str(min_shared),
                                      *(f"--lora={n}={p}" for n, p in runs.items())],
                                     env=with_root_on_path())
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300,
                                    max_retries=0)
        self.wait_until_ready(openai.APIConnectionError)

    def wait_until_ready(self, not_yet: type, limit_s: float = 180) -> None:
        deadline = time.monotonic() + limit_s
        while True:
            try:
                self.client.models.list()
                return
            except not_yet:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise SystemExit("the server did not start")
                time.sleep(0.5)

    def ask(self, model: str, question: str, max_tokens: int) -> dict:
        """One streamed greedy chat request: its text, token count, time to first token and total time."""
        start, first, text, usage = time.perf_counter(), None, "", None
        stream = self.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        end = time.perf_counter()
        return {"text": text, "tokens": usage.completion_tokens, "ttft": (first or end) - start, "seconds": end - start}

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def summary(answers: list[dict], seconds: float) -> dict:
    tokens = sum(a["tokens"] for a in answers)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "ttft_median_s": statistics.median(a["ttft"] for a in answers),
            "ttft_max_s": max(a["ttft"] for a in answers),
            "request_tokens_per_s_median": statistics.median(a["tokens"] / a["seconds"] for a in answers)}


def peft_generator(checkpoint_dir: Path, runs: dict[str, Path], out_dir: Path, names: list[str], questions: list[str],
                   max_tokens: int, dtype: torch.dtype) -> Callable[..., tuple[list[str], float, int]]:
    """transformers + PEFT, loaded and warmed up: a function that runs requests (all by default, or the indexes it
    is given) in one left-padded batch with generate(adapter_names=...) and returns the texts, the seconds and the
    tokens."""
    import peft
    import transformers

    # The exporters' own verification (tests/test_verify.py covers it) is skipped: it would load each model once
    # more, and this comparison checks the exports anyway, as PEFT's answers against litft's.
    hf_dir = out_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        script(["scripts/convert_lit_checkpoint.py", "--checkpoint_dir", checkpoint_dir, "--output_dir", hf_dir,
                "--verify", "false"])
    for name, path in runs.items():
        if not (out_dir / "peft" / name / "adapter_config.json").is_file():
            script(["scripts/export_peft.py", "--checkpoint_dir", checkpoint_dir, "--lora_path", path,
                    "--output_dir", out_dir / "peft" / name, "--verify", "false"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device)
    model = peft.PeftModel.from_pretrained(model, out_dir / "peft" / "lora0", adapter_name="lora0")
    for name in list(runs)[1:]:
        model.load_adapter(out_dir / "peft" / name, adapter_name=name)
    model.to(device).eval()  # the adapters loaded after the move are moved too
    tokenizer = Tokenizer(checkpoint_dir)
    style = resolve_style(None, checkpoint_dir)
    prompts = [encode_conversation(tokenizer, style, [{"role": "user", "content": q}]).tolist() for q in questions]
    stops = sorted(tokenizer.stop_ids)
    with torch.inference_mode():  # warm-up, untimed, as litft's server gets one: the first request alone
        first = torch.tensor([prompts[0]], device=device)
        model.generate(input_ids=first, attention_mask=torch.ones_like(first), max_new_tokens=max_tokens,
                       do_sample=False, eos_token_id=stops, pad_token_id=0, adapter_names=names[:1])

    def batch(which: list[int] | None = None) -> tuple[list[str], float, int]:
        which = range(len(prompts)) if which is None else which
        width = max(len(prompts[i]) for i in which)
        ids = torch.tensor([[0] * (width - len(prompts[i])) + prompts[i] for i in which], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in which], device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=0, adapter_names=[names[i] for i in which])
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        texts, tokens = [], 0
        for row in out[:, width:].tolist():
            kept = row[:next((i for i, t in enumerate(row) if t in stops), len(row))]
            tokens += len(kept)
            texts.append(tokenizer.decode(kept))
        return texts, seconds, tokens
    return batch


def script(args: list) -> None:
    subprocess.run([sys.executable, str(ROOT / args[0]), *map(str, args[1:])], check=True, timeout=600,
                   env=with_root_on_path(), stdout=subprocess.DEVNULL)


def with_root_on_path() -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH, keeping what was there (where
    bench/gpu_session.sh put the packages it installed)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def print_report(r: dict) -> None:
    one, many = r["one_at_a_time"], r["concurrent"]
    rounds = f", fastest of {r['rounds']} alternating rounds" if r["rounds"] > 1 else ""
    print(f"{r['requests']} requests over {r['loras']} LoRAs, greedy, max_tokens {r['max_tokens']}, {r['precision']}, "
          f"--min_shared {r['min_shared']}{rounds}")
    print(f"{'':28}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT max':>10}{'req tok/s':>11}")
    for label, s in (("litft, one at a time", one), ("litft, all at once", many)):
        print(f"{label:28}{s['tokens']:>8}{s['seconds']:>9.2f}{s['tokens_per_s']:>10.1f}{s['ttft_median_s']:>10.3f}"
              f"{s['ttft_max_s']:>10.3f}{s['request_tokens_per_s_median']:>11.1f}")
    if "peft_batched" in r:
        p = r["peft_batched"]
        print(f"{'transformers+peft, 1 batch':28}{p['tokens']:>8}{p['seconds']:>9.2f}{p['tokens_per_s']:>10.1f}")
    if "peft_one_at_a_time" in r:
        p = r["peft_one_at_a_time"]
        print(f"{'transformers+peft, alone':28}{p['tokens']:>8}{p['seconds']:>9.2f}{p['tokens_per_s']:>10.1f}")
    if r["rounds"] > 1:  # answers below: the fewest equal in any round
        each = lambda seconds: ", ".join(f"{s:.2f}" for s in seconds)  # noqa: E731
        peft = f"; transformers+peft: {each(r['peft_batched']['seconds_each_round'])}" if "peft_batched" in r else ""
        print(f"seconds of each round, litft all at once: {each(r['concurrent_seconds_each_round'])}{peft}")
    print(f"concurrent answers equal to one-at-a-time: {r['concurrent_equal_one_at_a_time']}/{r['requests']}")
    print(f"aggregate tokens/s, all at once / one at a time: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x")
    if "peft_batched" in r:
        print(f"aggregate tokens/s, litft all at once / transformers+peft batched: "
              f"{many['tokens_per_s'] / r['peft_batched']['tokens_per_s']:.2f}x")
        p = r["peft_batched"]  # by time as well: with different answers the two batches make different tokens
        print(f"seconds, transformers+peft batched / litft all at once: {p['seconds'] / many['seconds']:.2f}x "
              f"(tokens {many['tokens']} / {p['tokens']})")
        print(f"litft answers equal to transformers+peft's: {r['peft_equal_litft']}/{r['requests']}")
    if "peft_batched_equal_peft_alone" in r:
        print(f"transformers+peft batched answers equal to its own one at a time: "
              f"{r['peft_batched_equal_peft_alone']}/{r['requests']}")


if __name__ == "__main__":
    run(main)
