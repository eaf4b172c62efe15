"""Is a greedy answer the same in a batch as alone? Six prompts decoded together (generate_batch, as the server
batches them) against each decoded alone (generate), in one precision.

    python bench/batch_invariance.py --precision 32-true     # every answer equal: what tests/test_serve.py checks
    python bench/batch_invariance.py --precision bf16-true   # the batch's shapes change bf16's rounding

Prints, for each prompt, whether its batched answer equals its answer alone and, if not, the first token where
they part; then the same for batches of one.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from litft.batch_generate import Row, generate_batch
from litft.cli import run
from litft.fast import for_generation
from litft.generate import generate
from litft.generate_cli import pick_precision
from litft.load_finetuned import load_finetuned
from litft.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "Write a long story about a dragon who", "Hi", "def fibonacci(n):\n    ",
           "List ten animals:", "In 1492,"]


def batched(model, prompts: list[torch.Tensor], new_tokens: int) -> list[list[int]]:
    rows = [Row(ids, new_tokens) for ids in prompts]
    out = {id(row): [] for row in rows}
    for row, token in generate_batch(model, rows):
        if token is not None:
            out[id(row)].append(token)
    return [out[id(row)] for row in rows]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main(checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
         precision: str = "bf16-true", new_tokens: int = 30) -> None:
    """Compare batched and one-at-a-time greedy answers.

    Args:
        checkpoint_dir: the model.
        precision: bf16-true, 16-true or 32-true.
        new_tokens: tokens generated per prompt.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, dtype = pick_precision(precision, device)
    model = for_generation(partial(load_finetuned, checkpoint_dir), device, dtype)
    tokenizer = Tokenizer(checkpoint_dir)
    prompts = [tokenizer.encode(text).to(device) for text in PROMPTS]
    alone = [list(generate(model, ids, new_tokens, temperature=0)) for ids in prompts]
    together = batched(model, prompts, new_tokens)
    singles = [batched(model, [ids], new_tokens)[0] for ids in prompts]
    print(f"{precision} on {device}, {len(prompts)} prompts, {new_tokens} greedy tokens each")
    for text, a, b, s in zip(PROMPTS, alone, together, singles):
        k, k1 = first_difference(a, b), first_difference(a, s)
        print(f"{text!r:42} in the batch of {len(prompts)}: {'same' if k is None else f'differs from token {k}'}; "
              f"in a batch of one: {'same' if k1 is None else f'differs from token {k1}'}")
    equal = sum(first_difference(a, b) is None for a, b in zip(alone, together))
    print(f"answers in the batch equal to their answers alone: {equal}/{len(prompts)}")


if __name__ == "__main__":
    run(main)
