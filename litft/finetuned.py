"""Load a model for inference from a base checkpoint plus, optionally, a fine-tuning run's weights file.

The run directory (the folder holding the weights file) says which method produced it: `lora.yaml` for LoRA,
`adapter.yaml` / `adapter_v2.yaml` for LLaMA-Adapter, nothing for a full fine-tune or a merged checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from litft.checkpoint import load_lit_model
from litft.model import Llama


def load_finetuned(checkpoint_dir: Path, weights_path: Path | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> Llama:
    """The base model from `checkpoint_dir`, with the method's weights from `weights_path` applied."""
    model = load_lit_model(checkpoint_dir, device=device, dtype=dtype)
    if weights_path is None:
        return model.eval()
    raise NotImplementedError("method weights are wired in as the methods land")
