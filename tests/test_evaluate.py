"""Exact-match rules, and evaluation through the CLIs: the prompt a run is trained on (tokens stored by data_prep)
is the prompt generate/ and scripts/evaluate.py give the model, the loss ignores prompt and padding, and the
report counts matches. Greedy continuations are checked with the cache-free reference loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

from litft.checkpoint import save_lit_checkpoint
from litft.config import Config
from litft.data import load_split
from litft.evaluate import evaluate
from litft.generate import greedy_without_cache
from litft.load_finetuned import load_finetuned
from litft.model import Llama
from litft.prompts import PromptStyle
from litft.scoring import exact_match, extract_gsm8k, normalize_mr, normalize_sql, normalize_text
from litft.tokenizer import Tokenizer

# ---- scoring -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,number", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),            # thousands separators
    ("#### 12,345,678", "12345678"),
    ("The loss is #### -15", "-15"),   # negatives, ASCII or Unicode minus
    ("#### −8", "-8"),
    ("#### 3.50", "3.5"),              # decimals compare as numbers
    ("#### 7.0", "7"),
    ("#### .25", "0.25"),
    ("#### $1,000.", "1000"),          # a currency sign and a sentence's full stop
    ("#### 42 dollars", "42"),
    ("#### 1 #### 2", "1"),            # the first marker wins, as in lm-evaluation-harness's strict match
    ("#### 5\n\nQuestion: and twice that?\n#### 10", "5"),
    ("#### " + "9" * 40, "9" * 40),    # past decimal's default 28 digits: still exact, not an error
    ("#### 0." + "1" * 40, "0." + "1" * 40),
    ("#### 0.0000001", "0.0000001"),   # as written, not 1E-7
    ("#### -0", "0"),
    ("The answer is 42.", None),       # no marker: no answer
    ("#### ", None),
    ("#### many", None),
])
def test_gsm8k_extraction(text, number):
    assert extract_gsm8k(text) == number


def test_sql_that_normalises_alike_returns_the_same_rows_in_sqlite():
    """Truth: SQLite. Layout, keyword case, quote style and a final ";" change no result and are ignored; the text
    inside a string literal changes which rows come back ('Bob' = 'bob' is false) and is kept."""
    import sqlite3

    db = sqlite3.connect(":memory:")
    db.executescript("CREATE TABLE t (name TEXT, n INT); INSERT INTO t VALUES ('Bob', 1), ('bob', 2), ('x , y', 3), "
                     "('x,y', 4), ('New  York', 5), ('New York', 6), ('B', 7);")
    pairs = [("SELECT n FROM t WHERE name = 'Bob'", 'select n from t where name="Bob";'),
             ("SELECT COUNT ( * ) FROM t WHERE n > 2", "select count(*) from t where n>2"),
             ("SELECT n FROM t WHERE name = 'Bob'", "SELECT n FROM t WHERE name = 'bob'"),
             ("SELECT n FROM t WHERE name = 'x , y'", "SELECT n FROM t WHERE name = 'x,y'"),
             ("SELECT n FROM t WHERE name = 'New  York'", "SELECT n FROM t WHERE name = 'New York'"),
             ("SELECT n FROM t WHERE name = 'B' OR n = 1", "select n from t where name = 'B' or n=1")]
    for a, b in pairs:
        same_rows = db.execute(a).fetchall() == db.execute(b).fetchall()
        assert (normalize_sql(a) == normalize_sql(b)) == same_rows, (a, b)


def test_gsm8k_exact_match():
    assert exact_match("gsm8k", "So 1000 + 234 = 1234.\n#### 1234", "Work...\n#### 1,234")
    assert not exact_match("gsm8k", "The answer is 1234", "#### 1234")  # missing #### is wrong
    assert not exact_match("gsm8k", "#### 12", "#### 1.2")


def test_normalization_rules():
    assert normalize_text("  The  Answer\nis 4 ") == "the answer is 4"
    assert normalize_mr("Inform( name [Iron Echo] , genres[action,  puzzle] )") == \
        normalize_mr("inform(name[Iron Echo], genres[action, puzzle])")
    assert normalize_mr("inform(name[Iron Echo])") != normalize_mr("inform(name[Iron Echoes])")
    assert normalize_sql('SELECT COUNT ( * ) FROM t WHERE a = "B";') == \
        normalize_sql("select count(*) from t where a='B'")
    assert normalize_sql("SELECT a FROM t") != normalize_sql("SELECT b FROM t")
    for spaced, tight in (("b != 3", "b!=3"), ("b <> 3", "b<>3"), ("b >= 3", "b>=3")):
        assert normalize_sql(spaced) == normalize_sql(tight)
    assert exact_match("games", "confirm(name[X],genres[puzzle])", "confirm(name[X], genres[puzzle])")
    assert not exact_match("games", "confirm(genres[puzzle], name[X])", "confirm(name[X], genres[puzzle])")
    assert exact_match("alpaca", "Paris ", "paris") and not exact_match("alpaca", "Paris.", "Paris")


# ---- evaluation over a tiny model and a real tokenizer -------------------------------------------------------

EXAMPLES = [{"instruction": f"Describe the number {n}.", "input": "", "output": f"{n} is a number."} for n in range(6)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sentencepiece_model):
    """A tiny random Llama (Llama's 32000-token vocabulary) with a real sentencepiece tokenizer."""
    directory = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny-gqa", vocab_size=32000))
    with torch.no_grad():  # larger weights than the default init: greedy answers depend on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    save_lit_checkpoint(model, directory)
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory, checkpoint):
    directory = tmp_path_factory.mktemp("data")
    (directory / "d.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    proc = run_script("data_prep/json_data.py", "--data_file", directory / "d.jsonl", "--checkpoint_dir", checkpoint,
                      "--destination_path", directory / "prepared", "--val_split_fraction", "0.5", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    return directory / "prepared"


def greedy_from_training_tokens(model, sample: dict, tokenizer: Tokenizer, n: int) -> str:
    """Continue the prompt exactly as stored for training (the masked label positions of the sample)."""
    prompt = sample["input_ids"][sample["labels"] == -100]  # (P,)
    return tokenizer.decode(greedy_without_cache(model, prompt, n, stop_ids=[tokenizer.eos_id]))


def test_evaluate_cli_prompts_as_trained_and_computes_loss(tmp_path, checkpoint, data):
    proc = run_script("scripts/evaluate.py", "--checkpoint_dir", checkpoint, "--data", data, "--max_new_tokens", "6",
                      "--out", tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert "exact match" in proc.stdout and report["samples"] == 3 and report["prompt_style"] == "alpaca"
    model, tokenizer = load_finetuned(checkpoint), Tokenizer(checkpoint)
    samples = load_split(data, "test")
    for row, sample in zip(report["predictions"], samples):
        assert row["prompt"] == PromptStyle("alpaca").apply(sample["instruction"])
        assert row["prediction"] == greedy_from_training_tokens(model, sample, tokenizer, 6)
    # the loss: mean next-token cross-entropy over each sample's own answer tokens, no padding involved
    losses, counts = [], []
    with torch.no_grad():
        for s in samples:
            logits = model(s["input_ids"][None])[0, :-1]  # (T - 1, vocab)
            targets = s["labels"][1:]
            keep = targets != -100
            losses.append(F.cross_entropy(logits[keep], targets[keep], reduction="sum").item())
            counts.append(int(keep.sum()))
    assert report["val_loss"] == pytest.approx(sum(losses) / sum(counts), rel=1e-5)


def test_exact_match_counts_matching_answers(checkpoint, data):
    model, tokenizer = load_finetuned(checkpoint), Tokenizer(checkpoint)
    samples = load_split(data, "test")
    # references made equal to the model's own greedy answers, except one: 2 of 3 must match
    rigged = [{**s, "output": greedy_from_training_tokens(model, s, tokenizer, 6)} for s in samples]
    rigged[1]["output"] += " (changed)"
    report = evaluate(model, tokenizer, rigged, PromptStyle("alpaca"), "text", max_new_tokens=6)
    assert [row["correct"] for row in report["predictions"]] == [True, False, True]
    assert report["exact_match"] == pytest.approx(2 / 3)
    assert evaluate(model, tokenizer, rigged, PromptStyle("alpaca"), "text", limit=1, max_new_tokens=6)["samples"] == 1


def test_answers_stop_where_the_context_ends(checkpoint, data):
    """block_size is the KV cache's length: a prompt of P tokens leaves block_size − P for the answer, however large
    --max_new_tokens is, and a prompt that fills the context gets an empty answer instead of an error. Reference:
    the cache-free greedy loop given exactly that many tokens."""
    tokenizer = Tokenizer(checkpoint)
    samples = load_split(data, "test")
    samples.append({**samples[0], "instruction": samples[0]["instruction"] + " Explain it in great detail, please."})
    style = PromptStyle("alpaca")
    lengths = [len(tokenizer.encode(style.apply(s["instruction"]), bos=style.add_bos)) for s in samples]
    block_size = min(lengths) + 4  # room for 4 answer tokens after the shortest prompt
    model = load_finetuned(checkpoint)
    small = Llama(Config.from_name("tiny-gqa", vocab_size=32000, block_size=block_size)).eval()
    small.load_state_dict(model.state_dict())
    report = evaluate(small, tokenizer, samples, style, "text", max_new_tokens=50)
    full_budget = 0
    for row, n in zip(report["predictions"], lengths):
        ids = tokenizer.encode(row["prompt"], bos=style.add_bos)
        budget = max(block_size - n, 0)
        expected = greedy_without_cache(small, ids, budget, stop_ids=[tokenizer.eos_id]) if budget else []
        assert row["prediction"] == tokenizer.decode(expected)
        full_budget += 0 < budget == len(expected)  # the context, not EOS, ended this answer
    assert full_budget >= 1
    assert min(lengths) < block_size <= max(lengths), lengths  # an answer cut short, and a prompt with no room
    assert report["too_long"] == sum(n >= block_size for n in lengths) >= 1  # counted, for the note evaluate.py prints


def test_training_and_generation_use_the_same_prompt(tmp_path, checkpoint, data):
    """data_prep -> finetune/lora.py -> generate/lora.py: the run carries the data's style, and generation
    continues exactly the tokens the run was trained on."""
    run = tmp_path / "run"
    proc = run_script("finetune/lora.py", "--data", data, "--checkpoint_dir", checkpoint, "--out_dir", run,
                      "--max_steps", "1", "--batch_size", "2", "--micro_batch_size", "2", "--warmup_steps", "1",
                      "--eval_interval", "1", "--eval_iters", "1", "--save_interval", "1", "--precision", "32-true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PromptStyle.from_dir(run) == PromptStyle("alpaca")
    sample = load_split(data, "train")[0]
    proc = run_script("generate/lora.py", "--checkpoint_dir", checkpoint, "--lora_path", run / "lit_model_lora.pth",
                      "--prompt", sample["instruction"], "--temperature", "0", "--max_new_tokens", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tokenizer = load_finetuned(checkpoint, run / "lit_model_lora.pth"), Tokenizer(checkpoint)
    expected = greedy_from_training_tokens(model, sample, tokenizer, 6)
    assert proc.stdout.rstrip("\n") == expected
    plain = tokenizer.decode(greedy_without_cache(model, tokenizer.encode(sample["instruction"]), 6, [tokenizer.eos_id]))
    assert plain != expected  # the comparison can tell prompt styles apart

    # scripts/evaluate.py given only the run: the base is the one its base.yaml records, as for generate/
    proc = run_script("scripts/evaluate.py", "--weights_path", run, "--data", data, "--max_new_tokens", "6",
                      "--out", tmp_path / "report.json", "--split", "train", "--limit", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "report.json").read_text())["predictions"][0]["prediction"] == expected


# ---- the task formats end to end: data_prep/<task>.py -> scripts/evaluate.py ----------------------------------------

GSM8K = [{"question": f"Tom has {n} apples and buys {72 - n} more. How many now?",
          "answer": f"{n} + {72 - n} = 72\n#### 72" if n != 5 else "5 + 67 = 73\n#### 73"} for n in range(2, 10)]
SQL = [{"question": f"Who is user {n}?", "context": "CREATE TABLE users (name VARCHAR, id INTEGER)",
        "answer": "SELECT name FROM users" if n % 2 else "SELECT id FROM users"} for n in range(8)]


def answering_checkpoint(directory: Path, corpus: str, answer: str) -> Path:
    """A lit checkpoint whose greedy answer to every alpaca prompt is `answer` then EOS: a byte-level BPE trained on
    `corpus` (so each word of the answer is one token) and a chain model (tests/test_chat_formats.py)."""
    from test_chat_formats import chain_model
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([corpus] * 50, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir()
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tokenizer = Tokenizer(directory)
    prompt_end = tokenizer.encode(PromptStyle("alpaca").apply("x"), bos=False).tolist()[-1]  # every prompt's last token
    words = tokenizer.encode(answer, bos=False).tolist()
    assert tokenizer.decode(words) == answer and len(set(words)) == len(words) == len(answer.split())
    save_lit_checkpoint(chain_model(tokenizer.vocab_size, [prompt_end, *words, tokenizer.eos_id]), directory)
    return directory


@pytest.mark.parametrize("task,records,corpus,answer", [
    ("gsm8k", GSM8K, "#### 72 #### 73", "#### 72"),
    ("sql", SQL, "SELECT name FROM users SELECT id", "SELECT name FROM users"),
], ids=["gsm8k", "sql"])
def test_evaluation_end_to_end_on_the_task_formats(tmp_path, task, records, corpus, answer):
    """The records in the task's own format, prepared by its data_prep script and scored by scripts/evaluate.py
    against a model that always answers `answer`: exactly the records whose reference (GSM8K: the number after
    "####"; SQL: the query) is that answer count as correct."""
    checkpoint = answering_checkpoint(tmp_path / "ckpt", corpus, answer)
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_script(f"data_prep/{task}.py", "--data_file", tmp_path / "records.jsonl", "--checkpoint_dir", checkpoint,
               "--destination_path", tmp_path / "data", "--val_split_fraction", "0.5", "--seed", "1", check=True)
    proc = run_script("scripts/evaluate.py", "--checkpoint_dir", checkpoint, "--data", tmp_path / "data",
                      "--max_new_tokens", "8", "--out", tmp_path / "report.json", check=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["task"] == task and report["samples"] == len(records) // 2
    records_of = [next(r for r in records if r["question"] in row["prompt"]) for row in report["predictions"]]
    expected = [r["answer"].endswith("#### 72") if task == "gsm8k" else r["answer"] == answer for r in records_of]
    assert [row["prediction"] for row in report["predictions"]] == [answer] * report["samples"]
    assert [row["correct"] for row in report["predictions"]] == expected
    assert 0 < sum(expected) < len(expected)  # both kinds of reference were in the test split
    assert f"exact match {sum(expected) / len(expected):.1%}" in proc.stdout


# TinyLlama-1.1B-Chat-v1.0's template (zephyr): no BOS in the template, while its tokenizer adds one by default
ZEPHYR = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + "
          "eos_token }}{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
          "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}")


def test_a_chat_template_prompt_is_checked_without_the_tokenizers_own_bos(tmp_path, checkpoint):
    """A chat template writes its own BOS (here none): data_prep encodes without the tokenizer's default BOS, and
    evaluate's check that the data matches this tokenizer must encode the same way."""
    chat = tmp_path / "chat"
    shutil.copytree(checkpoint, chat)
    (chat / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                            "eos_token": "</s>", "chat_template": ZEPHYR}))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    run_script("data_prep/json_data.py", "--data_file", tmp_path / "d.jsonl", "--checkpoint_dir", chat,
               "--destination_path", tmp_path / "prepared", "--val_split_fraction", "0.5",
               "--prompt_style", "chat-template", check=True)
    assert Tokenizer(chat).bos_id not in load_split(tmp_path / "prepared", "test")[0]["input_ids"].tolist()
    proc = run_script("scripts/evaluate.py", "--checkpoint_dir", chat, "--data", tmp_path / "prepared",
                      "--max_new_tokens", "2", "--limit", "1", "--out", tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "report.json").read_text())["samples"] == 1
