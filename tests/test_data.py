"""Data preparation and batching, checked against the tokenizers themselves (sentencepiece's encode of Llama's
tokenizer.model; a `tokenizers` BPE trained here): the exact token ids, the prompt mask, EOS at the end of every
sample (truncated ones too), right padding, the Dolly and custom-key mappings, and a reproducible seeded split."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil

import pytest
import torch
from conftest import assert_user_error, run_main, run_script

from litft.data import collate, load_split, meta_of, prompt_style_of
from litft.errors import UserError
from litft.prepare import IGNORE_INDEX, prepare, read_records, split_examples, take_fields
from litft.prompts import PromptStyle

EXAMPLES = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5"},
    {"instruction": "Write a haiku about rain.", "input": "", "output": "Soft rain on the roof,\nquiet streets."},
]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, sentencepiece_model):
    """A checkpoint directory holding only a real Llama-style sentencepiece tokenizer (BOS 1, EOS 2)."""
    directory = tmp_path_factory.mktemp("sp")
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A checkpoint directory with a byte-level BPE tokenizer.json trained here; EOS is ChatML's <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([json.dumps(e) for e in EXAMPLES] * 20, trainer)
    directory = tmp_path_factory.mktemp("bpe")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "add_bos_token": False}))
    return directory


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare_here(tmp_path, checkpoint_dir, examples=EXAMPLES, **options):
    options = {"max_seq_length": 256, "mask_inputs": True, "prompt_style": "alpaca", **options}
    prepare(examples, examples[:1], task="text", source="test", destination_path=tmp_path / "data",
            checkpoint_dir=checkpoint_dir, seed=0, val_split_fraction=0.0, **options)
    return load_split(tmp_path / "data", "train")


@pytest.mark.parametrize("style_name, between", [("alpaca", ""), ("llama2-chat", " ")])
def test_samples_equal_sentencepiece_ids_with_the_prompt_masked(tmp_path, sp_dir, sentencepiece_model, style_name,
                                                                 between):
    """Truth: sentencepiece's encode of the whole text, prompt then answer, as the model reads it — alpaca's answer
    follows "### Response:\n" directly (no "▁" of its own), Llama-2-chat's follows "[/INST]" after a space."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sentencepiece_model))
    style = PromptStyle(style_name)
    proc = run_script("data_prep/json_data.py", "--data_file", write_jsonl(tmp_path / "d.jsonl", EXAMPLES),
                      "--val_split_fraction", "0", "--checkpoint_dir", sp_dir, "--destination_path", tmp_path / "out",
                      "--prompt_style", style_name)
    assert proc.returncode == 0, proc.stderr
    samples = load_split(tmp_path / "out", "train")
    assert sorted(s["output"] for s in samples) == sorted(e["output"] for e in EXAMPLES)
    for s in samples:
        prompt_text = style.apply(s["instruction"], s["input"])
        prompt = [sp.bos_id()] + sp.encode(prompt_text)
        whole = [sp.bos_id()] + sp.encode(prompt_text + between + s["output"]) + [sp.eos_id()]
        assert whole[:len(prompt)] == prompt  # the prompt is encoded as generation encodes it
        assert s["input_ids"].tolist() == whole
        assert s["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + whole[len(prompt):]
        assert sp.decode(whole[len(prompt):]) == s["output"]
    assert prompt_style_of(tmp_path / "out") == style
    meta = meta_of(tmp_path / "out")
    assert meta["mask_inputs"] is True and meta["counts"] == {"train": 4, "test": 0}
    assert "sample lengths in tokens" in proc.stdout


def test_chatml_samples_equal_tokenizers_ids_and_unmasked_labels(tmp_path, bpe_dir):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    eos = hf.token_to_id("<|im_end|>")
    samples = prepare_here(tmp_path, bpe_dir, prompt_style="chatml", mask_inputs=False)
    for s, e in zip(samples, EXAMPLES):
        prompt = hf.encode(PromptStyle("chatml").apply(e["instruction"], e["input"]), add_special_tokens=False).ids
        assert prompt[0] == hf.token_to_id("<|im_start|>")  # markers are single ids, no BOS
        assert s["input_ids"].tolist() == prompt + hf.encode(e["output"], add_special_tokens=False).ids + [eos]
        assert torch.equal(s["labels"], s["input_ids"])  # mask_inputs off: the prompt is learned too


def test_truncated_samples_keep_eos_and_are_counted(tmp_path, sp_dir, sentencepiece_model):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sentencepiece_model))
    style, max_len = PromptStyle("plain"), 16
    examples = [{"instruction": f"Story {i}.", "input": "", "output": " ".join(["once upon a time"] * i)} for i in range(1, 7)]
    examples.append({"instruction": "word " * 40, "input": "", "output": "too long a prompt"})
    full = [1 + len(sp.encode(style.apply(e["instruction"]))) + len(sp.encode(e["output"])) + 1 for e in examples]
    samples = prepare_here(tmp_path, sp_dir, examples, prompt_style="plain", max_seq_length=max_len)
    assert len(samples) == len(examples) - 1  # the 40-word prompt leaves no room for an answer: dropped
    for s in samples:
        assert len(s["input_ids"]) <= max_len
        assert s["input_ids"][-1] == s["labels"][-1] == sp.eos_id()
    report = json.loads((tmp_path / "data" / "length_report.json").read_text())["train"]
    assert report["truncated"] == sum(n > max_len for n in full[:-1]) > 0
    assert report["dropped"] == 1 and report["max"] == max_len
    import numpy as np  # the percentiles the report shows, as numpy computes them (rounded up to a real length)

    lengths = [len(s["input_ids"]) for s in samples]
    assert [report[f"p{q}"] for q in (50, 90, 95, 99)] == \
        [int(np.percentile(lengths, q, method="higher")) for q in (50, 90, 95, 99)]


def test_an_empty_answer_is_dropped_when_only_answers_are_learned(tmp_path, sp_dir):
    """Masked, a sample with no answer would train EOS alone; unmasked (raw text in the instruction), it is text."""
    examples = EXAMPLES + [{"instruction": "Say nothing.", "input": "", "output": " \n"}]
    assert len(prepare_here(tmp_path / "masked", sp_dir, examples)) == len(EXAMPLES)
    report = json.loads((tmp_path / "masked" / "data" / "length_report.json").read_text())["train"]
    assert report["dropped"] == 1
    assert len(prepare_here(tmp_path / "unmasked", sp_dir, examples, mask_inputs=False)) == len(examples)


def test_collate_pads_right_without_touching_labels():
    a = {"input_ids": torch.tensor([1, 5, 6, 7, 2]), "labels": torch.tensor([-100, -100, 6, 7, 2])}
    b = {"input_ids": torch.tensor([1, 8, 2]), "labels": torch.tensor([-100, 8, 2])}
    input_ids, labels = collate([a, b], pad_id=0)
    assert input_ids.tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]
    assert labels.tolist() == [[-100, -100, 6, 7, 2], [-100, 8, 2, -100, -100]]
    assert collate([b, b], pad_id=0)[0].shape == (2, 3)  # no padding when nothing needs it
    # a sample longer than max_seq_length keeps its head and its final EOS
    input_ids, labels = collate([a, b], pad_id=9, ignore_index=-1, max_seq_length=4)
    assert input_ids.tolist() == [[1, 5, 6, 2], [1, 8, 2, 9]]
    assert labels.tolist() == [[-100, -100, 6, 2], [-100, 8, 2, -1]]
    # --pad_to_multiple_of: rounded up, never past max_seq_length
    assert collate([a, b], pad_id=0, multiple_of=4)[0].tolist() == [[1, 5, 6, 7, 2, 0, 0, 0], [1, 8, 2, 0, 0, 0, 0, 0]]
    assert collate([b, b], pad_id=0, multiple_of=3)[0].shape == (2, 3)
    assert collate([a, b], pad_id=0, multiple_of=16, max_seq_length=6)[1].tolist() == \
        [[-100, -100, 6, 7, 2, -100], [-100, 8, 2, -100, -100, -100]]


def test_dolly_maps_context_and_response(tmp_path, sp_dir):
    records = [{"instruction": f"Question {i}?", "context": f"Passage {i}." if i % 2 else "", "response": f"Answer {i}.",
                "category": "open_qa"} for i in range(10)]
    proc = run_script("data_prep/dolly.py", "--data_file", write_jsonl(tmp_path / "dolly.jsonl", records),
                      "--checkpoint_dir", sp_dir, "--destination_path", tmp_path / "dolly", "--val_split_fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    samples = load_split(tmp_path / "dolly", "train") + load_split(tmp_path / "dolly", "test")
    got = sorted((s["instruction"], s["input"], s["output"]) for s in samples)
    assert got == sorted((r["instruction"], r["context"], r["response"]) for r in records)
    assert meta_of(tmp_path / "dolly")["counts"] == {"train": 8, "test": 2}


def test_custom_keys_and_separate_validation_file(tmp_path, sp_dir):
    train = [{"q": f"What is {i} + {i}?", "a": str(2 * i)} for i in range(5)]
    val = [{"q": "What is 9 + 9?", "a": "18"}]
    proc = run_script("data_prep/json_data.py", "--data_file", write_jsonl(tmp_path / "t.jsonl", train),
                      "--val_file", write_jsonl(tmp_path / "v.jsonl", val), "--instruction_key", "q", "--input_key", "",
                      "--output_key", "a", "--task", "gsm8k", "--prompt_style", "plain", "--checkpoint_dir", sp_dir,
                      "--destination_path", tmp_path / "qa")
    assert proc.returncode == 0, proc.stderr
    assert [(s["instruction"], s["input"], s["output"]) for s in load_split(tmp_path / "qa", "train")] == \
        [(r["q"], "", r["a"]) for r in train]
    assert [s["output"] for s in load_split(tmp_path / "qa", "test")] == ["18"]
    assert meta_of(tmp_path / "qa")["task"] == "gsm8k" and prompt_style_of(tmp_path / "qa") == PromptStyle("plain")


def test_an_input_key_no_record_has_is_noted_when_another_key_goes_unread(tmp_path, sp_dir):
    rows = [{"question": f"What is {i} + 1?", "context": f"i is {i}", "answer": str(i + 1)} for i in range(3)]
    flags = ["--instruction_key", "question", "--output_key", "answer", "--checkpoint_dir", sp_dir,
             "--val_split_fraction", "0"]
    proc = run_main("data_prep/json_data.py", "--data_file", write_jsonl(tmp_path / "d.jsonl", rows), *flags,
                    "--destination_path", tmp_path / "a")
    assert proc.returncode == 0 and "has the key 'input', so every input is empty" in proc.stderr
    assert "'context'" in proc.stderr and "--input_key" in proc.stderr
    for row in rows:  # without the unread key: data with no inputs at all, nothing to say
        del row["context"]
    proc = run_main("data_prep/json_data.py", "--data_file", write_jsonl(tmp_path / "e.jsonl", rows), *flags,
                    "--destination_path", tmp_path / "b")
    assert proc.returncode == 0 and "every input is empty" not in proc.stderr


def test_seeded_split_is_reproducible(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": str(i), "output": str(i)} for i in range(50)])
    examples = take_fields(read_records(path), path)
    train, test = split_examples(examples, 0.2, seed=7)
    assert (train, test) == split_examples(examples, 0.2, seed=7)
    assert test != split_examples(examples, 0.2, seed=8)[1]
    assert len(test) == 10 and sorted(e["output"] for e in train + test) == sorted(str(i) for i in range(50))
    assert all(e["input"] == "" for e in examples)  # a missing input key is an empty input


def test_games_task_is_deterministic_regular_and_held_out(tmp_path, bpe_dir):
    from data_prep import games

    proc = run_script("data_prep/games.py", "--num_examples", "300", "--checkpoint_dir", bpe_dir,
                      "--destination_path", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    train, test = [json.loads((tmp_path / "a" / f"games_{s}.json").read_text()) for s in ("train", "test")]
    assert split_examples(games.generate_examples(300, seed=42), 0.1, seed=42) == (train, test)  # same seed, same task
    assert games.generate_examples(300, seed=1) != games.generate_examples(300, seed=42)
    assert len(train) == 270 and len(test) == 30
    assert not {e["input"] for e in train} & {e["input"] for e in test}
    slot = r"(name|release_year|genres|platforms|rating|multiplayer)\[[^\]]+\]"
    grammar = re.compile(rf"(inform|request|confirm|give_opinion)\({slot}(, {slot})*\)")
    order = ["name", "release_year", "genres", "platforms", "rating", "multiplayer"]
    for e in train + test:
        assert grammar.fullmatch(e["output"]), e["output"]
        slots = re.findall(r"(\w+)\[", e["output"])
        assert slots == sorted(slots, key=order.index)  # attributes always in the fixed order
        assert len(e["input"]) < 200
    assert len(load_split(tmp_path / "a", "test")) == 30 and meta_of(tmp_path / "a")["task"] == "games"


def test_missing_data_names_the_script_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"data/alpaca does not exist .*python data_prep/alpaca.py"):
        load_split("alpaca", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not prepared data"):
        load_split(tmp_path / "empty", "train")
    with pytest.raises(UserError, match="no prompt_style.yaml"):
        prompt_style_of(tmp_path / "empty")


def test_a_bare_name_means_a_folder_here_only_when_that_holds_data_or_names_no_data_set(tmp_path, monkeypatch):
    """`--data alpaca` beside an unrelated ./alpaca folder (a clone of the data's repository) means data/alpaca,
    as the named sets' first-use preparation writes there; a folder here is read when it is prepared data, or
    when it is not a named set's and data/<name> does not exist (then the error says it is not prepared data)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "README.md").write_text("a clone, not prepared data")
    with pytest.raises(UserError, match=r"data/alpaca does not exist .*python data_prep/alpaca.py"):
        load_split("alpaca", "train")
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match=r"--data mine: mine is not prepared data"):
        load_split("mine", "train")
    for prepared in (tmp_path / "data" / "mine", tmp_path / "alpaca"):
        prepared.mkdir(parents=True, exist_ok=True)
        torch.save([{"input_ids": torch.tensor([1]), "where": str(prepared)}], prepared / "train.pt")
    assert load_split("mine", "train")[0]["where"] == str(tmp_path / "data" / "mine")
    for path in ("./mine", "mine/"):  # written as a path: that folder, prepared or not
        with pytest.raises(UserError, match=rf"--data {path}: mine is not prepared data"):
            load_split(path, "train")
    assert load_split("alpaca", "train")[0]["where"] == str(tmp_path / "alpaca")  # prepared here: read here


def test_a_file_as_data_and_damaged_json_files_are_user_errors(tmp_path, sp_dir):
    prepare_here(tmp_path, sp_dir)
    data = tmp_path / "data"
    with pytest.raises(UserError, match=rf"--data {data}/train.pt is a file; --data names the directory .*"
                                        rf"\(here: --data {data}\)"):
        load_split(data / "train.pt", "train")
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(UserError, match=rf"--data {tmp_path}/rows.json is a data file, not prepared data; prepare it "
                                        rf"first: python data_prep/json_data.py --data_file {tmp_path}/rows.json "
                                        r"--destination_path data/rows .* then pass --data data/rows"):
        load_split(tmp_path / "rows.json", "train")
    for content, reason in [(b'{"task": "text", "coun', "Unterminated string"), (b"\xff\xfe\x00", "not UTF-8"),
                            (b"[1, 2]", "holds a JSON list, not an object")]:
        (data / "meta.json").write_bytes(content)
        with pytest.raises(UserError, match=rf"{data}/meta.json .*{reason}.*prepare the data again"):
            meta_of(data)


def test_jsonl_records_hold_unicode_line_separators(tmp_path):
    """Truth: RFC 8259 lets a JSON string hold U+2028, U+2029 and U+0085 unescaped, and JSON Lines ends a record at
    "\n" only (jsonlines.org), so each line is one record exactly as json.loads reads it."""
    records = [{"instruction": "Line\u2028sep", "input": "para\u2029graph", "output": "next\x85line\x0cfeed"},
               {"instruction": "Plain.", "output": "Yes."}]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path = tmp_path / "u.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    assert read_records(path) == [(f"line {n}", json.loads(line)) for n, line in enumerate(lines, 1)]


def test_suffixes_are_read_in_any_case(tmp_path):
    """Truth: the json and csv modules reading the same text as JSON Lines and as CSV."""
    lines = [json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) for i in range(2)]
    (tmp_path / "two.JSONL").write_text("\n".join(lines) + "\n")
    assert [r for _, r in read_records(tmp_path / "two.JSONL")] == [json.loads(line) for line in lines]
    text = "instruction,output\nSay hi,Hi\n"
    (tmp_path / "t.CSV").write_text(text)
    assert [r for _, r in read_records(tmp_path / "t.CSV")] == list(csv.DictReader(io.StringIO(text)))


def test_a_fraction_that_leaves_no_training_examples_is_refused(tmp_path):
    two = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(2)]
    for examples, fraction in [(two, 0.9), (two, 0.75), (two[:1], 0.6)]:  # 1.8, 1.5 and 0.6 round up to all
        with pytest.raises(UserError, match=rf"--val_split_fraction {fraction} holds out all {len(examples)} "
                                            "examples as the test split, leaving no training examples"):
            split_examples(examples, fraction, seed=0)
    assert [len(part) for part in split_examples(two, 0.5, seed=0)] == [1, 1]


def test_an_interrupted_prepare_leaves_the_earlier_set_whole(tmp_path, sp_dir, monkeypatch):
    """train.pt marks a prepared directory (litft/named_data.py uses it as such): cut short while writing test.pt, a
    preparation leaves the earlier train.pt, test.pt and meta.json as they were, never a mix of old and new."""
    import litft.prepare

    old_train = prepare_here(tmp_path, sp_dir, prompt_style="plain", max_seq_length=256)
    save = torch.save

    def save_but_fail_on_test(obj, f, *args, **kwargs):
        if ".test.pt." in str(f):  # atomic_path's temporary name for test.pt
            raise KeyboardInterrupt
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(litft.prepare.torch, "save", save_but_fail_on_test)
    with pytest.raises(KeyboardInterrupt):
        prepare_here(tmp_path, sp_dir, prompt_style="plain", max_seq_length=12)
    data = tmp_path / "data"
    assert_same_samples(load_split(data, "train"), old_train)
    assert meta_of(data)["max_seq_length"] == 256 and not list(data.glob(".partial-*"))
    monkeypatch.undo()
    new_train = prepare_here(tmp_path, sp_dir, prompt_style="plain", max_seq_length=12)
    assert max(len(s["input_ids"]) for s in new_train) == meta_of(data)["max_seq_length"] == 12


def assert_same_samples(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                            for k in a)


def test_alpaca_viggo_gsm8k_sql_mappings_from_local_files(tmp_path, sp_dir):
    """Each script's --data_file path, with records laid out as the public files are."""
    import csv

    from data_prep import alpaca, gsm8k, sql, viggo

    with open(tmp_path / "viggo.csv", "w", newline="") as f:  # GEM/viggo's train.csv header: gem_id,mr,ref
        writer = csv.DictWriter(f, ["gem_id", "mr", "ref"])
        writer.writeheader()
        for i in range(4):
            writer.writerow({"gem_id": f"GEM-viggo-train-{i}", "mr": f"inform(name[Game {i}], rating[good])",
                             "ref": f"Game {i} is a good game, with \"quotes\", commas."})
    math = [{"question": f"What is {i} times 2?", "answer": f"{i} * 2 = {2 * i}\n#### {2 * i}"} for i in range(4)]
    tables = [{"question": f"How many rows have id {i}?", "context": "CREATE TABLE t (id VARCHAR)",
               "answer": f"SELECT COUNT(*) FROM t WHERE id = {i}"} for i in range(4)]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math))
    (tmp_path / "sql.json").write_text(json.dumps(tables))
    (tmp_path / "alpaca.json").write_text(json.dumps(EXAMPLES))
    expected = {
        viggo: ("viggo.csv", "viggo", lambda s: (s["input"].startswith("Game "), s["output"].startswith("inform("),
                                                 s["instruction"] == viggo.INSTRUCTION)),
        gsm8k: ("gsm8k.jsonl", "gsm8k", lambda s: (s["instruction"].startswith("What is"), "####" in s["output"],
                                                   s["input"] == "")),
        sql: ("sql.json", "sql", lambda s: (s["input"] == "CREATE TABLE t (id VARCHAR)", s["output"].startswith("SELECT"),
                                            s["instruction"].startswith("How many"))),
        alpaca: ("alpaca.json", "alpaca", lambda s: (s in EXAMPLES,)),
    }
    for module, (name, task, check) in expected.items():
        out = tmp_path / task
        module.main(data_file=tmp_path / name, destination_path=out, checkpoint_dir=sp_dir, val_split_fraction=0.25)
        samples = load_split(out, "train") + load_split(out, "test")
        assert len(samples) == 4 and meta_of(out)["task"] == task
        raw = [{k: s[k] for k in ("instruction", "input", "output")} for s in samples]
        assert all(all(check(s)) for s in raw), (task, raw[0])
    assert {s["input"] for s in load_split(tmp_path / "viggo", "train")} <= {f"Game {i} is a good game, with \"quotes\", commas." for i in range(4)}
    features = [{"meaning_representation": "inform(name[X])", "target": "X."}]  # the datasets library's names
    (tmp_path / "features.json").write_text(json.dumps(features))
    assert viggo.load(tmp_path / "features.json")[0] == {"instruction": viggo.INSTRUCTION, "input": "X.",
                                                         "output": "inform(name[X])"}


@pytest.mark.parametrize("script, record, message", [
    ("viggo", {"mr": "inform(name[X])", "target": "X."}, "missing key 'ref' (for input)"),
    ("viggo", {"mr": "inform(name[X])", "ref": None}, "'ref' (the input) is empty"),
    ("sql", {"question": "How many?", "answer": "SELECT 1"}, "missing key 'context' (for input)"),
    ("sql", {"question": "How many?", "context": "  ", "answer": "SELECT 1"}, "'context' (the input) is empty"),
])
def test_a_task_whose_input_is_missing_is_refused(tmp_path, sp_dir, script, record, message):
    """The sentence (ViGGO) or the table (SQL) is what the answer is made from: without it every input was empty."""
    (tmp_path / "records.json").write_text(json.dumps([record] * 4))
    proc = run_main(f"data_prep/{script}.py", "--data_file", tmp_path / "records.json", "--checkpoint_dir", sp_dir,
                    "--destination_path", tmp_path / "out")
    assert_user_error(proc, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["alpaca", "dolly", "games", "gsm8k", "json_data", "sql", "viggo"])
def test_help_puts_each_shared_option_under_its_own_flag(script):
    """The options litft.prepare appends to every data_prep docstring are read as separate arguments: --seed's
    description is printed under --seed, not run on into the first flag's paragraph."""
    proc = run_main(f"data_prep/{script}.py", "--help")
    assert proc.returncode == 0, proc.stderr
    options = proc.stdout.split("\noptions:\n", 1)[1]
    sections = {s.split()[0]: "".join(s.split()) for s in re.split(r"\n(?=  --)", options) if s.startswith("  --")}
    seed = "".join("the seed of the train/test shuffle; the same seed gives the same split.".split())
    assert seed in sections["--seed"], sections["--seed"]
    assert [flag for flag, text in sections.items() if seed in text] == ["--seed"]
    assert "destination_path:" not in options and "seed:" not in options


def test_data_is_prepared_from_a_download_not_yet_converted(tmp_path, sp_dir):
    """Preparing data reads only the tokenizer, so a Hugging Face download (config.json, no lit weights yet) will
    do, and gives the samples its converted checkpoint would; a LoRA run there is refused by name."""
    from litft.kinds import kind_of

    hf = tmp_path / "hf"
    shutil.copytree(sp_dir, hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert kind_of(hf) == "hf"
    assert_same_samples(prepare_here(tmp_path / "a", hf), prepare_here(tmp_path / "b", sp_dir))
    (hf / "lora.yaml").write_text("r: 8\n")
    with pytest.raises(UserError, match=rf"--checkpoint_dir {hf} is a LoRA run, not a checkpoint"):
        prepare_here(tmp_path / "c", hf)
