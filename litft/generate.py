"""Autoregressive generation: prefill the prompt once, then decode one token at a time from the KV cache.

A language model gives, for every position, a score (logit) for each possible next token. Generating text is a
loop: score the next token, pick one, append it, repeat. Done naively, step t re-runs the model over all
t tokens so far. Attention is the only place positions interact, and a token's keys and values never change
once computed, so we keep them in a static *KV cache*:

    prefill   model(prompt, input_pos=0..T-1)      (1, T)  -> keys/values of T positions cached; next-token logits
    decode    model(token, input_pos=t)            (1, 1)  -> one new key/value row; next-token logits
              ... repeated until max_new_tokens, a stop token, or the end of the cache

How the next token is picked from the logits z (vocab,):

    temperature   z / τ; τ → 0 is greedy argmax (deterministic), τ > 1 flattens the distribution
    top-k         keep the k largest logits, drop the rest
    top-p         keep the smallest set of most likely tokens whose probability mass reaches p (nucleus
                  sampling, Holtzman et al. 2019 — https://arxiv.org/abs/1904.09751)
    sample        draw from softmax of what is left (a seeded torch.Generator makes it reproducible)

`generate_cli` loads the model through litft/fast (`for_generation`): on a CPU in fp32 the weights are stored
in a layout that lets every thread work on each matrix-vector product, and an fp32 LoRA is merged first;
`--fast false` decodes with the model as loaded. The loop itself does not change.

`generate_batch` decodes many prompts at once, each row at its own positions (no row sees another's padding),
with its own sampling settings and, over one base, its own LoRA (litft/multi_lora.py); scripts/serve.py runs it.

`greedy_without_cache` is the same greedy loop with no cache at all: slow, but so simple it serves as the
reference the cached loop is tested against. `generate_cli` is what the generate/ scripts run.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

from litft.config import Config
from litft.errors import UserError
from litft.fast import for_generation
from litft.load_finetuned import tokenizer_dir
from litft.multi_lora import use_loras
from litft.prompts import PromptStyle, resolve_style
from litft.tokenizer import StreamDecoder, Tokenizer

PRECISIONS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}


# ---- picking the next token ------------------------------------------------------------------------------


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set to -inf every logit outside the smallest most-likely set whose probability mass is >= top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., vocab), most likely first
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens strictly ahead of each one
    drop_sorted = mass_before >= top_p  # the set had already reached top_p without this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """logits: (B, vocab) -> (B,) token ids. Temperature 0 is greedy; then top-k, then top-p, then a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---- the decoding loops ----------------------------------------------------------------------------------


def next_token_logits(model: torch.nn.Module, idx: Tensor, input_pos: Tensor) -> Tensor:
    """(B, T) ids at positions input_pos, (T,) or (B, T) -> (B, vocab) logits for the token after each row's last.

    Same as model(idx, input_pos)[:, -1], but only the last position goes through the output head: during the
    prefill that saves a (T × n_embd) @ (n_embd × vocab) matmul whose other T - 1 rows nobody reads.
    """
    h = model.hidden_states(idx, input_pos)  # (B, T, C); the KV cache now holds these T positions
    return model.lm_head(h[:, -1])  # (B, vocab)


def check_fits(block_size: int, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len == 0:
        raise UserError("the prompt is empty; give at least one token to continue from")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > block_size:
        raise UserError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                        f"model's block_size ({block_size}); shorten the prompt or lower --max_new_tokens")


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Iterable[int] = (),
             generator: Optional[torch.Generator] = None) -> Iterator[int]:
    """Yield new token ids one by one as they are produced, for a 1-D prompt of token ids (T,).

    Stops after `max_new_tokens`, or at the first token in `stop_ids` (which is not yielded). The model
    should be in eval mode. The KV cache is allocated here and dropped when the generator finishes.
    """
    T = prompt.size(0)
    check_fits(model.config.block_size, T, max_new_tokens)
    stop_ids, device = set(stop_ids), prompt.device
    model.set_kv_cache(batch_size=1, max_seq_length=T + max_new_tokens)
    try:
        logits = next_token_logits(model, prompt[None], torch.arange(T, device=device))  # prefill
        for t in range(T, T + max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)  # (1,)
            token_id = int(token)  # the host needs the id to stream it or to stop
            if token_id in stop_ids:
                return
            yield token_id
            if t + 1 < T + max_new_tokens:
                logits = next_token_logits(model, token[None], torch.tensor([t], device=device))  # decode
    finally:
        model.clear_kv_cache()


# ---- many prompts at once -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One prompt of a batch and how to continue it. Setting `done` stops the row at its next step (a client that
    went away, a stop string seen in the text)."""

    prompt: Tensor  # (T,) token ids
    max_new_tokens: int
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    stop_ids: frozenset[int] = frozenset()
    generator: Optional[torch.Generator] = None
    lora: Optional[str] = None  # the LoRA this row uses (litft/multi_lora.py), None for the base model
    done: bool = False


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, rows: list[Row],
                   more: Callable[[], list[Row]] = list) -> Iterator[tuple[Row, Optional[int]]]:
    """Decode many prompts together; yield (row, token id) as tokens are produced, and (row, None) when a row
    meets one of its stop ids. A row also ends after max_new_tokens, or once its `done` is set. `more()` is asked
    after every step for rows that join the batch (a server's new requests); decoding ends when no row is left.

    Every row keeps its own positions, so no row sees another's padding:

        prefill   prompts right-padded to (B, T), row b at positions 0..T-1; its logits read at T_b - 1
        decode    one token per live row, (B', 1), row b at its own position T_b + n_b
                  (the pads' cache slots past T_b are overwritten before a mask ever shows them)

    Joining rows are prefilled in a cache of their own, whose rows are then appended to the batch's. A row that
    ends leaves the batch (its cache row is dropped), so the rest decode at the cost of their number. Each row
    samples with its own settings and generator, as `generate` would alone. (One exception: with dynamic NTK RoPE
    scaling past the original context, the tables follow the batch's longest row, so a row depends on the others.)
    """
    live, logits, pos = [], None, None  # the rows decoding, their next-token logits (B', vocab) and positions (B',)
    produced, joining = {}, rows
    try:
        while True:
            if joining := [row for row in joining if not row.done]:
                live, logits, pos = join(model, live, logits, pos, joining)
                produced.update((id(row), 0) for row in joining)
            if not live:
                return
            tokens, keep = pick(logits, live), []  # (B',)
            for j, row in enumerate(live):
                if row.done:
                    continue
                if int(tokens[j]) in row.stop_ids:
                    yield row, None
                    continue
                yield row, int(tokens[j])
                produced[id(row)] += 1
                if produced[id(row)] < row.max_new_tokens and not row.done:
                    keep.append(j)
            if len(keep) < len(live):  # rows ended: drop them from the batch
                live, tokens, pos = drop_rows(model, live, tokens, pos, keep)
                produced = {id(row): produced[id(row)] for row in live}
            if live:
                logits = next_token_logits(model, tokens[:, None], pos[:, None])  # decode: (B', 1) -> (B', vocab)
                pos = pos + 1
            joining = more()
    finally:
        model.clear_kv_cache()
        use_loras(model, [])


def drop_rows(model: torch.nn.Module, live: list[Row], tokens: Tensor, pos: Tensor,
              keep: list[int]) -> tuple[list[Row], Tensor, Tensor]:
    """Keep only the batch rows `keep` (indexes into live), in the cache too: the others have ended."""
    kept = torch.tensor(keep, dtype=torch.long, device=pos.device)
    live = [live[j] for j in keep]
    if live:
        model.keep_kv_rows(kept)
    else:
        model.clear_kv_cache()
    use_loras(model, [row.lora for row in live])
    return live, tokens[kept], pos[kept]


def join(model: torch.nn.Module, live: list[Row], logits: Optional[Tensor], pos: Optional[Tensor],
         joining: list[Row]) -> tuple[list[Row], Tensor, Tensor]:
    """Prefill `joining` in a cache of its own, then append its rows to the batch's: the live rows, their logits
    (B', vocab) and positions (B',) grow by the new rows."""
    earlier = model.kv_caches() if live else None
    new_logits, new_pos = prefill(model, joining)
    if live:
        model.join_kv_caches(earlier)
        new_logits, new_pos = torch.cat((logits, new_logits)), torch.cat((pos, new_pos))
    use_loras(model, [row.lora for row in live + joining])
    return live + joining, new_logits, new_pos


def prefill(model: torch.nn.Module, rows: list[Row]) -> tuple[Tensor, Tensor]:
    """Run the prompts of `rows` in a new KV cache; return their next-token logits (B, vocab) and lengths (B,)."""
    for row in rows:
        check_fits(model.config.block_size, row.prompt.size(0), row.max_new_tokens)
    device = rows[0].prompt.device
    lengths = torch.tensor([row.prompt.size(0) for row in rows], device=device)  # (B,)
    idx = torch.nn.utils.rnn.pad_sequence([row.prompt for row in rows], batch_first=True)  # (B, T), right-padded
    B, T = idx.shape
    model.set_kv_cache(batch_size=B, max_seq_length=max(int(n) + r.max_new_tokens for n, r in zip(lengths, rows)))
    use_loras(model, [row.lora for row in rows])
    h = model.hidden_states(idx, torch.arange(T, device=device).expand(B, T))  # (B, T, C)
    return model.lm_head(h[torch.arange(B, device=device), lengths - 1]), lengths  # (B, vocab), (B,)


def pick(logits: Tensor, rows: list[Row]) -> Tensor:
    """(B, vocab) -> (B,): the next token of each row, by the row's own sampling settings."""
    if all(row.temperature == 0 for row in rows):
        return logits.argmax(dim=-1)
    return torch.cat([sample(logits[j:j + 1], row.temperature, row.top_k, row.top_p, row.generator)
                      for j, row in enumerate(rows)])


@torch.inference_mode()
def greedy_without_cache(model: torch.nn.Module, prompt: Tensor, max_new_tokens: int,
                         stop_ids: Iterable[int] = ()) -> list[int]:
    """Greedy decoding the slow, obvious way: re-run the whole sequence every step. A reference for tests."""
    check_fits(model.config.block_size, prompt.size(0), max_new_tokens)
    idx, new, stop_ids = prompt[None], [], set(stop_ids)  # (1, T)
    for _ in range(max_new_tokens):
        token = model(idx)[:, -1].argmax(dim=-1)  # (1, T, vocab) -> (1,)
        if int(token) in stop_ids:
            break
        new.append(int(token))
        idx = torch.cat((idx, token[None]), dim=1)  # (1, T + 1)
    return new


# ---- the command line: shared by generate/base.py, generate/lora.py, generate/adapter.py, ... --------------


def pick_precision(precision: Optional[str], device: torch.device) -> tuple[str, torch.dtype]:
    """bf16-true on a GPU, 32-true on a CPU unless asked otherwise."""
    precision = precision or ("bf16-true" if device.type == "cuda" else "32-true")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not supported for generation; "
                        f"choose one of {', '.join(PRECISIONS)}")
    return precision, PRECISIONS[precision]


def stop_token_ids(tokenizer: Tokenizer, style: Optional[PromptStyle]) -> set[int]:
    """Every id that ends generation: the checkpoint's stop ids (EOS, and all of generation_config.json's
    `eos_token_id` list), plus the style's end-of-turn marker (<|im_end|>, <|eot_id|>) when it is one token."""
    stops = set(tokenizer.stop_ids)
    if style is not None and style.end_of_turn is not None:
        ids = tokenizer.encode(style.end_of_turn, bos=False).tolist()
        if len(ids) == 1:
            stops.add(ids[0])
    return stops


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak memory: {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB (GPU, allocated by torch)"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return f"peak memory: {kib / 1e6:.2f} GB (RSS)"


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
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {checkpoint_dir} does not exist; download or convert a model first")
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
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top_k must be >= 1 (or null for no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")


def stream(tokens: Iterator[int], tokenizer: Tokenizer) -> tuple[str, dict[str, float]]:
    """Print the completion to stdout as the tokens arrive; return it with timings (seconds) for the report."""
    decoder, pieces = StreamDecoder(tokenizer), []
    start, first = time.perf_counter(), None
    for token_id in tokens:
        first = first or time.perf_counter()
        pieces.append(decoder.step(token_id))
        print(pieces[-1], end="", flush=True)
    pieces.append(decoder.flush())
    print(pieces[-1], flush=True)  # anything held back, and a final newline
    end = time.perf_counter()
    return "".join(pieces), {"tokens": len(decoder.ids), "start": start, "first": first or end, "end": end}


def report(t: dict[str, float], device: torch.device) -> None:
    """Diagnostics on stderr: time to first token (prompt prefill + one step), decode speed, peak memory."""
    print(f"time to first token: {t['first'] - t['start']:.3f} s", file=sys.stderr)
    n, total = int(t["tokens"]), t["end"] - t["start"]
    decode_rate = (n - 1) / (t["end"] - t["first"]) if n > 1 else float("nan")
    print(f"{n} tokens in {total:.2f} s: {n / total:.1f} tokens/s overall, {decode_rate:.1f} tokens/s decoding",
          file=sys.stderr)
    print(peak_memory(device), file=sys.stderr)
