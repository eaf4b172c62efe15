"""Many prompts decoded together: one forward pass per step for the whole batch, each row on its own terms.

One decoding step of a small model costs about the same for 1 row as for 32: the weights are read once per
step whatever the number of rows. A server that decodes its requests together gets most of that back.

Prompts have different lengths, and they end at different times. Every row keeps its own positions, so no row
sees another's padding:

    prefill   prompts right-padded to (B, T), row b at positions 0..T_b-1; its logits read at T_b - 1
              (rows that begin alike: their start once, then (B, S), row b from P_b: litft/shared_prefix.py)
    decode    one token per live row, (B', 1), row b at its own position T_b + n_b
              (the pads' cache slots past T_b are overwritten before a mask ever shows them)

The cache holds the batch's longest row, for every row, so it is not sized for the longest row a request *may*
reach (its prompt and max_new_tokens): it starts at the longest prompt plus `cache_step` positions and grows by
that much when a row reaches its end. One request for 8,000 tokens would otherwise give all 32 rows of a batch
room for 8,000, for as long as it lasted, even if it stopped after ten.

Each row samples with its own settings and generator, as litft/generate.py's `generate` would alone, and over
one base each row may use its own LoRA (litft/multi_lora.py). scripts/serve.py runs `generate_batch` through
litft/engine.py; rows join the batch as requests arrive and leave it as they end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from litft.generate import check_fits, next_token_logits, sample
from litft.multi_lora import use_loras
from litft.shared_prefix import copy_starts, plan_starts, prefill_starts


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
def generate_batch(model: torch.nn.Module, rows: list[Row], more: Callable[[], list[Row]] = list,
                   cache_step: int = 256, min_shared: int = 16) -> Iterator[tuple[Row, Optional[int]]]:
    """Decode many prompts together; yield (row, token id) as tokens are produced, and (row, None) when a row
    meets one of its stop ids. A row also ends after max_new_tokens, or once its `done` is set. `more()` is asked
    after every step for rows that join the batch (a server's new requests); decoding ends when no row is left.

    Joining rows are prefilled in a cache of their own, whose rows are then appended to the batch's. A row that
    ends leaves the batch (its cache row is dropped), so the rest decode at the cost of their number. The cache
    grows `cache_step` positions at a time (see above). Rows of one LoRA joining together that begin with
    `min_shared` or more equal tokens prefill that start once (litft/shared_prefix.py; 0: never). (With
    dynamic NTK RoPE scaling past the original context, the tables follow the batch's longest row, so there a
    row depends on the others.)
    """
    live, logits, pos = [], None, None  # the rows decoding, their next-token logits (B', vocab) and positions (B',)
    produced, joining = {}, rows
    try:
        while True:
            if joining := [row for row in joining if not row.done]:
                live, logits, pos = join(model, live, logits, pos, joining, cache_step, min_shared)
                produced.update((id(row), 0) for row in joining)
            if not live:
                return
            tokens, keep = pick(logits, live), []  # (B',)
            for j, (row, token) in enumerate(zip(live, tokens.tolist(), strict=True)):  # one read for the batch
                if row.done:
                    continue
                if token in row.stop_ids:
                    yield row, None
                    continue
                yield row, token
                produced[id(row)] += 1
                if produced[id(row)] < row.max_new_tokens and not row.done:
                    keep.append(j)
            if len(keep) < len(live):  # rows ended: drop them from the batch
                live, tokens, pos = drop_rows(model, live, tokens, pos, keep)
                produced = {id(row): produced[id(row)] for row in live}
            if live:
                if (longest := int(pos.max())) >= model.kv_caches()[0].length:  # it has reached the cache's end
                    model.grow_kv_cache(min(longest + cache_step, model.config.block_size))
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
         joining: list[Row], cache_step: int, min_shared: int) -> tuple[list[Row], Tensor, Tensor]:
    """Prefill `joining` in a cache of its own, then append its rows to the batch's: the live rows, their logits
    (B', vocab) and positions (B',) grow by the new rows."""
    earlier = model.kv_caches() if live else None
    new_logits, new_pos = prefill(model, joining, cache_step, min_shared)
    if live:
        model.join_kv_caches(earlier)
        new_logits, new_pos = torch.cat((logits, new_logits)), torch.cat((pos, new_pos))
    use_loras(model, [row.lora for row in live + joining])
    return live + joining, new_logits, new_pos


def prefill(model: torch.nn.Module, rows: list[Row], cache_step: int, min_shared: int) -> tuple[Tensor, Tensor]:
    """Run the prompts of `rows` in a new KV cache, with room for `cache_step` more positions (or as many as the
    rows may reach, if fewer); return their next-token logits (B, vocab) and lengths (B,). Rows of one LoRA that
    begin with `min_shared` or more equal tokens run those once (litft/shared_prefix.py; 0: never)."""
    for row in rows:
        check_fits(model.config.block_size, row.prompt.size(0), row.max_new_tokens)
    device = rows[0].prompt.device
    prompts, loras = [row.prompt for row in rows], [row.lora for row in rows]
    lengths = torch.tensor([p.size(0) for p in prompts], device=device)  # (B,)
    groups, shared = plan_starts(prompts, loras, min_shared, model.config)  # shared: P_b, 0 for a row of no group
    start_caches = prefill_starts(model, prompts, loras, groups) if groups else None
    idx = torch.nn.utils.rnn.pad_sequence([p[n:] for p, n in zip(prompts, shared)], batch_first=True)  # (B, S)
    B, S = idx.shape
    reach = max(int(n) + row.max_new_tokens for n, row in zip(lengths, rows))
    room = min(reach, int(lengths.max()) + cache_step)
    model.set_kv_cache(batch_size=B, max_seq_length=max(room, max(shared) + S))
    if start_caches:
        copy_starts(model, start_caches, groups, B)
    use_loras(model, loras)
    offset = torch.tensor(shared, device=device)  # (B,)
    h = model.hidden_states(idx, offset[:, None] + torch.arange(S, device=device))  # (B, S, C), right-padded
    return model.lm_head(h[torch.arange(B, device=device), lengths - offset - 1]), lengths  # (B, vocab), (B,)


def pick(logits: Tensor, rows: list[Row]) -> Tensor:
    """(B, vocab) -> (B,): the next token of each row, by the row's own sampling settings."""
    if all(row.temperature == 0 for row in rows):
        return logits.argmax(dim=-1)
    return torch.cat([sample(logits[j:j + 1], row.temperature, row.top_k, row.top_p, row.generator)
                      for j, row in enumerate(rows)])
