"""Convert a llama.cpp GGUF file into a lit checkpoint directory (weights, model_config.yaml, tokenizer).

    python scripts/convert_gguf_checkpoint.py --gguf_path checkpoints/offline/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --output_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

How the tensors are dequantized, un-permuted and renamed is explained in litft/gguf.py. Converted into a directory
that held another checkpoint, the old model's tokenizer files and prompt_style.yaml are removed: they would be
read in place of this model's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

import torch

from litft.checkpoint import WEIGHTS
from litft.files import atomic_path, atomic_write_text, check_output_dir, remove_other_tokenizer_files, save_state_dict
from litft.gguf import (
    check_tensors,
    config_from_gguf,
    convert_weights,
    metadata,
    open_gguf,
    rope_freqs,
    tensor_shapes,
    tokenizer_files,
)
from litft.prompts import FILE as PROMPT_STYLE


def main(gguf_path: Path, output_dir: Path, dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> None:
    """Convert a GGUF file (llama or qwen2 architecture) into a lit checkpoint.

    Args:
        gguf_path: the .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, Q*_K tensors).
        output_dir: the checkpoint directory to write (created if needed).
        dtype: dtype of the saved weights. float32 keeps the dequantized values exactly; bfloat16 halves the size.
    """
    start = time.perf_counter()
    check_output_dir("--output_dir", output_dir, "a checkpoint")
    reader = open_gguf(gguf_path)
    meta = metadata(reader)
    config = config_from_gguf(meta, tensor_shapes(reader), Path(output_dir).name, rope_freqs(reader))
    check_tensors(reader, config)
    files = tokenizer_files(meta)  # built (and checked) in memory before anything is written

    state_dict = convert_weights(reader, config, getattr(torch, dtype), permuted_qk=meta["general.architecture"] == "llama")
    save_state_dict(state_dict, Path(output_dir) / WEIGHTS)
    config.save(output_dir)
    for name, contents in files.items():
        if isinstance(contents, bytes):
            with atomic_path(Path(output_dir) / name) as tmp:
                tmp.write_bytes(contents)
        else:
            atomic_write_text(Path(output_dir) / name, contents)
    remove_other_tokenizer_files(output_dir, keep=list(files))  # an earlier model's files would be read instead
    (Path(output_dir) / PROMPT_STYLE).unlink(missing_ok=True)  # the GGUF's chat template is this model's style

    size = (Path(output_dir) / WEIGHTS).stat().st_size / 2**20
    types = sorted({t.tensor_type.name for t in reader.tensors})
    print(f"wrote {output_dir}: {len(state_dict)} tensors ({'/'.join(types)} -> {dtype}), {WEIGHTS} {size:.0f} MiB, "
          f"{', '.join(files)} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    from litft.cli import run

    run(main)
