"""New tokens from data preparation to generation, as a user runs the scripts.

Truth: the `tokenizers` library reading the tokenizer files the scripts write; the merged checkpoint served by
generate/base.py and generate/lora.py (which merges in memory) against the unmerged LoRA model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import assert_user_error, run_main, run_script
from test_train import COMMON
from tokenizers import Tokenizer

from litft import Config, Llama
from litft.checkpoint import save_lit_checkpoint
from litft.errors import UserError
from litft.generate import generate
from litft.load_finetuned import load_finetuned
from litft.new_tokens import grown_tokenizer_files
from litft.tokenizer import Tokenizer as LitTokenizer

NEW = ["<ans>", "</ans>"]


def test_new_tokens_from_data_prep_to_generation(tiny_checkpoint, tmp_path):
    base = tmp_path / "base"  # the tiny checkpoint with as many rows as its tokenizer has tokens
    vocab = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny-gqa", vocab_size=vocab))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # small weights: the loss starts near log(vocab)
                p.mul_(0.1)
    save_lit_checkpoint(model, base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, base / name)
    rows = [{"instruction": f"{kind} {i}", "input": "", "output": f"<ans>{word}</ans>"}
            for i in range(40) for kind, word in (("colour", "red"), ("animal", "cat"), ("number", "two"))]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    data, run = tmp_path / "data", tmp_path / "run"
    run_script("data_prep/json_data.py", "--data_file", tmp_path / "rows.json", "--destination_path", data,
               "--checkpoint_dir", base, "--max_seq_length", "48", "--prompt_style", "plain",
               "--new_tokens", ",".join(NEW), check=True)

    grown = Tokenizer.from_file(str(data / "tokenizer.json"))
    assert [grown.token_to_id(t) for t in NEW] == [vocab, vocab + 1]
    sample = torch.load(data / "train.pt", weights_only=True)[0]
    assert json.loads((data / "meta.json").read_text())["new_tokens"] == NEW
    assert sample["input_ids"].tolist().count(vocab) == 1 and vocab + 1 in sample["labels"].tolist()

    flags = ("--checkpoint_dir", base, "--data", data, *COMMON)
    run_script("finetune/lora.py", *flags, "--out_dir", run, "--max_steps", "60", "--learning_rate", "1e-2",
               "--lora_dropout", "0", check=True)  # no dropout: what is learnt does not depend on the random masks
    saved = torch.load(run / "lit_model_lora.pth", weights_only=True)
    assert saved["embed.new_rows"].shape == (2, 64) and "lm_head.new_rows" not in saved  # tied: stored once
    assert (run / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()

    ask = ("--prompt", "colour 3", "--temperature", "0", "--max_new_tokens", "6")
    lora = run_script("generate/lora.py", "--checkpoint_dir", base, "--lora_path", run / "lit_model_lora.pth", *ask,
                      check=True)
    assert lora.stdout.startswith("<ans>")  # the new token, learnt, generated and decoded
    unmerged = load_finetuned(base, run / "lit_model_lora.pth", method="lora")  # generate/lora.py merges
    ids = list(generate(unmerged, LitTokenizer(run).encode("colour 3"), 6, temperature=0))
    assert lora.stdout == LitTokenizer(run).decode(ids) + "\n"
    run_script("scripts/merge_lora.py", "--checkpoint_dir", base, "--lora_path", run / "lit_model_lora.pth",
               "--out_dir", tmp_path / "merged", check=True)
    merged = run_script("generate/base.py", "--checkpoint_dir", tmp_path / "merged", *ask, check=True)
    assert merged.stdout == lora.stdout

    shutil.copytree(run, tmp_path / "run3")  # lora.yaml names a third token the file has no row for
    settings = yaml.safe_load((tmp_path / "run3" / "lora.yaml").read_text())
    (tmp_path / "run3" / "lora.yaml").write_text(yaml.safe_dump({**settings, "new_tokens": [*NEW, "<x>"]}))
    with pytest.raises(UserError, match="holds 2 new-token rows but lora.yaml names 3 new tokens"):
        load_finetuned(base, tmp_path / "run3" / "lit_model_lora.pth")

    full = run_main("finetune/full.py", *flags, "--out_dir", tmp_path / "full")
    assert_user_error(full, "prepared with new tokens", "finetune/lora.py")
    assert not (tmp_path / "full").exists()
    (run / "tokenizer.json").unlink()  # the run's ids mean nothing to the base tokenizer: refuse, do not guess
    assert_user_error(run_main("generate/lora.py", "--checkpoint_dir", base, "--lora_path", run / "lit_model_lora.pth",
                               *ask), "holds no tokenizer file")
    again = run_main("data_prep/json_data.py", "--data_file", tmp_path / "rows.json", "--destination_path", data,
                     "--checkpoint_dir", base, "--new_tokens", "<ans>,<ans>")
    assert_user_error(again, "different from the others")
    for value in (",", "<ans>,,</ans>"):  # an empty item had been dropped: the data lacked a token the user asked for
        empty = run_main("data_prep/json_data.py", "--data_file", tmp_path / "rows.json", "--destination_path",
                         tmp_path / "data2", "--checkpoint_dir", base, "--new_tokens", value)
        assert_user_error(empty, f"--new_tokens {value!r} has an empty token")
        assert not (tmp_path / "data2").exists()


def test_a_vocabulary_padded_beyond_its_tokenizer_is_refused_with_what_to_do(tiny_checkpoint, tmp_path):
    """Qwen2.5 has 151,936 rows for 151,665 tokens: a new token's id (the tokenizer's next) would name a padding
    row, not the row litft adds after the last one."""
    shutil.copy(tiny_checkpoint / "tokenizer.json", tmp_path / "tokenizer.json")
    vocab = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    with pytest.raises(UserError, match=f"has {vocab} tokens but the model has {vocab + 64} rows \\(a vocabulary "
                                        "padded beyond its tokenizer\\).*prepare the data without --new_tokens"):
        grown_tokenizer_files(tmp_path, ["<ans>"], vocab + 64)


def test_a_sentencepiece_token_with_a_space_inside_is_refused(sentencepiece_model, tmp_path):
    """The sentencepiece library turns spaces into ▁ before it matches its pieces: grown by a USER_DEFINED
    "### Answer:", it still spells that text in ordinary pieces, so such a row would never be trained. Refused."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sentencepiece_model.read_bytes())
    new_id = len(proto.pieces)
    for token in ("### Answer:", "<sep>"):
        piece = proto.pieces.add()
        piece.piece, piece.type = token, pb.ModelProto.SentencePiece.USER_DEFINED
    sp = SentencePieceProcessor(model_proto=proto.SerializeToString())
    assert new_id not in sp.encode("x ### Answer: y") and new_id + 1 in sp.encode("a<sep>b")

    shutil.copy(sentencepiece_model, tmp_path / "tokenizer.model")
    assert set(grown_tokenizer_files(tmp_path, ["<sep>"], new_id)) == {"tokenizer.model"}
    with pytest.raises(UserError, match=r"\['### Answer:'\].*never matches a token with a space inside"):
        grown_tokenizer_files(tmp_path, ["### Answer:", "<sep>"], new_id)


def test_a_token_that_would_not_decode_to_its_own_text_is_refused(tiny_checkpoint, tmp_path):
    """The tokenizers library, grown by "café" on a byte-level tokenizer (SmolLM2's), decodes its id as "caf\ufffd"
    (é is read as the lone byte 0xE9); such a token is refused, tokens that come back as written are kept."""
    from tokenizers import AddedToken

    library = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    vocab = library.get_vocab_size(with_added_tokens=True)
    library.add_tokens([AddedToken("café", normalized=False)])
    assert library.decode([vocab], skip_special_tokens=False) == "caf\ufffd"
    shutil.copy(tiny_checkpoint / "tokenizer.json", tmp_path / "tokenizer.json")
    assert set(grown_tokenizer_files(tmp_path, ["<ans>", "日本"], vocab)) == {"tokenizer.json"}
    with pytest.raises(UserError, match=r"\['café'\] would not decode back to their own text"):
        grown_tokenizer_files(tmp_path, ["<ans>", "café"], vocab)
