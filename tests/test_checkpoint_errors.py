"""Bad checkpoints a user can hand the CLIs: each ends in one `error:` line, exit status != 0, and no output.

scripts/convert_lit_checkpoint.py is the CLI under test: it reads a lit checkpoint (config, weights, shapes)
exactly as every generate/finetune script does, through litft.checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_user_error, run_main, run_script

from litft.config import CONFIGS, Config
from litft.model import Llama


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    from litft.checkpoint import save_lit_checkpoint

    d = tmp_path_factory.mktemp("good")
    save_lit_checkpoint(Llama(Config.from_name("tiny-gqa")), d)
    return d


def convert_lit(checkpoint_dir: Path, out: Path, *fragments: str) -> None:
    proc = run_main("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", checkpoint_dir, "--output_dir", out)
    assert_user_error(proc, *fragments)
    assert not out.exists(), list(out.iterdir())


def test_missing_checkpoint_dir(tmp_path):
    convert_lit(tmp_path / "nowhere", tmp_path / "out", "does not exist")
    proc = run_main("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "nowhere")
    assert_user_error(proc, "does not exist")


def test_dir_without_config(tmp_path, good_checkpoint):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "lit_model.pth").write_bytes((good_checkpoint / "lit_model.pth").read_bytes())
    convert_lit(tmp_path / "ckpt", tmp_path / "out", "no model_config.yaml")
    proc = run_main("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "ckpt")
    assert_user_error(proc, "no config.json")


def test_weights_that_do_not_match_the_config(tmp_path, good_checkpoint):
    from litft.checkpoint import save_lit_checkpoint

    save_lit_checkpoint(Llama(Config.from_name("tiny-mha", n_embd=32)), tmp_path / "ckpt")
    Config.from_name("tiny-mha").save(tmp_path / "ckpt")  # config says width 64, weights are width 32
    convert_lit(tmp_path / "ckpt", tmp_path / "out", "embed.weight has shape (256, 32)", "(256, 64)")


def test_truncated_weights(tmp_path, good_checkpoint):
    (tmp_path / "ckpt").mkdir()
    data = (good_checkpoint / "lit_model.pth").read_bytes()
    (tmp_path / "ckpt" / "lit_model.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "ckpt" / "model_config.yaml").write_bytes((good_checkpoint / "model_config.yaml").read_bytes())
    convert_lit(tmp_path / "ckpt", tmp_path / "out", "truncated")


class RunsCode:
    """Unpickling this object would call open(marker, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pickle_that_runs_code_is_refused(tmp_path, good_checkpoint, fmt):
    (tmp_path / "ckpt").mkdir()
    marker = tmp_path / "pwned"
    state = {"embed.weight": RunsCode(marker)}
    torch.save(state, tmp_path / "ckpt" / "lit_model.pth", _use_new_zipfile_serialization=fmt == "zip")
    (tmp_path / "ckpt" / "model_config.yaml").write_bytes((good_checkpoint / "model_config.yaml").read_bytes())
    convert_lit(tmp_path / "ckpt", tmp_path / "out", "refused")
    assert not marker.exists()


# ---- the Hub ---------------------------------------------------------------------------------------------

def download(*args: str, **env: str) -> subprocess.CompletedProcess:
    """scripts/download.py with a private HF_HOME (no saved token, no cache) and the given environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": env.pop("HF_HOME"), **env}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts/download.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_download_offline_is_one_line(tmp_path):
    proc = download("--repo_id", "HuggingFaceTB/SmolLM2-135M-Instruct", "--checkpoint_dir", tmp_path / "c",
                    HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert_user_error(proc, "offline", "convert_gguf_checkpoint.py")
    assert not (tmp_path / "c").exists()


def test_download_unreachable_hub_is_one_line(tmp_path):
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as server:
        port = server.server_address[1]  # bound, then closed below: nothing listens there
    proc = download("--repo_id", "HuggingFaceTB/SmolLM2-135M-Instruct", "--checkpoint_dir", tmp_path / "c",
                    HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert_user_error(proc, "cannot reach", "convert_gguf_checkpoint.py")


class GatedHub(BaseHTTPRequestHandler):
    """Answers like huggingface.co for a gated repository: metadata is public, files need an accepted license."""

    def do_GET(self):
        files = ["config.json", "model.safetensors"]
        if self.path.startswith("/api/models/"):
            if "/tree/" in self.path:  # the file listing
                body = json.dumps([{"type": "file", "path": f, "size": 10, "oid": "0" * 40} for f in files])
            else:  # model info
                body = json.dumps({"id": "org/gated", "sha": "0" * 40, "gated": "manual", "private": False,
                                   "siblings": [{"rfilename": f} for f in files]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())
        else:
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model org/gated is restricted.")
            self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_download_gated_without_token_is_one_line(tmp_path):
    with ThreadingHTTPServer(("127.0.0.1", 0), GatedHub) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        proc = download("--repo_id", "org/gated", "--checkpoint_dir", tmp_path / "c", HF_HOME=str(tmp_path / "hf"),
                        HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}")
        server.shutdown()
    assert_user_error(proc, "gated", "--access_token")
    assert not (tmp_path / "c" / "org" / "gated").exists()


def test_download_list_prints_named_repos():
    proc = run_script("scripts/download.py", "--repo_id", "list", check=True)
    repos = proc.stdout.split()
    assert "meta-llama/Llama-2-7b-hf" in repos and "HuggingFaceTB/SmolLM2-135M-Instruct" in repos
    assert set(repos) == {c.hf_repo for c in CONFIGS.values() if c.hf_repo}
