"""Chat with a model in the terminal, in the model's own chat format.

    python generate/chat.py                                    # SmolLM2-135M-Instruct (the default base)
    python generate/chat.py --lora_path out/demo/lora60/lit_model_lora.pth --temperature 0
    python generate/chat.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-chat-hf --quantize nf4

Every turn the whole conversation is laid out in the prompt style (litft/conversation.py: the checkpoint's chat
template, or the run's prompt_style.yaml, or --prompt_style) and the reply is streamed to stdout as it is
produced; the `>>> ` prompt and notices go to stderr. `/reset` starts a new conversation, `/exit` or Ctrl-D
ends the session. Ctrl-C during a reply stops it and returns to the prompt, the unfinished exchange (the message
and the partial reply) left out of the conversation; Ctrl-C at the prompt ends the session. When the conversation
no longer fits the model's context with --max_new_tokens to spare, the oldest turns are dropped (the --system
message stays) and a notice on stderr says how many.
"""

from __future__ import annotations

import sys
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from litft.base_checkpoint import DEFAULT_CHECKPOINT, ensure_checkpoint, resolve_run
from litft.cli import run
from litft.config import Config
from litft.conversation import fit_conversation, turn_stops
from litft.errors import UserError
from litft.fast import for_generation
from litft.files import run_dir_of
from litft.generate import generate, stop_token_ids
from litft.generate_cli import check_sampling, pick_precision, stream
from litft.kinds import check_checkpoint
from litft.load_finetuned import detect_method, load_finetuned, tokenizer_dir
from litft.prompts import PromptStyle, resolve_style
from litft.tokenizer import Tokenizer

# what to do with a directory of another kind than a flag takes (litft/kinds.py), in this program's own flags
ADVICE = {"lora": "chat with it with --lora_path {path}", "adapter": "chat with it with --adapter_path {path}",
          "adapter_v2": "chat with it with --adapter_path {path}", "full": "chat with it with --checkpoint_dir {path}",
          "checkpoint": "chat with it with --checkpoint_dir {path}"}


@dataclass
class Chat:
    """A loaded model and how its conversations are written and sampled."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    style: Optional[PromptStyle]
    device: torch.device
    max_new_tokens: int
    sampling: dict  # temperature, top_k, top_p, generator: litft.generate.generate's keywords


def main(checkpoint_dir: Optional[Path] = None, lora_path: Optional[Path] = None, adapter_path: Optional[Path] = None,
         system: Optional[str] = None, max_new_tokens: int = 256, temperature: float = 0.8, top_k: Optional[int] = 50,
         top_p: float = 1.0, seed: int = 1234, precision: Optional[str] = None, prompt_style: Optional[str] = None,
         quantize: Optional[str] = None, fast: bool = True) -> None:
    """Chat in the terminal with a model, optionally with a LoRA or LLaMA-Adapter run's weights on it.

    Args:
        checkpoint_dir: the base model (default: SmolLM2-135M-Instruct, converted on first use; with --lora_path
            or --adapter_path, the base the run was trained on).
        lora_path: a LoRA run's lit_model_lora.pth; its folder holds lora.yaml, prompt_style.yaml, base.yaml.
        adapter_path: a LLaMA-Adapter (v1 or v2) run's weights file.
        system: a system message that opens every conversation (and survives the dropping of old turns).
        max_new_tokens: the longest reply, in tokens; also the room kept free in the context for it.
        temperature: 0 is greedy (deterministic); higher is more random.
        top_k: sample among the k most likely tokens (null: no limit).
        top_p: sample among the most likely tokens whose probabilities add up to top_p (1.0: no limit).
        seed: seed of the random generator, so a session's sampling is reproducible.
        precision: bf16-true, 16-true or 32-true (default: bf16-true on a GPU, 32-true on a CPU).
        prompt_style: the chat format (chatml, smollm2, llama2-chat, chat-template, alpaca, plain); by default the
            run's or checkpoint's prompt_style.yaml, else the checkpoint's chat template.
        quantize: nf4 or nf4-dq: the blocks' linear weights in 4 bits (howto/qlora.md).
        fast: apply litft/fast's decoding measures; false decodes with the model exactly as loaded.
    """
    check_sampling(temperature, top_k, top_p)
    checkpoint_dir, weights_path, method = which_model(checkpoint_dir, lora_path, adapter_path)
    block_size = Config.from_checkpoint(checkpoint_dir).block_size
    if not 0 < max_new_tokens < block_size:
        raise UserError(f"--max_new_tokens must be between 1 and the model's block_size - 1 ({block_size - 1}), "
                        f"got {max_new_tokens}")
    run_dir = None if weights_path is None else run_dir_of(weights_path)
    style = resolve_style(prompt_style, *(d for d in (run_dir, checkpoint_dir) if d is not None))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, dtype = pick_precision(precision, device)
    load = partial(load_finetuned, checkpoint_dir, weights_path=weights_path, method=method, quantize=quantize)
    model = for_generation(load, device, dtype, fast)
    weights = f"{checkpoint_dir}{f' + {weights_path}' if weights_path else ''}"
    print(f"loaded {weights} ({device.type}, {precision}{f', {quantize}' if quantize else ''}), prompt style: "
          f"{style.name if style else 'none'}; /reset clears the conversation, /exit quits", file=sys.stderr)
    generator = torch.Generator(device).manual_seed(seed)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator}
    chat = Chat(model, Tokenizer(tokenizer_dir(run_dir, checkpoint_dir)), style, device, max_new_tokens, sampling)
    converse(chat, system)


def which_model(checkpoint_dir: Optional[Path], lora_path: Optional[Path],
                adapter_path: Optional[Path]) -> tuple[Path, Optional[Path], Optional[str]]:
    """(base checkpoint, the run's weights file or None, its method) from the flags, as generate/*.py read them."""
    if lora_path is not None and adapter_path is not None:
        raise UserError("pass --lora_path or --adapter_path, not both")
    if lora_path is not None:
        lora_path, checkpoint_dir = resolve_run("lora", lora_path, checkpoint_dir, flag="lora_path", advice=ADVICE)
        return checkpoint_dir, lora_path, "lora"
    if adapter_path is not None:
        adapter_path, checkpoint_dir = resolve_run("adapter", adapter_path, checkpoint_dir, flag="adapter_path",
                                                   advice=ADVICE)
        if (method := detect_method(adapter_path)) not in ("adapter", "adapter_v2"):
            raise UserError(f"{adapter_path} is not a LLaMA-Adapter run (no adapter.yaml or adapter_v2.yaml beside "
                            "it); pass a lit_model_adapter.pth or lit_model_adapter_v2.pth")
        return checkpoint_dir, adapter_path, method
    checkpoint_dir = Path(checkpoint_dir or DEFAULT_CHECKPOINT)
    ensure_checkpoint(checkpoint_dir)  # the default base is converted on first use; any other must exist
    check_checkpoint(checkpoint_dir, advice=ADVICE)
    return checkpoint_dir, None, None


def converse(chat: Chat, system: Optional[str]) -> None:
    """Read a line, answer it, until /exit or end of input. /reset forgets everything but the system message."""
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    while (line := read_line()) is not None and line.strip() != "/exit":
        if line.strip() == "/reset":
            messages = list(opening)
            print("(new conversation)", file=sys.stderr)
        elif line.strip():
            messages = reply(chat, messages + [{"role": "user", "content": line}]) or messages


def read_line() -> Optional[str]:
    """One line from the user (the prompt on stderr, so stdout holds the replies only); None at end of input."""
    print(">>> ", end="", file=sys.stderr, flush=True)
    try:
        return input()
    except EOFError:
        print(file=sys.stderr)
        return None


def reply(chat: Chat, messages: list[dict]) -> Optional[list[dict]]:
    """Stream the model's answer to the conversation; return the conversation with it (None: a user error, or
    Ctrl-C during the reply, which stops it: the session goes on without this message)."""
    try:
        return answer(chat, messages)
    except UserError as e:  # this message cannot be answered
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(flush=True)  # end the partial reply's line on stdout
        print("(reply interrupted; this message and the partial reply are left out of the conversation)",
              file=sys.stderr)
    return None


def answer(chat: Chat, messages: list[dict]) -> list[dict]:
    """The conversation (its oldest turns dropped if it must fit) with the reply, streamed as it comes, at its end."""
    kept, ids = fit_conversation(chat.tokenizer, chat.style, messages, chat.model.config.block_size,
                                 chat.max_new_tokens)
    if dropped := len(messages) - len(kept):
        print(f"(dropped the {dropped} oldest messages to fit the context of {chat.model.config.block_size} tokens)",
              file=sys.stderr)
    stops = stop_token_ids(chat.tokenizer, chat.style)
    # closed at once even when interrupted, so the KV cache is freed before the next reply allocates its own
    with closing(generate(chat.model, ids.to(chat.device), chat.max_new_tokens, stop_ids=stops,
                          **chat.sampling)) as tokens:
        text, _ = stream(tokens, chat.tokenizer, turn_stops(chat.style))
    return kept + [{"role": "assistant", "content": text}]


if __name__ == "__main__":
    run(main)
