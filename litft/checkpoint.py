"""Lit checkpoints: a directory with `lit_model.pth` (a state dict in litft naming), `model_config.yaml` and the
tokenizer files, and building a model from one.

Loading memory-maps the weights file (litft/files.py reads it with weights_only=True), so a 7B model is not read
into RAM twice, and builds the model on the meta device, so no random weights are allocated first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from litft.config import Config
from litft.errors import UserError
from litft.files import load_state_dict, save_state_dict
from litft.model import Llama

WEIGHTS = "lit_model.pth"


def check_not_replacing(flag: str, output_dir: Path, overwrite: bool) -> None:
    """Refuse, in one line, to convert into a directory that already holds a checkpoint unless `overwrite`: a
    mistyped path must not replace another model."""
    if (Path(output_dir) / WEIGHTS).is_file() and not overwrite:
        raise UserError(f"{flag} {output_dir} already holds a checkpoint ({WEIGHTS}); choose another directory, or "
                        "pass --overwrite true to replace it")


def check_shapes(model: torch.nn.Module, state_dict: dict[str, Tensor], source: Path, strict: bool = True) -> None:
    """Fail with one line naming the first mismatching tensor, instead of PyTorch's wall of text."""
    expected = model.state_dict()
    for name, tensor in state_dict.items():
        if name not in expected:
            raise UserError(f"{source} has a tensor {name!r} this model does not have; is it for another model?")
        if expected[name].shape != tensor.shape:
            raise UserError(f"{source}: {name} has shape {tuple(tensor.shape)} but the config expects "
                            f"{tuple(expected[name].shape)}; the weights and model_config.yaml do not match")
    if strict:
        missing = [n for n in expected if n not in state_dict and not is_tied_head(model, n)]
        if missing:
            raise UserError(f"{source} lacks {len(missing)} tensors the model needs (first: {missing[0]})")


def is_tied_head(model: torch.nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and model.config.tie_embeddings


def lit_state_dict(model: Llama) -> dict[str, Tensor]:
    """The model's weights as saved: a tied lm_head is stored once, as the embedding."""
    return {k: v for k, v in model.state_dict().items() if not is_tied_head(model, k)}


def save_lit_checkpoint(model: Llama, checkpoint_dir: Path) -> None:
    checkpoint_dir = Path(checkpoint_dir)
    save_state_dict(lit_state_dict(model), checkpoint_dir / WEIGHTS)
    model.config.save(checkpoint_dir)


def base_weights(checkpoint_dir: Path) -> Path:
    """checkpoint_dir/lit_model.pth, or one line saying to convert the model first."""
    path = Path(checkpoint_dir) / WEIGHTS
    if not path.is_file():
        raise UserError(f"{checkpoint_dir} has no {WEIGHTS}; convert the model first (scripts/convert_hf_checkpoint.py)")
    return path


def load_lit_model(checkpoint_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   config: Config | None = None, weights_path: Path | None = None, mmap: bool = True) -> Llama:
    """Build the model from `checkpoint_dir` without first allocating random weights (meta device).

    `weights_path` replaces `checkpoint_dir/lit_model.pth`, e.g. a full fine-tune's out_dir/lit_model.pth.
    `mmap` maps the file instead of reading it: processes share its pages and nothing is copied before the
    weights move to a GPU. mmap=False gives the model memory of its own, freed tensor by tensor when a tensor
    is replaced (litft/fast/cpu_decoding.py); a mapped file stays resident until its last tensor is gone.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = config or Config.from_checkpoint(checkpoint_dir)
    path = Path(weights_path) if weights_path is not None else base_weights(checkpoint_dir)
    state_dict = load_state_dict(path, mmap=mmap)
    with torch.device("meta"):
        model = Llama(config)
    check_shapes(model, state_dict, path)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    return model.to(device)
