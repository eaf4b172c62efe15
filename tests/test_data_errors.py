"""Bad input to the data_prep scripts, as a user meets it: one line on stderr naming the file (with line and
column for broken JSON), exit status != 0, and nothing written to the destination."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_main, run_script

from litft.data import load_split
from litft.errors import UserError
from litft.prepare import DownloadError, download

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
    "JSON Lines named .json": ("d.json", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n", [],
                               [":2:1:", "invalid JSON (Extra data)", "must end in .jsonl"]),
    "a test split of every example": ("d.jsonl", (json.dumps(GOOD) + "\n") * 2, ["--val_split_fraction", "0.9"],
                                      ["--val_split_fraction 0.9 holds out all 2 examples", "no training examples"]),
}
NOT_ABOUT_THE_FILE = ("unknown prompt style", "a test split of every example")  # their line names a flag instead


@pytest.mark.parametrize("case", CASES)
def test_bad_data_file_is_one_line_and_writes_nothing(tmp_path, sp_dir, case):
    name, content, flags, fragments = CASES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    destination = tmp_path / "out"
    proc = run_main("data_prep/json_data.py", "--data_file", path, "--checkpoint_dir", sp_dir,
                    "--destination_path", destination, "--val_split_fraction", "0", *flags)
    fragments = fragments if case in NOT_ABOUT_THE_FILE else [str(path), *fragments]
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


def test_a_rerun_that_fails_writing_leaves_the_earlier_set_as_it_was(tmp_path, sp_dir, monkeypatch):
    """A full disk while train.pt is written (the last and largest file): the earlier train.pt, test.pt and
    meta.json all stay; they had been deleted or replaced one by one before."""
    import torch

    data = tmp_path / "d.jsonl"
    data.write_text((json.dumps(GOOD) + "\n") * 4)
    destination = tmp_path / "out"
    first = run_main("data_prep/json_data.py", "--data_file", data, "--checkpoint_dir", sp_dir, "--destination_path",
                     destination, "--val_split_fraction", "0.25")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in destination.iterdir()}
    save = torch.save

    def disk_full_at_train_pt(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".train.pt."):
            raise OSError(28, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_train_pt)
    proc = run_main("data_prep/json_data.py", "--data_file", data, "--checkpoint_dir", sp_dir, "--destination_path",
                    destination, "--val_split_fraction", "0.5", "--max_seq_length", "64")
    assert_user_error(proc, "No space left on device")
    assert {p.name: p.read_bytes() for p in destination.iterdir()} == before


def test_test_examples_that_repeat_training_ones_are_noted(tmp_path, sp_dir):
    """Ten copies of one record split 5/5: every test example is a training one, which a reader of the test
    scores should know; distinct records get no note."""
    repeated, distinct = tmp_path / "repeated.jsonl", tmp_path / "distinct.jsonl"
    repeated.write_text((json.dumps(GOOD) + "\n") * 10)
    distinct.write_text("".join(json.dumps({**GOOD, "output": f"{GOOD['output']} {i}"}) + "\n" for i in range(10)))
    notes = []
    for path in (repeated, distinct):
        proc = run_main("data_prep/json_data.py", "--data_file", path, "--checkpoint_dir", sp_dir,
                        "--destination_path", tmp_path / path.stem, "--val_split_fraction", "0.5")
        assert proc.returncode == 0, proc.stderr
        notes.append([line for line in proc.stderr.splitlines() if line.startswith("note:")])
    assert notes == [["note: 5 of 5 test examples are also training examples (repeated records); the test loss "
                      "and exact match overstate what a model learns beyond them"], []]


def test_a_test_split_that_loses_every_example_is_noted(tmp_path, sp_dir):
    """A --val_file whose answers are all empty: each sample is dropped (it would teach nothing but to stop), so
    the test split is empty and training would skip validation; preparation says so."""
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({**GOOD, "output": f"Hi {i}."}) + "\n" for i in range(4)))
    val.write_text((json.dumps({**GOOD, "output": ""}) + "\n") * 3)
    proc = run_main("data_prep/json_data.py", "--data_file", train, "--val_file", val, "--checkpoint_dir", sp_dir,
                    "--destination_path", tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    assert len(torch.load(tmp_path / "data" / "test.pt", weights_only=True)) == 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("note:")] == [
        "note: every one of the 3 test examples was dropped (see the report above), so training will skip "
        "validation; raise --max_seq_length or give answers to the test examples"]


def test_unknown_data_name_in_evaluate(tmp_path):
    proc = run_main("scripts/evaluate.py", "--checkpoint_dir", tmp_path, "--data", "no_such_data")
    assert_user_error(proc, "--data no_such_data", "data/no_such_data does not exist")


@pytest.mark.parametrize("flags, message", [
    (("--max_new_tokens", "0"), "--max_new_tokens must be at least 1, got 0"),  # had scored every answer empty
    (("--batch_size", "0"), "--batch_size must be at least 1, got 0"),  # had failed after generating every answer
    (("--batch_size", "-1"), "--batch_size must be at least 1, got -1"),  # had written a val_loss of NaN
    (("--checkpoint_dir", "no/such/model"), "checkpoint directory no/such/model does not exist"),
])
def test_evaluate_refuses_bad_flags_before_generating(tmp_path, flags, message):
    proc = run_main("scripts/evaluate.py", "--checkpoint_dir", tmp_path, "--data", "no_such_data", *flags)
    assert_user_error(proc, message)


def test_a_directory_as_data_file_and_utf16_with_a_byte_order_mark(tmp_path, sp_dir):
    proc = run_main("data_prep/json_data.py", "--data_file", tmp_path, "--checkpoint_dir", sp_dir,
                    "--destination_path", tmp_path / "out")
    assert_user_error(proc, "is a directory")
    path = tmp_path / "d.json"
    path.write_bytes(json.dumps([GOOD, {**GOOD, "instruction": "Grüße?"}], ensure_ascii=False).encode("utf-16"))
    run_script("data_prep/json_data.py", "--data_file", path, "--checkpoint_dir", sp_dir, "--destination_path",
               tmp_path / "out", "--val_split_fraction", "0", check=True)
    assert (tmp_path / "out" / "train.pt").is_file()


class ShortBody(http.server.BaseHTTPRequestHandler):
    """Announces a body of `length` bytes and sends `body`, then closes: a download cut short, as a dropped
    connection leaves it (no error on the reading side, only fewer bytes than Content-Length)."""

    body, length = b'[{"instruction": "a"', 100_000

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(self.length))
        self.end_headers()
        self.wfile.write(self.body)
        self.close_connection = True

    def log_message(self, *args):  # keep the test's output clean
        pass


@pytest.fixture
def serve():
    """serve(handler) -> the URL of a local HTTP server answering with `handler`; stopped after the test."""
    servers = []

    def start(handler) -> str:
        server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        server.timeout = 10
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/alpaca_data.json"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_download_shorter_than_its_content_length_is_refused_and_not_kept(tmp_path, serve):
    """Truth: the HTTP Content-Length header (RFC 9110 8.6), which urllib.request.urlretrieve also checks."""
    url, path = serve(ShortBody), tmp_path / "alpaca_data.json"
    for _ in range(2):  # nothing is kept, so the second try downloads again rather than reusing a stub
        with pytest.raises(DownloadError, match="the connection closed after 20 of 100000 bytes"):
            download(url, path)
        assert list(tmp_path.iterdir()) == []
    complete = type("Complete", (ShortBody,), {"length": len(ShortBody.body)})
    assert download(serve(complete), path).read_bytes() == ShortBody.body


@pytest.mark.parametrize("content", [[torch.arange(5)], [{"labels": torch.arange(5)}], 7, {"input_ids": [1]}],
                         ids=["a-list-of-tensors", "samples-without-input_ids", "an-int", "a-dict"])
def test_a_train_pt_that_torch_reads_but_is_not_samples_is_one_line(tmp_path, content):
    """Files torch.save writes and weights_only loading reads, none a list of samples: refused by name."""
    (tmp_path / "data").mkdir()
    torch.save(content, tmp_path / "data" / "train.pt")
    with pytest.raises(UserError, match=r"train.pt does not hold a list of samples; prepare it again"):
        load_split(tmp_path / "data", "train")
