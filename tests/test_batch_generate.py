"""Batched generation (litft/batch_generate.py's generate_batch) with a different LoRA per row (litft/multi_lora.py).

Truth: each prompt decoded alone (litft's one-prompt loop, itself tested against transformers) with its LoRA
loaded the ordinary way (add_lora); and transformers + PEFT's `generate(..., adapter_names=...)` on the same batch,
left-padded as transformers pads, with our LoRAs exported by scripts/export_peft.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script
from test_merge_export import base_config, bases, hf_model, hf_to_lit_name, make_run  # noqa: F401 (bases: a fixture)

from litft.batch_generate import Row, generate_batch
from litft.checkpoint import load_lit_model, save_lit_checkpoint
from litft.errors import UserError
from litft.generate import generate
from litft.load_finetuned import load_finetuned
from litft.lora import LoRAConfig
from litft.model import Llama
from litft.multi_lora import add_loras, lora_names, use_loras

peft = pytest.importorskip("peft")

PROMPTS = [[5, 900, 31, 7], [12], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410], [77, 78, 79]]
LORAS = {"qv": LoRAConfig(r=4, alpha=8, targets=["q", "v"]),
         "all": LoRAConfig(r=8, alpha=32, targets=["q", "k", "v", "o", "gate", "up", "down", "lm_head"])}


def scaled_hf_model() -> "transformers.LlamaForCausalLM":  # noqa: F821
    """transformers' tiny random Llama with weights large enough that greedy text varies from token to token."""
    hf = hf_model(base_config(True)).double()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(std=0.25)
    return hf


@pytest.fixture(scope="module")
def base(tmp_path_factory, bases) -> Path:
    """A lit checkpoint of scaled_hf_model() (with the tiny base's tokenizer.model)."""
    directory = tmp_path_factory.mktemp("base")
    model = Llama(base_config(True))
    model.load_state_dict({hf_to_lit_name(k): v for k, v in scaled_hf_model().state_dict().items()}, strict=False)
    model.tie_weights()
    save_lit_checkpoint(model.float(), directory)
    shutil.copy(bases[True] / "tokenizer.model", directory)
    return directory


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """Two LoRA runs of different ranks and targets on that base, as finetune/lora.py leaves them."""
    out = {}
    for seed, (name, config) in enumerate(LORAS.items()):
        run_dir = tmp_path_factory.mktemp(name)
        make_run(base, run_dir, config, seed=seed + 1)
        out[name] = run_dir / "lit_model_lora.pth"
    return out


def alone(model, prompt, max_new_tokens, **sampling) -> list[int]:
    return list(generate(model, torch.tensor(prompt), max_new_tokens, **sampling))


def batched(model, rows: list[Row], more=list) -> list[list[int]]:
    """Each row's tokens, in the order of `rows` (rows handed over later by `more` included)."""
    out = {id(row): [] for row in rows}
    for row, token in generate_batch(model, rows if more is list else rows[:1], more):
        if token is not None:
            out[id(row)].append(token)
    return [out[id(row)] for row in rows]


def arriving(rows: list[Row], at_steps: list[int]):
    """A `more` callback that hands over row i at the at_steps[i]-th call (as requests reach a server)."""
    calls = iter(range(10 ** 6))

    def more() -> list[Row]:
        step = next(calls)
        return [row for row, at in zip(rows, at_steps) if at == step]
    return more


def test_rows_of_different_lengths_decode_as_each_prompt_alone(base):
    model = load_lit_model(base).double().eval()
    budgets = [9, 14, 3, 20]
    rows = [Row(torch.tensor(p), n, temperature=0) for p, n in zip(PROMPTS, budgets)]
    expected = [alone(model, p, n, temperature=0) for p, n in zip(PROMPTS, budgets)]
    assert batched(model, rows) == expected
    assert [len(e) for e in expected] == budgets  # no stop id: every row runs to its own budget
    # a stop id ends its row only: the id is not yielded, the others go on
    stop = expected[3][5]
    rows = [Row(torch.tensor(p), n, temperature=0, stop_ids=frozenset({stop}) if i == 3 else frozenset())
            for i, (p, n) in enumerate(zip(PROMPTS, budgets))]
    got = batched(model, rows)
    assert got[3] == expected[3][:expected[3].index(stop)] and got[:3] == expected[:3]


def test_rows_that_join_a_running_batch_decode_as_alone(base):
    """Rows handed over after 0, 3 and 7 decode steps (one arrives after the first row ended) join the batch."""
    model = load_lit_model(base).double().eval()
    budgets = [5, 9, 6, 8]
    rows = [Row(torch.tensor(p), n, temperature=0) for p, n in zip(PROMPTS, budgets)]
    expected = [alone(model, p, n, temperature=0) for p, n in zip(PROMPTS, budgets)]
    assert batched(model, rows, arriving(rows[1:], [0, 3, 7])) == expected


def test_the_cache_grows_with_the_longest_row_not_with_what_a_row_may_reach(base):
    """A cache grown a few positions at a time (here 2) gives every row what it gives alone; a row that may reach
    the whole context but is stopped early never makes the batch's cache that long."""
    model = load_lit_model(base).double().eval()
    budgets = [5, 9, 6, 8]
    rows = [Row(torch.tensor(p), n, temperature=0) for p, n in zip(PROMPTS, budgets)]
    expected = [alone(model, p, n, temperature=0) for p, n in zip(PROMPTS, budgets)]
    got = {id(row): [] for row in rows}
    for row, token in generate_batch(model, rows[:1], arriving(rows[1:], [0, 3, 7]), cache_step=2):
        got[id(row)].append(token)
    assert [got[id(row)] for row in rows] == expected

    greedy = Row(torch.tensor(PROMPTS[0]), model.config.block_size - len(PROMPTS[0]), temperature=0)
    lengths = []
    for row, _ in generate_batch(model, [greedy], cache_step=2):
        lengths.append(model.kv_caches()[0].length)
        row.done = len(lengths) == 6
    assert max(lengths) <= len(PROMPTS[0]) + 6 + 2 < model.config.block_size


@pytest.mark.parametrize("per_row", [False, True])
def test_a_decoding_step_reads_the_device_once_not_once_per_layer(base, monkeypatch, per_row):
    """Reading a tensor's value on the host (int(), .item(), .tolist(), ...) makes a GPU's host wait until the
    device has run all the work queued so far. The model reads the last position once per forward pass, for the
    whole batch (litft/kv_cache.py's Positions), whatever the number of layers or rows."""
    from litft.generate import next_token_logits

    model = load_lit_model(base).eval()
    assert model.config.n_layer > 1
    model.set_kv_cache(batch_size=3, max_seq_length=16)
    pos = torch.tensor([[4], [9], [6]]) if per_row else torch.tensor([7])  # (B, 1) a position per row, or (1,)
    reads = count_host_reads(monkeypatch)
    with torch.inference_mode():
        next_token_logits(model, torch.tensor([[5], [6], [7]]), pos)
    assert reads == ["__int__"]


def test_the_batch_loop_reads_the_device_as_often_for_many_rows_as_for_one(base, monkeypatch):
    """A step of generate_batch reads the new tokens of all rows at once: each more step costs the same reads
    (the tokens, the longest position, and the forward pass's one) for 4 rows as for 1."""
    model = load_lit_model(base).eval()
    reads = count_host_reads(monkeypatch)

    def reads_for(prompts: list[list[int]], steps: int) -> int:
        reads.clear()
        batched(model, [Row(torch.tensor(p), steps, temperature=0) for p in prompts])
        return len(reads)

    per_step = {n: reads_for(PROMPTS[:n], 6) - reads_for(PROMPTS[:n], 5) for n in (1, 4)}
    assert per_step == {1: 3, 4: 3}


def count_host_reads(monkeypatch) -> list[str]:
    """The names of the Tensor methods that read a value to the host, one entry per call from now on."""
    reads = []
    for name in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist"):
        def counted(self, *args, _read=getattr(torch.Tensor, name), _name=name):
            reads.append(_name)
            return _read(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_sampled_rows_draw_as_each_prompt_alone(base):
    model = load_lit_model(base).double().eval()
    settings = [dict(temperature=0.7, top_k=20), dict(temperature=0), dict(temperature=1.3, top_p=0.8),
                dict(temperature=1.0)]
    rows = [Row(torch.tensor(p), 12, generator=torch.Generator().manual_seed(i), **s)
            for i, (p, s) in enumerate(zip(PROMPTS, settings))]
    expected = [alone(model, p, 12, generator=torch.Generator().manual_seed(i), **s)
                for i, (p, s) in enumerate(zip(PROMPTS, settings))]
    assert batched(model, rows) == expected


def test_a_row_set_done_leaves_the_batch(base):
    model = load_lit_model(base).double().eval()
    rows = [Row(torch.tensor(p), 10, temperature=0) for p in PROMPTS]
    got = {id(row): [] for row in rows}
    for row, token in generate_batch(model, rows):
        got[id(row)].append(token)
        if row is rows[1] and len(got[id(row)]) == 2:
            row.done = True  # as the server does when a client disconnects
    got = [got[id(row)] for row in rows]
    assert len(got[1]) == 2 and [len(g) for g in got] == [10, 2, 10, 10]
    assert got[2] == alone(model, PROMPTS[2], 10, temperature=0)


def test_each_row_uses_its_own_lora(base, runs):
    """Rows naming different LoRAs (and none) in one batch give what each LoRA gives alone."""
    model = load_lit_model(base).double().eval()
    add_loras(model, runs)
    assert lora_names(model) == {"qv", "all"}
    names = ["qv", None, "all", "qv"]
    rows = [Row(torch.tensor(p), 12, temperature=0, lora=n) for p, n in zip(PROMPTS, names)]
    got = batched(model, rows)
    alone_texts = {n: [alone(load_finetuned(base, runs[n] if n else None).double(), p, 12, temperature=0)
                       for p in PROMPTS] for n in (None, *runs)}
    assert got == [alone_texts[n][i] for i, n in enumerate(names)]
    assert all(alone_texts[n][i] != alone_texts[None][i] for i, n in enumerate(names) if n)  # the LoRAs matter


def test_one_forward_pass_gives_each_row_its_own_lora(base, runs):
    """The logits of each row of a mixed batch (prefill, no cache) equal its LoRA's alone, lm_head's LoRA included."""
    model = add_loras(load_lit_model(base).double().eval(), runs)
    names, x = ["qv", None, "qv", "all"], torch.tensor([PROMPTS[0]] * 4)
    use_loras(model, names)
    with torch.no_grad():
        got = model(x)
        for b, n in enumerate(names):
            torch.testing.assert_close(got[b], load_finetuned(base, runs[n] if n else None).double()(x[b:b + 1])[0])


def peft_generate(base: Path, runs: dict[str, Path], tmp_path: Path, prompts: list[list[int]],
                  names: list[str | None], max_new_tokens: int) -> list[list[int]]:
    """transformers + PEFT, our LoRAs exported to PEFT's format: generate(adapter_names=...) on one batch."""
    for name, path in runs.items():
        run_script("scripts/export_peft.py", "--checkpoint_dir", base, "--lora_path", path,
                   "--output_dir", tmp_path / name, check=True)
    pm = peft.PeftModel.from_pretrained(scaled_hf_model(), tmp_path / "qv", adapter_name="qv")
    pm.load_adapter(tmp_path / "all", adapter_name="all")
    pm.eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left-padded, as transformers batches
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0, adapter_names=[n or "__base__" for n in names])
    return out[:, width:].tolist()


def test_each_row_equals_peft_generate_with_adapter_names(base, runs, tmp_path):
    names = ["all", "qv", None, "all"]
    expected = peft_generate(base, runs, tmp_path, PROMPTS, names, 10)
    model = load_lit_model(base).double().eval()
    add_loras(model, runs)
    rows = [Row(torch.tensor(p), 10, temperature=0, lora=n) for p, n in zip(PROMPTS, names)]
    assert batched(model, rows) == expected


def test_a_lora_that_cannot_share_the_batch_is_refused(base, bases, tmp_path):
    model = load_lit_model(base).eval()
    make_run(base, tmp_path / "embed", LoRAConfig(r=2, targets=["q", "embed"]))
    with pytest.raises(UserError, match="embedding"):
        add_loras(model, {"e": tmp_path / "embed" / "lit_model_lora.pth"})
    make_run(bases[False], tmp_path / "other", LoRAConfig(r=2, targets=["k"]))  # 4 key heads there, 2 here
    with pytest.raises(UserError, match=r"was trained on tiny-mha \(n_query_groups 4, tie_embeddings False\), not "
                                        r"tiny-gqa \(n_query_groups 2, tie_embeddings True\)"):
        add_loras(model, {"o": tmp_path / "other" / "lit_model_lora.pth"})  # its model_config.yaml says so
    (tmp_path / "other" / "model_config.yaml").unlink()
    with pytest.raises(UserError, match="made for another base model: blocks.0.attn.k_proj"):
        add_loras(model, {"o": tmp_path / "other" / "lit_model_lora.pth"})  # without it, the shapes say so
