"""data_prep/preview.py (litft/preview.py): samples shown as the model sees them, and the silent mistakes named.

Truth: the JSON rows the data was prepared from. The trained part of a rendered sample is the row's answer
followed by EOS; the rest is the prompt style's prompt; each warning appears exactly when its mistake is
planted in the data, and not on clean data.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_script, tiny_bpe
from test_train import finetune, tiny  # noqa: F401  (tiny is a fixture)

from litft.checkpoint import save_lit_checkpoint
from litft.config import Config
from litft.errors import UserError
from litft.model import Llama
from litft.preview import TRAINED
from litft.preview import preview as preview_text
from litft.prompts import PromptStyle

ROWS = [{"instruction": f"{kind} {i}", "input": "", "output": word}
        for i in range(30) for kind, word in (("colour", "red"), ("animal", "cat"))]


@pytest.fixture(scope="module")
def chat_checkpoint(tiny, tmp_path_factory):
    """A tiny model with room for new tokens and a tokenizer that knows <|im_start|> and <|im_end|> (EOS stays
    </s>)."""
    ckpt = tmp_path_factory.mktemp("chat_ckpt")
    save_lit_checkpoint(Llama(Config.from_name("tiny-gqa", vocab_size=260)), ckpt)
    shutil.copy(tiny["ckpt"] / "tokenizer_config.json", ckpt)
    tiny_bpe(["<s>", "</s>", "<|im_start|>", "<|im_end|>"]).save(str(ckpt / "tokenizer.json"))
    return ckpt


def prepare(tmp_path, ckpt, rows=ROWS, *flags: str):
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    data = tmp_path / "data"
    run_script("data_prep/json_data.py", "--data_file", tmp_path / "rows.json", "--destination_path", data,
               "--checkpoint_dir", ckpt, "--val_split_fraction", "0.1", *flags, check=True)
    return data


def preview(data, *flags: str) -> str:
    return run_script("data_prep/preview.py", "--data", data, *flags, check=True).stdout


def test_a_sample_shows_its_prompt_plain_and_its_answer_and_eos_marked(tiny, tmp_path):
    data = prepare(tmp_path, tiny["ckpt"], ROWS, "--prompt_style", "alpaca")
    out = preview(data, "--n", "2")
    samples = torch.load(data / "train.pt", weights_only=True)
    style = PromptStyle.from_name("alpaca")
    for s in samples[:2]:
        expected = f"<s>{style.apply(s['instruction'])}{TRAINED[0]}{s['output']}</s>{TRAINED[1]}"
        assert expected in out
    assert out.count("--- train sample") == 2
    assert "nothing to warn about" in out


def test_each_planted_mistake_is_named(tiny, chat_checkpoint, tmp_path):
    """chatml data (each answer ends with <|im_end|>) whose end marker is masked; one sample cut before it; a new
    token no answer holds; and a --max_seq_length that truncates every sample."""
    data = prepare(tmp_path, chat_checkpoint, ROWS, "--prompt_style", "chatml", "--new_tokens", "<unused>")
    samples = torch.load(data / "train.pt", weights_only=True)
    for s in samples:
        s["labels"][-1] = -100
    samples[4] = {**samples[4], "input_ids": samples[4]["input_ids"][:-1], "labels": samples[4]["labels"][:-1]}
    torch.save(samples, data / "train.pt")
    out = preview(data, "--n", "1", "--max_seq_length", "8")
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4, out
    assert "1 of 54 samples do not end with </s> or <|im_end|>" in warnings[0]
    assert "end-of-turn marker <|im_end|> of the chatml prompt style is never trained" in warnings[1]
    assert "54 of 54 samples (100%) are truncated" in warnings[2]
    assert "the new token <unused> is in no trained label" in warnings[3]


def test_finetune_previews_before_it_trains(tiny, tmp_path):
    proc = finetune(tiny, tmp_path / "out", "--preview", "1", "--max_steps", "1")
    assert "--- train sample 0" in proc.stderr and TRAINED[0] in proc.stderr


LONG = [{"instruction": f"colour {i}", "input": "", "output": "red green blue cat dog one two three"} for i in range(20)]


@pytest.fixture(scope="module")
def long_data(tiny, tmp_path_factory):
    """Plain-style data prepared with --max_seq_length 30: every answer (36 tokens) loses its end there."""
    return prepare(tmp_path_factory.mktemp("long"), tiny["ckpt"], LONG, "--prompt_style", "plain",
                   "--max_seq_length", "30")


def test_truncation_is_counted_once_and_samples_are_shown_cut_as_training_reads_them(tiny, long_data):
    """Truth: the `tokenizers` ids of the prompt and of the answer (plain style encodes them apart); training
    reads the first L - 1 tokens and the end token. Samples shortened at preparation and cut again by a shorter
    --max_seq_length are each one truncated sample, not two."""
    from tokenizers import Tokenizer

    hf, L = Tokenizer.from_file(str(tiny["ckpt"] / "tokenizer.json")), 20
    first = torch.load(long_data / "train.pt", weights_only=True)[0]
    prompt, answer = (hf.encode(first[k], add_special_tokens=False).ids for k in ("instruction", "output"))
    kept = hf.decode(answer[:L - 2 - len(prompt)])  # BOS, the prompt, the answer's first tokens, EOS
    out = preview_text(long_data, 1, max_seq_length=L)
    assert f"--- train sample 0 ({L} tokens, cut from 30 by --max_seq_length) ---" in out
    assert f"<s>{first['instruction']}{TRAINED[0]}{kept}</s>{TRAINED[1]}\n" in out
    warning = next(line for line in out.splitlines() if "truncated" in line)
    assert warning.startswith("warning: 18 of 18 samples (100%) are truncated: 18 lost the end of their answer at "
                              "preparation (EOS kept)"), warning
    assert "18 are longer than --max_seq_length 20, so training reads only their first 19 tokens and their end " \
           "token" in warning
    uncut = preview_text(long_data, 1)  # no --max_seq_length: only what preparation did
    assert "(30 tokens) ---" in uncut and "18 of 18 samples (100%) are truncated" in uncut
    assert "longer than --max_seq_length" not in uncut


def test_a_damaged_length_report_is_a_user_error(long_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(long_data, data)
    (data / "length_report.json").write_text('{"train": {"truncated": 1')
    with pytest.raises(UserError, match=rf"{data}/length_report.json is damaged \(.*\); prepare the data again"):
        preview_text(data, 1)


def test_a_set_prepared_with_a_relative_checkpoint_path_previews_from_elsewhere_given_checkpoint_dir(
        tiny, chat_checkpoint, tmp_path):
    """meta.json keeps --checkpoint_dir as data prep was given it: from another directory that path names nothing,
    so preview says to pass --checkpoint_dir, and then renders what it renders where the data was prepared."""
    work = tmp_path / "work"
    shutil.copytree(tiny["ckpt"], work / "model")
    (work / "rows.json").write_text(json.dumps(ROWS))
    run_script("data_prep/json_data.py", "--data_file", "rows.json", "--destination_path", "data", "--checkpoint_dir",
               "model", "--val_split_fraction", "0.1", "--prompt_style", "alpaca", cwd=work, check=True)
    there = run_script("data_prep/preview.py", "--data", "data", "--n", "1", cwd=work, check=True).stdout
    assert "«" in there and "</s>" in there

    elsewhere = run_script("data_prep/preview.py", "--data", work / "data", "--n", "1", cwd=tmp_path)
    assert elsewhere.returncode != 0
    assert elsewhere.stderr.strip().splitlines() == [
        f"error: {work / 'data'} was prepared with the tokenizer of model, which is not found from {tmp_path}; "
        "pass --checkpoint_dir (the model it was prepared with)"]
    given = run_script("data_prep/preview.py", "--data", work / "data", "--n", "1", "--checkpoint_dir",
                       work / "model", cwd=tmp_path, check=True)
    assert given.stdout == there

    other = run_script("data_prep/preview.py", "--data", work / "data", "--n", "1", "--checkpoint_dir",
                       chat_checkpoint, cwd=tmp_path)
    assert other.returncode != 0 and "was prepared with another tokenizer than --checkpoint_dir" in other.stderr
    shutil.copytree(chat_checkpoint, tmp_path / "model")  # from here, the recorded "model" is another model
    misled = run_script("data_prep/preview.py", "--data", work / "data", "--n", "1", cwd=tmp_path)
    assert misled.stderr.strip().splitlines() == [
        f"error: {work / 'data'} was prepared with another tokenizer than model, as found from {tmp_path}, holds; "
        "pass --checkpoint_dir (the model it was prepared with)"]
