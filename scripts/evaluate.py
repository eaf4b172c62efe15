"""Evaluate a base, LoRA, adapter, merged or fully fine-tuned model on a prepared test split.

    python scripts/evaluate.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --weights_path out/lora/games/lit_model_lora.pth --data games --limit 100 --out out/lora/games/eval.json
    python scripts/evaluate.py --weights_path out/lora/games --data games     # on the base the run records

Answers are greedy, prompts use the style the data was prepared with (prompt_style.yaml), and exact match
follows the task's rule (litft/scoring.py). Accuracy and loss go to stdout; the JSON report holds them and
every sample's prompt, reference and prediction.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch

from litft.base_checkpoint import DEFAULT_CHECKPOINT, base_of, ensure_checkpoint, warn_if_trained_on_another
from litft.cli import run
from litft.data import data_dir, load_split, meta_of, prompt_style_of
from litft.errors import UserError
from litft.evaluate import evaluate
from litft.fast import for_generation
from litft.files import atomic_write_text, check_writable, holds, run_dir_of
from litft.generate_cli import pick_precision
from litft.kinds import check_checkpoint
from litft.load_finetuned import load_finetuned, tokenizer_dir, weights_in
from litft.nf4 import check_scheme
from litft.prompts import PromptStyle
from litft.tokenizer import Tokenizer


def main(data: str, checkpoint_dir: Optional[Path] = None, weights_path: Optional[Path] = None,
         split: Literal["test", "train"] = "test",
         limit: Optional[int] = None, max_new_tokens: int = 128, out: Optional[Path] = None,
         precision: Optional[str] = None, batch_size: int = 8, fast: bool = True, quantize: Optional[str] = None) -> dict:
    """Score greedy answers by exact match and compute the validation loss.

    Args:
        checkpoint_dir: the base model's lit checkpoint (weights, model_config.yaml, tokenizer); default: the base
            the run in --weights_path records (its base.yaml), or SmolLM2-135M-Instruct with no --weights_path.
        data: a prepared data name (games -> data/games) or directory.
        weights_path: a fine-tuning run's weights (LoRA, adapter or full); none evaluates the checkpoint as is.
        split: which split to evaluate (test or train).
        limit: evaluate only the first N samples.
        max_new_tokens: the longest answer generated per sample.
        out: where to write the JSON report (default: out/evaluate/<data>-<split>.json).
        precision: bf16-true, 16-true or 32-true (default: bf16-true on a GPU, 32-true on a CPU).
        batch_size: samples per forward pass for the validation loss.
        fast: load the model as generate/ does (litft/fast: fp32 LoRA merged, CPU decoding layout); false
            evaluates the model exactly as loaded.
        quantize: nf4 or nf4-dq: the linear weights of the blocks in 4 bits, as generate/ --quantize.
    """
    for flag, value in (("--limit", limit), ("--max_new_tokens", max_new_tokens), ("--batch_size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    checkpoint_dir = check_checkpoint(base_to_evaluate(checkpoint_dir, weights_path))
    weights_path = weights_in(weights_path)  # a LoRA or adapter run's directory: its weights file
    out = check_out(out or Path("out/evaluate") / f"{data_dir(data).name}-{split}.json", data)
    samples, style = load_split(data, split), prompt_style_of(data)
    if not samples:
        raise UserError(f"the {split} split of {data_dir(data)} is empty; prepare it with a --val_split_fraction above 0")
    task = meta_of(data).get("task", "text")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, dtype = pick_precision(precision, device)
    tokenizer = Tokenizer(tokenizer_dir(run_dir_of(weights_path) if weights_path else None, checkpoint_dir))
    check_same_tokens(samples[0], tokenizer, style, data, checkpoint_dir)
    warn_if_trained_with_another_style(weights_path, style)
    if weights_path is not None and Path(weights_path).is_file():  # a full run's directory is its own base
        warn_if_trained_on_another(run_dir_of(weights_path), checkpoint_dir, weights_path)

    check_scheme(quantize)
    load = partial(load_finetuned, checkpoint_dir, weights_path, quantize=quantize)
    model = for_generation(load, device, dtype, fast)  # as the generate/ scripts load it
    start = time.perf_counter()
    report = evaluate(model, tokenizer, samples, style, task, limit, max_new_tokens, batch_size)
    report.update(data=str(data_dir(data)), split=split, limit=limit, checkpoint_dir=str(checkpoint_dir),
                  weights_path=str(weights_path) if weights_path else None, seconds=round(time.perf_counter() - start, 1))
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print_summary(report, out, model.config.block_size)
    return report


def base_to_evaluate(checkpoint_dir: Optional[Path], weights_path: Optional[Path]) -> Path:
    """--checkpoint_dir; else the base the run in --weights_path records, or the default base (converted on first
    use), as generate/ picks it."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    if weights_path is None:
        ensure_checkpoint(Path(DEFAULT_CHECKPOINT))
        return Path(DEFAULT_CHECKPOINT)
    if not Path(weights_path).exists():
        raise UserError(f"--weights_path {weights_path} does not exist; pass a fine-tuning run's directory or its "
                        "weights file")
    return base_of(run_dir_of(Path(weights_path)))


def print_summary(report: dict, out: Path, block_size: int) -> None:
    if report["too_long"]:
        print(f"note: {report['too_long']} of {report['samples']} prompts fill the model's context ({block_size} "
              "tokens), leaving no room for an answer: each is scored wrong", file=sys.stderr)
    print(f"exact match {report['exact_match']:.1%} ({report['correct']}/{report['samples']})  "
          f"val loss {report['val_loss']:.4f}  report: {out}")


def check_out(out: Path, data: str) -> Path:
    """The report's path, checked before evaluating: a .json file that can be written and replaces nothing but an
    earlier report; not inside the data it reads, a checkpoint or a PEFT adapter (a tokenizer.json or config.json
    there is no report to replace). A run directory may hold reports beside its files."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name the .json file to write")
    if out.suffix != ".json":
        raise UserError(f"--out {out}: the report is JSON; name a .json file")
    if out.parent.resolve() == data_dir(data).resolve():
        raise UserError(f"--out {out} is inside the data directory this command reads; write it elsewhere")
    if (kind := holds(out.parent)) in ("prepared data", "a checkpoint", "a PEFT adapter"):
        raise UserError(f"--out {out} is inside {kind} ({out.parent}); write the report elsewhere")
    if out.is_file() and not is_report(out):
        raise UserError(f"--out {out} exists and is not an evaluation report; name another file")
    check_writable("--out", out, out.parent)
    return out


def is_report(path: Path) -> bool:
    """Whether `path` holds a report this script wrote (which a new one may replace)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8 (UnicodeDecodeError is a ValueError), not JSON
        return False
    return isinstance(report, dict) and {"exact_match", "predictions"} <= report.keys()


def check_same_tokens(sample: dict, tokenizer: Tokenizer, style: PromptStyle, data: str, checkpoint_dir: Path) -> None:
    """The data's prompt tokens must be what this checkpoint's tokenizer makes of the prompt."""
    prompt = tokenizer.encode(style.apply(sample["instruction"], sample["input"]), bos=style.add_bos)  # as data_prep
    if not torch.equal(sample["input_ids"][: len(prompt)], prompt):
        prepared_with = meta_of(data).get("checkpoint_dir", "another tokenizer")
        raise UserError(f"{data_dir(data)} was prepared with the tokenizer of {prepared_with}, not {checkpoint_dir}; "
                        f"prepare it again with --checkpoint_dir {checkpoint_dir}")


def warn_if_trained_with_another_style(weights_path: Optional[Path], style: PromptStyle) -> None:
    if weights_path is None:
        return
    run_dir = run_dir_of(weights_path)
    trained = PromptStyle.from_dir(run_dir) if run_dir.is_dir() else None
    if trained is not None and trained != style:
        print(f"warning: {run_dir} was trained with prompt style {trained.name!r}; this data uses {style.name!r}",
              file=sys.stderr)


if __name__ == "__main__":
    run(main)
