"""Convert a Hugging Face Llama checkpoint directory into a lit checkpoint.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

reads config.json and the weights (model*.safetensors or pytorch_model*.bin, single or sharded) and writes, by
default into the same directory, lit_model.pth + model_config.yaml, next to the tokenizer files it copies.
Tensors are streamed shard by shard (see litft/convert_hf.py): a 7B model is never held twice in RAM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from litft.checkpoint import WEIGHTS, save_state_dict
from litft.convert_hf import copy_files, hf_to_lit_state_dict, parse_dtype, read_hf_config
from litft.errors import UserError


def main(checkpoint_dir: Path, output_dir: Optional[Path] = None,
         dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None) -> None:
    """Convert HF weights to litft's format.

    Args:
        checkpoint_dir: a Hugging Face model directory (config.json + weights + tokenizer files).
        output_dir: where to write the lit checkpoint; defaults to checkpoint_dir itself.
        dtype: cast the weights to this dtype; by default they keep the dtype they are stored in.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {checkpoint_dir} does not exist; download it with scripts/download.py")
    output_dir = Path(output_dir) if output_dir is not None else checkpoint_dir
    config = read_hf_config(checkpoint_dir)
    state_dict = hf_to_lit_state_dict(checkpoint_dir, config, parse_dtype(dtype))  # checked before anything is written

    save_state_dict(state_dict, output_dir / WEIGHTS)
    config.save(output_dir)
    copied = copy_files(checkpoint_dir, output_dir)
    n_params = sum(t.numel() for t in state_dict.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state_dict.values()})
    print(f"wrote {output_dir / WEIGHTS}: {len(state_dict)} tensors, {n_params:,} parameters, "
          f"{'/'.join(dtypes)}; model_config.yaml ({config.name}); copied {', '.join(copied) or 'no tokenizer files'}")


if __name__ == "__main__":
    from litft.cli import run

    run(main)
