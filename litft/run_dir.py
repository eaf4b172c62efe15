"""A run directory's lifecycle: start fresh, resume, or overwrite — and never lose anything else.

An `--out_dir` holds one run. The files a run writes are its *run files*:

    the weights (lit_model_lora.pth, lit_model_adapter.pth, lit_model_adapter_v2.pth, lit_model.pth),
    run.yaml, base.yaml, hyperparameters.yaml, model_config.yaml, prompt_style.yaml, lora.yaml / adapter.yaml /
    adapter_v2.yaml, the tokenizer files a full fine-tune or new tokens bring, summary.json, loss.png,
    logs/ (TensorBoard's events files), checkpoints/step-*, and `.<name>.*.tmp` files of an interrupted write.

Anything else in out_dir (notes, a README, other folders) belongs to the user and is never touched.

    fresh (default)      out_dir may not hold run files: a used out_dir is refused in one line naming them
    --overwrite true     the earlier run's files are removed first, and only those
    --resume true        the run must be the one run.yaml describes: same base (by fingerprint), method and
                         method settings, data (by fingerprint), batch shape, sequence length, packing, seed and
                         number of processes; and its newest checkpoint must lie below --max_steps and hold
                         what --strategy loads (FSDP's shards or whole tensors). The first difference is one line,
                         before any file is touched.

Both refusals come before the data, the base or Lightning is loaded (`check`): a wrong flag costs seconds.
Every start that goes ahead removes what a killed save left behind: `.<name>.*.tmp` files and
`checkpoints/*.tmp` directories. run.yaml's run_id goes into every checkpoint, and the keep-newest-two rotation
deletes only checkpoints with this run's id (litft/train_state.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import uuid
from pathlib import Path

import yaml

from litft import adapter, adapter_v2, checkpoint, lora, train_state
from litft.base_checkpoint import fingerprint, sample_file
from litft.data import data_dir
from litft.errors import UserError
from litft.files import TOKENIZER_FILES, atomic_write_text, check_output_dir, read_yaml_mapping

RECORD = "run.yaml"
WEIGHT_FILES = (lora.WEIGHTS, adapter.WEIGHTS, adapter_v2.WEIGHTS, checkpoint.WEIGHTS)
RUN_FILES = (*WEIGHT_FILES, RECORD, "base.yaml", "hyperparameters.yaml", "model_config.yaml", "prompt_style.yaml",
             lora.FILE, adapter.FILE, adapter_v2.FILE, *TOKENIZER_FILES, "summary.json",
             "loss.png")
SETTINGS = ("batch_size", "micro_batch_size", "max_seq_length", "seed")  # flags a resumed run may not change
DATA_FILES = ("meta.json", "prompt_style.yaml", "train.pt", "test.pt")


def check(args, method) -> None:
    """`start`'s refusals, read-only and before anything is loaded, so that a wrong flag costs seconds: a fresh run
    into a used out_dir, a resume of another run. A resumed --micro_batch_size auto takes the size the run started
    with. Any process may call it; `start` decides again on rank 0, where it also clears."""
    if args.resume and args.micro_batch_size == "auto":
        args.micro_batch_size = recorded(args.out_dir, "micro_batch_size") or "auto"
    if args.resume:
        check_resume(args, method)
    elif not args.overwrite:
        check_unused(Path(args.out_dir))


def start(args, method) -> str:
    """Check out_dir for this run and clear what must go; return the run's id. Rank 0 only, before any write."""
    out = Path(args.out_dir)
    if args.resume:
        run_id = check_resume(args, method)
    else:
        found = run_files(out)
        if not args.overwrite:
            check_unused(out)
        if found:
            print(f"--overwrite: removing the earlier run's files from {out}", file=sys.stderr)
            remove(found)
        run_id = uuid.uuid4().hex[:12]
    remove(orphans(out))
    return run_id


def check_unused(out: Path) -> None:
    """A fresh run's out_dir may not hold another run's files."""
    found = run_files(out)
    if found:
        shown = ", ".join(str(p.relative_to(out)) for p in found[:3])
        raise UserError(f"--out_dir {out} holds an earlier run ({shown}{', ...' if len(found) > 3 else ''}); "
                        "continue it with --resume true, replace it with --overwrite true, or choose another "
                        "--out_dir")


def check_out_dir(args) -> None:
    """out_dir must be a writable directory (or creatable) that is neither the base nor the data, nor holds them:
    --overwrite removes run files, and the base's lit_model.pth or tokenizer must never be among them."""
    out = check_output_dir("--out_dir", Path(args.out_dir), "a fine-tuning run", base=args.checkpoint_dir,
                           data=data_dir(args.data))
    for flag, path in (("--checkpoint_dir", Path(args.checkpoint_dir)), ("--data", data_dir(args.data))):
        if out.resolve() in path.resolve().parents:
            raise UserError(f"--out_dir {out} contains {flag} {path}; a run directory may not hold its inputs, "
                            "choose another --out_dir")
    if args.resume and args.overwrite:
        raise UserError("--resume true continues the run in --out_dir and --overwrite true replaces it; choose one")


# ---- what a run is ---------------------------------------------------------------------------------------------


def identity(args, method) -> dict:
    """Everything --resume must find unchanged to continue the same training, as it reads back from run.yaml."""
    ident = {"method": method.name, **{f"{method.name} {k}": v for k, v in method.config.items()},
             "base": fingerprint(args.checkpoint_dir), "data": data_fingerprint(data_dir(args.data)),
             "processes": args.devices * args.num_nodes, **{k: getattr(args, k) for k in SETTINGS},
             **({"packing": True} if args.packing else {})}  # recorded only when on: older runs match unpacked
    return yaml.safe_load(yaml.safe_dump(ident, sort_keys=False))  # tuples become lists, as when read back


def data_fingerprint(directory: Path) -> str:
    """A short hash of prepared data: meta.json and the prompt style whole, the splits by size, first and last MiB
    (torch.save's zip directory at the end holds a CRC-32 of every tensor, so other samples show)."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        if (Path(directory) / name).is_file():
            digest.update(name.encode() + b"\0")
            sample_file(digest, Path(directory) / name)
    return digest.hexdigest()[:16]


def record(args, method, run_id: str) -> None:
    """Write run.yaml: the run's id, where its base and data were, and what --resume compares."""
    entry = {"run_id": run_id, "checkpoint_dir": str(Path(args.checkpoint_dir).resolve()),
             "data": str(data_dir(args.data).resolve()), "must_match": identity(args, method)}
    atomic_write_text(Path(args.out_dir) / RECORD, yaml.safe_dump(entry, sort_keys=False))


def check_resume(args, method) -> str:
    """The recorded run's id, when it is the run asked for and its newest checkpoint can go on to --max_steps under
    --strategy; otherwise one line naming the first difference."""
    out = Path(args.out_dir)
    train_state.resumable(out)  # a checkpoint to resume from (whose run's, run.yaml says below)
    recorded = read_yaml_mapping(out / RECORD, missing=(
        f"--resume: {out} has no {RECORD} (started before litft recorded runs), so it cannot be checked; start "
        "it again with --overwrite true"))
    then, now = recorded.get("must_match") or {}, identity(args, method)
    for key in dict.fromkeys([*then, *now]):
        if then.get(key) != now.get(key):
            was, asked = show(key, then.get(key), recorded.get("checkpoint_dir"), recorded.get("data")), \
                show(key, now.get(key), Path(args.checkpoint_dir), data_dir(args.data))
            raise UserError(f"--resume: {out} was started with {was}, this run has {asked}; resume with the "
                            f"settings in {out / RECORD}, or start anew with --overwrite true or another --out_dir")
    if "run_id" not in recorded:
        raise UserError(f"--resume: {out / RECORD} records no run_id, so its checkpoints cannot be told from another "
                        "run's; start the run again with --overwrite true")
    run_id = str(recorded["run_id"])
    train_state.check_continues(train_state.resumable(out, run_id), args.max_steps, sharded=args.strategy == "fsdp")
    return run_id


def recorded(out_dir: Path, setting: str):
    """A setting run.yaml recorded when the run in out_dir started (--micro_batch_size auto resumes with it), or
    None (no run.yaml: --resume then says what is missing)."""
    if not (Path(out_dir) / RECORD).is_file():
        return None
    return (read_yaml_mapping(Path(out_dir) / RECORD, missing="").get("must_match") or {}).get(setting)


def show(key: str, value, base: Path, data: Path) -> str:
    """One setting as the user knows it: `--lora_r 8` style for flags, paths with fingerprints for base and data."""
    if key == "base":
        return f"base {base} (fingerprint {value})"
    if key == "data":
        return f"data {data} (fingerprint {value})"
    if key == "processes":
        return f"{value} process{'' if value == 1 else 'es'} (--devices × --num_nodes)"
    if key in SETTINGS:
        return f"--{key} {value}"
    if key == "packing":
        return f"--packing {bool(value)}"
    method, _, name = key.partition(" ")
    if name in ("r", "alpha", "dropout", "targets", "rslora") and method == "lora":  # the flag --lora_r sets r
        return f"--lora_{name} {','.join(value) if isinstance(value, list) else value}"
    if name in ("quantize", "prompt_length", "start_layer"):
        return f"--{name} {value}"
    return f"{key} {value}"  # "method lora", "lora new_tokens [...]"


# ---- files --------------------------------------------------------------------------------------------------------


def run_files(out: Path) -> list[Path]:
    """The run files present in `out` (see the top)."""
    if not out.is_dir():
        return []
    found = [out / name for name in RUN_FILES if (out / name).is_file()]
    found += sorted((out / "checkpoints").glob("step-*")) + sorted((out / "logs").glob("events.out.tfevents.*"))
    found += [p for p in (out / "logs" / "hparams.yaml",) if p.is_file()]
    return list(dict.fromkeys(found + orphans(out)))


def orphans(out: Path) -> list[Path]:
    """What a killed write leaves: `.<name>.*.tmp` files (litft.files.atomic_path) and checkpoints/*.tmp."""
    if not out.is_dir():
        return []
    return sorted(out.glob(".*.tmp")) + sorted((out / "checkpoints").glob("*.tmp"))


def remove(paths: list[Path]) -> None:
    """Remove these files and directories, then checkpoints/ and logs/ when that leaves them empty."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            os.remove(path)
    for folder in {p.parent for p in paths if p.parent.name in ("checkpoints", "logs")}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
