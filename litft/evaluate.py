"""Evaluation over a prepared split: exact-match accuracy of greedy answers, and the validation loss.

For every sample the prompt is rebuilt from its raw instruction and input with the data's prompt style and
encoded exactly as generation encodes it, the model answers greedily until EOS (or the style's end-of-turn
token), and the answer is compared with the reference under the task's rule (litft/scoring.py). The loss is
the mean cross-entropy of the next token over every labelled position (the answer and EOS when inputs were
masked), the same quantity training minimizes.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from litft.data import collate
from litft.generate import generate, stop_token_ids
from litft.loss import next_token_loss
from litft.prompts import PromptStyle
from litft.scoring import exact_match, extract


@torch.no_grad()
def validation_loss(model: torch.nn.Module, samples: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean next-token loss over `samples`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        input_ids, labels = collate(samples[i : i + batch_size], pad_id)  # (B, T), (B, T)
        logits = model(input_ids.to(device))  # (B, T, vocab)
        total += next_token_loss(logits, labels.to(device), reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    return total / count if count else math.nan


def evaluate(model: torch.nn.Module, tokenizer, samples: list[dict], style: PromptStyle, task: str,
             limit: int | None = None, max_new_tokens: int = 128, batch_size: int = 8) -> dict:
    """Greedy answers for the first `limit` samples, scored by exact match; plus the validation loss."""
    samples = samples[:limit] if limit else samples
    device = next(model.parameters()).device
    stops, block_size = stop_token_ids(tokenizer, style), model.config.block_size
    rows, too_long = [], 0  # prompts that fill the context: no room for an answer
    for sample in tqdm(samples, desc="evaluating", unit=" samples"):
        prompt = style.apply(sample["instruction"], sample["input"])
        ids = tokenizer.encode(prompt, bos=style.add_bos).to(device)  # (T,), as generate/ scripts encode a prompt
        budget = min(max_new_tokens, block_size - len(ids))
        too_long += budget <= 0
        answer = tokenizer.decode(list(generate(model, ids, budget, temperature=0, stop_ids=stops))) if budget > 0 else ""
        rows.append({"prompt": prompt, "reference": sample["output"], "prediction": answer,
                     "extracted": extract(task, answer), "correct": exact_match(task, answer, sample["output"])})
    correct = sum(row["correct"] for row in rows)
    return {"task": task, "prompt_style": style.name, "samples": len(rows), "correct": correct, "too_long": too_long,
            "exact_match": correct / len(rows) if rows else math.nan,
            "val_loss": validation_loss(model, samples, tokenizer.pad_id, batch_size), "predictions": rows}
