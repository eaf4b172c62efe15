"""Fold a LoRA run's weights into its base model: a full lit checkpoint that generate/base.py serves.

    python scripts/merge_lora.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --lora_path out/lora/lit_model_lora.pth --out_dir checkpoints/merged/smollm2-lora

Every adapted weight becomes W + (α/r)·B·A; r, α and the targets come from the run's lora.yaml (the folder of
--lora_path). The output holds lit_model.pth, model_config.yaml, the base's tokenizer files and, when the run
has one, its prompt_style.yaml, so the merged model is prompted as it was trained. With tied embeddings and
LoRA on embed or lm_head, the merged model has the two matrices untied (tie_embeddings: false). A run that added
tokens (lora.yaml's new_tokens) gives a merged model with the larger vocabulary and a tokenizer that knows them.
A QLoRA run (lora.yaml's quantize: nf4) is merged into the weights it was trained on, W' = Ŵ + (α/r)·B·A with
Ŵ the dequantized NF4 weight (litft/qlora.py), and saved in the base's dtype.

Verification (`--verify true`, the default): the merged checkpoint, put into transformers' own Llama, must compute
what the unmerged LoRA run computes in litft (litft/verify.py); it prints one `verified: ...` line or stops.

The files are written into a scratch directory inside --out_dir and moved into place only once verified: a failed
or interrupted merge leaves an earlier merge there as it was. An existing --out_dir is replaced only when an earlier
run of this script wrote it (its litft_export.yaml says so) or with `--overwrite true`; any other directory with
files in it (a base model, say) is refused.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from litft.base_checkpoint import base_of, other_base, warn_if_trained_on_another
from litft.checkpoint import load_lit_model, save_lit_checkpoint
from litft.cli import run
from litft.config import Config
from litft.errors import UserError
from litft.files import (
    TOKENIZER_FILES,
    WRITTEN_BY,
    atomic_path,
    check_output_dir,
    check_replaceable,
    copy_tokenizer,
    run_dir_of,
    staged_output,
    write_written_by,
    written_record,
)
from litft.kinds import check_checkpoint
from litft.load_finetuned import check_same_base, load_lora, lora_settings, weights_in
from litft.lora import LoRAConfig, merge_lora
from litft.new_tokens import grown_tokenizer_files, write_tokenizer
from litft.prompts import FILE as PROMPT_STYLE
from litft.qlora import as_used
from litft.readers import lit_checkpoint, require_readers
from litft.verify import MERGED_TOLERANCE, TOLERANCE, check, litft_reference

SCRIPT = "scripts/merge_lora.py"
STALE = (*TOKENIZER_FILES, PROMPT_STYLE)  # what an earlier merge into --out_dir may have left that this one does not


def main(lora_path: Path, out_dir: Path, checkpoint_dir: Optional[Path] = None, verify: bool = True,
         overwrite: bool = False) -> None:
    """Merge the LoRA weights in --lora_path into the base model in --checkpoint_dir and save it to --out_dir.

    Args:
        lora_path: the run's lit_model_lora.pth (its folder holds lora.yaml), or that run directory.
        out_dir: where to write the merged lit checkpoint (created if needed).
        checkpoint_dir: the base lit checkpoint the LoRA run was trained on (default: the one its base.yaml
            records).
        verify: compare the merged checkpoint, in transformers, with the unmerged LoRA model.
        overwrite: replace the files of a directory that this script did not write.
    """
    lora_path = weights_in(Path(lora_path))  # a run directory: its lit_model_lora.pth
    checkpoint_dir, out_dir = check_checkpoint(checkpoint_dir or base_of(run_dir_of(lora_path))), Path(out_dir)
    if verify:
        require_readers()  # before anything is written
    check_output_dir("--out_dir", out_dir, "a checkpoint", base=checkpoint_dir, run=lora_path.parent)
    check_replaceable("--out_dir", out_dir, SCRIPT, overwrite)
    base, lora = check_inputs(checkpoint_dir, lora_path)
    model = load_lora(load_lit_model(checkpoint_dir, mmap=lora.quantize is None), lora_path)  # all checks before writing
    merged = merge_lora(as_used(model, trained=lora.quantize, requested=None))  # a QLoRA run: W' = Ŵ + (α/r)·B·A
    with staged_output(out_dir, STALE) as scratch:  # moved into out_dir only once verified
        copied = write_merged(scratch, merged, checkpoint_dir, lora_path, lora, base)
        del model, merged
        line = verified(checkpoint_dir, lora_path, scratch, out_dir) if verify else None
        write_written_by(scratch, SCRIPT, checkpoint_dir=checkpoint_dir, lora_path=lora_path)
    print(f"merged {lora_path} into {checkpoint_dir} -> {out_dir} (lit_model.pth, model_config.yaml, "
          f"{', '.join([*copied, WRITTEN_BY])})", file=sys.stderr)
    if line:
        print(line)


def check_inputs(checkpoint_dir: Path, lora_path: Path) -> tuple[Config, LoRAConfig]:
    """The base's config and the run's LoRA settings, once everything that can be checked before loading is."""
    if not lora_path.is_file():
        what = "is a directory" if lora_path.is_dir() else "does not exist"
        raise UserError(f"--lora_path {lora_path} {what}; pass a LoRA run's directory or its lit_model_lora.pth")
    base = Config.from_checkpoint(checkpoint_dir)  # fail early on a bad base directory
    record = written_record(checkpoint_dir)
    trained_here = (lora_path.parent / "base.yaml").is_file() and other_base(lora_path.parent, checkpoint_dir) is None
    if record.get("written_by") == SCRIPT and record.get("lora_path") == str(lora_path.resolve()) and not trained_here:
        raise UserError(f"--checkpoint_dir {checkpoint_dir} already has {lora_path} merged into it (this script wrote "
                        f"it); merging again would add the update twice: pass the base, {record.get('checkpoint_dir')}")
    lora = lora_settings(lora_path)
    check_same_base(lora_path.parent, base, lora_path)  # the run's model_config.yaml names its base
    warn_if_trained_on_another(lora_path.parent, checkpoint_dir, lora_path)  # same shape, another model
    if lora.new_tokens:  # fail before anything is written if the tokenizer cannot take them
        grown_tokenizer_files(checkpoint_dir, lora.new_tokens, base.vocab_size)
    return base, lora


def write_merged(directory: Path, merged, checkpoint_dir: Path, lora_path: Path, lora: LoRAConfig,
                 base: Config) -> list[str]:
    """The merged checkpoint's files in `directory`; returns the names copied besides the weights and config."""
    save_lit_checkpoint(merged, directory)
    copied = (write_tokenizer(checkpoint_dir, directory, lora.new_tokens, base.vocab_size) if lora.new_tokens
              else copy_tokenizer(checkpoint_dir, directory))  # new tokens at ids V, V + 1, ...
    if (lora_path.parent / PROMPT_STYLE).is_file():  # prompted as it was trained
        with atomic_path(directory / PROMPT_STYLE) as tmp:
            shutil.copyfile(lora_path.parent / PROMPT_STYLE, tmp)
        copied.append(PROMPT_STYLE)
    return copied


# A merge against its LoRA run (litft/verify.py, MERGED_TOLERANCE); 16-bit merges are also rounded to 16 bits.
TOLERANCES = {torch.float32: MERGED_TOLERANCE, torch.bfloat16: 0.25, torch.float16: 0.05}


def verified(checkpoint_dir: Path, lora_path: Path, written: Path, out_dir: Path) -> str:
    """The merged checkpoint written in `written` (for `out_dir`), renamed into transformers' Llama in memory,
    against the LoRA run in litft."""
    expected = litft_reference(checkpoint_dir, lora_path, tokens=written)  # the merged tokenizer: new tokens too
    merged = load_lit_model(written)
    saved = merged.embed.weight.dtype
    reader = lit_checkpoint(merged.float())
    return check(expected, reader, f"the merged checkpoint in {out_dir}", TOLERANCES.get(saved, TOLERANCE))


if __name__ == "__main__":
    run(main)
