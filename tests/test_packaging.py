"""What `pip install .` puts in place: the wheel pip builds from pyproject.toml (the outside truth is pip and
setuptools) holds every module of the litft package, its sub-packages included."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT


def test_the_wheel_holds_every_litft_module(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy, so the build's files land outside the checkout
    shutil.copytree(ROOT / "litft", source / "litft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           str(source), "-w", str(tmp_path / "wheel")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "wheel").glob("litft-*.whl")
    packed = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    modules = {path.relative_to(source).as_posix() for path in (source / "litft").rglob("*.py")}
    assert modules - packed == set() and "litft/fast/fused_lora.py" in packed
