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

`greedy_without_cache` is the same greedy loop with no cache at all: slow, but so simple it serves as the
reference the cached loop is tested against; with no cache to set up, it also runs through a DDP/FSDP-wrapped
model, which is how training samples a validation answer (litft/train.py).

Elsewhere: many prompts decoded together, each with its own LoRA, in litft/batch_generate.py; the generate/
scripts' command line in litft/generate_cli.py.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor

from litft.errors import UserError
from litft.prompts import PromptStyle
from litft.tokenizer import Tokenizer

# ---- picking the next token ------------------------------------------------------------------------------


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set to -inf every logit outside the smallest most-likely set whose probability mass is >= top_p; the most
    likely token always stays (top_p 0 is greedy)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., vocab), most likely first
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens strictly ahead of each one
    drop_sorted = mass_before >= top_p  # the set had already reached top_p without this token
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """logits: (B, vocab) -> (B,) token ids. Temperature 0 is greedy; then top-k, then top-p, then a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shift the best logit to 0 first: z / τ then never overflows to inf (inf - inf is NaN) for a tiny τ.
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
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
        raise UserError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > block_size:
        raise UserError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                        f"model's block_size ({block_size}); shorten the prompt or lower --max_new_tokens")


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Iterable[int] = (),
             generator: Optional[torch.Generator] = None) -> Iterator[int]:
    """Yield new token ids one by one as they are produced, for a 1-D prompt of token ids (T,).

    Stops after `max_new_tokens`, or at the first token in `stop_ids` (which is not yielded). The model
    should be in eval mode. The KV cache is allocated here and dropped when the generator finishes; it is this
    generator's own, so generators stepped in turn on one model (two streams served at once) do not mix.
    """
    T = prompt.size(0)
    check_fits(model.config.block_size, T, max_new_tokens)
    stop_ids, device = set(stop_ids), prompt.device
    model.set_kv_cache(batch_size=1, max_seq_length=T + max_new_tokens)
    caches = model.kv_caches()
    try:
        logits = next_token_logits(model, prompt[None], torch.arange(T, device=device))  # prefill
        for t in range(T, T + max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)  # (1,)
            token_id = int(token)  # the host needs the id to stream it or to stop
            if token_id in stop_ids:
                return
            yield token_id
            if t + 1 < T + max_new_tokens:
                model.use_kv_caches(caches)  # another generator may have stepped on this model while we yielded
                logits = next_token_logits(model, token[None], torch.tensor([t], device=device))  # decode
    finally:
        model.clear_kv_cache()


@torch.inference_mode()
def greedy_without_cache(model: torch.nn.Module, prompt: Tensor, max_new_tokens: int,
                         stop_ids: Iterable[int] = ()) -> list[int]:
    """Greedy decoding the slow, obvious way: re-run the whole sequence every step (no KV cache to set up, so
    it also runs through a DDP/FSDP-wrapped model)."""
    check_fits(model.config.block_size, prompt.size(0), max_new_tokens)
    idx, new, stop_ids = prompt[None], [], set(stop_ids)  # (1, T)
    for _ in range(max_new_tokens):
        token = model(idx)[:, -1].argmax(dim=-1)  # (1, T, vocab) -> (1,)
        if int(token) in stop_ids:
            break
        new.append(int(token))
        idx = torch.cat((idx, token[None]), dim=1)  # (1, T + 1)
    return new


def stop_token_ids(tokenizer: Tokenizer, style: Optional[PromptStyle]) -> set[int]:
    """Every id that ends generation: the checkpoint's stop ids (EOS, and all of generation_config.json's
    `eos_token_id` list), plus the style's end-of-turn marker (<|im_end|>, <|eot_id|>) when it is one token."""
    stops = set(tokenizer.stop_ids)
    if style is not None and style.end_of_turn is not None:
        ids = tokenizer.encode(style.end_of_turn, bos=False).tolist()
        if len(ids) == 1:
            stops.add(ids[0])
    return stops
