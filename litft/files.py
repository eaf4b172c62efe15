"""Files on disk, written safely: atomic writes, YAML settings, tensor state dicts, tokenizer files.

Every file litft writes goes to a temporary file in the same directory first and is renamed into place, so a
crash mid-write never leaves a half-written file behind; the file, then its directory, are synced to disk, so a
power cut right after the rename leaves the new file or the old one, not an empty one. Tensors are read with
`weights_only=True`: a file that would run code when unpickled is refused.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from types import UnionType
from typing import Iterator, TypeVar, Union, get_args, get_origin, get_type_hints

import torch
import yaml
from torch import Tensor

from litft.errors import UserError

T = TypeVar("T")

# The files that make up a tokenizer (and its chat template and stop tokens), copied along with a checkpoint.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")  # newer repos keep the chat template apart


def run_dir_of(weights_path: Path) -> Path:
    """The run directory of a fine-tune's weights: the file's folder, or the path itself when it names the folder."""
    weights_path = Path(weights_path)
    return weights_path if weights_path.is_dir() else weights_path.parent


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
        sync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sync_directory(directory: Path) -> None:
    """Make the renames in `directory` durable: a rename lives in the directory's entries, which fsync on the file
    does not write. (Windows cannot open a directory, and some network and FUSE file systems cannot sync one;
    there the rename is left to the system, as before.)"""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# What a directory holds, told by one file in it; the first match wins (a full fine-tune's run holds lit_model.pth).
MARKERS = (("run.yaml", "a fine-tuning run"), ("train.pt", "prepared data"), ("adapter_config.json", "a PEFT adapter"),
           ("lit_model.pth", "a checkpoint"), ("config.json", "a checkpoint"))


def holds(directory: Path) -> str | None:
    """What `directory` holds ("a fine-tuning run", "prepared data", "a PEFT adapter", "a checkpoint"), or None."""
    return next((kind for marker, kind in MARKERS if (Path(directory) / marker).is_file()), None)


def check_output_dir(flag: str, out: Path, writes: str | None = None, **inputs: Path) -> Path:
    """Refuse, in one line, an output directory that is a file, cannot be written, is one of the inputs, or holds
    something else than what the command `writes` (one of MARKERS' kinds), whose files it would replace.

    `inputs` name the directories a script reads (e.g. base=checkpoint_dir, run=lora_path.parent): writing into
    them could overwrite or delete what the user asked to read.
    """
    out = Path(out)
    for what, directory in inputs.items():
        if directory is not None and out.resolve() == Path(directory).resolve():
            raise UserError(f"{flag} {out} is the {what} directory this command reads; choose a new directory")
    if writes is not None and out.is_dir() and (kind := holds(out)) not in (None, writes):
        raise UserError(f"{flag} {out} holds {kind}, which writing {writes} there would damage; choose a new "
                        "directory")
    check_writable(flag, out, out)
    return out


def check_not_hf_model(flag: str, out: Path) -> None:
    """Refuse an output directory holding a Hugging Face model (a download, an export): a checkpoint written there
    would replace its tokenizer files and generation_config.json."""
    out = Path(out)
    found = [p.name for pattern in HF_MODEL_FILES for p in sorted(out.glob(pattern))] if out.is_dir() else []
    if found:
        raise UserError(f"{flag} {out} holds a Hugging Face model ({found[0]}), whose tokenizer files a checkpoint "
                        "written there would replace; choose a new directory")


HF_MODEL_FILES = ("config.json", "*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def check_writable(flag: str, value: Path, directory: Path) -> None:
    """Refuse, in one line naming `flag` and its `value`, a `directory` that cannot be made or written: its nearest
    existing part is a file, or is not writable."""
    existing = next(p for p in (Path(directory), *Path(directory).parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {value}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {value}: {existing} is not writable; choose a directory you can write to")


# An exporter's output directory names, in this file, the script that wrote it and what from. A later run of that
# script may replace such a directory; any other non-empty directory is refused unless --overwrite true (a mistyped
# --out_dir must not replace someone's base model).
WRITTEN_BY = "litft_export.yaml"
SCRATCH = ".partial-"  # prefix of the scratch directory an output is written into before it is published


def check_replaceable(flag: str, out: Path, script: str, overwrite: bool) -> None:
    """Refuse, in one line, an output directory holding files that no earlier run of `script` wrote."""
    out = Path(out)
    if overwrite or not out.is_dir() or all(p.name.startswith(SCRATCH) for p in out.iterdir()):
        return
    if written_by(out) != script:
        raise UserError(f"{flag} {out} already holds files that {script} did not write; choose another directory, "
                        "or pass --overwrite true to replace them")


def written_by(directory: Path) -> str | None:
    """The script WRITTEN_BY names in `directory`, or None."""
    return written_record(directory).get("written_by")


def written_record(directory: Path) -> dict:
    """WRITTEN_BY in `directory` (its first 65,536 characters at most): the script and its inputs; {} if none."""
    try:
        with open(Path(directory) / WRITTEN_BY, encoding="utf-8") as f:
            data = yaml.safe_load(f.read(2**16))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def write_written_by(directory: Path, script: str, **sources: Path | None) -> None:
    """Record in `directory` that `script` wrote it, and from which inputs (resolved paths)."""
    record = {"written_by": script, **{k: str(Path(v).resolve()) for k, v in sources.items() if v is not None}}
    atomic_write_text(Path(directory) / WRITTEN_BY, yaml.safe_dump(record, sort_keys=False))


@contextmanager
def staged_output(output_dir: Path, stale: tuple[str, ...] = (), marker: str | None = None) -> Iterator[Path]:
    """Yield a scratch directory inside `output_dir` to write (and verify) an output in; when the block ends
    without error its files are published into `output_dir` (see `publish`). An error in the block leaves
    `output_dir` as it was: the scratch directory is removed, and so are the directories made for `output_dir`
    that are still empty. Scratch directories a killed run left are removed first (each may hold a full copy of
    the weights); one whose process still runs is another run's, writing now, and stays."""
    output_dir = Path(output_dir)
    created = missing_directories(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for leftover in output_dir.glob(f"{SCRATCH}*"):
        if not process_runs(leftover.name[len(SCRATCH):].split("-", 1)[0]):
            shutil.rmtree(leftover, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=f"{SCRATCH}{os.getpid()}-") as scratch:
            yield Path(scratch)
            publish(Path(scratch), output_dir, stale, marker)
    except BaseException:
        for directory in created:  # deepest first: each is removed only if nothing else came into it
            try:
                directory.rmdir()  # refused for a directory that is not empty
            except OSError:
                break
        raise


def missing_directories(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what mkdir(parents=True) makes."""
    missing = []
    while not path.exists() and path != path.parent:  # (a missing Windows drive is its own parent)
        missing.append(path)
        path = path.parent
    return missing


def process_runs(pid: str) -> bool:
    """Whether the process `pid` (digits from a scratch directory's name) is running on this machine."""
    if not pid.isdigit() or os.name != "posix":  # (on Windows, signal 0 would be a Ctrl-C)
        return False
    try:
        os.kill(int(pid), 0)  # signal 0 sends nothing: it only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def publish(scratch: Path, output_dir: Path, stale: tuple[str, ...] = (), marker: str | None = None) -> None:
    """Move the files in `scratch` into `output_dir` (each in one rename) and remove the files matching the glob
    patterns `stale` that this output does not have: an earlier output's leftovers (weight shards, another
    tokenizer, a prompt style), which a reader would pick up instead. `marker`, a file whose presence says the
    directory is complete (prepared data's train.pt), is removed first and moved in last of all."""
    names = [path.name for path in scratch.iterdir()]
    if marker is not None:
        (output_dir / marker).unlink(missing_ok=True)
    for name in names:
        if name != marker:
            os.replace(scratch / name, output_dir / name)
    for pattern in stale:
        for path in output_dir.glob(pattern):
            if path.name not in names and path.is_file():
                path.unlink()
    if marker in names:
        os.replace(scratch / marker, output_dir / marker)
    sync_directory(output_dir)


def read_yaml_mapping(path: Path, missing: str) -> dict:
    """A YAML file that holds a mapping. A missing file raises UserError(missing); a malformed one, one line."""
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


def write_settings(path: Path, settings) -> None:
    """A dataclass's fields as a YAML mapping (lora.yaml, adapter.yaml, ...)."""
    atomic_write_text(path, yaml.safe_dump(asdict(settings), sort_keys=False))


def read_settings(cls: type[T], path: Path, missing: str) -> T:
    """The dataclass `cls` from a YAML mapping of its fields; a missing file is UserError(missing), a key that is
    not a field one line naming the fields."""
    data = read_yaml_mapping(path, missing)
    known = {f.name for f in fields(cls)}
    if set(data) - known:
        raise UserError(f"{path} has {', '.join(sorted(set(data) - known))}; it may hold {', '.join(sorted(known))}")
    hints = get_type_hints(cls)
    for key, value in data.items():
        if not has_type(value, hints[key]):
            raise UserError(f"{path}: {key} is {value!r}, which is not {type_name(hints[key])}; fix the file (it was "
                            "written with the run's settings)")
    return cls(**data)


def has_type(value, hint) -> bool:
    """Whether a YAML value fits a field annotated `hint` (int, float, bool, str, list[...], X | None)."""
    if get_origin(hint) in (Union, UnionType):
        return any(has_type(value, option) for option in get_args(hint))
    if get_origin(hint) is list:
        return isinstance(value, list) and all(has_type(v, get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if hint in (bool, str, type(None)) else True


def type_name(hint) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(type_name(option) for option in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {type_name(get_args(hint)[0]).split(' ', 1)[-1]}s"
    return names.get(hint, str(hint))


def save_state_dict(state_dict: dict[str, Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)


def load_state_dict(path: Path, mmap: bool = True) -> dict[str, Tensor]:
    """Load tensors only. A truncated file or a pickle that would run code becomes a UserError."""
    path = Path(path)
    if path.is_dir():  # e.g. a full fine-tune's directory given to generate/adapter.py
        raise UserError(f"{path} is a directory, not a weights file (nor a run directory of the kind this command "
                        "takes); pass the weights file (.pth)")
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    mmap = mmap and zipfile.is_zipfile(path)  # legacy (pre-zip) pickles cannot be memory-mapped
    try:
        with warnings.catch_warnings():  # the unpickler warns about protocols before refusing a file
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = (str(e).splitlines()[0] if "Weights only load failed" not in str(e)
                  else "it is not a file of tensors that torch.save wrote, or it holds other objects")
        raise UserError(f"{path} was refused: {reason}; only plain tensor state dicts are loaded") from None
    except (IndexError, KeyError, ValueError, TypeError):  # the unpickler, reading a file torch.save did not write
        raise UserError(f"{path} is not a checkpoint (not a file torch.save wrote); pass the run's weights file, "
                        "e.g. lit_model_lora.pth") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        reason = str(e).splitlines()[0].split(". ")[0]
        raise UserError(f"{path} is not a readable checkpoint ({reason}); it may be truncated — re-create it") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return sd


def copy_files(src_dir: Path, dst_dir: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy those of `names` that exist in src_dir (atomically); return the names copied."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if src_dir.resolve() == dst_dir.resolve():
        return [n for n in names if (src_dir / n).is_file()]
    copied = []
    for n in names:
        if (src_dir / n).is_file():
            with atomic_path(dst_dir / n) as tmp:
                shutil.copyfile(src_dir / n, tmp)
            copied.append(n)
    return copied


def copy_tokenizer(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy `src_dir`'s tokenizer files into `out_dir`, removing any other tokenizer file left there."""
    copied = copy_files(src_dir, out_dir)
    remove_other_tokenizer_files(out_dir, keep=copied)
    return copied


def remove_other_tokenizer_files(directory: Path, keep: list[str]) -> None:
    for name in set(TOKENIZER_FILES) - set(keep):
        (Path(directory) / name).unlink(missing_ok=True)
