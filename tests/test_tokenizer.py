"""litft.Tokenizer against the libraries that define the formats: `sentencepiece` and `tokenizers`.

A real sentencepiece model (Mistral-7B v0.1's, 32000 pieces with byte fallback), the SmolLM2 tokenizer.json
rebuilt from its GGUF (also checked against transformers' own GGUF tokenizer), and small byte-level BPE
tokenizers trained here with `tokenizers`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from litft.errors import UserError
from litft.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading and  double  spaces ",
    "line one\nline two\n\n\tTabbed\r\n",
    "Unicode: café, naïve, Größe, 日本語, Ελληνικά, עברית",
    "Emoji 🦙🔥👍🏽 and rare letters 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⁂",
    "Numbers 12345, 3.14159 and 2024-01-01",
    "trailing space ",
    "",
]


@pytest.fixture(scope="module")
def sp_dir(sentencepiece_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sp")
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer.json + tokenizer_config.json, rebuilt from the GGUF metadata (no weights)."""
    from litft.gguf import metadata, open_gguf, tokenizer_files

    directory = tmp_path_factory.mktemp("smollm2")
    for name, contents in tokenizer_files(metadata(open_gguf(smollm2_gguf))).items():
        (directory / name).write_text(contents)
    return directory


def train_bpe(directory: Path, post_processor_bos: bool = False) -> "tokenizers.Tokenizer":  # noqa: F821
    """A tiny byte-level BPE trained with `tokenizers`, saved as directory/tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    if post_processor_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tok.save(str(directory / "tokenizer.json"))
    return tok


# ---- sentencepiece ------------------------------------------------------------------------------------------

def test_sentencepiece_matches_library(sp_dir, sentencepiece_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    tok = Tokenizer(sp_dir)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size())
    assert tok.add_bos and tok.pad_id == sp.eos_id()  # no pad piece: falls back to EOS
    for text in TEXTS:
        expected = sp.encode(text)
        assert tok.encode(text).tolist() == [sp.bos_id()] + expected, text
        assert tok.encode(text, bos=False, eos=True).tolist() == expected + [sp.eos_id()]
        assert tok.decode(torch.tensor(expected)) == sp.decode(expected) == text
    assert 0 < len(sp.encode("🦙")) and all(sp.id_to_piece(i).startswith("<0x") for i in sp.encode("🦙")[1:])
    assert tok.encode(TEXTS[3], max_length=5).tolist() == [sp.bos_id()] + sp.encode(TEXTS[3])[:4]
    assert tok.encode(TEXTS[3], max_length=1).tolist() == [sp.bos_id()]  # any max_length above 0 truncates
    assert tok.token_to_id("</s>") == sp.eos_id() and tok.token_to_id("no-such-piece") is None


def test_tokenizer_config_overrides_defaults(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": {"content": "<unk>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "pad_token_id": [0]}))
    tok = Tokenizer(tmp_path)
    assert (tok.add_bos, tok.eos_id, tok.bos_id, tok.pad_id) == (False, 0, 2, 0)
    assert tok.encode("hi")[0] != 2


def test_missing_or_damaged_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer(tmp_path)
    for name in ("tokenizer.model", "tokenizer.json"):
        (tmp_path / name).write_text("{ not a tokenizer")
        with pytest.raises(UserError, match=f"{name} could not be read"):
            Tokenizer(tmp_path)
        (tmp_path / name).unlink()


def test_a_tokenizer_config_whose_added_tokens_are_a_list_is_a_user_error(sentencepiece_model, tmp_path):
    shutil.copy(sentencepiece_model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": ["<|im_end|>"]}')
    with pytest.raises(UserError, match="added_tokens_decoder must map ids to tokens"):
        Tokenizer(tmp_path)


# ---- tokenizer.json -----------------------------------------------------------------------------------------

def test_smollm2_tokenizer_json_matches_library(smollm2_dir):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    tok = Tokenizer(smollm2_dir)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, False, 49152)
    for text in TEXTS + ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text).tolist() == ids
        assert tok.decode(ids) == hf.decode(ids)
    chat = tok.encode("<|im_start|>user\nHi<|im_end|>").tolist()
    assert chat[0] == tok.token_to_id("<|im_start|>") == 1 and chat[-1] == tok.eos_id == 2  # single ids
    assert tok.encode("2024").tolist() == [tok.token_to_id(d) for d in "2024"]  # SmolLM2 splits digits


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir, smollm2_gguf):
    """transformers builds its own tokenizer from the same GGUF; it splits digits as GPT-2 does, so no digits here."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tok = Tokenizer(smollm2_dir)
    for text in [t for t in TEXTS if not any(c.isdigit() for c in t)] + ["<|im_start|>user\nHi there<|im_end|>"]:
        assert tok.encode(text).tolist() == reference(text, add_special_tokens=False).input_ids, text


@pytest.mark.parametrize("post_processor_bos", [False, True])
def test_trained_bpe_matches_library(tmp_path, post_processor_bos):
    hf = train_bpe(tmp_path, post_processor_bos)
    tok = Tokenizer(tmp_path)
    assert tok.add_bos is post_processor_bos  # no tokenizer_config.json: the post-processor decides
    assert tok.bos_id == (0 if post_processor_bos else None) and tok.eos_id is None  # only the post-processor hints
    for text in TEXTS + ["the lazy dog<|im_end|>"]:
        assert tok.encode(text).tolist() == hf.encode(text).ids  # the library adds what its post-processor adds
        assert tok.encode(text, bos=False).tolist() == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(hf.encode(text).ids) == hf.decode(hf.encode(text).ids)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    tok = Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.encode("fox").tolist() == hf.encode("fox").ids  # BOS exactly when the post-processor adds it


# ---- streaming ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["sentencepiece", "tokenizers"])
def test_stream_decode_concatenates_to_full_decode(which, sp_dir, smollm2_dir):
    tok = Tokenizer(sp_dir if which == "sentencepiece" else smollm2_dir)
    rng = random.Random(0)
    streams = [tok.encode(text, bos=False).tolist() for text in TEXTS]
    streams += [[rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(5)]  # arbitrary ids
    streams += [tok.encode("🦙🦙 x").tolist()[:-2]]  # ends inside a byte-fallback character
    for ids in streams:
        decoder = StreamDecoder(tok)
        pieces = [decoder.step(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids)
    decoder = StreamDecoder(tok)
    emoji = tok.encode("🦙", bos=False).tolist()
    assert [decoder.step(i) for i in emoji][-1].endswith("🦙")  # whole character at once, never half of it


def test_special_tokens_map_names_bos_and_eos_like_transformers(tmp_path):
    """Older checkpoints name bos/eos only in special_tokens_map.json; transformers reads them from there too."""
    from transformers import AutoTokenizer

    train_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    reference, tok = AutoTokenizer.from_pretrained(tmp_path), Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (reference.bos_token_id, reference.eos_token_id) == (0, 1)
    assert tok.stop_ids == {1} and tok.special_tokens == {"<|bos|>": 0, "<|eos|>": 1, "<|im_end|>": 2}
