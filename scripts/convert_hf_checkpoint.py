"""Convert a Hugging Face Llama checkpoint directory into a lit checkpoint.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

reads config.json and the weights (model*.safetensors or pytorch_model*.bin, single or sharded) and writes, by
default into the same directory, lit_model.pth + model_config.yaml, next to the tokenizer files it copies.
Tensors are streamed shard by shard (see litft/convert_hf.py): a 7B model is never held twice in RAM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from litft.convert_hf import convert_hf_checkpoint


def main(checkpoint_dir: Path, output_dir: Optional[Path] = None,
         dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None, overwrite: bool = False) -> None:
    """Convert HF weights to litft's format.

    Args:
        checkpoint_dir: a Hugging Face model directory (config.json + weights + tokenizer files).
        output_dir: where to write the lit checkpoint; defaults to checkpoint_dir itself.
        dtype: cast the weights to this dtype; by default they keep the dtype they are stored in.
        overwrite: replace the checkpoint another --output_dir already holds (without it, one is refused).
    """
    print(convert_hf_checkpoint(checkpoint_dir, output_dir, dtype, overwrite))


if __name__ == "__main__":
    from litft.cli import run

    run(main)
