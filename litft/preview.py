"""See the data as the model sees it, and the mistakes that train silently.

    python data_prep/preview.py --data data/games --n 3          # or: python finetune/lora.py ... --preview 3

Each sample is printed token run by token run: what the loss is computed on inside «…», what is only read
(the masked prompt) as plain text, and control tokens by name (<|im_end|>, </s>), so a missing EOS shows.
Then the checks, one line each, for what would train without an error and still give a model that does not
work:

- samples that do not end with EOS or the style's end-of-turn marker (the model never learns to stop);
- a prompt style whose end-of-turn marker (<|im_end|>, <|eot_id|>) is never trained (it never learns to close
  its turn);
- more than 5 % of the samples truncated (by data preparation, or by --max_seq_length);
- a new token (data prepared with --new_tokens) that no trained label holds (its output row never learns).
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

import torch

from litft import data as data_lib
from litft.data import cut
from litft.loss import IGNORE_INDEX
from litft.prompts import PromptStyle
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
    truncated = truncated_before + sum(max_seq_length is not None and len(s["input_ids"]) > max_seq_length
                                       for s in samples)
    if truncated > TRUNCATED_SHARE * n:
        warnings.append(f"{truncated} of {n} samples ({truncated / n:.0%}) are truncated: their answers lose their "
                        "middle; raise --max_seq_length")
    for token in new_tokens:
        if not (trained == tokenizer.token_to_id(token)).any():
            warnings.append(f"the new token {token} is in no trained label: its output row never learns; use it in "
                            "the answers, or drop it from --new_tokens")
    return warnings


def preview(data: str | Path, n: int, split: str = "train", max_seq_length: int | None = None) -> str:
    """The first n samples of a prepared split rendered, then its checks: the text data_prep/preview.py prints."""
    directory = data_lib.data_dir(data)
    samples, meta = data_lib.load_split(data, split), data_lib.meta_of(data)
    new_tokens = meta.get("new_tokens", [])
    tokenizer = Tokenizer(directory if new_tokens else Path(meta.get("checkpoint_dir", directory)))
    style = PromptStyle.from_dir(directory)
    report = directory / "length_report.json"
    before = json.loads(report.read_text()).get(split, {}).get("truncated", 0) if report.is_file() else 0
    shown = [f"--- {split} sample {i} ({len(s['input_ids'])} tokens) ---\n{render(s, tokenizer)}"
             for i, s in enumerate(samples[:n])]
    found = checks(samples, tokenizer, style, new_tokens, max_seq_length, before)
    summary = [f"warning: {w}" for w in found] or [f"checked {len(samples)} {split} samples: nothing to warn about"]
    return "\n".join([*shown, *summary])
