"""The training data, checked against the model it is about to train: the same tokenizer, ids inside its vocabulary.

A run refuses, with one line saying how to prepare the data again, data that would silently train on the wrong
token ids, or samples with nothing to train on. `read_data` reads the splits for litft/train.py, checked, shown
(--preview) and packed (--packing).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from litft import data as data_lib
from litft import packing
from litft.base_checkpoint import tokenizer_fingerprint
from litft.errors import UserError
from litft.loss import IGNORE_INDEX
from litft.preview import preview
from litft.schedule import check_fills_a_micro_batch
from litft.train_args import Method, TrainArgs

if TYPE_CHECKING:
    from lightning.fabric import Fabric


def check_data_tokenizer(args: TrainArgs) -> None:
    """Data encoded by another tokenizer is refused: its ids would mean other words to this model."""
    meta = data_lib.meta_of(args.data)
    if meta.get("tokenizer") and meta["tokenizer"] != (ours := tokenizer_fingerprint(args.checkpoint_dir)):
        raise UserError(f"--data {args.data} was encoded by the tokenizer of {meta.get('checkpoint_dir')} "
                        f"(fingerprint {meta['tokenizer']}), not by --checkpoint_dir {args.checkpoint_dir}'s ({ours}); "
                        f"prepare the data again with --checkpoint_dir {args.checkpoint_dir}")


def check_token_ids(args: TrainArgs, vocab_size: int, **splits: list[dict]) -> None:
    """Every token id must be a row of the model's embedding (data prepared for a larger vocabulary is not)."""
    for split, samples in splits.items():
        for s in samples:
            ids = s["input_ids"]
            if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
                bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
                raise UserError(f"{data_lib.data_dir(args.data)}/{split}.pt holds token id {bad}, outside the "
                                f"{vocab_size} ids of {args.checkpoint_dir}; prepare the data again with "
                                f"--checkpoint_dir {args.checkpoint_dir}")


def check_lengths(args: TrainArgs, block_size: int, **splits: list[dict]) -> None:
    """No sample may be longer, once --max_seq_length has cut it, than the model's context: positions past
    block_size are ones the model never learnt (and past a sliding window, which litft caps block_size at,
    attention would no longer be the model's)."""
    for split, samples in splits.items():
        longest = max((sample_length(s, args.max_seq_length) for s in samples), default=0)
        if longest > block_size:
            raise UserError(f"{data_lib.data_dir(args.data)}/{split}.pt holds a sample of {longest} tokens, longer than "
                            f"the model's context ({block_size}); pass --max_seq_length {block_size} (or less), or "
                            f"prepare the data again with --max_seq_length {block_size}")


def sample_length(sample: dict, max_seq_length: int | None) -> int:
    """The tokens of a sample as training sees it: cut to max_seq_length; a packed row's longest sample."""
    if "packed_pos" in sample:
        return int(sample["packed_pos"].max()) + 1
    return min(len(sample["input_ids"]), max_seq_length or len(sample["input_ids"]))


def check_trained_tokens(args: TrainArgs, samples: list[dict]) -> None:
    """Every training sample must keep a token with a loss: the loss of a step is the mean over its trained tokens,
    and a sample with none would have nothing to learn from. --max_seq_length cuts a longer sample to its first
    tokens and its end token; a cut through the prompt would leave that end token alone, and the model would learn
    to stop in the middle of a prompt, so a sample with an answer must keep one of its answer's tokens too."""
    lost = []  # (sample number, the length that would keep its first answer token)
    for n, s in enumerate(samples):
        labels = data_lib.cut(s["input_ids"], s["labels"], args.max_seq_length)[1]
        if not bool((labels[1:] != IGNORE_INDEX).any()):
            raise UserError(f"{data_lib.data_dir(args.data)}/train.pt sample {n} has no token to train on (every "
                            "label is masked, or cut away by --max_seq_length); drop it or prepare the data again")
        answer = (s["labels"][1:-1] != IGNORE_INDEX).nonzero()  # trained tokens before the end token
        if len(answer) and not bool((labels[1:-1] != IGNORE_INDEX).any()):
            lost.append((n, int(answer[0]) + 3))  # the prompt, the answer's first token and the end token
    if lost:
        raise UserError(f"{data_lib.data_dir(args.data)}/train.pt: {len(lost)} samples (the first: sample "
                        f"{lost[0][0]}) lose their whole answer to --max_seq_length {args.max_seq_length}; raise it "
                        f"to at least {max(need for _, need in lost)}, or prepare the data again with "
                        f"--max_seq_length {args.max_seq_length} (it drops what does not fit)")


def tokenizer_of(args: TrainArgs, method: Method) -> Path:
    """The base tokenizer, or the data's grown one when the data was prepared with --new_tokens."""
    new_tokens = data_lib.meta_of(args.data).get("new_tokens", [])
    if new_tokens and new_tokens != method.new_tokens:
        raise UserError(f"{data_lib.data_dir(args.data)} was prepared with new tokens {new_tokens}, which "
                        f"{method.name} cannot train; use finetune/lora.py, or prepare the data without --new_tokens")
    return data_lib.data_dir(args.data) if new_tokens else args.checkpoint_dir


def read_data(fabric: Fabric, args: TrainArgs, method: Method) -> tuple[list[dict], list[dict]]:
    """The train and test splits, checked; with --preview, shown; with --packing, the train split in rows."""
    check_data_tokenizer(args)
    train_data, val_data = data_lib.load_split(args.data, "train"), data_lib.load_split(args.data, "test")
    if not train_data:
        raise UserError(f"{data_lib.data_dir(args.data)}/train.pt holds no samples; prepare the data again with "
                        "a data_prep script")
    check_trained_tokens(args, train_data)
    if args.preview and fabric.global_rank == 0:
        print(preview(args.data, args.preview, max_seq_length=args.max_seq_length, checkpoint_dir=args.checkpoint_dir),
              file=sys.stderr)
    rows = pack_rows(fabric, args, train_data) if args.packing else train_data
    # checked now, before the run directory is written (the training loop draws its first batch much later)
    # auto: at least one row per process; the size it resolves to never exceeds that (litft/memory.py's plan_run)
    smallest = 1 if args.micro_batch_size == "auto" else args.micro_batch_size
    check_fills_a_micro_batch(len(rows), smallest, fabric.world_size, len(train_data) if args.packing else None)
    return rows, val_data


def pack_rows(fabric: Fabric, args: TrainArgs, samples: list[dict]) -> list[dict]:
    """--packing: the samples in rows of up to --max_seq_length tokens (default: the longest sample)."""
    length = args.max_seq_length or longest(samples)
    rows = packing.pack(samples, length)
    fabric.print(f"packing: {len(samples)} samples in {len(rows)} rows of up to {length} tokens", file=sys.stderr)
    return rows


def longest(samples: list[dict]) -> int:
    return max(len(s["input_ids"]) for s in samples)
