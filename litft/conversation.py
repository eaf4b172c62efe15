"""A conversation as prompt text: the turns of a chat laid out in the model's format, ending where the reply starts.

A chat window and a chat API both hold a conversation as OpenAI-style messages,

    [{"role": "system", "content": "You are terse."},        optional
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Red."},
     {"role": "user", "content": "Another one?"}]             the last message is the user's

and the model sees one sequence in the layout it was trained on, ending with the header of the assistant's turn,
so the tokens it writes next are its reply. Per prompt style (litft/prompts.py):

    chat-template  the checkpoint's Jinja template, rendered as transformers' apply_chat_template renders it
    chatml         <|im_start|>{role}\\n{content}<|im_end|>\\n for each message, then <|im_start|>assistant\\n
    smollm2        chatml, with SmolLM2-Instruct's default system turn first when the messages bring none
    llama2-chat    Meta's Llama-2-chat layout; the system prompt rides inside the first user turn and the turns
                   must alternate user, assistant, user, ...; contents are stripped, as Meta's code does:
                       <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]
                   Each finished exchange is its own sequence, BOS ... EOS: `encode_conversation` encodes them one
                   by one with the tokenizer's BOS and EOS ids; the rendered text writes them as <s> and </s>.
    alpaca         a single-instruction style: it has no turns, so the instruction is the last user message and
                   the earlier messages are its input, one "Role: content" line each (a reply the model wrote
                   after "Assistant:" starts with a space, the one after the colon: it is not written twice)
    plain          (and no style at all): with earlier messages, a transcript of "Role: content" lines that ends
                   "User: {last}\nAssistant:", so the model continues as the assistant, after the question. No
                   token ends its turn, so a reply also ends where the model starts the user's next line
                   ("\nUser:", `turn_stops`), as llama.cpp's reverse prompt ends one
    A single user message, in either, is exactly `style.apply(message)`.

As with a single prompt, the text is encoded with `bos=style.add_bos`: a chat template writes its own BOS.

A conversation outgrows the model's context (block_size) sooner or later. `fit_conversation` then drops the
oldest turns — a turn is a user message and the replies after it — keeping a leading system message, until the
prompt leaves room for the reply.
"""

from __future__ import annotations

import torch
from torch import Tensor

from litft.errors import UserError
from litft.prompts import PromptStyle
from litft.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def validate_messages(messages: object) -> list[dict[str, str]]:
    """Check a conversation; return its messages as {"role", "content"} dicts. Every problem is one UserError line."""
    if not isinstance(messages, list) or not messages:
        raise UserError('messages must be a non-empty list of {"role": ..., "content": ...} objects')
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f'messages[{i}] must be an object with "role" and "content", got {type(message).__name__}')
        role, content = message.get("role"), text_of(message.get("content"), i)
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system message
        if role not in ROLES:
            raise UserError(f"messages[{i}].role must be one of {', '.join(ROLES)} (or developer, for system), "
                            f"got {role!r}")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "user":
        raise UserError(f"the last message must be the user's (role user), got {checked[-1]['role']}; "
                        "the reply to it is what the model writes")
    return checked


def text_of(content: object, i: int) -> str:
    """A message's content: a string, or OpenAI's list of parts when every part is text ({"type": "text", "text"})."""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        kinds = {part.get("type") for part in content} - {"text"}
        if kinds:
            raise UserError(f"messages[{i}].content has parts of type {', '.join(map(repr, sorted(map(str, kinds))))}; "
                            "only text is supported")
        if all(isinstance(part.get("text"), str) for part in content):
            content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise UserError(f"messages[{i}].content must be a string (or a list of text parts), got "
                        f"{type(content).__name__}")
    try:
        content.encode("utf-8")  # a terminal's Latin-1 bytes reach Python as lone surrogates: no tokenizer takes them
    except UnicodeEncodeError as e:
        raise UserError(f"messages[{i}].content is not valid UTF-8 (at character {e.start}); send the text in UTF-8"
                        ) from None
    return content


def render_conversation(style: PromptStyle | None, messages: list[dict]) -> str:
    """The prompt text for `messages` in `style` (None: plain), ending where the assistant's reply begins."""
    messages = validate_messages(messages)
    if style is not None and style.chat_template is not None:  # chatml, smollm2, the checkpoint's own template
        return style.render_turns(messages)
    name = style.name if style is not None else "plain"
    if name == "llama2-chat":
        return "</s><s>".join(llama2_exchanges(messages))  # the first <s> is the tokenizer's, as for one prompt
    *earlier, last = messages
    context = "\n".join(f"{m['role'].capitalize()}: {line_content(m)}" for m in earlier)
    if name == "plain" and earlier:  # the question last: plain's own order (instruction, input) would end in history
        return f"{context}\nUser: {last['content']}\nAssistant:"
    return (style or PromptStyle("plain")).apply(last["content"], context)


def line_content(message: dict[str, str]) -> str:
    """A message's content on its "Role: content" line. A reply the model wrote after "Assistant:" starts with a
    space, which the line already has after the colon: written back as it came."""
    content = message["content"]
    return content[1:] if message["role"] == "assistant" and content.startswith(" ") else content


def turn_stops(style: PromptStyle | None) -> list[str]:
    """Text that ends the assistant's turn besides the stop tokens: plain's "\nUser:", where the model, having no
    end-of-turn token, goes on to write the user's next line. The other styles end a turn with a token."""
    return ["\nUser:"] if style is None or style.name == "plain" else []


def encode_conversation(tokenizer: Tokenizer, style: PromptStyle | None, messages: list[dict]) -> Tensor:
    """The prompt ids for `messages` in `style`: (T,)."""
    bos = style.add_bos if style is not None else None
    if style is not None and style.name == "llama2-chat":
        *finished, last = llama2_exchanges(validate_messages(messages))
        parts = [tokenizer.encode(text, bos=bos, eos=True) for text in finished]  # BOS [INST] .. [/INST] .. EOS
        return torch.cat([*parts, tokenizer.encode(last, bos=bos)])
    return tokenizer.encode(render_conversation(style, messages), bos=bos)


def fit_conversation(tokenizer: Tokenizer, style: PromptStyle | None, messages: list[dict], block_size: int,
                     reply_tokens: int) -> tuple[list[dict[str, str]], Tensor]:
    """Drop the oldest turns until the prompt plus `reply_tokens` fits in `block_size`; keep a leading system message.

    Returns the messages kept (all of them when they fit) and their prompt ids. A UserError when even the last
    user turn alone does not fit.
    """
    messages = validate_messages(messages)
    if not 0 < reply_tokens < block_size:
        raise UserError(f"max_new_tokens must be between 1 and the model's block_size - 1 ({block_size - 1}), "
                        f"got {reply_tokens}")
    system, turns = (messages[:1], messages[1:]) if messages[0]["role"] == "system" else ([], messages)
    while True:
        ids = encode_conversation(tokenizer, style, system + turns)
        if len(ids) + reply_tokens <= block_size:
            return system + turns, ids
        next_user = next((i for i, m in enumerate(turns) if i > 0 and m["role"] == "user"), None)
        if next_user is None:
            raise UserError(too_long(tokenizer, style, system, len(ids), reply_tokens, block_size))
        turns = turns[next_user:]  # the oldest turn: its user message and everything up to the next one


def too_long(tokenizer: Tokenizer, style: PromptStyle | None, system: list[dict], tokens: int, reply_tokens: int,
             block_size: int) -> str:
    """Why the last message alone does not fit, naming the system message's share when it has one."""
    kept, shorten = "", "the message"
    if system:
        alone = len(encode_conversation(tokenizer, style, system + [{"role": "user", "content": ""}]))
        kept, shorten = f" (the system message, kept in every prompt, takes {alone} of them with the turn's " \
            "framing)", "the message or the system message"
    return (f"the last message makes a prompt of {tokens} tokens{kept}, which with max_new_tokens ({reply_tokens}) "
            f"exceeds the model's block_size ({block_size}); shorten {shorten} or lower max_new_tokens")


def llama2_exchanges(messages: list[dict[str, str]]) -> list[str]:
    """Llama-2-chat's sequences: "[INST] {user} [/INST] {answer} " per finished exchange, then "[INST] {user} [/INST]"."""
    system, turns = (messages[0]["content"], messages[1:]) if messages[0]["role"] == "system" else (None, messages)
    if [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
        raise UserError("the llama2-chat style needs one optional system message, then turns that alternate "
                        "user, assistant, user, ...")
    users = [m["content"] for m in turns[0::2]]
    if system is not None:
        users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
    answers = [m["content"] for m in turns[1::2]]
    finished = [f"[INST] {u.strip()} [/INST] {a.strip()} " for u, a in zip(users, answers)]
    return finished + [f"[INST] {users[-1].strip()} [/INST]"]
