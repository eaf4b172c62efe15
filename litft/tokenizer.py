"""One tokenizer over the two formats Llama-family checkpoints ship: sentencepiece and Hugging Face tokenizers.

- `tokenizer.model` is a sentencepiece model (Llama-1/2, Mistral, TinyLlama): pieces with scores, `▁` for a
  space, and "byte fallback" — a character missing from the vocabulary is spelled as its UTF-8 bytes,
  `<0xF0> <0x9F> <0xA6> <0x99>` for 🦙.
- `tokenizer.json` is a Hugging Face `tokenizers` pipeline (SmolLM2, Llama-3, most newer models): normalizer,
  pre-tokenizer, a BPE model, a decoder, and "added tokens" such as `<|im_end|>` that are matched whole in the
  text before anything else runs, so a chat template's markers become their single ids.

Which ids mean "begin" and "end" of a sequence, and whether a sequence starts with BOS, is a property of the
checkpoint, not of the library: it is read from tokenizer_config.json, generation_config.json and config.json
(what Hugging Face checkpoints carry), falling back to the sentencepiece model's own bos/eos ids.

Text produced token by token cannot be decoded token by token: sentencepiece drops the leading space of the
first piece, and a byte-fallback character arrives as several tokens that are not valid UTF-8 on their own.
`StreamDecoder` decodes a short window of recent ids and emits only the text that has become final.
"""

from __future__ import annotations

import json
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
        config = _read_json(checkpoint_dir / "tokenizer_config.json")
        generation = _read_json(checkpoint_dir / "generation_config.json")
        model = _read_json(checkpoint_dir / "config.json")
        self.bos_id = self._special_id("bos", config, generation, model)
        self.eos_id = self._special_id("eos", config, generation, model)
        pad_id = self._special_id("pad", config, generation, model)
        self.pad_id: int = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
        self.add_bos: bool = self._adds_bos(config)

    # ---- what the checkpoint says ----------------------------------------------------------------------

    def _special_id(self, kind: str, config: dict, generation: dict, model: dict) -> int | None:
        """`kind` in {bos, eos, pad}: the token named in tokenizer_config.json, else an id from the config files."""
        token = config.get(f"{kind}_token")
        if isinstance(token, dict):  # {"content": "</s>", "lstrip": false, ...}
            token = token.get("content")
        if isinstance(token, str) and (id := self.token_to_id(token)) is not None:
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
        id = self.sp.piece_to_id(token)
        return None if id == self.sp.unk_id() and token != self.sp.id_to_piece(id) else id

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, max_length: int = -1) -> Tensor:
        """Text -> 1-D LongTensor of ids. bos=None: add BOS iff the checkpoint does; max_length > 0 truncates."""
        if self.backend == "tokenizers":
            ids = self.hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self.sp.encode(text)
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
        return self.sp.decode(ids)


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
