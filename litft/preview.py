"""See the data as the model sees it, and the mistakes that train silently.

    python data_prep/preview.py --data data/games --n 3          # or: python finetune/lora.py ... --preview 3

Each sample is printed token run by token run: what the loss is computed on inside «…», what is only read
(the masked prompt) as plain text, and control tokens by name (<|im_end|>, </s>), so a missing EOS shows.
Then the checks, one line each, for what would train without an error and still give a model that does not
work:

- samples that do not end with EOS or the style's end-of-turn marker (the model never learns to stop);
- a prompt style whose end-of-turn marker (<|im_end|>, <|eot_id|>) is never trained (it never learns to close
  its turn);
- more than 5 % of the samples truncated: shortened at preparation (the answer lost its end, EOS kept), or
  longer than --max_seq_length (training reads their first max_seq_length - 1 tokens and their end token);
- a new token (data prepared with --new_tokens) that no trained label holds (its output row never learns).
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

import torch

from litft import data as data_lib
from litft.base_checkpoint import tokenizer_fingerprint
from litft.data import cut
from litft.errors import UserError
from litft.loss import IGNORE_INDEX
from litft.prompts import PromptStyle
from litft.readers import has_tokenizer
from litft.tokenizer import Tokenizer

TRAINED = ("«", "»")
TRUNCATED_SHARE = 0.05


def render(sample: dict, tokenizer: Tokenizer) -> str:
    """One sample: its trained text inside «…», control tokens by name."""
    controls = {tokenizer.bos_id, tokenizer.eos_id, *tokenizer.stop_ids, *tokenizer.special_tokens.values()}
    runs: list[tuple[bool, list[int]]] = []  # (trained, ids): a control token is a run of its own
    for id, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained and id not in controls and runs[-1][1][-1] not in controls:
            runs[-1][1].append(id)
        else:
            runs.append((trained, [id]))
    texts = [(trained, tokenizer.token_text(ids[0]) if ids[0] in controls else tokenizer.decode(ids))
             for trained, ids in runs]
    spans = [(trained, "".join(t for _, t in group)) for trained, group in groupby(texts, key=lambda t: t[0])]
    return "".join(f"{TRAINED[0]}{text}{TRAINED[1]}" if trained else text for trained, text in spans)


def checks(samples: list[dict], tokenizer: Tokenizer, style: PromptStyle | None, new_tokens: list[str],
           max_seq_length: int | None = None, truncated_before: int = 0) -> list[str]:
    """The warnings for these samples (see the top); empty when there is nothing to say."""
    n, warnings = len(samples), []
    kept = [cut(s["input_ids"], s["labels"], max_seq_length) for s in samples]
    end = style.end_of_turn if style is not None else None
    end_ids = tokenizer.encode(end, bos=False).tolist() if end else []
    enders = {tokenizer.eos_id, *tokenizer.stop_ids, *end_ids[-1:]}
    unended = sum(int(ids[-1]) not in enders for ids, _ in kept)
    if unended:
        names = " or ".join(dict.fromkeys(tokenizer.token_text(i) for i in (tokenizer.eos_id, *end_ids[-1:])))
        warnings.append(f"{unended} of {n} samples do not end with {names}: the model will not learn to stop; "
                        "prepare the data again with a data_prep script")
    trained = torch.cat([lab[lab != IGNORE_INDEX] for _, lab in kept]) if kept else torch.tensor([])
    if len(end_ids) == 1 and not (trained == end_ids[0]).any():
        warnings.append(f"the end-of-turn marker {end} of the {style.name} prompt style is never trained: the model "
                        "will not learn to close its turn; prepare the data again with a data_prep script")
    if truncated := truncation_warning(samples, max_seq_length, truncated_before):
        warnings.append(truncated)
    for token in new_tokens:
        if not (trained == tokenizer.token_to_id(token)).any():
            warnings.append(f"the new token {token} is in no trained label: its output row never learns; use it in "
                            "the answers, or drop it from --new_tokens")
    return warnings


def truncation_warning(samples: list[dict], max_seq_length: int | None, truncated_before: int) -> str | None:
    """The warning when more than TRUNCATED_SHARE of the samples are truncated, saying how for each cause."""
    n = len(samples)
    longer = sum(max_seq_length is not None and len(s["input_ids"]) > max_seq_length for s in samples)
    # A sample shortened at preparation is exactly as long as the preparation's max_seq_length, so a shorter
    # --max_seq_length cuts every one of them again: the truncated samples are the larger count, not the sum.
    truncated = max(truncated_before, longer)
    if not n or truncated <= TRUNCATED_SHARE * n:
        return None
    causes = []
    if truncated_before:
        causes.append(f"{truncated_before} lost the end of their answer at preparation (EOS kept); prepare the data "
                      "again with a larger --max_seq_length")
    if longer:
        causes.append(f"{longer} are longer than --max_seq_length {max_seq_length}, so training reads only their "
                      f"first {max_seq_length - 1} tokens and their end token (the rest of the answer is lost); raise "
                      "--max_seq_length")
    return f"{truncated} of {n} samples ({truncated / n:.0%}) are truncated: {'; '.join(causes)}"


def preparing_tokenizer(directory: Path, meta: dict, checkpoint_dir: Path | None) -> Tokenizer:
    """The tokenizer the set was prepared with: --checkpoint_dir's when given (it must be the same one), else the
    checkpoint meta.json names, a path as data prep was given it (relative to where that ran)."""
    recorded = meta.get("checkpoint_dir")
    if checkpoint_dir is None and recorded and not has_tokenizer(Path(recorded)):
        raise UserError(f"{directory} was prepared with the tokenizer of {recorded}, which is not found from "
                        f"{Path.cwd()}; pass --checkpoint_dir (the model it was prepared with)")
    source = Path(checkpoint_dir or recorded or directory)
    fingerprint = meta.get("tokenizer")  # a relative path from here may also lead to another model
    if fingerprint and tokenizer_fingerprint(source) != fingerprint:
        found = f"--checkpoint_dir {source}" if checkpoint_dir is not None else f"{source}, as found from {Path.cwd()},"
        raise UserError(f"{directory} was prepared with another tokenizer than {found} holds; pass --checkpoint_dir "
                        "(the model it was prepared with)")
    return Tokenizer(source)


def show(i: int, split: str, sample: dict, tokenizer: Tokenizer, max_seq_length: int | None) -> str:
    """Sample i rendered as training reads it: cut to --max_seq_length like litft/data.py's collate."""
    ids, labels = cut(sample["input_ids"], sample["labels"], max_seq_length)
    length = f"{len(ids)} tokens"
    if len(ids) < len(sample["input_ids"]):
        length += f", cut from {len(sample['input_ids'])} by --max_seq_length"
    return f"--- {split} sample {i} ({length}) ---\n{render({'input_ids': ids, 'labels': labels}, tokenizer)}"


def preview(data: str | Path, n: int, split: str = "train", max_seq_length: int | None = None,
            checkpoint_dir: Path | None = None) -> str:
    """The first n samples of a prepared split rendered, then its checks: the text data_prep/preview.py prints."""
    directory = data_lib.data_dir(data)
    samples, meta = data_lib.load_split(data, split), data_lib.meta_of(data)
    new_tokens = meta.get("new_tokens", [])
    tokenizer = Tokenizer(directory) if new_tokens else preparing_tokenizer(directory, meta, checkpoint_dir)
    style = PromptStyle.from_dir(directory)
    before = data_lib.read_json(directory / "length_report.json").get(split, {}).get("truncated", 0)
    shown = [show(i, split, s, tokenizer, max_seq_length) for i, s in enumerate(samples[:n])]
    found = checks(samples, tokenizer, style, new_tokens, max_seq_length, before)
    summary = [f"warning: {w}" for w in found] or [f"checked {len(samples)} {split} samples: nothing to warn about"]
    return "\n".join([*shown, *summary])
