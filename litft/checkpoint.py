"""Lit checkpoints on disk: atomic writes, safe loads, and building a model from a checkpoint directory.

A checkpoint directory holds `lit_model.pth` (a plain state dict in litft naming), `model_config.yaml` and the
tokenizer files. Loading never unpickles arbitrary objects (`weights_only=True`) and memory-maps the file, so a
7B model is not read into RAM twice. Writing goes to a temporary file that is renamed into place, so a crash
mid-write never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from litft.config import Config
from litft.errors import UserError
from litft.model import Llama

WEIGHTS = "lit_model.pth"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_output_dir(flag: str, out: Path, **inputs: Path) -> Path:
    """Refuse, in one line, an output directory that is a file, cannot be written, or is one of the inputs.

    `inputs` name the directories a script reads (e.g. base=checkpoint_dir, run=lora_path.parent): writing into
    them could overwrite or delete what the user asked to read.
    """
    out = Path(out)
    for what, directory in inputs.items():
        if directory is not None and out.resolve() == Path(directory).resolve():
            raise UserError(f"{flag} {out} is the {what} directory this command reads; choose a new directory")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {out}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {existing} is not writable; choose a directory you can write to")
    return out


def read_yaml_mapping(path: Path, missing: str) -> dict:
    """A YAML file that holds a mapping. A missing file raises UserError(missing); a malformed one, one line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a mapping of settings")
    return data


def save_state_dict(state_dict: dict[str, Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)


def load_state_dict(path: Path, mmap: bool = True) -> dict[str, Tensor]:
    """Load tensors only. A truncated file or a pickle that would run code becomes a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    mmap = mmap and zipfile.is_zipfile(path)  # legacy (pre-zip) pickles cannot be memory-mapped
    try:
        with warnings.catch_warnings():  # the unpickler warns about protocols before refusing a file
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if "Weights only load failed" not in str(e) else "it holds objects other than tensors"
        raise UserError(f"{path} was refused: {reason}; only plain tensor state dicts are loaded") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        reason = str(e).splitlines()[0].split(". ")[0]
        raise UserError(f"{path} is not a readable checkpoint ({reason}); it may be truncated — re-create it") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return sd


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


def load_lit_model(checkpoint_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   config: Config | None = None, weights_path: Path | None = None, mmap: bool = True) -> Llama:
    """Build the model from `checkpoint_dir` without first allocating random weights (meta device).

    `weights_path` replaces `checkpoint_dir/lit_model.pth`, e.g. a full fine-tune's out_dir/lit_model.pth.
    `mmap` maps the file instead of reading it: processes share its pages and nothing is copied before the
    weights move to a GPU. mmap=False gives the model memory of its own, freed tensor by tensor when a tensor
    is replaced (litft/cpu_decoding.py); a mapped file stays resident until its last tensor is gone.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = config or Config.from_checkpoint(checkpoint_dir)
    path = Path(weights_path) if weights_path is not None else checkpoint_dir / WEIGHTS
    if weights_path is None and not path.is_file():
        raise UserError(f"{checkpoint_dir} has no {WEIGHTS}; convert the model first (scripts/convert_hf_checkpoint.py)")
    state_dict = load_state_dict(path, mmap=mmap)
    with torch.device("meta"):
        model = Llama(config)
    check_shapes(model, state_dict, path)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    return model.to(device)
