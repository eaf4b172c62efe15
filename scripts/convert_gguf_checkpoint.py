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

from litft.gguf import convert_gguf


def main(gguf_path: Path, output_dir: Path, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
         overwrite: bool = False) -> None:
    """Convert a GGUF file (llama or qwen2 architecture) into a lit checkpoint.

    Args:
        gguf_path: the .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, Q*_K tensors).
        output_dir: the checkpoint directory to write (created if needed).
        dtype: dtype of the saved weights. float32 keeps the dequantized values exactly; bfloat16 halves the size.
        overwrite: replace the checkpoint --output_dir already holds (without it, one is refused).
    """
    start = time.perf_counter()
    summary = convert_gguf(gguf_path, output_dir, getattr(torch, dtype), overwrite=overwrite)
    print(f"{summary} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    from litft.cli import run

    run(main)
