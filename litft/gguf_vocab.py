"""A checkpoint's tokenizer as GGUF metadata: what llama.cpp (and Ollama) tokenize, prompt and stop with.

    sentencepiece tokenizer.model   -> tokenizer.ggml.model "llama": pieces, their scores and piece types
    byte-level BPE tokenizer.json   -> tokenizer.ggml.model "gpt2": tokens, merges, token types, and
                                       tokenizer.ggml.pre, the NAME of the rule that splits text before BPE
    either                          -> bos / eos / unknown / padding ids, add_bos_token, the end-of-turn id
                                       (eot: <|eot_id|>, <|im_end|>) and tokenizer.chat_template

A GGUF names its pre-tokenizer instead of spelling it out: llama.cpp has the regular expressions built in (the
table is in litft/gguf_format.py). `pre_tokenizer_name` picks the name whose rule splits a set of probe texts
exactly as the tokenizer.json's own pre-tokenizer does, so two spellings of one rule (a Digits step or a Split on
\\p{N}) get one name, and a rule llama.cpp has no name for is refused instead of exported wrongly.

When the embedding has more rows than the tokenizer has tokens (a padded vocabulary), llama.cpp still wants one
token per row: the extra rows get "[PAD{i}]" tokens of type UNUSED, as llama.cpp's own converter writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from litft.errors import UserError
from litft.gguf_format import CONTROL, NFC_PRE_TOKENIZERS, NORMAL, PRE_TOKENIZERS, UNUSED, USER_DEFINED
from litft.prompts import PromptStyle
from litft.tokenizer import Tokenizer, read_tokenizer_config, token_text

# Texts whose splitting tells the rules apart: digits (one, up to three, any run), contractions in either case,
# punctuation runs, newlines, runs of spaces, letters outside ASCII, a decomposed é (NFC or not).
PROBES = ["Hello, world! It's 2024-01-01: 12345 apples cost $3.50.", "I'LL say WE'VE done it; you'd agree?",
          "  spaced\n\n\tout   words  \r\n  end ", "naïve café 🦙 日本語 Ünïcödé", "x=1+22;y==333 /* c */",
          "cafe\u0301 e\u0301"]


def vocab_metadata(tokenizer_dir: Path, n_rows: int, style: PromptStyle | None) -> dict[str, Any]:
    """Every tokenizer.* key for the GGUF header, from the tokenizer files in `tokenizer_dir`."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "tokenizer.model").is_file():
        meta = sentencepiece_vocab(tokenizer_dir / "tokenizer.model")
    elif (tokenizer_dir / "tokenizer.json").is_file():
        meta = byte_level_vocab(tokenizer_dir / "tokenizer.json")
    else:
        raise UserError(f"{tokenizer_dir} has neither tokenizer.model nor tokenizer.json; a GGUF needs the tokenizer")
    pad_rows(meta, n_rows, tokenizer_dir)
    return {**meta, **special_ids(Tokenizer(tokenizer_dir), style)}


def sentencepiece_vocab(path: Path) -> dict[str, Any]:
    """Llama's sentencepiece model: its pieces, scores and types are the GGUF vocabulary as they are."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE or norm.name not in ("identity", ""):
        raise UserError(f"{path} is not a Llama-style sentencepiece model (BPE, no text normalization); llama.cpp's "
                        "'llama' vocabulary could not reproduce its tokenization")
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces], "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.add_space_prefix": bool(norm.add_dummy_prefix),
        **({"tokenizer.ggml.unknown_token_id": proto.trainer_spec.unk_id} if proto.trainer_spec.unk_id >= 0 else {}),
    }


def byte_level_vocab(path: Path) -> dict[str, Any]:
    """A byte-level BPE tokenizer.json: tokens by id (added tokens typed control or user-defined) and merges."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{path} holds a {model.get('type')} model; GGUF export takes byte-level BPE tokenizer.json "
                        "files or a sentencepiece tokenizer.model")
    if not model.get("merges"):
        raise UserError(f"{path} is a BPE without merges; llama.cpp's byte-level BPE cannot load one")
    size = 1 + max([*model["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))])
    tokens, types = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size
    for token, id in model["vocab"].items():
        tokens[id], types[id] = token, NORMAL
    for added in data.get("added_tokens", []):
        tokens[added["id"]], types[added["id"]] = added["content"], CONTROL if added.get("special") else USER_DEFINED
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_tokenizer_name(HFTokenizer.from_file(str(path)), path),
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]}
    unk = model.get("unk_token") or configured_unk(path.parent)  # SmolLM2 names it in tokenizer_config.json only
    ids = {**model["vocab"], **{added["content"]: added["id"] for added in data.get("added_tokens", [])}}
    if unk in ids:
        meta["tokenizer.ggml.unknown_token_id"] = ids[unk]
    return meta


def configured_unk(directory: Path) -> str | None:
    """tokenizer_config.json's unk_token (a string, or {"content": ...}), where llama.cpp's converter reads it."""
    return token_text(read_tokenizer_config(directory).get("unk_token"))


def pre_tokenizer_name(tokenizer, path: Path) -> str:
    """The llama.cpp pre-tokenizer name whose splitting (and NFC or not) equals the tokenizer's on every probe."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    def pieces(normalizer, pre_tokenizer) -> list[list[str]]:
        texts = [normalizer.normalize_str(t) if normalizer else t for t in PROBES]
        return [[piece for piece, _ in pre_tokenizer.pre_tokenize_str(t)] for t in texts]

    if tokenizer.pre_tokenizer is None:
        raise UserError(f"{path} has no pre-tokenizer; it is not a byte-level BPE that llama.cpp can tokenize")
    own = pieces(tokenizer.normalizer, tokenizer.pre_tokenizer)
    for name, regexes in PRE_TOKENIZERS.items():
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        rule = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pieces(normalizers.NFC() if name in NFC_PRE_TOKENIZERS else None, rule) == own:
            return name
    raise UserError(f"{path} splits text in a way none of llama.cpp's named pre-tokenizers known here does "
                    f"({', '.join(PRE_TOKENIZERS)}); llama.cpp would tokenize it differently, so it is not exported")


def pad_rows(meta: dict[str, Any], n_rows: int, tokenizer_dir: Path) -> None:
    """One token per embedding row: "[PAD{i}]" (unused) for rows past the tokenizer's last token."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if len(tokens) > n_rows:
        raise UserError(f"{tokenizer_dir}'s tokenizer has {len(tokens)} tokens but the model only {n_rows} embedding "
                        "rows; the tokenizer belongs to another model")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_rows)]
    types += [UNUSED] * (n_rows - len(types))
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] += [-1000.0] * (n_rows - len(meta["tokenizer.ggml.scores"]))


def special_ids(tokenizer: Tokenizer, style: PromptStyle | None) -> dict[str, Any]:
    """bos / eos / padding ids, add_bos_token, the chat template and its end-of-turn token (eot) when one id."""
    meta: dict[str, Any] = {"tokenizer.ggml.add_bos_token": tokenizer.add_bos, "tokenizer.ggml.add_eos_token": False}
    for key, id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id)):
        if id is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = id
    end = style.end_of_turn if style is not None else None
    ids = tokenizer.encode(end, bos=False).tolist() if end else []
    if len(ids) == 1:
        meta["tokenizer.ggml.eot_token_id"] = ids[0]
    if style is not None and style.chat_template is not None:
        meta["tokenizer.chat_template"] = style.chat_template
    return meta
