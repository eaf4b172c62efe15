"""Rows that begin alike are prefilled once: a chat template's system prompt, a shared preamble.

Requests to a chat server mostly begin with the same tokens. SmolLM2's template opens every conversation that has
no system message with its own turn ("You are a helpful AI assistant named SmolLM, trained by Hugging Face"), 24
tokens with the user turn's opening. A causal model's keys and values at position p depend only on tokens 0..p
(and on the row's LoRA), so rows of one LoRA that begin with the same P tokens have the same keys and values
there. When such rows join the batch together, that start is computed once for the group and copied:

    group the rows      by LoRA, then by common start (sorted prompts; neighbours sharing >= min_shared tokens)
    pass 1              each group's start, (G, P_max): k rows sharing P tokens cost P token positions, not k·P
    copy                row b's cache positions 0..P_max-1 <- its group's row of pass 1's cache
    pass 2              each row's own rest, (B, S): row b at positions P_b .. P_b + S - 1, attending to its copy

Only positions 0..P_b-1 of a row's copy are its own start; the rest (pass 1's padding, another group's start for
a row of no group) lie at or past what pass 2 writes or past the row's end, and, as with any padding of the
batch, are overwritten before a mask shows them. A row keeps at least its last token for pass 2, whose output
gives its first new token. Pass 2 pads every row to the longest rest, so sharing is skipped where it would run
more positions than one pass over the whole prompts; and with dynamic NTK RoPE, whose tables depend on the
pass's length, it is never used. The copied values are those pass 1 computed in a batch of another shape: in
16 bits that can round the last bit differently from the row prefilled alone, as any batching can
(howto/serve.md, **Batching**).

vLLM's automatic prefix caching and SGLang's RadixAttention (Zheng et al. 2023, https://arxiv.org/abs/2312.07104)
keep such starts between requests; here a start lives only while the rows that share it are prefilled.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor

from litft.config import Config
from litft.multi_lora import use_loras


class Group(NamedTuple):
    rows: list[int]  # indexes of the rows that share the start; pass 1 runs the first one's tokens
    length: int  # P: the tokens they share (at most the shortest prompt's length - 1)


def common_length(a: list[int], b: list[int]) -> int:
    """How many first tokens a and b have in common."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def shared_starts(prompts: list[list[int]], loras: list[str | None], min_shared: int) -> list[Group]:
    """The groups of two or more rows, of one LoRA, whose prompts begin with at least `min_shared` equal tokens.

    Sorted, prompts with a common start are neighbours; a group is a run of neighbours each sharing at least
    min_shared tokens with the one before, and it shares what all of them share (the least of those, and at most
    its shortest prompt's length - 1): one row that shares less shortens the whole group's start."""
    order = sorted(range(len(prompts)), key=lambda i: (loras[i] is None, loras[i] or "", prompts[i]))
    runs: list[list[int]] = []
    for before, i in zip([None, *order], order):
        shares = before is not None and loras[before] == loras[i]
        if shares and common_length(prompts[before], prompts[i]) >= min_shared:
            runs[-1].append(i)
        else:
            runs.append([i])
    groups = []
    for run in runs:
        shared = min(common_length(prompts[run[0]], prompts[i]) for i in run[1:]) if len(run) > 1 else 0
        length = min(shared, *(len(prompts[i]) - 1 for i in run))  # each row keeps its last token for pass 2
        if len(run) > 1 and length >= min_shared:
            groups.append(Group(run, length))
    return groups


def plan_starts(prompts: list[Tensor], loras: list[str | None], min_shared: int,
                config: Config) -> tuple[list[Group], list[int]]:
    """The groups, and P_b, the start each row shares (0 for a row of no group). None are formed when min_shared
    is 0, under dynamic NTK RoPE, or where passes 1 and 2 would run more positions than one pass over the whole
    prompts (G·P_max + B·S against B·T) or run past the context."""
    dynamic = config.rope_scaling is not None and config.rope_scaling.type == "dynamic"
    none = [], [0] * len(prompts)
    if min_shared <= 0 or len(prompts) < 2 or dynamic:
        return none
    flat = torch.cat(prompts).tolist()  # one read from the device for all prompts
    ends = list(itertools.accumulate(p.size(0) for p in prompts))
    groups = shared_starts([flat[e - p.size(0):e] for p, e in zip(prompts, ends)], loras, min_shared)
    shared = [0] * len(prompts)
    for group in groups:
        for i in group.rows:
            shared[i] = group.length
    B, T = len(prompts), max(p.size(0) for p in prompts)
    S = max(p.size(0) - n for p, n in zip(prompts, shared))  # pass 2's length: the longest rest
    P = max(shared)
    if len(groups) * P + B * S >= B * T or P + S > config.block_size:
        return none
    return groups, shared


@torch.inference_mode()
def prefill_starts(model: torch.nn.Module, prompts: list[Tensor], loras: list[str | None],
                   groups: list[Group]) -> list:
    """Pass 1: run each group's start, in a cache of its own (one row per group); return that cache's layers."""
    device = prompts[0].device
    firsts = [prompts[g.rows[0]][:g.length] for g in groups]
    idx = torch.nn.utils.rnn.pad_sequence(firsts, batch_first=True)  # (G, P_max), right-padded
    G, P = idx.shape
    model.set_kv_cache(batch_size=G, max_seq_length=P)
    use_loras(model, [loras[g.rows[0]] for g in groups])
    model.trunk(model.embed(idx), torch.arange(P, device=device).expand(G, P))  # only the cache it fills is kept
    return model.kv_caches()


def copy_starts(model: torch.nn.Module, start_caches: list, groups: list[Group], batch_size: int) -> None:
    """Copy each group's row of pass 1's cache into the first positions of its rows in the model's (new,
    batch_size-row) cache."""
    source = [0] * batch_size  # a row of no group copies group 0's: padding to it, overwritten before it is seen
    for g, group in enumerate(groups):
        for i in group.rows:
            source[i] = g
    rows = torch.tensor(source, device=start_caches[0].k.device)
    for cache, start in zip(model.kv_caches(), start_caches):
        cache.copy_start(start, rows)
