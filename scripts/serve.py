"""Serve a base model and any number of LoRA runs over it through an OpenAI-compatible HTTP API.

    python scripts/serve.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --lora games=out/lora/games/lit_model_lora.pth --lora alpaca=out/lora/alpaca/lit_model_lora.pth

Then any OpenAI client talks to http://127.0.0.1:8000/v1 with `model` set to the base's folder name
(SmolLM2-135M-Instruct) or a LoRA's name (games, alpaca). Requests that arrive together are decoded in one
batch, whichever LoRA each names (litft/engine.py); the API is litft/openai_api.py, the how-to howto/serve.md.
Every LoRA must have been trained on this base (its base.yaml fingerprint) and be one that rows of a batch can
share (no new tokens, no LoRA on the embedding: merge those with scripts/merge_lora.py and serve the result).
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from pathlib import Path

from litft.base_checkpoint import check_trained_on, ensure_checkpoint
from litft.cli import run
from litft.config import Config
from litft.engine import Engine
from litft.errors import UserError
from litft.fast import for_generation
from litft.generate import stop_token_ids
from litft.generate_cli import pick_precision
from litft.kinds import check_checkpoint
from litft.load_finetuned import load_finetuned, lora_settings, weights_in
from litft.multi_lora import add_loras, check_run
from litft.openai_api import Served, create_app
from litft.prompts import resolve_style
from litft.tokenizer import Tokenizer


def main(checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), lora: list[str] = [],
         host: str = "127.0.0.1", port: int = 8000, quantize: str | None = None, precision: str | None = None,
         max_batch_size: int = 32, max_tokens: int = 512, prompt_style: str | None = None,
         min_shared: int = 16) -> None:
    """Serve the base model and its LoRAs until interrupted (Ctrl-C).

    Args:
        checkpoint_dir: the base model (a lit checkpoint).
        lora: NAME=PATH, once per LoRA: a LoRA run's lit_model_lora.pth, served under NAME.
        host: the address to listen on; 127.0.0.1 serves this machine only.
        port: the TCP port.
        quantize: nf4 or nf4-dq: the base's linear weights in 4 bits (litft/qlora.py); a LoRA trained on an NF4
            base (QLoRA) needs its scheme here.
        precision: bf16-true, 16-true or 32-true (default: bf16-true on a GPU, 32-true on a CPU).
        max_batch_size: the most requests decoded together; later ones wait for a row to free up.
        max_tokens: the most tokens a reply gets when its request sets no max_tokens (and the context allows).
        prompt_style: how chat messages are laid out for the base model (default: its prompt_style.yaml or chat
            template); a LoRA's chat messages follow its own run's style.
        min_shared: requests of one model that join the batch together and begin with at least this many equal
            tokens (a chat template's system prompt) compute those once (litft/shared_prefix.py); 0: never.
    """
    import torch

    check_address(host, port)
    check_at_least(("--max_batch_size", max_batch_size, 1), ("--max_tokens", max_tokens, 1),
                   ("--min_shared", min_shared, 0))
    ensure_checkpoint(checkpoint_dir)
    serve_a_run = "serve it on its base: --checkpoint_dir {base} --lora NAME={path}"
    check_checkpoint(checkpoint_dir, advice={"lora": serve_a_run})
    runs = parse_loras(lora, checkpoint_dir, quantize)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, dtype = pick_precision(precision, device)
    load = lambda **kw: add_loras(load_finetuned(checkpoint_dir, quantize=quantize, **kw), runs, quantize)  # noqa: E731
    model = for_generation(load, device, dtype)  # the LoRAs stay apart from W: rows of a batch use different ones
    tokenizer = Tokenizer(checkpoint_dir)
    base_style = resolve_style(prompt_style, checkpoint_dir)
    models = {checkpoint_dir.name: served(checkpoint_dir.name, None, tokenizer, base_style)}
    for name, path in runs.items():
        models[name] = served(name, name, tokenizer, resolve_style(None, path.parent, checkpoint_dir))
    engine = Engine(model, max_batch_size, min_shared)
    app = create_app(engine, tokenizer, models, model.config.block_size, max_tokens)
    server, http = listen(app, host, port)
    print(f"serving {', '.join(models)} on http://{address(host, port)}/v1 ({device.type}, {precision}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop(engine))
    engine.run()  # until a signal
    server.should_exit = True
    http.join(timeout=30)
    print("stopped", file=sys.stderr)


def check_at_least(*limits: tuple[str, int, int]) -> None:
    """(flag, value, least) for each number a flag sets: one line for the first too small."""
    for flag, value, least in limits:
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")


def stop(engine: Engine) -> None:
    """The first Ctrl-C (or SIGTERM) lets the requests being decoded finish and refuses new ones (503); a second
    stops at once, ending their streams where they are."""
    if engine.stopping.is_set():
        raise KeyboardInterrupt
    print("stopping: the requests being answered finish first (Ctrl-C again to stop now)", file=sys.stderr, flush=True)
    engine.stop()


def listen(app, host: str, port: int) -> tuple["uvicorn.Server", threading.Thread]:  # noqa: F821
    """Serve `app` over HTTP from a thread of its own (the model stays on the main thread: litft/engine.py)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise UserError(f"cannot listen on {address(host, port)}; pass another --port or --host")
        time.sleep(0.05)
    return server, http


def check_address(host: str, port: int) -> None:
    """Fail before loading anything when the address cannot be listened on."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it ("" is 0.0.0.0)
        with socket.create_server((host, port), family=family):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {address(host, port)} ({e.strerror or e}); pass another --port or "
                        "--host") from None


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"  # IPv6 in brackets, as in a URL


def served(name: str, lora: str | None, tokenizer: Tokenizer, style) -> Served:
    return Served(name, lora, style, frozenset(stop_token_ids(tokenizer, style)))


def parse_loras(specs: list[str], checkpoint_dir: Path, quantize: str | None = None) -> dict[str, Path]:
    """NAME=PATH pairs -> {NAME: PATH}, each run checked against the base before anything is loaded."""
    runs, base = {}, Config.from_checkpoint(checkpoint_dir)
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise UserError(f"--lora {spec!r} is not NAME=PATH; e.g. --lora games=out/lora/games/lit_model_lora.pth")
        if name in runs or name == checkpoint_dir.name:
            raise UserError(f"--lora {name} is given twice (or is the base model's name); give each LoRA its own name")
        runs[name] = weights_in(Path(path))  # a run directory: its lit_model_lora.pth
        if not runs[name].is_file():
            what = "does not exist" if not Path(path).exists() else "is no LoRA run's weights file"
            raise UserError(f"--lora {name}: {path} {what}; pass the run's directory or its lit_model_lora.pth")
        lora_settings(runs[name])  # an adapter run is named as such
        check_trained_on(runs[name].parent, checkpoint_dir, f"--lora {name} ({path})")
        check_run(name, runs[name], base, quantize)  # one that cannot share a batch, or needs --quantize
    return runs


def repeated_lora_flags(args: list[str]) -> list[str]:
    """`--lora A --lora B` (and `--lora=A`) as the command-line parser appends to a list: `--lora+ A --lora+ B`."""
    return [("--lora+" if a == "--lora" else "--lora+=" + a[len("--lora="):] if a.startswith("--lora=") else a)
            for a in args]


if __name__ == "__main__":
    run(main, repeated_lora_flags(sys.argv[1:]))
