"""Prepared data for training and evaluation: load a split, and pad samples into a batch.

A prepared directory (written by a data_prep script, see litft/prepare.py) holds train.pt and test.pt: lists of
samples {input_ids, labels, instruction, input, output}. `labels[t]` is the token at position t, or -100 where
no loss is wanted (the prompt, when inputs are masked); the loss compares the logits at t - 1 with labels[t].

Batches are padded on the right: input ids with the tokenizer's pad id, labels with ignore_index, so padding
never contributes to the loss and no label written during preparation is ever overwritten.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from torch import Tensor

from litft.errors import UserError
from litft.prompts import PromptStyle

NAMED = ("alpaca", "dolly", "viggo", "gsm8k", "sql", "games")  # prepared on first use (litft/named_data.py)


def data_dir(data: str | Path) -> Path:
    """`alpaca` -> data/alpaca; a path (`./alpaca`, `out/data`) is taken as given. A bare name that is also a
    folder here means that folder when it holds prepared data, or when it is not a named set and data/<name> does
    not exist: an unrelated ./alpaca must not be read as the data, nor have a first use's preparation written
    into it."""
    path = Path(data)
    bare = len(path.parts) == 1 and path.name not in ("", "..") and not any(s in str(data) for s in ("/", os.sep))
    if not bare or (path / "train.pt").is_file():
        return path
    named = Path("data") / path
    return path if path.is_dir() and str(data) not in NAMED and not named.is_dir() else named


def load_split(data: str | Path, split: str) -> list[dict]:
    """The samples of `split` ("train" or "test") in a prepared directory."""
    directory = data_dir(data)
    path = directory / f"{split}.pt"
    given = Path(data)
    if given.is_file() and given.suffix != ".pt":  # a raw data file: the data_prep scripts turn it into train.pt
        raise UserError(f"--data {data} is a data file, not prepared data; prepare it first: python "
                        f"data_prep/json_data.py --data_file {data} --destination_path data/{given.stem} (and the "
                        f"--checkpoint_dir you train), then pass --data data/{given.stem}")
    if directory.is_file() or given.is_file():
        raise UserError(f"--data {data} is a file; --data names the directory that holds train.pt and test.pt "
                        f"(here: --data {given.parent})")
    if not path.is_file():
        script = Path(__file__).resolve().parents[1] / "data_prep" / f"{directory.name}.py"
        hint = f"python data_prep/{directory.name}.py" if script.is_file() else "a data_prep script (e.g. data_prep/json_data.py)"
        what = "is not prepared data" if directory.is_dir() else "does not exist"
        raise UserError(f"--data {data}: {directory} {what} (no {split}.pt); prepare it first with {hint}")
    try:
        samples = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:  # not torch's advice (weights_only=False)
        unpickled = isinstance(e, pickle.UnpicklingError)
        reason = "not a file of samples that torch.save wrote" if unpickled else str(e).splitlines()[0]
        raise UserError(f"{path} is not readable prepared data ({reason}); prepare it again") from None
    if not isinstance(samples, list) or not all(isinstance(s, dict) and "input_ids" in s for s in samples):
        raise UserError(f"{path} does not hold a list of samples; prepare it again with a data_prep script")
    return samples


def prompt_style_of(data: str | Path) -> PromptStyle:
    """The prompt style the data was prepared with: training saves it, generation and evaluation reuse it."""
    style = PromptStyle.from_dir(data_dir(data))
    if style is None:
        raise UserError(f"{data_dir(data)} has no prompt_style.yaml; prepare it again with a data_prep script")
    return style


def meta_of(data: str | Path) -> dict:
    """meta.json of a prepared directory: task, tokenizer checkpoint_dir, max_seq_length, mask_inputs, counts."""
    return read_json(data_dir(data) / "meta.json")


def read_json(path: Path) -> dict:
    """A JSON object that data preparation wrote (meta.json, length_report.json); {} when the file is missing."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, or bytes that are no Unicode text
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"{path} is damaged ({reason}); prepare the data again with a data_prep script") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; prepare the data again with a "
                        "data_prep script")
    return value


def collate(samples: list[dict], pad_id: int, ignore_index: int = -100, max_seq_length: int | None = None,
            multiple_of: int = 1) -> tuple[Tensor, Tensor]:
    """Samples -> (input_ids, labels), both (B, T), padded on the right to the longest sample, rounded up to a
    multiple of `multiple_of` (never past max_seq_length): see batch_length.

    A sample longer than max_seq_length keeps its first max_seq_length - 1 tokens and its last one (EOS).
    """
    pairs = [cut(s["input_ids"], s["labels"], max_seq_length) for s in samples]
    T = batch_length(max(len(ids) for ids, _ in pairs), multiple_of, max_seq_length)
    input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(pairs), T), ignore_index, dtype=torch.long)  # (B, T)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(lab)] = lab
    return input_ids, labels


def batch_length(longest: int, multiple_of: int = 1, max_seq_length: int | None = None) -> int:
    """The length T a batch is padded to: its longest sample's, rounded up to a multiple of `multiple_of`, at most
    max_seq_length. Padding sits right of every sample, where causal attention keeps it out of the real tokens'
    view, and its labels are ignored: it changes no loss, only the batch's shape.

    Why round: a run whose batches take every length between its shortest and its longest sample builds every
    kernel for every length. On a CPU, oneDNN caches a compiled bf16 matmul per shape, and glibc keeps the freed
    blocks of every size; a bf16 QLoRA run on data/games (38-97 tokens) held 1.71 GB after 20 steps at multiples
    of 1, 1.23 GB at multiples of 16 (howto/train.md section 9). torch.compile recompiles for new shapes too.
    """
    T = -(-longest // multiple_of) * multiple_of
    return min(T, max_seq_length) if max_seq_length else T


def cut(input_ids: Tensor, labels: Tensor, max_seq_length: int | None) -> tuple[Tensor, Tensor]:
    if max_seq_length is None or len(input_ids) <= max_seq_length:
        return input_ids, labels
    keep = torch.cat([torch.arange(max_seq_length - 1), torch.tensor([len(input_ids) - 1])])
    return input_ids[keep], labels[keep]
