"""Bad input to the data_prep scripts, as a user meets it: one line on stderr naming the file (with line and
column for broken JSON), exit status != 0, and nothing written to the destination."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import assert_user_error, run_main, run_script

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, sentencepiece_model):
    directory = tmp_path_factory.mktemp("sp")
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    return directory


CASES = {
    # name: (file name, content, extra flags, fragments of the error line besides the file name)
    "malformed JSON": ("d.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', [],
                       [":2:22:", "invalid JSON"]),
    "malformed JSONL": ("d.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{\"instruction\": \"x\",,}\n", [],
                        [":3:21:", "invalid JSON"]),
    "missing key": ("d.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"instruction": "x"}) + "\n", [],
                    ["line 2", "missing key 'output'"]),
    "non-string field": ("d.json", json.dumps([GOOD, {"instruction": "x", "output": 5}]), [],
                         ["record 2", "'output' must be a string, got int"]),
    "not objects": ("d.jsonl", "[1, 2]\n", [], ["line 1", "expected a JSON object"]),
    "empty file": ("d.jsonl", "\n \n", [], ["is empty"]),
    "every sample too long": ("d.jsonl", json.dumps(GOOD) + "\n", ["--max_seq_length", "4"],
                              ["every sample", "--max_seq_length 4"]),
    "unknown prompt style": ("d.jsonl", json.dumps(GOOD) + "\n", ["--prompt_style", "vicuna"],
                             ["unknown prompt style 'vicuna'"]),
    "Latin-1 JSONL": ("d.jsonl", '{"instruction": "Caf\u00e9?", "output": "Oui."}\n'.encode("latin-1"), [],
                      ["is not UTF-8", "byte 0xe9 at offset 20"]),
    "Latin-1 CSV": ("d.csv", "instruction,output\nGr\u00fc\u00df,Hallo\n".encode("latin-1"), [],
                    ["is not UTF-8", "byte 0xfc"]),
    "CSV row with an unquoted comma": ("d.csv", "instruction,output\nSay hi,Hi\nGreet,Hello, world\n", [],
                                       ["line 3", "3 fields where the header has 2", "quote a value"]),
    "CSV row short of a field": ("d.csv", "instruction,input,output\nSay hi,,Hi\nGreet,Hello\n", [],
                                 ["line 3", "2 fields where the header has 3", "a,,c"]),
    "lone surrogate": ("d.jsonl", '{"instruction": "a\\ud800b", "output": "c"}\n', [],
                       ["line 1", "'instruction' holds an unpaired surrogate at character 1"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_data_file_is_one_line_and_writes_nothing(tmp_path, sp_dir, case):
    name, content, flags, fragments = CASES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    destination = tmp_path / "out"
    proc = run_main("data_prep/json_data.py", "--data_file", path, "--checkpoint_dir", sp_dir,
                    "--destination_path", destination, "--val_split_fraction", "0", *flags)
    fragments = fragments if case == "unknown prompt style" else [str(path), *fragments]
    assert_user_error(proc, *fragments)
    assert not destination.exists()


def test_missing_file_and_unknown_variant(tmp_path, sp_dir):
    proc = run_main("data_prep/dolly.py", "--data_file", tmp_path / "nope.jsonl", "--checkpoint_dir", sp_dir,
                    "--destination_path", tmp_path / "out")
    assert_user_error(proc, str(tmp_path / "nope.jsonl"), "does not exist")
    proc = run_main("data_prep/alpaca.py", "--variant", "dirty", "--destination_path", tmp_path / "out")
    assert_user_error(proc, "--variant 'dirty'", "original, cleaned")
    assert not (tmp_path / "out").exists()


def test_destination_that_is_not_writable(tmp_path, sp_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_main("data_prep/json_data.py", "--data_file", data, "--checkpoint_dir", sp_dir,
                    "--destination_path", blocker / "out")
    assert_user_error(proc, str(blocker / "out"), "is not a directory")
    assert blocker.read_text() == "not a directory"
    if os.geteuid() != 0:  # root may write anywhere, so permissions can only be tested as a user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        proc = run_main("data_prep/json_data.py", "--data_file", data, "--checkpoint_dir", sp_dir,
                        "--destination_path", locked / "out")
        assert_user_error(proc, str(locked / "out"), "not writable")
        assert not (locked / "out").exists()


def test_unknown_data_name_in_evaluate(tmp_path):
    proc = run_main("scripts/evaluate.py", "--checkpoint_dir", tmp_path, "--data", "no_such_data")
    assert_user_error(proc, "--data no_such_data", "data/no_such_data does not exist")


def test_a_directory_as_data_file_and_utf16_with_a_byte_order_mark(tmp_path, sp_dir):
    proc = run_main("data_prep/json_data.py", "--data_file", tmp_path, "--checkpoint_dir", sp_dir,
                    "--destination_path", tmp_path / "out")
    assert_user_error(proc, "is a directory")
    path = tmp_path / "d.json"
    path.write_bytes(json.dumps([GOOD, {**GOOD, "instruction": "Grüße?"}], ensure_ascii=False).encode("utf-16"))
    run_script("data_prep/json_data.py", "--data_file", path, "--checkpoint_dir", sp_dir, "--destination_path",
               tmp_path / "out", "--val_split_fraction", "0", check=True)
    assert (tmp_path / "out" / "train.pt").is_file()
