"""Turning instruction records into training samples: the one pipeline every data_prep script runs.

    file (JSON, JSONL, CSV) -> records -> examples {instruction, input, output} -> seeded train/test split
    -> tokens, with prompt = style.apply(instruction, input):

        input_ids = [BOS] prompt ids   answer ids   EOS        (BOS only when the tokenizer adds one)
        labels    = -100 ... -100      answer ids   EOS        (= input_ids when mask_inputs is off)

The prompt is encoded on its own, exactly as generation encodes it, so the tokens a model learns to continue
are the tokens it is later prompted with; the answer's ids are those it has in the whole text (encode_answer).
EOS is always the last token (or the style's end-of-turn token, <|im_end|> or <|eot_id|>, when the template
closes turns with one): a sample longer than max_seq_length loses the end of its answer, never its EOS (counted
as truncated); a sample whose prompt alone leaves no room for its answer is dropped (counted too), as is one
whose answer is empty when only answers are learned (mask_inputs). Nothing is written to the
destination until every record has been read, checked and tokenized.

The destination then holds train.pt and test.pt (lists of {input_ids, labels, instruction, input, output},
readable with torch.load(weights_only=True)), prompt_style.yaml, meta.json and length_report.json, written
beside an earlier set first and moved into place once whole, train.pt last: a train.pt there means the whole set
comes from one preparation (litft/named_data.py prepares a named data set again when it is missing). With
new tokens (markers that structure the data, e.g. "<sql>"), the tokenizer is grown first so each marker is one
new id V, V + 1, ... (litft/new_tokens.py), and the grown tokenizer files are written next to the data.
"""

from __future__ import annotations

import csv
import http.client
import inspect
import io
import json
import os
import random
import sys
import tempfile
import textwrap
import urllib.request
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from litft.base_checkpoint import ensure_checkpoint, tokenizer_fingerprint
from litft.config import Config
from litft.errors import UserError
from litft.files import TOKENIZER_FILES, atomic_path, atomic_write_text, check_output_dir, staged_output
from litft.kinds import check_checkpoint
from litft.new_tokens import write_tokenizer
from litft.prompts import PromptStyle
from litft.tokenizer import Tokenizer

IGNORE_INDEX = -100
SPLITS = ("train", "test")

# The options every data_prep script shares; appended to each script's docstring so `--help` explains them.
COMMON_ARGS = """\
    data_file: a local copy of the data (JSON, JSONL or CSV); when not given, the data is downloaded.
    destination_path: where train.pt, test.pt, prompt_style.yaml, meta.json and length_report.json go.
    checkpoint_dir: the model whose tokenizer encodes the data; the default is converted from the offline GGUF if missing.
    max_seq_length: the longest sample in tokens; longer answers are shortened, EOS is always kept.
    mask_inputs: give the prompt tokens the label -100, so the loss covers only the answer and EOS.
    prompt_style: the template around instruction and input (plain, alpaca, chatml, smollm2, llama2-chat, or
        chat-template: the checkpoint's own chat template).
    val_split_fraction: the share of examples held out as the test split when none is given (never all of them).
    seed: the seed of the train/test shuffle; the same seed gives the same split.
    new_tokens: comma-separated tokens to add to the vocabulary (e.g. "<q>,</q>"); only finetune/lora.py trains them.
"""


def with_common_args(fn):
    """Append the shared options' help to a data_prep script's `main` docstring (read by `--help`), at the
    docstring's own `Args:` indent; an option the script documents itself keeps the script's description."""
    doc = inspect.cleandoc(fn.__doc__)
    names = set(inspect.signature(fn).parameters) - {line.split(":")[0].strip() for line in doc.splitlines()}
    lines = [line for line in COMMON_ARGS.splitlines(keepends=True) if line.split(":")[0].strip() in names]
    args = textwrap.indent(textwrap.dedent("".join(lines)), "    ")  # cleandoc leaves the items 4 under Args:
    fn.__doc__ = doc + ("\n" if "Args:" in doc else "\n\nArgs:\n") + args
    return fn


# ---- reading -------------------------------------------------------------------------------------------------


def read_records(path: Path, flag: str = "--data_file") -> list[tuple[str, dict]]:
    """(where, record) pairs from a JSON array, a JSONL file or a CSV file with a header row."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give {flag} a JSON, JSONL or CSV file")
    if not path.is_file():
        raise UserError(f"{path} does not exist; give {flag} an existing JSON, JSONL or CSV file")
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path} is empty; it should hold one record per example")
    suffix = path.suffix.lower()  # data.JSONL and data.CSV too
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        items = [(f"line {reader.line_num}", check_csv_row(row, reader, path)) for row in reader]
    elif suffix == ".jsonl":
        lines = enumerate(jsonl_lines(text), 1)
        items = [(f"line {n}", _parse_json(line, path, n)) for n, line in lines if line.strip()]
    else:
        data = _parse_json(text, path, 1)
        if not isinstance(data, list):
            raise UserError(f"{path} must hold a JSON array of objects (or use .jsonl: one object per line)")
        items = [(f"record {n}", item) for n, item in enumerate(data, 1)]
    if not items:
        raise UserError(f"{path} holds no records")
    for where, item in items:
        if not isinstance(item, dict):
            raise UserError(f"{path} {where}: expected a JSON object, got {type(item).__name__}")
    return items


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines file: records end at "\n" (or "\r\n") only. str.splitlines would also split at
    U+2028, U+2029, U+0085 and other characters that JSON strings may hold unescaped (RFC 8259)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_text(path: Path) -> str:
    """The file as text: UTF-8 (with or without a byte-order mark) or UTF-16 with one; anything else is refused
    in one line rather than guessed (Latin-1 and UTF-8 cannot be told apart reliably)."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as "
                        "UTF-8 and run again") from None


def check_csv_row(row: dict, reader: csv.DictReader, path: Path) -> dict:
    """A CSV row must have as many fields as the header: csv.DictReader would file extra ones under the key None
    and fill missing ones with None, shifting an unquoted comma's text into the next column unnoticed."""
    if None in row or None in row.values():
        have = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or ())
        fix = "quote a value that holds a comma (\"a, b\")" if None in row else "leave a field empty as a,,c"
        raise UserError(f"{path} line {reader.line_num}: {have} fields where the header has {len(reader.fieldnames)}; "
                        f"{fix}")
    return row


def _parse_json(text: str, path: Path, first_line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # a second value at the start of a line: one object per line, i.e. JSON Lines read as one JSON document
        hint = "; a file of one object per line is JSON Lines and must end in .jsonl" if (
            e.msg == "Extra data" and e.colno == 1 and e.lineno > 1) else ""
        raise UserError(f"{path}:{first_line + e.lineno - 1}:{e.colno}: invalid JSON ({e.msg}){hint}") from None


def take_fields(records: list[tuple[str, dict]], path: Path, instruction: str | None = "instruction",
                input: str | None = "input", output: str = "output", fixed_instruction: str = "",
                input_required: bool = False) -> list[dict]:
    """Map records to {instruction, input, output} by key names; a key given as None yields a fixed text.

    The input key may be absent (or null) in a record unless `input_required` (a task whose input is the
    question itself); the other keys must be present and hold strings.
    """
    keys = {"instruction": instruction, "input": input, "output": output}
    examples = []
    for where, record in records:
        example = {}
        for field, key in keys.items():
            value = record.get(key) if key is not None else (fixed_instruction if field == "instruction" else "")
            if key is not None and key not in record and (field != "input" or input_required):
                found = ", ".join(map(repr, record)) or "none"
                raise UserError(f"{path} {where}: missing key {key!r} (for {field}); keys found: {found}")
            if field == "input" and input_required and (value is None or isinstance(value, str) and not value.strip()):
                raise UserError(f"{path} {where}: {key!r} (the input) is empty; this task's answer is made from it")
            if value is None and field == "input":
                value = ""
            if not isinstance(value, str):
                raise UserError(f"{path} {where}: {key!r} must be a string, got {type(value).__name__}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON can spell a lone surrogate ("\ud800"), which is not text
                raise UserError(f"{path} {where}: {key!r} holds an unpaired surrogate at character {e.start}, "
                                "which is not valid Unicode text") from None
            example[field] = value
        examples.append(example)
    return examples


def split_examples(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with `seed` and hold out `fraction` of the examples as the test split (at least one when the
    fraction is above 0). A fraction that would hold out every example, leaving none to train on, is refused."""
    if not 0 <= fraction < 1:
        raise UserError(f"--val_split_fraction must be in [0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = round(len(examples) * fraction)
    if fraction > 0 and len(examples) > 1:
        n_test = max(n_test, 1)
    if examples and n_test >= len(examples):
        raise UserError(f"--val_split_fraction {fraction} holds out all {len(examples)} examples as the test split, "
                        "leaving no training examples; give a smaller fraction (0 for no test split) or more data")
    return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]


def download(url: str, path: Path) -> Path:
    """Fetch `url` into `path` (skipped when it is already there) and return the path."""
    path = Path(path)
    if path.is_file():
        return path
    check_writable(path.parent)
    print(f"downloading {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(path) as tmp:
            expected = content_length(response)
            received = save_body(response, tmp, expected)
            # A connection closed early ends the body without an error; the file would be taken as complete
            # (urllib.request.urlretrieve's ContentTooShortError makes the same check). Raised inside
            # atomic_path, nothing is left at `path`.
            if expected is not None and received < expected:
                raise DownloadError(url, f"the connection closed after {received} of {expected} bytes; run again")
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(url, str(e) or type(e).__name__) from None
    return path


def content_length(response) -> int | None:
    """The body's size the server announced, or None when it gave none (or none that is a number)."""
    value = (response.headers.get("Content-Length") or "").strip()
    return int(value) if value.isdigit() else None


def save_body(response, path: Path, expected: int | None) -> int:
    """Write the response's body to `path`, with a progress bar; return the number of bytes received."""
    received = 0
    with open(path, "wb") as f, tqdm(total=expected or None, unit="B", unit_scale=True) as bar:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


class DownloadError(UserError):
    """A data set could not be downloaded; finetune/*.py --data NAME words the same advice for its own flags."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"could not download {url} ({reason}); offline, pass a local copy with --data_file")
        self.url, self.reason = url, reason


# ---- tokenizing ----------------------------------------------------------------------------------------------


def encode_example(example: dict, tokenizer, style: PromptStyle, max_seq_length: int, mask_inputs: bool
                   ) -> tuple[dict | None, bool]:
    """One example -> (sample, truncated). The sample is None when even the prompt does not fit, or when only
    the answer is learned (mask_inputs) and it is empty: such a sample would teach nothing but to stop at once."""
    if mask_inputs and not example["output"].strip():
        return None, False
    text = style.apply(example["instruction"], example["input"])
    prompt = tokenizer.encode(text, bos=style.add_bos)  # (P,)
    answer = encode_answer(tokenizer, style, example, text, prompt)  # (A,)
    room = max_seq_length - len(prompt) - 1  # tokens left for the answer once its end token is reserved
    if room < min(1, len(answer)):
        return None, False
    truncated = len(answer) > room
    input_ids = torch.cat([prompt, answer[:room], torch.tensor([answer_end_id(tokenizer, style)])])  # (P + A', )
    labels = input_ids.clone()
    if mask_inputs:
        labels[: len(prompt)] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, **example}, truncated


def encode_answer(tokenizer, style: PromptStyle, example: dict, prompt_text: str, prompt: Tensor) -> Tensor:
    """The answer's ids as the whole text (prompt, then answer) has them, when that text starts with the prompt's.

    A chat template writes the answer its own way (Llama 3's trims it, so "Paris.\n" is learned as "Paris.", as
    the model later sees its turns in a chat's history): the answer is then cut from the whole exchange as the
    template renders it (answer_in_exchange). Other styles put the output right after the prompt. Encoded on its
    own, a sentencepiece answer gets a leading "▁" (the dummy prefix, a space): right after a prompt that ends in a
    word ("[/INST]", plain text), wrong after one that ends in a newline (alpaca's "### Response:\n"), where the
    text has no space. So after whitespace the answer is cut from the encoded whole; elsewhere, or when the
    prompt's last token merges with the answer's first, it is encoded alone.
    """
    from_template = answer_in_exchange(tokenizer, style, example, prompt_text, prompt)
    if from_template is not None:
        return from_template
    answer_text = example["output"]
    if prompt_text[-1:].isspace() and answer_text:
        whole = tokenizer.encode(prompt_text + answer_text, bos=style.add_bos)  # (P + A,)
        if len(whole) > len(prompt) and torch.equal(whole[:len(prompt)], prompt):
            return whole[len(prompt):]
    return tokenizer.encode(answer_text, bos=False)


def answer_in_exchange(tokenizer, style: PromptStyle, example: dict, prompt_text: str, prompt: Tensor
                       ) -> Tensor | None:
    """The answer's ids in the question-and-answer exchange the style's chat template renders, as transformers'
    apply_chat_template gives them, up to the end-of-turn token. None for a style without a template, or an
    exchange whose ids do not begin with the prompt's: a prompt ending in "\n" whose newline merges with the
    answer's leading whitespace (SmolLM2's "\n" + "    return x"), where the answer is then encoded on its own, as
    it follows the prompt in generation."""
    exchange = style.exchange(example["instruction"], example["input"], example["output"])  # a refusal: one line
    if exchange is None or not exchange.startswith(prompt_text):
        return None
    whole = tokenizer.encode(exchange, bos=style.add_bos)  # (P + A + 1 + ...,)
    tail, end = whole[len(prompt):].tolist(), answer_end_id(tokenizer, style)  # answer, end, maybe more
    if not torch.equal(whole[:len(prompt)], prompt) or end not in tail:
        return None
    return torch.tensor(tail[:len(tail) - 1 - tail[::-1].index(end)], dtype=torch.long)  # (A,)


def answer_end_id(tokenizer, style: PromptStyle) -> int:
    """The token that ends an answer: the style's end of turn when it is one token (<|im_end|>, <|eot_id|>), so
    the model learns to close its turn as the template does; otherwise EOS. Generation stops at both."""
    if style.end_of_turn is not None:
        ids = tokenizer.encode(style.end_of_turn, bos=False).tolist()
        if len(ids) == 1:
            return ids[0]
    return tokenizer.eos_id


def encode_split(examples: list[dict], name: str, tokenizer, style: PromptStyle, max_seq_length: int,
                 mask_inputs: bool) -> tuple[list[dict], dict]:
    samples, lengths, truncated = [], [], 0
    for example in tqdm(examples, desc=f"tokenizing {name}", unit=" samples"):
        sample, cut = encode_example(example, tokenizer, style, max_seq_length, mask_inputs)
        if sample is not None:
            samples.append(sample)
            lengths.append(len(sample["input_ids"]))
            truncated += cut
    return samples, length_stats(lengths, truncated, dropped=len(examples) - len(samples))


def length_stats(lengths: list[int], truncated: int, dropped: int) -> dict:
    stats = {"samples": len(lengths), "truncated": truncated, "dropped": dropped}
    if lengths:
        t = torch.tensor(lengths, dtype=torch.float)
        stats.update({"mean": round(t.mean().item(), 1), "min": int(t.min()), "max": int(t.max())})
        stats.update({f"p{q}": int(t.quantile(q / 100, interpolation="higher")) for q in (50, 90, 95, 99)})
    return stats


# ---- writing -------------------------------------------------------------------------------------------------


def check_writable(directory: Path) -> None:
    """Fail early, before any work, if `directory` cannot be created or written to."""
    directory = Path(directory).absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write to {directory}: {existing} is not a directory; choose another --destination_path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {directory}: {existing} is not writable; choose another --destination_path")
    check_output_dir("--destination_path", directory, "prepared data")


def prepare(train: list[dict], test: list[dict], *, task: str, source: str, destination_path: Path,
            checkpoint_dir: Path, max_seq_length: int, mask_inputs: bool, prompt_style: str, seed: int,
            val_split_fraction: float, new_tokens: list[str] = ()) -> dict:
    """Tokenize both splits, print the length report and write everything to `destination_path`."""
    ensure_checkpoint(checkpoint_dir)  # the default base is converted on first use
    check_checkpoint(checkpoint_dir, also=("hf",))  # only its tokenizer is read: a download not yet converted will do
    style = PromptStyle.from_name(prompt_style, checkpoint_dir)  # chat-template: the checkpoint's own template
    destination_path = Path(destination_path)
    check_writable(destination_path)
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2 (one answer token and EOS), got {max_seq_length}")
    if not train:
        raise UserError(f"{source} leaves no training examples; give it more records (or a smaller "
                        "--val_split_fraction)")
    with tempfile.TemporaryDirectory() as grown_dir:
        tokenizer = grown_tokenizer(checkpoint_dir, list(new_tokens), Path(grown_dir))
    if tokenizer.eos_id is None:
        raise UserError(f"the tokenizer in {checkpoint_dir} has no EOS token; samples could not be ended")
    samples, report = {}, {"max_seq_length": max_seq_length}
    for name, examples in zip(SPLITS, (train, test)):
        samples[name], report[name] = encode_split(examples, name, tokenizer, style, max_seq_length, mask_inputs)
    if not samples["train"]:
        raise UserError(f"every sample of {source} was dropped: its prompt alone is longer than --max_seq_length "
                        f"{max_seq_length}, or its answer is empty; raise --max_seq_length or choose a shorter "
                        "--prompt_style")
    print_report(report)
    note_shared_examples(train, test)
    if test and not samples["test"]:
        print(f"note: every one of the {len(test)} test examples was dropped (see the report above), so training "
              "will skip validation; raise --max_seq_length or give answers to the test examples", file=sys.stderr)
    meta = {"task": task, "source": str(source), "checkpoint_dir": str(checkpoint_dir), "max_seq_length": max_seq_length,
            "mask_inputs": mask_inputs, "ignore_index": IGNORE_INDEX, "prompt_style": style.name, "seed": seed,
            "val_split_fraction": val_split_fraction, "counts": {s: len(samples[s]) for s in SPLITS},
            "new_tokens": list(new_tokens),
            "tokenizer": tokenizer_fingerprint(checkpoint_dir)}  # finetune/ refuses data another tokenizer encoded
    try:
        write_prepared(destination_path, samples, style, report, meta, checkpoint_dir, list(new_tokens))
    except OSError as e:
        raise UserError(f"cannot write to {destination_path} ({e.strerror}); choose another --destination_path") from None
    print(f"wrote {meta['counts']['train']} train and {meta['counts']['test']} test samples to {destination_path}")
    return meta


def note_shared_examples(train: list[dict], test: list[dict]) -> None:
    """One line on stderr when test examples are also training examples (a file that repeats records, or a
    --val_file that overlaps the data): their scores measure memory, not what was learned."""
    seen = {(e["instruction"], e["input"], e["output"]) for e in train}
    shared = sum((e["instruction"], e["input"], e["output"]) in seen for e in test)
    if shared:
        print(f"note: {shared} of {len(test)} test examples are also training examples (repeated records); the "
              "test loss and exact match overstate what a model learns beyond them", file=sys.stderr)


def write_prepared(destination_path: Path, samples: dict, style: PromptStyle, report: dict, meta: dict,
                   checkpoint_dir: Path, new_tokens: list[str]) -> None:
    """Write the prepared set: into a scratch folder first, so a failure (a full disk) leaves an earlier set as it
    was. A train.pt marks a prepared directory (litft/named_data.py, litft/files.py): when the set is moved into
    place the old one goes first and the new one comes last, so a directory is never read as a new train.pt
    beside the old test.pt and meta.json. An earlier set's grown tokenizer goes when this one has no new tokens."""
    with staged_output(destination_path, TOKENIZER_FILES, marker="train.pt") as scratch:
        if new_tokens:
            write_tokenizer(checkpoint_dir, scratch, new_tokens, model_vocab_size(checkpoint_dir))
        with atomic_path(scratch / "test.pt") as tmp:
            torch.save(samples["test"], tmp)
        style.save(scratch)
        atomic_write_text(scratch / "length_report.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(scratch / "meta.json", json.dumps(meta, indent=2) + "\n")
        with atomic_path(scratch / "train.pt") as tmp:
            torch.save(samples["train"], tmp)


def grown_tokenizer(checkpoint_dir: Path, new_tokens: list[str], scratch: Path):
    """The checkpoint's tokenizer, with `new_tokens` appended after the model's vocabulary when there are any."""
    if not new_tokens:
        return Tokenizer(checkpoint_dir)
    write_tokenizer(checkpoint_dir, scratch, new_tokens, model_vocab_size(checkpoint_dir))
    return Tokenizer(scratch)


def model_vocab_size(checkpoint_dir: Path) -> int:
    """V, the number of embedding rows of the model: new tokens get ids V, V + 1, ..."""
    return Config.from_checkpoint(checkpoint_dir).vocab_size


def split_tokens(text: str) -> list[str]:
    """ "<q>, </q>" -> ["<q>", "</q>"] (the --new_tokens flag of the data_prep scripts)."""
    tokens = [t.strip() for t in text.split(",")] if text.strip() else []
    if "" in tokens:
        raise UserError(f"--new_tokens {text!r} has an empty token; separate the tokens with single commas")
    return tokens


def print_report(report: dict) -> None:
    print(f"sample lengths in tokens (max_seq_length {report['max_seq_length']}):")
    for name in SPLITS:
        r = report[name]
        spread = "  ".join(f"{k} {r[k]}" for k in ("min", "p50", "p90", "p95", "p99", "max") if k in r)
        print(f"  {name:5s} {r['samples']:6d} samples  {spread}  truncated {r['truncated']}  dropped {r['dropped']}")
