"""What --precision means for the dtypes of a run's weights.

    *-true    (bf16-true, 32-true)           every weight in that dtype, trained ones too (training refuses
                                             16-true: AdamW's eps is 0 in fp16, see below)
    *-mixed   (bf16-mixed, 16-mixed)         the frozen base as the checkpoint stores it, the weights a run trains
                                             (and so AdamW's moments) in fp32; autocast computes in 16 bits

Mixed precision keeps fp32 master weights because an update far below a 16-bit weight's resolution rounds away, and
in fp16 AdamW's eps (1e-8) is 0: LoRA's A, whose first gradient is 0 (B starts at 0), would step by 0 / 0. peft
keeps adapters over a 16-bit base in fp32 the same way. Training (litft/train_setup.py) and the memory plan
(litft/memory.py) both build the model by these rules.
"""

from __future__ import annotations

from pathlib import Path

import torch

from litft.checkpoint import base_weights
from litft.files import load_state_dict
from litft.model import Llama

TRUE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def base_dtype(precision: str, checkpoint_dir: Path) -> torch.dtype:
    """The dtype the base is loaded in: --precision's under *-true, the checkpoint's own under *-mixed."""
    if precision in TRUE_DTYPES:
        return TRUE_DTYPES[precision]
    weights = load_state_dict(base_weights(checkpoint_dir), mmap=True)  # mapped: no tensor is read
    dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).bits, default=torch.float32)  # mixed: the widest


def train_in_fp32(model: Llama) -> Llama:
    """The trainable 16-bit parameters made fp32, each the same Parameter (ties and names unchanged)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return model
