"""Rows that begin alike prefill their common start once (litft/shared_prefix.py), and still decode as alone.

Truth: each prompt decoded alone (litft's one-prompt loop, itself tested against transformers) with its LoRA loaded
the ordinary way, and transformers + PEFT's generate(adapter_names=...) on the same batch; the saving is counted in
the token positions the model is given.
"""

from __future__ import annotations

import torch
from test_batch_generate import alone, base, batched, runs  # noqa: F401 (fixtures)
from test_merge_export import bases  # noqa: F401 (a fixture)

from litft.batch_generate import Row
from litft.checkpoint import load_lit_model
from litft.load_finetuned import load_finetuned
from litft.multi_lora import add_loras
from litft.shared_prefix import Group, shared_starts

SYSTEM = list(range(300, 320))  # a 20-token start, as a chat template's system prompt
PROMPTS = [SYSTEM + [7, 8, 9], SYSTEM + [5], SYSTEM + [7, 8, 11, 12, 13], SYSTEM, [44, 45, 46], SYSTEM + [6, 1],
           SYSTEM + [6, 2, 3]]
NAMES = ["qv", "qv", "qv", "qv", "qv", "all", "all"]


def test_rows_of_one_lora_that_begin_alike_form_a_group():
    prompts = [[1, 2, 3, 4, 5], [9, 9], [1, 2, 3, 4, 6, 7], [1, 2, 3, 8], [1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 5]]
    loras = ["a", "a", "a", "a", "a", "b"]
    # sorted: [1,2,3,4,5] [1,2,3,4,5,0] [1,2,3,4,6,7] [1,2,3,8] [9,9]; neighbours share 5, 4, 3, 0 tokens
    assert shared_starts(prompts, loras, min_shared=4) == [Group([0, 4, 2], 4)]
    assert shared_starts(prompts, loras, min_shared=3) == [Group([0, 4, 2, 3], 3)]
    # a row keeps its last token to run: [1,2,3,4,5] and [1,2,3,4,5,0] share 5 tokens, the first gets 4
    assert shared_starts(prompts, loras, min_shared=5) == []
    assert shared_starts([[1, 2, 3, 4, 5]] * 2, ["a", "a"], 4) == [Group([0, 1], 4)]
    assert shared_starts([[1, 2, 3, 4, 5]] * 2, ["a", None], 1) == []  # another LoRA, other keys and values
    assert shared_starts([[1, 2, 3, 4, 5]] * 2, [None, None], 1) == [Group([0, 1], 4)]


def prefill_positions(model) -> list[int]:
    """Records the token positions of each forward pass through the model's blocks from now on."""
    seen = []
    model.embed.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    return seen


def test_rows_that_share_a_start_decode_as_each_prompt_alone_with_its_lora(base, runs):
    model = add_loras(load_lit_model(base).double().eval(), runs)
    rows = [Row(torch.tensor(p), 8, temperature=0, lora=n) for p, n in zip(PROMPTS, NAMES)]
    positions = prefill_positions(model)
    got = batched(model, rows)
    expected = [alone(load_finetuned(base, runs[n]).double(), p, 8, temperature=0) for p, n in zip(PROMPTS, NAMES)]
    assert got == expected
    # pass 1: the two "all" rows share 21 tokens, the four qv rows that begin with SYSTEM 19 (the row that is only
    # SYSTEM keeps its last token): 2 starts of 21 positions (right-padded); pass 2: 7 rows of 6 positions (the
    # longest rest: SYSTEM's last token and [7, 8, 11, 12, 13]; the others padded); 84 positions, against 137 prompt tokens
    assert positions[:2] == [2 * 21, 7 * 6]
    assert positions[2:] == [7] * 7  # then one position per row and step


def test_equal_to_peft_generate_with_adapter_names_on_rows_that_share_a_start(base, runs, tmp_path):
    from test_batch_generate import peft_generate

    names = ["all", "all", None, None, "qv", "all", "all"]
    expected = peft_generate(base, runs, tmp_path, PROMPTS, names, 6)
    model = add_loras(load_lit_model(base).double().eval(), runs)
    assert batched(model, [Row(torch.tensor(p), 6, temperature=0, lora=n) for p, n in zip(PROMPTS, names)]) == expected


def test_nothing_is_shared_where_a_short_rest_would_be_padded_past_the_context(base):
    """block_size is 64: rows sharing 40 tokens with a rest of 1 and another row of 30 would run 40 + 30."""
    model = load_lit_model(base).double().eval()
    start = list(range(500, 540))
    prompts = [start + [1], start + [2], list(range(600, 630))]
    rows = [Row(torch.tensor(p), 4, temperature=0) for p in prompts]
    positions = prefill_positions(model)
    assert batched(model, rows) == [alone(model, p, 4, temperature=0) for p in prompts]
    assert positions[0] == 3 * 41  # one pass, every row whole


def test_a_min_shared_of_zero_shares_nothing(base):
    from litft.batch_generate import generate_batch

    model = load_lit_model(base).double().eval()
    rows = [Row(torch.tensor(p), 2, temperature=0) for p in PROMPTS[:3]]
    positions = prefill_positions(model)
    list(generate_batch(model, rows, min_shared=0))
    assert positions[0] == 3 * 25
