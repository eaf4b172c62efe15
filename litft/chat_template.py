"""Chat templates: the Jinja program a Hugging Face checkpoint ships to lay a conversation out as prompt text.

An instruct model was trained on conversations in one exact layout, and only its own layout gets its best
answers. The checkpoint says which in tokenizer_config.json (`chat_template`, or a file chat_template.jinja):

    Llama-3   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
    Qwen2.5   <|im_start|>system\\nYou are Qwen, ...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n
    Mistral   <s>[INST] Hi[/INST]

It is rendered the way transformers' `apply_chat_template` renders it, so the same template gives the same text:
a sandboxed Jinja environment (a template is code that came with downloaded files), blocks that trim their own
newline and leading spaces, `{% break %}`/`{% continue %}`, a `tojson` that does not escape HTML, and the
functions templates call: `raise_exception(message)` and `strftime_now(format)` (Llama-3.2 writes today's date).
The variables are `messages`, `add_generation_prompt` (end with the header of the assistant's turn, so the
model writes the answer next) and the special tokens' text: `bos_token`, `eos_token`, `unk_token`, `pad_token`.

The rendered text has the special tokens written out; the tokenizer turns each into its single id.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from litft.errors import UserError
from litft.tokenizer import read_tokenizer_config

TOKEN_VARIABLES = ("bos_token", "eos_token", "unk_token", "pad_token")
_SENTINEL = "LITFT_ANSWER_7f3a"  # a stand-in answer, to find where the assistant's turn ends


def find_template(directory: Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`.

    tokenizer_config.json may hold a list of named templates ({"name": "default", "template": ...}, plus e.g.
    "tool_use"); the default one is the chat template.
    """
    directory = Path(directory)
    if (path := directory / "chat_template.jinja").is_file():
        return path.read_text(encoding="utf-8")
    template = read_tokenizer_config(directory).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def token_variables(directory: Path) -> dict[str, str]:
    """The special tokens' text a template may use ({"bos_token": "<s>", ...}); absent ones are left out."""
    config = read_tokenizer_config(directory)
    variables = {}
    for name in TOKEN_VARIABLES:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token:
            variables[name] = token
    return variables


def render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
           **variables: Any) -> str:
    """Render `template` for a conversation, as transformers' apply_chat_template(..., tokenize=False) does."""
    try:
        import jinja2
    except ImportError:
        raise UserError("rendering the checkpoint's chat template needs jinja2: pip install jinja2") from None

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          tools=None, documents=None, **variables)  # defined, as in transformers
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template could not be rendered ({e}); pass --prompt_style with a named style") from None
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, ArithmeticError) as e:  # e.g. `for t in tools`
        raise UserError(f"the chat template failed ({type(e).__name__}: {e}); pass --prompt_style with a named style"
                        ) from None


def end_of_turn(template: str, variables: dict[str, str]) -> str | None:
    """The text that closes the assistant's turn ("<|eot_id|>", "<|im_end|>", "</s>"): a stop marker.

    Found by rendering a one-question, one-answer conversation and reading what follows the answer, up to the
    first whitespace. None when the template cannot render such a conversation.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = render(template, messages, add_generation_prompt=False, **variables)
    except UserError:
        return None
    after = text.rpartition(_SENTINEL)[2].split()
    return after[0] if _SENTINEL in text and after else None


@lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled once: data preparation renders it for every sample."""
    return _environment().from_string(template)


def _environment():
    """A sandboxed Jinja environment with the settings and functions chat templates are written for."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's own text (transformers builds training masks
        from it); the text inside renders as it is."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)  # the tag's name
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """JSON as json.dumps writes it: Jinja's own tojson escapes <, >, & and ' for HTML, which a prompt must not."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    """What a template calls to refuse a conversation (e.g. "roles must alternate user/assistant")."""
    import jinja2

    raise jinja2.TemplateError(message)
