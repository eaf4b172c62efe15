"""What a path given on the command line holds, and the one line for a path of the wrong kind.

litft reads several kinds of directory, easily mixed up on a command line: a base checkpoint, a fine-tuning run
(LoRA, adapter, adapter v2, full), prepared data, a PEFT export, a Hugging Face download, and GGUF files. A
command given the wrong kind names what the path holds and the command that reads it, before anything loads:

    $ python generate/base.py --checkpoint_dir out/lora --prompt "..."
    error: --checkpoint_dir out/lora is a LoRA run, not a checkpoint; generate from it with generate/lora.py
    --lora_path out/lora
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from litft.errors import UserError
from litft.files import read_yaml_mapping, run_dir_of
from litft.load_finetuned import RUN_FILES

# kind: (how a line names it, what to do with it; {path} is the path as given)
KINDS = {
    "lora": ("a LoRA run", "generate from it with generate/lora.py --lora_path {path}, or merge it into a "
                           "checkpoint first (scripts/merge_lora.py)"),
    "adapter": ("an adapter run", "generate from it with generate/adapter.py --adapter_path {path}"),
    "adapter_v2": ("an adapter v2 run", "generate from it with generate/adapter_v2.py --adapter_path {path}"),
    "full": ("a full fine-tune", "generate from it with generate/full.py --finetuned_path {path}"),
    "checkpoint": ("a base checkpoint", "generate from it with generate/base.py --checkpoint_dir {path}"),
    "data": ("prepared data", "train on it with finetune/lora.py --data {path}"),
    "peft": ("a PEFT adapter", "litft reads the run it was exported from; pass that run directory"),
    "hf": ("a Hugging Face model", "convert it first: python scripts/convert_hf_checkpoint.py --checkpoint_dir {path}"),
    "gguf": ("a GGUF file", "convert it first: python scripts/convert_gguf_checkpoint.py --gguf_path {path} "
                            "--output_dir checkpoints/NAME"),
}


def kind_of(path: Path) -> str | None:
    """One of KINDS for what `path` (a directory, or a file in one) holds; None when it is none of them, or does
    not exist. A directory holding a model's weights is a checkpoint (or a full run), whatever else lies beside."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    names = {p.name for p in run_dir_of(path).iterdir() if p.is_file()}
    runs = [method for method, (config_file, _) in RUN_FILES.items() if config_file in names]
    if len(runs) == 1:
        return runs[0]
    if {"lit_model.pth", "model_config.yaml"} <= names or {"run.yaml", "lit_model.pth"} <= names:
        return "full" if "run.yaml" in names else "checkpoint"
    if "train.pt" in names:
        return "data"
    if "adapter_config.json" in names:
        return "peft"
    if "config.json" in names and "model_config.yaml" not in names:
        return "hf"
    return None


def refuse(flag: str, path: Path, kind: str, wanted: str, advice: dict[str, str] | None = None) -> NoReturn:
    """One line: `flag path` is a `kind`, not `wanted`; how to use what it is (a run's flags take its weights
    file too; the others take the directory the file is in). `advice` replaces KINDS' for the kinds it names; it
    may say {base}, the base a run records (else BASE)."""
    name, what_to_do = KINDS[kind]
    what_to_do = (advice or {}).get(kind, what_to_do)
    where = path if kind in RUN_FILES or kind in ("full", "gguf") else run_dir_of(path)
    base_yaml = run_dir_of(path) / "base.yaml"  # a run's record of its base: the checkpoint the user may have meant
    record = read_yaml_mapping(base_yaml, "") if (kind in RUN_FILES or kind == "full") and base_yaml.is_file() else {}
    base = shown(Path(record["path"])) if record.get("path") else None
    trained_on = f" trained on {base}" if base else ""
    raise UserError(f"{flag} {path} is {name}{trained_on}, not {wanted}; "
                    f"{what_to_do.format(path=where, base=base or 'BASE')}")


def shown(path: Path) -> Path:
    """A recorded absolute path, relative to the current directory when it lies below it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def check_checkpoint(path: Path, flag: str = "--checkpoint_dir", also: tuple[str, ...] = (),
                     advice: dict[str, str] | None = None) -> Path:
    """A base checkpoint (or a full fine-tune, a checkpoint of its own) is what `flag` takes, and the kinds in
    `also`; the other kinds above are refused by name (with the command's own `advice` for some). A directory of no
    known kind is left to the checks that read its files."""
    path = Path(path)
    if (kind := kind_of(path)) not in (None, "checkpoint", "full", *also):
        refuse(flag, path, kind, "a checkpoint", advice)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise UserError(f"checkpoint directory {path} {what}; download or convert a model first")
    return path


def check_run_kind(path: Path, method: str, flag: str, base_given: bool, advice: dict[str, str] | None = None) -> None:
    """A run is what generate/<method>.py's `flag` takes (one of another method is named where it is loaded:
    litft/base_checkpoint.py's resolve_run). generate/full.py also takes a checkpoint, given the base it derives
    from; any other kind is refused by name (with the command's own `advice` for some)."""
    takes = set(RUN_FILES)
    if method == "full":
        takes |= {"full", "checkpoint"} if base_given else {"full"}
    if (kind := kind_of(path)) is not None and kind not in takes:
        refuse(flag, path, kind, KINDS[method][0], advice)
