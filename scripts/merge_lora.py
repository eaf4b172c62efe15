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
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from litft.base_checkpoint import warn_if_trained_on_another
from litft.checkpoint import load_lit_model, save_lit_checkpoint
from litft.cli import run
from litft.config import Config
from litft.errors import UserError
from litft.files import atomic_path, check_output_dir, copy_tokenizer
from litft.load_finetuned import check_same_base, load_lora
from litft.lora import LoRAConfig, merge_lora
from litft.new_tokens import grown_tokenizer_files, write_tokenizer
from litft.prompts import FILE as PROMPT_STYLE
from litft.qlora import as_used
from litft.readers import lit_checkpoint, require_readers
from litft.verify import TOLERANCE, check, litft_reference


def main(checkpoint_dir: Path, lora_path: Path, out_dir: Path, verify: bool = True) -> None:
    """Merge the LoRA weights in --lora_path into the base model in --checkpoint_dir and save it to --out_dir.

    Args:
        checkpoint_dir: the base lit checkpoint the LoRA run was trained on.
        lora_path: the run's lit_model_lora.pth (its folder holds lora.yaml).
        out_dir: where to write the merged lit checkpoint (created if needed).
        verify: compare the merged checkpoint, in transformers, with the unmerged LoRA model.
    """
    checkpoint_dir, lora_path, out_dir = Path(checkpoint_dir), Path(lora_path), Path(out_dir)
    if verify:
        require_readers()  # before anything is written
    check_output_dir("--out_dir", out_dir, "a checkpoint", base=checkpoint_dir, run=lora_path.parent)
    if not lora_path.is_file():
        what = "is a directory" if lora_path.is_dir() else "does not exist"
        raise UserError(f"--lora_path {lora_path} {what}; pass the run's lit_model_lora.pth")
    base = Config.from_checkpoint(checkpoint_dir)  # fail early on a bad base directory
    lora = LoRAConfig.from_dir(lora_path.parent)
    check_same_base(lora_path.parent, base, lora_path)  # the run's model_config.yaml names its base
    warn_if_trained_on_another(lora_path.parent, checkpoint_dir, lora_path)  # same shape, another model
    if lora.new_tokens:  # fail before anything is written if the tokenizer cannot take them
        grown_tokenizer_files(checkpoint_dir, lora.new_tokens, base.vocab_size)
    model = load_lora(load_lit_model(checkpoint_dir, mmap=lora.quantize is None), lora_path)  # all checks before writing
    merged = merge_lora(as_used(model, trained=lora.quantize, requested=None))  # a QLoRA run: W' = Ŵ + (α/r)·B·A
    save_lit_checkpoint(merged, out_dir)
    copied = (write_tokenizer(checkpoint_dir, out_dir, lora.new_tokens, base.vocab_size) if lora.new_tokens
              else copy_tokenizer(checkpoint_dir, out_dir))  # new tokens at ids V, V + 1, ...
    if (lora_path.parent / PROMPT_STYLE).is_file():
        with atomic_path(out_dir / PROMPT_STYLE) as tmp:
            shutil.copyfile(lora_path.parent / PROMPT_STYLE, tmp)
        copied.append(PROMPT_STYLE)
    else:  # a style left by an earlier merge into out_dir would prompt this model in another run's format
        (out_dir / PROMPT_STYLE).unlink(missing_ok=True)
    print(f"merged {lora_path} into {checkpoint_dir} -> {out_dir} (lit_model.pth, model_config.yaml, "
          f"{', '.join(copied)})", file=sys.stderr)
    if verify:
        del model, merged
        print(verified(checkpoint_dir, lora_path, out_dir))


# Merged weights are rounded to the checkpoint's dtype, the LoRA model is not: a 16-bit merge moves logits a little.
TOLERANCES = {torch.float32: TOLERANCE, torch.bfloat16: 0.25, torch.float16: 0.05}


def verified(checkpoint_dir: Path, lora_path: Path, out_dir: Path) -> str:
    """The merged checkpoint, renamed into transformers' Llama in memory, against the LoRA run in litft."""
    expected = litft_reference(checkpoint_dir, lora_path, tokens=out_dir)  # the merged tokenizer: new tokens too
    merged = load_lit_model(out_dir)
    saved = merged.embed.weight.dtype
    reader = lit_checkpoint(merged.float())
    return check(expected, reader, f"the merged checkpoint in {out_dir}", TOLERANCES.get(saved, TOLERANCE))


if __name__ == "__main__":
    run(main)
