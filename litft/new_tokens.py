"""New tokens: tokenizer files whose vocabulary is grown by a few whole-string tokens.

A LoRA run may add tokens (e.g. markers that structure a task's data; the Anyscale Llama-2 study grew the
vocabulary from 32,000 to 32,004). The model side lives in litft/new_rows.py (trainable `new_rows`);
here the tokenizer side: token i of `new_tokens` gets id V + i, where V is the model's base vocabulary, and is
matched whole in the text before anything else is tokenized, and decoded back to its own text.

- tokenizer.json (Hugging Face tokenizers): appended as added tokens (not "special", so decoding prints them).
- tokenizer.model (sentencepiece): appended as USER_DEFINED pieces, which sentencepiece matches whole (so no
  token may have a space inside: sentencepiece turns spaces into ▁ before matching)
  (needs the `protobuf` package to edit the model file).

A checkpoint that ships both files (most Llama-2 and Mistral repositories) gets both grown. The tokenizer's own
vocabulary must end exactly at V, otherwise the new ids would not line up with the rows.

The tokens are named once, when the data is prepared (data_prep --new_tokens), and the grown files written
next to train.pt; finetune/lora.py records the tokens in lora.yaml and copies the files into the run
directory, where generate/ and scripts/evaluate.py read them (litft/load_finetuned.py's `tokenizer_dir`); merge and export grow the
base's files again from lora.yaml's list, which gives the same files.
"""

from __future__ import annotations

from pathlib import Path

from litft.errors import UserError
from litft.files import TOKENIZER_FILES, atomic_path, copy_files, remove_other_tokenizer_files


def grown_tokenizer_files(checkpoint_dir: Path, new_tokens: list[str], first_id: int) -> dict[str, bytes]:
    """The tokenizer file(s) of `checkpoint_dir` with `new_tokens` appended at ids first_id, first_id + 1, ..."""
    checkpoint_dir = Path(checkpoint_dir)
    if any(not t or t != t.strip() for t in new_tokens) or len(set(new_tokens)) != len(new_tokens):
        raise UserError(f"new tokens {new_tokens}: each must be non-empty, without spaces at either end, and "
                        "different from the others")
    grow = {"tokenizer.json": _grow_hf, "tokenizer.model": _grow_sentencepiece}
    grown = {name: fn(checkpoint_dir / name, new_tokens, first_id) for name, fn in grow.items()
             if (checkpoint_dir / name).is_file()}
    if not grown:
        raise UserError(f"{checkpoint_dir} has neither tokenizer.json nor tokenizer.model to add new tokens to")
    return grown


def write_tokenizer(checkpoint_dir: Path, out_dir: Path, new_tokens: list[str], first_id: int) -> list[str]:
    """Copy `checkpoint_dir`'s tokenizer files into `out_dir`, the vocabulary grown by `new_tokens`; return names.

    Tokenizer files already in `out_dir` that the base does not have are removed, so none is left stale."""
    if Path(out_dir).resolve() == Path(checkpoint_dir).resolve():
        raise UserError(f"{out_dir} is the base checkpoint; its tokenizer must not be overwritten, "
                        "choose another directory")
    grown = grown_tokenizer_files(checkpoint_dir, new_tokens, first_id)
    copied = copy_files(checkpoint_dir, out_dir, tuple(n for n in TOKENIZER_FILES if n not in grown))
    for name, data in grown.items():
        with atomic_path(Path(out_dir) / name) as tmp:
            tmp.write_bytes(data)
    remove_other_tokenizer_files(out_dir, keep=[*copied, *grown])
    return copied + [f"{name} (+{len(new_tokens)} tokens)" for name in grown]


def _check(size: int, first_id: int, new_tokens: list[str], path: Path, present: list[str]) -> None:
    if present:
        raise UserError(f"new tokens {present} are already in {path}; new tokens must be new")
    if size < first_id:  # Qwen2.5: 151,665 tokens, 151,936 rows
        raise UserError(f"{path} has {size} tokens but the model has {first_id} rows (a vocabulary padded beyond its "
                        "tokenizer); litft adds new tokens after the last row only, so write the markers as plain "
                        "text instead (prepare the data without --new_tokens)")
    if size != first_id:
        raise UserError(f"{path} has {size} tokens but the model has {first_id} rows; new token ids would not line up")


def _grow_hf(path: Path, new_tokens: list[str], first_id: int) -> bytes:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(path))
    _check(tok.get_vocab_size(with_added_tokens=True), first_id, new_tokens, path,
           [t for t in new_tokens if tok.token_to_id(t) is not None])
    tok.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in new_tokens])
    assert [tok.token_to_id(t) for t in new_tokens] == list(range(first_id, first_id + len(new_tokens)))
    # a byte-level decoder reads é (U+00E9) in an added token as the lone byte 0xE9: "café" would print "caf\ufffd"
    garbled = [t for t in new_tokens if tok.decode([tok.token_to_id(t)], skip_special_tokens=False) != t]
    if garbled:
        raise UserError(f"new tokens {garbled} would not decode back to their own text with {path.name} (a byte-level "
                        "tokenizer garbles the characters U+00A1-U+0143 in added tokens); choose other characters")
    return tok.to_str().encode()


def _grow_sentencepiece(path: Path, new_tokens: list[str], first_id: int) -> bytes:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise UserError("adding tokens to a sentencepiece tokenizer needs protobuf: pip install protobuf") from None
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    pieces = {p.piece for p in proto.pieces}
    _check(len(proto.pieces), first_id, new_tokens, path, [t for t in new_tokens if t in pieces])
    if spaced := [t for t in new_tokens if any(c.isspace() for c in t)]:  # text reaches the pieces as "▁", never " "
        raise UserError(f"new tokens {spaced}: {path.name} (sentencepiece) never matches a token with a space "
                        "inside; choose tokens without spaces")
    for token in new_tokens:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()
