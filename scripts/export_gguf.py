"""Export a lit checkpoint, or a LoRA run merged into it, as one GGUF file: the format llama.cpp and Ollama run.

    python scripts/export_gguf.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --lora_path out/demo/lora60/lit_model_lora.pth --out_file out/smollm2-games.q8_0.gguf --dtype q8_0

The file holds the weights (--dtype f32, f16, bf16 or q8_0; litft/gguf_export.py explains the layout and the
storage types), the model's shape and RoPE settings, and the tokenizer with its special ids, end-of-turn token
and chat template (litft/gguf_vocab.py). A LoRA run is merged first, W' = W + (α/r)·B·A (its new tokens
included). A LLaMA-Adapter run cannot be exported: its gated prefix attention has no place in a plain Llama.

Verification (`--verify true`, the default) reads the written file back with transformers' GGUF loader and compares
it with litft's model holding the values the file stores (litft/verify.py); a lossy --dtype also reports how far
storage moved litft's own logits. The file is renamed into place only after it passed. An existing --out_file is
replaced only when it is an earlier export of this script (its `litft.exported_by` key says so) or with
`--overwrite true`; a file that is not GGUF at all is never replaced.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch

from litft.base_checkpoint import warn_if_trained_on_another
from litft.cli import run
from litft.config import Config
from litft.errors import UserError
from litft.files import atomic_path, check_writable
from litft.gguf_export import EXPORTER, check_exportable, exported_by, write_gguf
from litft.gguf_vocab import vocab_metadata
from litft.load_finetuned import detect_method, load_finetuned, tokenizer_dir, weights_in
from litft.lora import merge_lora
from litft.model import Llama
from litft.readers import gguf_file, require_readers
from litft.verify import MERGED_TOLERANCE, Reader, check, compare, prompting, reference


def main(checkpoint_dir: Path, out_file: Path, lora_path: Path | None = None, adapter_path: Path | None = None,
         dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16", verify: bool = True, overwrite: bool = False) -> None:
    """Write the model in --checkpoint_dir (with the LoRA run in --lora_path merged into it) to --out_file.

    Args:
        checkpoint_dir: the base lit checkpoint (lit_model.pth, model_config.yaml, tokenizer files).
        out_file: the .gguf file to write.
        lora_path: a LoRA run's lit_model_lora.pth (or that run directory), merged into the base before export.
        adapter_path: a LLaMA-Adapter run: refused, it cannot be merged into a plain Llama.
        dtype: storage of the matrices: f32 (exact), f16, bf16, or q8_0 (8-bit blocks of 32 weights).
        verify: read the file back with transformers' GGUF loader and compare it with litft's model.
        overwrite: replace a GGUF file at --out_file that this script did not write.
    """
    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    lora_path = weights_in(lora_path)  # a run directory: its lit_model_lora.pth
    if verify:
        require_readers()  # before anything is written
    run_dir = check_inputs(checkpoint_dir, out_file, lora_path, adapter_path)
    check_out_file(out_file, overwrite)
    if run_dir is not None:
        warn_if_trained_on_another(run_dir, checkpoint_dir, lora_path)
    check_exportable(Config.from_checkpoint(checkpoint_dir))
    tokenizer, style, stops = prompting(checkpoint_dir, run_dir)
    if tokenizer is None:
        raise UserError(f"{checkpoint_dir} has no tokenizer files; a GGUF carries its tokenizer, copy them in first")
    model = load_finetuned(checkpoint_dir, lora_path, dtype=torch.float32, mmap=False)  # its values are replaced below
    lossless = dtype == "f32" and lora_path is None  # the file's values are then the checkpoint's own
    source = reference(model, tokenizer, style, stops) if verify and not lossless else None
    if lora_path is not None:
        model = merge_lora(model)
        if source is not None:  # merging must not change what the model computes
            check(source, Reader("the merged model", logits_of(model)), "the LoRA run", MERGED_TOLERANCE)
    vocab = vocab_metadata(tokenizer_dir(run_dir, checkpoint_dir), model.config.vocab_size, style)
    if style is not None and style.chat_template is None:
        print(f"note: the prompt style {style.name!r} has no chat template form; the file carries none, so prompt "
              "it in that style yourself", file=sys.stderr)
    name = checkpoint_dir.name + (f"-{run_dir.name}" if run_dir is not None else "")
    lines = []
    with atomic_path(out_file) as tmp:  # a file that fails verification never takes --out_file's place
        counts = write_gguf(tmp, model, vocab, dtype, name)
        if verify:
            lines, expected = storage_lines(model, source, dtype), reference(model, tokenizer, style, stops)
            del model  # transformers reads the file into a model of its own: one fp32 copy at a time, not two
            lines.append(check(expected, gguf_file(tmp), "the GGUF file"))
    size = out_file.stat().st_size / 2**20
    print(f"wrote {out_file}: {sum(counts.values())} tensors ({', '.join(f'{n} {k}' for k, n in counts.items())}), "
          f"{len(vocab['tokenizer.ggml.tokens'])} tokens, {size:.1f} MiB", file=sys.stderr)
    for line in lines:
        print(line)


def check_inputs(checkpoint_dir: Path, out_file: Path, lora_path: Path | None, adapter_path: Path | None) -> Path | None:
    """Refuse an adapter, a non-LoRA --lora_path and an --out_file that is a directory or lies in an input."""
    if adapter_path is not None:
        raise UserError(f"--adapter_path {adapter_path}: a LLaMA-Adapter's gated prefix attention has no place in a "
                        "plain Llama (nor in llama.cpp's llama architecture), so it cannot be exported; a LoRA run "
                        "(finetune/lora.py) merges into one")
    run_dir = Path(lora_path).parent if lora_path is not None else None
    if lora_path is not None and (not Path(lora_path).is_file() or detect_method(Path(lora_path)) != "lora"):
        raise UserError(f"--lora_path {lora_path} is not a LoRA run's weights file (lit_model_lora.pth next to lora.yaml)")
    if out_file.is_dir():
        raise UserError(f"--out_file {out_file} is a directory; name the .gguf file to write")
    for what, directory in (("base checkpoint", checkpoint_dir), ("run", run_dir)):
        if directory is not None and out_file.parent.resolve() == directory.resolve():
            raise UserError(f"--out_file {out_file} is inside the {what} directory this command reads; write it elsewhere")
    return run_dir


def check_out_file(out_file: Path, overwrite: bool) -> None:
    """Refuse an --out_file whose folder cannot be written, or that exists and is not an earlier export of this
    script (a file that is not GGUF at all even with --overwrite true)."""
    check_writable("--out_file", out_file, out_file.parent)
    if not out_file.is_file():
        return
    with open(out_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"--out_file {out_file} exists and is not a GGUF file; name a new .gguf file")
    if not overwrite and exported_by(out_file) != EXPORTER:
        raise UserError(f"--out_file {out_file} is a GGUF file that {EXPORTER} did not write; name a new .gguf file, "
                        "or pass --overwrite true to replace it")


def storage_lines(stored: Llama, source, dtype: str) -> list[str]:
    """For a lossy dtype, how far storing moved litft's model (now holding the values the file stores)."""
    if dtype == "f32" or source is None:
        return []
    kept = compare(source, Reader(f"litft with the {dtype} weights", logits_of(stored)))
    return [f"storage: {dtype} moves litft's logits by max {kept.max_delta:.2g}, greedy text equal on "
            f"{kept.equal}/{kept.total} prompts"]


def logits_of(model: Llama):
    return lambda ids: model(ids[None])[0]  # (T,) -> (1, T, vocab) -> (T, vocab)


if __name__ == "__main__":
    run(main)
