"""Rows that begin alike prefill their common start once (litft/shared_prefix.py), and still decode as alone.

Truth: each prompt decoded alone (litft's one-prompt loop, itself tested against transformers) with its LoRA loaded
the ordinary way, and transformers + PEFT's generate(adapter_names=...) on the same batch; the saving is counted in
the token positions the model is given.
"""

from __future__ import annotations

import torch
from test_batch_generate import alone, base, batched, runs  # noqa: F401 (fixtures)
from test_merge_export import bases  # noqa: F401 (a fixture)

from litft.batch_generate import Row, generate_batch
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
    # longest rest: SYSTEM's last token and [7, 8, 11, 12, 13]; the others padded). 84 positions, against 137
    # prompt tokens
    assert positions[:2] == [2 * 21, 7 * 6]
    assert positions[2:] == [7] * 7  # then one position per row and step


def test_equal_to_peft_generate_with_adapter_names_on_rows_that_share_a_start(base, runs, tmp_path):
    from test_batch_generate import peft_generate

    names = ["all", "all", None, None, "qv", "all", "all"]
    expected = peft_generate(base, runs, tmp_path, PROMPTS, names, 6)
    model = add_loras(load_lit_model(base).double().eval(), runs)
    assert batched(model, [Row(torch.tensor(p), 6, temperature=0, lora=n) for p, n in zip(PROMPTS, names)]) == expected


def test_nothing_is_shared_where_it_would_cost_more_positions_or_run_past_the_context(base):
    model = load_lit_model(base).double().eval()
    start = list(range(500, 540))
    # two rows sharing 40 tokens, and a row of 30: 40 + 3 x 30 positions shared, 3 x 41 in one pass
    prompts = [start + [1], start + [2], list(range(600, 630))]
    positions = prefill_positions(model)
    rows = [Row(torch.tensor(p), 4, temperature=0) for p in prompts]
    assert batched(model, rows) == [alone(model, p, 4, temperature=0) for p in prompts]
    assert positions[0] == 3 * 41  # one pass, every row whole
    # nine rows sharing 40 tokens and that row of 30: fewer positions (40 + 10 x 30 < 10 x 41), but the row of 30,
    # padded to 30 positions from 40, would reach position 69 of a 64-position context
    prompts = [start + [i] for i in range(9)] + [list(range(600, 630))]
    positions.clear()
    rows = [Row(torch.tensor(p), 2, temperature=0) for p in prompts]
    assert model.config.block_size == 64
    assert batched(model, rows) == [alone(model, p, 2, temperature=0) for p in prompts]
    assert positions[0] == 10 * 41


def test_nothing_is_shared_under_dynamic_ntk_rope(base):
    """Dynamic NTK scaling's tables depend on a pass's length, stretched past original_max_position (16 here): four
    rows sharing 12 tokens and a row of 6 would run a pass 2 of 12 + 6 = 18 positions, where each row alone, and
    the batch's decoding, stay within 16."""
    from dataclasses import replace

    from litft.model import Llama
    from litft.rope import RoPEScaling

    plain = load_lit_model(base)
    model = Llama(replace(plain.config, rope_scaling=RoPEScaling(type="dynamic", factor=4.0, original_max_position=16)))
    model.load_state_dict(plain.state_dict())
    model = model.double().eval()
    prompts = [list(range(20, 32)) + [i] for i in range(4)] + [list(range(50, 56))]
    positions = prefill_positions(model)
    rows = [Row(torch.tensor(p), 3, temperature=0) for p in prompts]
    got = {id(row): [] for row in rows}
    for row, token in generate_batch(model, rows, min_shared=4):
        got[id(row)].append(token)
    got = [got[id(row)] for row in rows]
    assert positions[0] == 5 * 13
    assert got == [alone(model, p, 3, temperature=0) for p in prompts]


def test_a_min_shared_of_zero_shares_nothing(base):
    model = load_lit_model(base).double().eval()
    rows = [Row(torch.tensor(p), 2, temperature=0) for p in PROMPTS[:3]]
    positions = prefill_positions(model)
    list(generate_batch(model, rows, min_shared=0))
    assert positions[0] == 3 * 25


def test_rows_that_share_a_start_join_a_running_batch_as_alone(base, runs):
    from test_batch_generate import arriving

    model = add_loras(load_lit_model(base).double().eval(), runs)
    rows = [Row(torch.tensor(p), 8, temperature=0, lora=n) for p, n in zip(PROMPTS, NAMES)]
    positions = prefill_positions(model)
    got = batched(model, [rows[4], *rows[:4], *rows[5:]], arriving(rows[:4] + rows[5:], [2] * 6))
    assert positions[:4] == [3, 1, 1, 1]  # the first row alone: its 3 tokens, then a step before each call to more
    assert positions[4:6] == [2 * 21, 6 * 6]  # the six that join at the third call share their starts as above
    expected = [alone(load_finetuned(base, runs[n]).double(), p, 8, temperature=0) for p, n in zip(PROMPTS, NAMES)]
    assert got == [expected[4], *expected[:4], *expected[5:]]


def test_the_server_engine_shares_starts_by_default(base, runs):
    """litft/engine.py (scripts/serve.py's loop), in-process: of four requests queued at once, the first is
    prefilled alone and the three that join it at the next step share their start; each answer is the one its
    prompt gets alone (fp32)."""
    from test_serve import serve_queued

    from litft.engine import Engine
    from litft.generate import generate

    model = add_loras(load_finetuned(base), runs)
    positions = prefill_positions(model)
    prompts, names = PROMPTS[:4], NAMES[:4]
    rows = [Row(torch.tensor(p), 6, lora=n) for p, n in zip(prompts, names)]
    served = serve_queued(Engine(model, max_batch_size=8), rows)
    got = [tokens for tokens, _ in served]
    assert positions[:4] == [23, 1, 19, 3 * 6]  # alone; a step; the three that join: their start, then their rests
    assert got == [list(generate(load_finetuned(base, runs[n]), torch.tensor(p), 6, temperature=0))
                   for p, n in zip(prompts, names)]
