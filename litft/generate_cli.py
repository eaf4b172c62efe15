"""The command line of the generate/ scripts: load a model, wrap the prompt in its style, stream the answer.

The scripts (generate/base.py, lora.py, adapter.py, adapter_v2.py, full.py) differ only in how the model is
built; `generate_cli` does the rest. It loads the model through litft/fast (`for_generation`): on a CPU in fp32
the weights are reordered once into oneDNN's blocked layout (litft/fast/cpu_decoding.py), and an fp32 LoRA is
merged first; `--fast false` decodes with the model as loaded. The decoding loop (litft/generate.py) is the same
either way. The completion goes to stdout as it is produced; what was loaded, the time to first token, the
decoding speed and the peak memory go to stderr.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from litft.config import Config
from litft.errors import UserError
from litft.fast import for_generation
from litft.generate import check_fits, generate, stop_token_ids
from litft.kinds import check_checkpoint
from litft.load_finetuned import tokenizer_dir
from litft.memory import peak_memory_gb
from litft.prompts import resolve_style
from litft.stop_strings import StopStrings
from litft.tokenizer import StreamDecoder, Tokenizer

PRECISIONS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}


def pick_precision(precision: Optional[str], device: torch.device) -> tuple[str, torch.dtype]:
    """bf16-true on a GPU, 32-true on a CPU unless asked otherwise."""
    precision = precision or ("bf16-true" if device.type == "cuda" else "32-true")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not supported for generation; "
                        f"choose one of {', '.join(PRECISIONS)}")
    return precision, PRECISIONS[precision]


def peak_memory(device: torch.device) -> str:
    where = "GPU, allocated by torch" if device.type == "cuda" else "RSS"
    return f"peak memory: {peak_memory_gb(device):.2f} GB ({where})"


def generate_cli(checkpoint_dir: Path, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                 top_k: Optional[int] = 50, top_p: float = 1.0, seed: int = 1234, precision: Optional[str] = None,
                 prompt_style: Optional[str] = None, fast: bool = True, quantize: Optional[str] = None, *,
                 load_model: Callable[..., torch.nn.Module], run_dir: Optional[Path]) -> str:
    """Generate a completion for a prompt; the completion alone goes to stdout, streamed as it is produced.

    Args:
        checkpoint_dir: a lit checkpoint directory (lit_model.pth, model_config.yaml, tokenizer files).
        prompt: the text to continue; wrapped in a prompt style when one is named or found (see prompt_style).
        max_new_tokens: the most tokens to generate; generation also stops at any of the model's stop tokens.
        temperature: 0 picks the most likely token every step (greedy, deterministic); higher is more random.
        top_k: sample only among the k most likely tokens (null: no limit).
        top_p: sample only among the most likely tokens whose probabilities add up to top_p (1.0: no limit).
        seed: seed of the random generator, so sampling is reproducible.
        precision: bf16-true, 16-true or 32-true (default: bf16-true on a GPU, 32-true on a CPU).
        prompt_style: wrap the prompt in this style (plain, alpaca, chatml, smollm2, llama2-chat, chat-template);
            by default the style saved as prompt_style.yaml in the run or checkpoint directory, else the chat
            template in the checkpoint's tokenizer_config.json, else the prompt as given (same as plain).
        fast: apply litft/fast's decoding measures (CPU weight layout, fp32 LoRA merged); false decodes with the
            model exactly as loaded.
        quantize: nf4 or nf4-dq: the blocks' linear weights in 4 bits (litft/qlora.py; a QLoRA run: howto/qlora.md).

    The generate/ scripts differ only in `load_model(checkpoint_dir, device=, dtype=, mmap=, quantize=)`, which
    builds the model (e.g. base weights plus LoRA weights), and `run_dir`, a fine-tuning run's directory searched
    for prompt_style.yaml before checkpoint_dir (None for a plain checkpoint).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, dtype = pick_precision(precision, device)
    check_sampling(temperature, top_k, top_p)
    check_text(prompt, "--prompt")
    checkpoint_dir = check_checkpoint(checkpoint_dir)
    style = resolve_style(prompt_style, *(d for d in (run_dir, checkpoint_dir) if d is not None and Path(d).is_dir()))
    tokenizer = Tokenizer(tokenizer_dir(run_dir, checkpoint_dir))  # a run with new tokens has its own
    ids = tokenizer.encode(style.apply(prompt), bos=style.add_bos) if style else tokenizer.encode(prompt)  # (T,)
    if style is not None:
        print(f"prompt style: {style.name}", file=sys.stderr)
    check_fits(Config.from_checkpoint(checkpoint_dir).block_size, len(ids), max_new_tokens)  # before loading

    t0 = time.perf_counter()
    model = for_generation(partial(load_model, checkpoint_dir, quantize=quantize), device, dtype, fast)
    print(f"loaded {checkpoint_dir} in {time.perf_counter() - t0:.2f} s ({device.type}, {precision})", file=sys.stderr)

    generator = torch.Generator(device).manual_seed(seed)
    stops = stop_token_ids(tokenizer, style)
    tokens = generate(model, ids.to(device), max_new_tokens, temperature, top_k, top_p, stops, generator)
    text, timings = stream(tokens, tokenizer)
    report(timings, device)
    return text


def check_text(text: str, flag: str) -> None:
    """A command line that is not UTF-8 reaches Python as lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{flag} is not valid UTF-8 (at character {e.start}); pass the text in UTF-8") from None


def check_sampling(temperature: float, top_k: Optional[int], top_p: float) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top_k must be >= 1 (or null for no limit), got {top_k}")
    if not 0 <= top_p <= 1:
        raise UserError(f"--top_p must be in [0, 1], got {top_p}")


def stream(tokens: Iterator[int], tokenizer: Tokenizer, stops: Iterable[str] = ()) -> tuple[str, dict[str, float]]:
    """Print the completion to stdout as the tokens arrive, up to the first of the stop strings `stops` (which
    ends it, unprinted); return it with timings (seconds) for the report."""
    decoder, text = StreamDecoder(tokenizer), StopStrings(stops)
    start, first = time.perf_counter(), None
    for token_id in tokens:
        first = first or time.perf_counter()
        print(text.add(decoder.step(token_id)), end="", flush=True)
        if text.stopped:
            break
    print(text.add(decoder.flush(), final=True), flush=True)  # anything held back, and a final newline
    end = time.perf_counter()
    return text.text, {"tokens": len(decoder.ids), "start": start, "first": first or end, "end": end}


def report(t: dict[str, float], device: torch.device) -> None:
    """Diagnostics on stderr: time to first token (prompt prefill + one step), decode speed, peak memory."""
    print(f"time to first token: {t['first'] - t['start']:.3f} s", file=sys.stderr)
    n, total = int(t["tokens"]), t["end"] - t["start"]
    decode_rate = (n - 1) / (t["end"] - t["first"]) if n > 1 else float("nan")
    print(f"{n} tokens in {total:.2f} s: {n / total:.1f} tokens/s overall, {decode_rate:.1f} tokens/s decoding",
          file=sys.stderr)
    print(peak_memory(device), file=sys.stderr)
