"""Conversations (litft/conversation.py) and the chat program (generate/chat.py) against outside truth.

Truth for the layout: transformers' `apply_chat_template(messages, add_generation_prompt=True)` on the same
tokenizer directories — SmolLM2-135M-Instruct's real tokenizer and chat template (rebuilt from the offline GGUF),
the Llama-3 and Qwen2.5 layouts of test_chat_formats.py, and meta-llama/Llama-2-7b-chat-hf's chat template on a
Llama-settings sentencepiece model in transformers' legacy mode, which encodes text after a special token as
sentencepiece encodes a sequence start: the ids Meta's llama code builds, one BOS ... EOS sequence per exchange.
Truth for the program: `litft.generate.generate`, greedy, run in-process on the conversation's prompt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import random
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_user_error, run_main, tiny_bpe
from test_chat_formats import llama3_dir, qwen_dir  # noqa: F401 (fixtures: the Llama-3 and Qwen2.5 layouts)
from test_tokenizer import smollm2_dir  # noqa: F401 (fixture: SmolLM2's tokenizer files and chat template)

from litft.adapter import AdapterConfig, adapter_state_dict, add_adapter
from litft.adapter_v2 import AdapterV2Config, adapter_v2_state_dict, add_adapter_v2
from litft.base_checkpoint import record_base
from litft.checkpoint import load_lit_model, save_lit_checkpoint
from litft.config import Config
from litft.conversation import encode_conversation, fit_conversation, render_conversation, validate_messages
from litft.errors import UserError
from litft.fast import for_generation
from litft.files import save_state_dict
from litft.generate import generate, stop_token_ids
from litft.hf_prompting import write_tokenizer_config
from litft.load_finetuned import load_finetuned
from litft.lora import LoRAConfig, add_lora, lora_state_dict
from litft.model import Llama
from litft.prompts import PromptStyle, resolve_style
from litft.stop_strings import StopStrings
from litft.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You answer in one word."}
CONVERSATIONS = [
    [{"role": "user", "content": "What is LoRA?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
     {"role": "user", "content": "  Another one, café 🦙?  "}],
    [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! "},
     {"role": "user", "content": "Two\nlines"}, {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Bye"}],
]

# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json "chat_template", as published.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def llama2_dir(sentencepiece_model, tmp_path_factory) -> Path:
    """Llama-2-chat's tokenizer settings (<s> 1, </s> 2, BOS added) and chat template, in transformers' legacy mode."""
    directory = tmp_path_factory.mktemp("llama2")
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "legacy": True, "tokenizer_class": "LlamaTokenizer",
        "chat_template": LLAMA2_TEMPLATE, "clean_up_tokenization_spaces": False}))
    return directory


def hf_chat(directory: Path, messages: list[dict], tokenize: bool):
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize, return_dict=False)


# ---- the layout: transformers' apply_chat_template -----------------------------------------------------------


@pytest.mark.parametrize("family", ["smollm2", "llama3", "qwen"])
def test_chat_template_conversations_equal_transformers(family, request):
    directory = request.getfixturevalue(f"{family}_dir")
    style, tokenizer = resolve_style(None, directory), Tokenizer(directory)  # the checkpoint's own template
    for messages in CONVERSATIONS:
        assert render_conversation(style, messages) == hf_chat(directory, messages, tokenize=False)
        assert encode_conversation(tokenizer, style, messages).tolist() == hf_chat(directory, messages, tokenize=True)


def test_smollm2_and_chatml_styles_are_smollm2s_template(smollm2_dir):
    """smollm2 adds the default system turn only when the messages have none; chatml never adds one."""
    default_turn = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    for messages in CONVERSATIONS:
        expected = hf_chat(smollm2_dir, messages, tokenize=False)
        assert render_conversation(PromptStyle("smollm2"), messages) == expected
        chatml = render_conversation(PromptStyle("chatml"), messages)
        assert chatml == (expected if messages[0]["role"] == "system" else expected.removeprefix(default_turn))
    one_turn = CONVERSATIONS[0]
    for name in ("smollm2", "chatml"):  # one user turn: what generate/*.py and data_prep write
        assert render_conversation(PromptStyle(name), one_turn) == PromptStyle(name).apply(one_turn[0]["content"])


def test_llama2_chat_is_metas_layout(llama2_dir):
    style, tokenizer = PromptStyle("llama2-chat"), Tokenizer(llama2_dir)
    for messages in CONVERSATIONS:
        assert "<s>" + render_conversation(style, messages) == hf_chat(llama2_dir, messages, tokenize=False)
        ids = encode_conversation(tokenizer, style, messages).tolist()
        assert ids == hf_chat(llama2_dir, messages, tokenize=True)
        assert ids.count(1) == len(messages) // 2 + (messages[0]["role"] != "system")  # BOS per exchange
    assert render_conversation(style, CONVERSATIONS[0]) == style.apply("What is LoRA?")
    with pytest.raises(UserError, match="alternate user, assistant"):
        render_conversation(style, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_alpaca_takes_the_earlier_turns_as_input_and_plain_ends_with_the_question():
    """alpaca: the last message is the instruction, the earlier turns its input. plain has no turns and continues
    text, so the prompt must end with the question and the assistant's cue, never in the history."""
    messages = CONVERSATIONS[2]
    context = ("System: You answer in one word.\nUser: Hi\nAssistant: Hello! \nUser: Two\nlines\nAssistant: Yes.")
    assert render_conversation(PromptStyle("alpaca"), messages) == PromptStyle("alpaca").apply("Bye", context)
    assert render_conversation(PromptStyle("plain"), messages) == context + "\nUser: Bye\nAssistant:"
    assert render_conversation(None, messages) == render_conversation(PromptStyle("plain"), messages)
    for style in (PromptStyle("alpaca"), PromptStyle("plain")):
        assert render_conversation(style, CONVERSATIONS[0]) == style.apply("What is LoRA?")


# ---- validation: one line each ---------------------------------------------------------------------------------


@pytest.mark.parametrize("messages,fragment", [
    (None, "non-empty list"), ([], "non-empty list"), ("Hi", "non-empty list"),
    (["Hi"], "messages[0] must be an object"),
    ([{"role": "tool", "content": "x"}],
     "messages[0].role must be one of system, user, assistant (or developer, for system), got 'tool'"),
    ([{"content": "x"}], "messages[0].role must be one of"),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string (or a list of text parts), got int"),
    ([{"role": "user"}], "messages[0].content must be a string (or a list of text parts), got NoneType"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content has parts of type 'image_url'; only text is supported"),
    ([{"role": "user", "content": [{"type": "text"}]}], "must be a string (or a list of text parts), got list"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "last message must be the user's"),
])
def test_invalid_messages_are_one_line_user_errors(messages, fragment):
    with pytest.raises(UserError) as error:
        validate_messages(messages)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_text_parts_and_the_developer_role_read_as_openai_defines_them():
    """OpenAI's API lets content be a list of parts ({"type": "text", "text": ...}, joined) and calls the system
    message "developer" in its newer models; both mean what the plain spelling means."""
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert validate_messages(parts) == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]


# ---- dropping the oldest turns ---------------------------------------------------------------------------------


def test_fit_conversation_drops_the_oldest_turns_and_keeps_the_system_message(smollm2_dir):
    style, tokenizer = resolve_style(None, smollm2_dir), Tokenizer(smollm2_dir)
    messages = CONVERSATIONS[2]  # system, (user, assistant), (user, assistant), user
    length = {n: len(encode_conversation(tokenizer, style, [SYSTEM, *messages[n:]])) for n in (1, 3, 5)}
    assert length[1] > length[3] > length[5]
    kept, ids = fit_conversation(tokenizer, style, messages, block_size=length[1] + 10, reply_tokens=10)
    assert kept == messages and ids.tolist() == hf_chat(smollm2_dir, messages, tokenize=True)
    for block_size, first in ((length[1] + 9, 3), (length[3] + 10, 3), (length[3] + 9, 5), (length[5] + 10, 5)):
        kept, ids = fit_conversation(tokenizer, style, messages, block_size=block_size, reply_tokens=10)
        assert kept == [SYSTEM, *messages[first:]]
        assert ids.tolist() == hf_chat(smollm2_dir, kept, tokenize=True)
    alone = len(hf_chat(smollm2_dir, [SYSTEM, {"role": "user", "content": ""}], tokenize=True))  # its share
    with pytest.raises(UserError, match=rf"prompt of {length[5]} tokens \(the system message, kept in every prompt, "
                                        rf"takes {alone} of them with the turn's framing\).*block_size \({length[5] + 9}\); shorten the message "
                                        "or the system message"):
        fit_conversation(tokenizer, style, messages, block_size=length[5] + 9, reply_tokens=10)
    with pytest.raises(UserError, match="max_new_tokens must be between 1 and"):
        fit_conversation(tokenizer, style, messages, block_size=100, reply_tokens=100)


def test_fit_conversation_drops_messages_that_do_not_alternate_one_turn_at_a_time(smollm2_dir):
    """OpenAI's API takes two user messages in a row, or an assistant message first: each older user message
    starts a turn of its own, and the leading assistant message is dropped with the first turn."""
    tokenizer, style = Tokenizer(smollm2_dir), resolve_style(None, smollm2_dir)
    long, short = {"role": "user", "content": "red " * 200}, {"role": "user", "content": "Bye"}
    opener = {"role": "assistant", "content": "Hello, how can I help?"}
    for messages in ([SYSTEM, long, short], [SYSTEM, opener, long, short], [opener, long, short]):
        expected = [m for m in (SYSTEM, short) if m in messages]
        block_size = len(hf_chat(smollm2_dir, expected, tokenize=True)) + 10  # room for the last message only
        kept, ids = fit_conversation(tokenizer, style, messages, block_size=block_size, reply_tokens=10)
        assert kept == expected and ids.tolist() == hf_chat(smollm2_dir, kept, tokenize=True), messages


# ---- the program, in a pseudo-terminal -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_checkpoint(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE and SmolLM2's chat template: a chat model that is fast to run.
    Its output head scores only letters and space (the other rows are zero), so its replies are printable text."""
    directory = tmp_path_factory.mktemp("chat_checkpoint")
    tokenizer = tiny_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    template = json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": template}))
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny-gqa", vocab_size=tokenizer.get_vocab_size(), block_size=512))
    printable = [tokenizer.token_to_id(tokenizer.encode(c).tokens[0]) for c in "abcdefghijklmnopqrstuvwxyz "]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
        silent = torch.ones(model.config.vocab_size, dtype=torch.bool).index_fill_(0, torch.tensor(printable), False)
        model.lm_head.weight[silent] = 0
    save_lit_checkpoint(model, directory)
    return directory


class Terminal:
    """A program whose stdin, stdout and stderr are a pseudo-terminal (no echo, output bytes as written)."""

    def __init__(self, *args: str) -> None:
        self.fd, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n", so the transcript is what the program printed
        attrs[3] &= ~termios.ECHO  # the typed lines are not part of the transcript
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, *args], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                     env=env, start_new_session=True)
        os.close(slave)
        self.output = b""

    def wait_for(self, text: str, count: int, timeout: float = 60) -> str:
        """Read until `text` has appeared `count` times in the whole output; return the output."""
        return self.wait_until(lambda out: out.count(text) >= count, f"{text!r} #{count}", timeout)

    def wait_until(self, done, what: str, timeout: float = 60) -> str:
        """Read until done(the whole output so far) is true; return the output."""
        deadline = time.monotonic() + timeout
        while not done(self.output.decode(errors="replace")):
            if not select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise AssertionError(f"no {what} within {timeout} s; output:\n{self.output.decode()}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the program closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the program ended before {what}; output:\n{self.output.decode()}")
            self.output += chunk
        return self.output.decode(errors="replace")

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def close(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.fd)


def greedy_reply(model, tokenizer: Tokenizer, style, messages: list[dict], max_new_tokens: int) -> str:
    ids = encode_conversation(tokenizer, style, messages)
    return tokenizer.decode(list(generate(model, ids, max_new_tokens, temperature=0,
                                          stop_ids=stop_token_ids(tokenizer, style))))


def test_chat_in_a_terminal_answers_as_generate_does(chat_checkpoint, tmp_path):
    """Three turns (the third drops the first to fit the context), /reset, a message too long for the context
    (one error line, the session goes on), one more turn, /exit: every reply is what `generate` gives greedily
    for the conversation so far, and the program exits with status 0."""
    n, checkpoint = 12, shutil.copytree(chat_checkpoint, tmp_path / "checkpoint")
    model = for_generation(partial(load_finetuned, chat_checkpoint), "cpu", torch.float32)
    tokenizer, style = Tokenizer(chat_checkpoint), resolve_style(None, chat_checkpoint)

    def turns(*contents: str) -> list[dict]:
        return [{"role": role, "content": c} for role, c in zip(["user", "assistant"] * 3, contents)]

    def length(*contents: str) -> int:
        return len(encode_conversation(tokenizer, style, turns(*contents)))

    user = ["red green blue cat dog one two three colour animal number " * 4, "one cat", "two dog", "blue"]
    a1 = greedy_reply(model, tokenizer, style, turns(user[0]), n)
    a2 = greedy_reply(model, tokenizer, style, turns(user[0], a1, user[1]), n)
    a3 = greedy_reply(model, tokenizer, style, turns(user[1], a2, user[2]), n)  # the first turn dropped
    a4 = greedy_reply(model, tokenizer, style, turns(user[3]), n)
    assert all(a.strip() for a in (a1, a2, a3, a4)), "the tiny model should say something"
    block_size = max(length(user[0], a1, user[1]), length(user[1], a2, user[2])) + n
    assert length(user[0], a1, user[1], a2, user[2]) + n > block_size  # so turn three must drop turn one
    replace(Config.from_checkpoint(checkpoint), block_size=block_size).save(checkpoint)
    too_long = "red " * block_size
    with pytest.raises(UserError) as error:
        fit_conversation(tokenizer, style, turns(too_long), block_size, n)

    term = Terminal("generate/chat.py", "--checkpoint_dir", str(checkpoint), "--temperature", "0",
                    "--max_new_tokens", str(n))
    try:
        for i, line in enumerate([user[0], user[1], user[2], "/reset", too_long, user[3], "/exit"]):
            term.wait_for(">>> ", i + 1)
            term.type(line)
    finally:
        status = term.close()
    transcript = term.output.decode()
    assert status == 0, transcript
    header, _, session = transcript.partition("\n")
    assert "prompt style: chat-template" in header, transcript
    dropped = f"(dropped the 2 oldest messages to fit the context of {block_size} tokens)\n"
    assert session == (f">>> {a1}\n>>> {a2}\n>>> {dropped}{a3}\n>>> (new conversation)\n"
                       f">>> error: {error.value}\n>>> {a4}\n>>> ")


INTERRUPTED = "(reply interrupted; this message and the partial reply are left out of the conversation)\n"


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(chat_checkpoint):
    """SIGINT (what Ctrl-C sends) while a reply streams: the reply stops, a notice says so, and the next message
    gets what `generate` gives greedily for that message alone (the interrupted exchange is not in the
    conversation); /exit then ends the session with status 0. The tiny model never emits a stop token, so each
    reply is n tokens long: the signal comes after the first 10 characters, with hundreds of tokens to go."""
    n = 200
    model = for_generation(partial(load_finetuned, chat_checkpoint), "cpu", torch.float32)
    tokenizer, style = Tokenizer(chat_checkpoint), resolve_style(None, chat_checkpoint)
    expected = greedy_reply(model, tokenizer, style, [{"role": "user", "content": "two dog"}], n)

    term = Terminal("generate/chat.py", "--checkpoint_dir", str(chat_checkpoint), "--temperature", "0",
                    "--max_new_tokens", str(n))
    try:
        term.wait_for(">>> ", 1)
        term.type("one cat")
        term.wait_until(lambda out: len(out.rpartition(">>> ")[2]) >= 10, "10 characters of the reply")
        term.proc.send_signal(signal.SIGINT)
        term.wait_for(">>> ", 2)
        term.type("two dog")
        term.wait_for(">>> ", 3, timeout=120)
        term.type("/exit")
    finally:
        status = term.close()
    transcript = term.output.decode()
    assert status == 0, transcript
    partial_reply, _, rest = transcript.partition("\n>>> ")[2].partition("\n")
    assert len(partial_reply) >= 10 and rest == f"{INTERRUPTED}>>> {expected}\n>>> ", transcript


def test_ctrl_c_at_the_prompt_ends_the_session(chat_checkpoint):
    """At the prompt, Ctrl-C ends the session as it ends every litft script: one line, the shell's status 130."""
    term = Terminal("generate/chat.py", "--checkpoint_dir", str(chat_checkpoint), "--temperature", "0")
    try:
        term.wait_for(">>> ", 1)
        term.proc.send_signal(signal.SIGINT)
        term.wait_for("error: interrupted\n", 1)
    finally:
        status = term.close()
    assert status == 130 and term.output.decode().endswith("\n>>> error: interrupted\n"), term.output.decode()


RUNS = {  # method: (its config, how it is added to a model, what a run saves, the weights file, the flag)
    "lora": (LoRAConfig(r=4, alpha=8), add_lora, lora_state_dict, "lit_model_lora.pth", "--lora_path"),
    "adapter": (AdapterConfig(prompt_length=4, start_layer=0), add_adapter, adapter_state_dict,
                "lit_model_adapter.pth", "--adapter_path"),
    "adapter_v2": (AdapterV2Config(prompt_length=4, start_layer=0), add_adapter_v2, adapter_v2_state_dict,
                   "lit_model_adapter_v2.pth", "--adapter_path"),
}


def make_run(base: Path, run_dir: Path, method: str) -> Path:
    """A run directory as finetune/<method>.py leaves it (ChatML, base.yaml), its trained tensors random."""
    config, add, state_dict, weights, _ = RUNS[method]
    model = add(load_lit_model(base), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("lm_head"):  # the head keeps scoring printable text only
                p.add_(torch.randn_like(p), alpha=0.5)
    save_state_dict(state_dict(model), run_dir / weights)
    config.save(run_dir)
    PromptStyle("chatml").save(run_dir)
    record_base(run_dir, base)
    return run_dir / weights


@pytest.mark.parametrize("method", list(RUNS))
def test_chat_with_a_run_answers_as_the_run_does(chat_checkpoint, tmp_path, method):
    """The run's path alone: the base comes from its base.yaml, the prompt style from its prompt_style.yaml, and
    the reply is the fine-tuned model's greedy answer (not the base model's). Input from a pipe works too."""
    weights = make_run(chat_checkpoint, tmp_path, method)
    tokenizer, style, question = Tokenizer(chat_checkpoint), PromptStyle("chatml"), [{"role": "user", "content": "one cat"}]
    tuned = partial(load_finetuned, chat_checkpoint, weights_path=weights, method=method)
    expected = greedy_reply(for_generation(tuned, "cpu", torch.float32), tokenizer, style, question, 12)
    base = partial(load_finetuned, chat_checkpoint)
    assert expected != greedy_reply(for_generation(base, "cpu", torch.float32), tokenizer, style, question, 12)
    proc = subprocess.run([sys.executable, "generate/chat.py", RUNS[method][-1], str(weights), "--temperature", "0",
                           "--max_new_tokens", "12"], input="one cat\n", capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n" and "prompt style: chatml" in proc.stderr


def test_end_of_input_ends_the_session(chat_checkpoint):
    term = Terminal("generate/chat.py", "--checkpoint_dir", str(chat_checkpoint), "--temperature", "0")
    try:
        term.wait_for(">>> ", 1)
        os.write(term.fd, b"\x04")  # Ctrl-D on an empty line: end of input
    finally:
        status = term.close()
    assert status == 0, term.output.decode()


# A model that writes " Red.\nUser: Red.\nUser: ..." after any prompt ending in ":", as a base model in a plain
# transcript goes on to write the user's next line. One layer whose attention and MLP add nothing, so the last
# hidden state is the current token's embedding: the next token depends on the current one alone (a bigram model).
PARROT = {":": " Red", " Red": ".", ".": "\n", "\n": "User", "User": ":"}


@pytest.fixture(scope="module")
def parrot_checkpoint(smollm2_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("parrot")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, directory / name)
    tokenizer = Tokenizer(directory)
    config = Config.from_name("tiny-gqa", n_layer=1, vocab_size=tokenizer.vocab_size, block_size=256,
                              tie_embeddings=False)
    torch.manual_seed(0)
    model = Llama(config)
    with torch.no_grad():
        model.blocks[0].attn.o_proj.weight.zero_()
        model.blocks[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for this, after in PARROT.items():
            [a], [b] = tokenizer.encode(this).tolist(), tokenizer.encode(after).tolist()
            model.lm_head.weight[b] = 10 * model.embed.weight[a]
    save_lit_checkpoint(model, directory)
    return directory


def test_a_plain_reply_ends_where_the_model_starts_the_users_next_line(parrot_checkpoint, monkeypatch):
    """In the plain style no token ends the assistant's turn: the reply is cut at "\nUser:" (llama.cpp's reverse
    prompt), and the next prompt holds the cut reply. Truth: `generate`'s greedy text, cut where str.find finds
    "\nUser:"."""
    model = for_generation(partial(load_finetuned, parrot_checkpoint), "cpu", torch.float32)
    tokenizer = Tokenizer(parrot_checkpoint)
    first = [{"role": "user", "content": "Say:"}]
    whole = greedy_reply(model, tokenizer, None, first, 12)
    assert whole.count("\nUser:") > 1, whole  # without the cut the reply would go on as the user
    reply = whole[:whole.find("\nUser:")]
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Again:"}]
    assert render_conversation(None, second) == f"User: Say:\nAssistant: {reply.strip()}\nUser: Again:\nAssistant:"
    again = greedy_reply(model, tokenizer, None, second, 12)
    again = again[:again.find("\nUser:")]
    proc = subprocess.run([sys.executable, "generate/chat.py", "--checkpoint_dir", str(parrot_checkpoint),
                           "--prompt_style", "plain", "--temperature", "0", "--max_new_tokens", "12"],
                          input="Say:\nAgain:\n", capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{reply}\n{again}\n", proc.stdout
    # what the program keeps of the exchange, the next prompt's history, is the reply as printed
    spec = importlib.util.spec_from_file_location("chat_program", ROOT / "generate" / "chat.py")
    program = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "chat_program", program)  # a dataclass looks its module up there
    spec.loader.exec_module(program)
    sampling = {"temperature": 0, "top_k": None, "top_p": 1.0, "generator": None}
    chat = program.Chat(model, tokenizer, None, torch.device("cpu"), 12, sampling)
    assert program.answer(chat, first) == first + [{"role": "assistant", "content": reply}]


def test_stop_strings_cut_text_where_str_find_does_however_the_text_arrives():
    """StopStrings against str.find on the whole text: random texts, stop strings and splits into pieces. What
    it shows is the text up to the first stop string; while it waits, it holds back only the longest end of what
    arrived that begins a stop string (str.startswith), so text that cannot become one is shown at once."""
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(["a", "b", "\n", "User", ":", "Us"]) for _ in range(rng.randrange(12)))
        stops = rng.sample(["\nUser:", "ab", "b\nU", ":a", "Us"], rng.randrange(3))
        cuts = sorted(rng.choices(range(len(text) + 1), k=rng.randrange(5)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[:min(found)] if found else text
        cut, shown, arrived = StopStrings(stops), "", ""
        for piece in pieces:
            shown, arrived = shown + cut.add(piece), arrived + piece
            if not cut.stopped:
                begins = [k for s in stops for k in range(1, min(len(s), len(arrived) + 1))
                          if s.startswith(arrived[len(arrived) - k:])]
                assert shown == arrived[:len(arrived) - max(begins, default=0)], (arrived, stops, shown)
            assert expected.startswith(shown)
        shown += cut.add("", final=True)
        assert (shown, cut.text, cut.stopped) == (expected, expected, bool(found)), (text, stops, pieces)


def test_user_errors_are_one_line(chat_checkpoint, tmp_path):
    both = run_main("generate/chat.py", "--checkpoint_dir", chat_checkpoint, "--lora_path", tmp_path / "a.pth",
                    "--adapter_path", tmp_path / "b.pth")
    assert_user_error(both, "--lora_path or --adapter_path, not both")
    too_long = run_main("generate/chat.py", "--checkpoint_dir", chat_checkpoint, "--max_new_tokens", 512)
    assert_user_error(too_long, "--max_new_tokens must be between 1 and the model's block_size - 1 (511)")
    for value in ("0", "-3"):  # had been a traceback: the bound was read before it was set
        none = run_main("generate/chat.py", "--checkpoint_dir", chat_checkpoint, "--max_new_tokens", value)
        assert_user_error(none, f"--max_new_tokens must be between 1 and the model's block_size - 1 (511), got {value}")


@pytest.mark.parametrize("style, kept", [("llama2-chat", True), ("alpaca", False)])
def test_an_export_keeps_the_bases_template_only_when_it_lays_prompts_out_as_the_runs_style(llama2_dir, tmp_path,
                                                                                             style, kept):
    """Truth: transformers reading the export's tokenizer files. Llama-2-chat's own template renders a question as the
    llama2-chat style does, so a llama2-chat run keeps it; an alpaca run of the same base must not be prompted so."""
    export = tmp_path / "export"
    shutil.copytree(llama2_dir, export)
    write_tokenizer_config(export, Tokenizer(export), PromptStyle(style))
    assert (transformers.AutoTokenizer.from_pretrained(export).chat_template == LLAMA2_TEMPLATE) is kept


def test_a_directory_of_another_kind_is_named_with_the_chat_flag_that_takes_it(chat_checkpoint, tmp_path):
    """The refusal names chat.py's own flag for what was given, not another program's."""
    for flag in ("--adapter_path", "--lora_path"):
        proc = run_main("generate/chat.py", flag, chat_checkpoint)
        assert_user_error(proc, f"{flag} {chat_checkpoint} is a base checkpoint, not",
                          f"chat with it with --checkpoint_dir {chat_checkpoint}")
    run = tmp_path / "run"
    run.mkdir()
    (run / "lora.yaml").write_text("r: 8\n")
    (run / "lit_model_lora.pth").write_bytes(b"")
    proc = run_main("generate/chat.py", "--checkpoint_dir", run)
    assert_user_error(proc, f"--checkpoint_dir {run} is a LoRA run", f"chat with it with --lora_path {run}")
