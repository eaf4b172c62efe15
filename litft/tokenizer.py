"""One tokenizer over the two formats Llama-family checkpoints ship: sentencepiece and Hugging Face tokenizers.

- `tokenizer.model` is a sentencepiece model (Llama-1/2, Mistral, TinyLlama): pieces with scores, `▁` for a
  space, and "byte fallback" — a character missing from the vocabulary is spelled as its UTF-8 bytes,
  `<0xF0> <0x9F> <0xA6> <0x99>` for 🦙.
- `tokenizer.json` is a Hugging Face `tokenizers` pipeline (SmolLM2, Llama-3, most newer models): normalizer,
  pre-tokenizer, a BPE model, a decoder, and "added tokens" such as `<|im_end|>` that are matched whole in the
  text before anything else runs, so a chat template's markers become their single ids.

Which ids mean "begin" and "end" of a sequence, and whether a sequence starts with BOS, is a property of the
checkpoint, not of the library: it is read from tokenizer_config.json, special_tokens_map.json,
generation_config.json and config.json (what Hugging Face checkpoints carry), falling back to the sentencepiece
model's own bos/eos ids. Llama-3 names <|begin_of_text|> and adds it through its tokenizer.json post-processor;
Qwen2.5 has no BOS at all; Mistral and Llama-2 say `add_bos_token: true`.

A model may have several stop tokens: Llama-3.1-Instruct's generation_config.json lists
`eos_token_id: [128001, 128008, 128009]` (<|end_of_text|>, <|eom_id|>, <|eot_id|>). `stop_ids` holds them all.

Special tokens written out in text (a rendered chat template: "<|start_header_id|>user<|end_header_id|>",
"<s>[INST]") must become their single ids. tokenizer.json matches its added tokens itself. A sentencepiece
model never matches its control pieces ([INST] in Mistral v0.3's tokenizer.model) in text, so for it the text is
split at the special tokens a tokenizer_config.json implies (those it declares in `added_tokens_decoder` or names
as bos/eos/unk/pad, and the control pieces) and the pieces between are encoded one by one; as transformers does
(unless the config says `legacy: true`), text right after a special token gets no extra leading "▁": "[INST] Hi"
is [INST] ▁Hi, not [INST] ▁ ▁Hi. A bare tokenizer.model, with no config, encodes exactly as the sentencepiece
library does.

Text produced token by token cannot be decoded token by token: sentencepiece drops the leading space of the
first piece, and a byte-fallback character arrives as several tokens that are not valid UTF-8 on their own.
`StreamDecoder` decodes a short window of recent ids and emits only the text that has become final.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from litft.errors import UserError


class Tokenizer:
    def __init__(self, checkpoint_dir: Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        if (path := checkpoint_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "tokenizers"
            self.hf = _load(HFTokenizer.from_file, path)
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        elif (path := checkpoint_dir / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            self.backend = "sentencepiece"
            self.sp = _load(lambda p: SentencePieceProcessor(model_file=p), path)
            self.vocab_size = self.sp.vocab_size()
        else:
            raise UserError(f"{checkpoint_dir} has neither tokenizer.json nor tokenizer.model; "
                            "copy the tokenizer files of the model into it")
        config = read_tokenizer_config(checkpoint_dir)
        generation = _read_json(checkpoint_dir / "generation_config.json")
        model = _read_json(checkpoint_dir / "config.json")
        self.special_tokens: dict[str, int] = self._special_tokens(config)  # text -> id, matched whole in text
        self.vocab_size = max([self.vocab_size, *(id + 1 for id in self.special_tokens.values())])
        self.bos_id = self._special_id("bos", config, generation, model)
        self.eos_id = self._special_id("eos", config, generation, model)
        pad_id = self._special_id("pad", config, generation, model)
        self.pad_id: int = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
        self.add_bos: bool = self._adds_bos(config)
        self.stop_ids: set[int] = self._stop_ids(generation, model)
        self.legacy: bool = config.get("legacy") is True  # sentencepiece: "▁" after a special token too

    # ---- what the checkpoint says ----------------------------------------------------------------------

    def _special_id(self, kind: str, config: dict, generation: dict, model: dict) -> int | None:
        """`kind` in {bos, eos, pad}: the token named in tokenizer_config.json, else an id from the config files.

        `"bos_token": null` is a statement (Qwen has no BOS): generation_config.json's bos_token_id then only names
        the id a prompt-less generation would start from, and is not the tokenizer's BOS.
        """
        if kind == "bos" and "bos_token" in config and config["bos_token"] is None:
            return None
        token = token_text(config.get(f"{kind}_token"))
        if token is not None and (id := self.token_to_id(token)) is not None:
            return id
        for source in (generation, model):
            id = source.get(f"{kind}_token_id")
            if isinstance(id, list):  # several stop ids (Llama-3): the first is the canonical one
                id = id[0] if id else None
            if isinstance(id, int):
                return id
        if self.backend == "sentencepiece" and kind != "pad":
            id = self.sp.bos_id() if kind == "bos" else self.sp.eos_id()
            return id if id >= 0 else None
        return self._post_processor_bos() if kind == "bos" else None

    def _post_processor_bos(self) -> int | None:
        """The id a tokenizer.json's post-processor puts in front of every sequence, if any."""
        plain = self.hf.encode("a", add_special_tokens=False).ids
        full = self.hf.encode("a", add_special_tokens=True).ids
        return full[0] if len(full) > len(plain) and full[1:1 + len(plain)] == plain else None

    def _stop_ids(self, generation: dict, model: dict) -> set[int]:
        """EOS and every `eos_token_id` generation_config.json or config.json lists: each one ends generation."""
        ids = {self.eos_id}
        for source in (generation, model):
            listed = source.get("eos_token_id")
            ids.update(listed if isinstance(listed, list) else [listed])
        return {id for id in ids if isinstance(id, int)}

    def _special_tokens(self, config: dict) -> dict[str, int]:
        """The special tokens' text -> id: what a rendered chat template writes out and must come back as one id.

        tokenizer.json lists its own (and matches them in text itself). For sentencepiece, as transformers reads
        a tokenizer_config.json: the tokens it declares in `added_tokens_decoder` (ids may lie past the
        tokenizer.model's pieces, e.g. a ChatML <|im_end|> at 32000), the bos/eos/unk/pad tokens it names, and the
        model's control pieces (<s>, </s>, Mistral v0.3's [INST]), so a config without the record (one written
        from a GGUF file) still renders its chat template as ids. A bare tokenizer.model, with no config, has none:
        its text is the sentencepiece library's.
        """
        if self.backend == "tokenizers":
            return {t.content: id for id, t in self.hf.get_added_tokens_decoder().items() if t.special}
        if not config:
            return {}
        declared = {t["content"]: int(id) for id, t in (config.get("added_tokens_decoder") or {}).items()
                    if isinstance(t, dict) and isinstance(t.get("content"), str) and t["content"] and str(id).isdigit()}
        control = {self.sp.id_to_piece(id): id for id in range(self.sp.vocab_size()) if self.sp.is_control(id)}
        named = {token: self.sp.piece_to_id(token) for kind in ("bos", "eos", "unk", "pad")
                 if (token := token_text(config.get(f"{kind}_token"))) is not None and self._is_piece(token)}
        return {**control, **named, **declared}

    def _is_piece(self, token: str) -> bool:
        """Whether `token` is one of the sentencepiece model's own pieces (unknown text maps to <unk>'s id)."""
        id = self.sp.piece_to_id(token)
        return id != self.sp.unk_id() or token == self.sp.id_to_piece(id)

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        """The ids decode drops for sentencepiece (tokenizer.json drops its own special tokens)."""
        return frozenset(self.special_tokens.values())

    def _adds_bos(self, config: dict) -> bool:
        if isinstance(config.get("add_bos_token"), bool):
            return config["add_bos_token"]
        if self.backend == "sentencepiece":
            return self.bos_id is not None  # Llama's sentencepiece convention: every sequence starts with <s>
        # A tokenizer.json without a config: BOS is added iff its post-processor puts it in front.
        return self.bos_id is not None and self._post_processor_bos() == self.bos_id

    # ---- encode / decode -------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        if self.backend == "tokenizers":
            return self.hf.token_to_id(token)
        if token in self.special_tokens:  # it may lie past the sentencepiece pieces
            return self.special_tokens[token]
        return self.sp.piece_to_id(token) if self._is_piece(token) else None

    def token_text(self, id: int | None) -> str:
        """A token's own text (its piece), e.g. </s> or <|im_end|>; "none" for a missing id."""
        if id is None:
            return "none"
        if self.backend == "tokenizers":
            return self.hf.id_to_token(id)
        if id >= self.sp.vocab_size():
            return next((text for text, special in self.special_tokens.items() if special == id), f"<id {id}>")
        return self.sp.id_to_piece(id)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, max_length: int = -1) -> Tensor:
        """Text -> 1-D LongTensor of ids; special tokens written in the text become their ids.

        bos=None: add BOS iff the checkpoint does (a prompt style's `add_bos` says when not: a chat template
        writes its own); max_length > 0 truncates.
        """
        if self.backend == "tokenizers":
            ids = self.hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_sentencepiece(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Tensor | Iterable[int] | int) -> str:
        """Ids -> text. Control tokens (BOS, EOS, chat markers) are dropped, as both libraries do."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else [ids] if isinstance(ids, int) else list(ids)
        if self.backend == "tokenizers":
            return self.hf.decode(ids, skip_special_tokens=True)
        pieces = self.sp.vocab_size()  # ids past them (a padded embedding's rows) are no text, as in transformers
        return self.sp.decode([id for id in ids if id not in self._special_ids and 0 <= id < pieces])

    # ---- sentencepiece with special tokens in the text ---------------------------------------------------

    def _encode_sentencepiece(self, text: str) -> list[int]:
        """Split the text at special tokens; encode the pieces between with sentencepiece, the tokens as ids."""
        if not self.special_tokens:
            return self.sp.encode(text)
        parts = self._special_pattern.split(text)  # [text, special, text, special, ..., text]
        ids = self.sp.encode(parts[0]) if parts[0] else []  # the start of the text: sentencepiece's leading "▁"
        for special, piece in zip(parts[1::2], parts[2::2]):
            ids.append(self.special_tokens[special])
            if piece:
                ids += (self.sp if self.legacy else self._sp_without_prefix).encode(piece)
        return ids

    @cached_property
    def _special_pattern(self) -> re.Pattern:
        longest_first = sorted(self.special_tokens, key=len, reverse=True)  # a token before its own prefixes
        return re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    @cached_property
    def _sp_without_prefix(self):
        """The same sentencepiece model with its "add a leading ▁" switch off (needs protobuf to edit it)."""
        from sentencepiece import SentencePieceProcessor

        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except ImportError:
            raise UserError("encoding text after a special token with a sentencepiece tokenizer needs protobuf: "
                            "pip install protobuf") from None
        proto = pb.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        return SentencePieceProcessor(model_proto=proto.SerializeToString())


class StreamDecoder:
    """Turn ids arriving one at a time into text pieces whose concatenation is `tokenizer.decode(all ids)`.

    Keeps two offsets into the ids seen so far: text up to `read` has been emitted; decoding restarts from
    `prefix` (the previous emission point), so the context a piece needs (a leading `▁`, the first bytes of a
    UTF-8 character) is present and the work per token stays small. Text ending in U+FFFD is an incomplete
    UTF-8 sequence and is held back until the next token completes it (or `flush` gives up waiting).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def step(self, id: int | Tensor) -> str:
        """Add one id; return the newly completed text ("" when nothing is final yet)."""
        self.ids.append(int(id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character at the very end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(seen):]


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json over special_tokens_map.json (older checkpoints name bos/eos only in the latter)."""
    directory = Path(directory)
    config = {**_read_json(directory / "special_tokens_map.json"), **_read_json(directory / "tokenizer_config.json")}
    if not isinstance(config.get("added_tokens_decoder") or {}, dict):
        raise UserError(f"{directory / 'tokenizer_config.json'}: added_tokens_decoder must map ids to tokens "
                        '({"32000": {"content": ...}}); restore the file')
    return config


def token_text(token: Any) -> str | None:
    """A special token as the config files write it: "</s>" or {"content": "</s>", "lstrip": false, ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _load(loader, path: Path):
    try:
        return loader(str(path))
    except Exception as e:  # both libraries raise plain Exception/RuntimeError for a damaged file
        raise UserError(f"{path} could not be read ({str(e).splitlines()[0][:200]}); restore the tokenizer file") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it from the model's original files") from None
    return data if isinstance(data, dict) else {}
