"""Prompt styles: how an instruction (and optional input) is turned into the text the model sees.

One style object is used by data preparation, training, generation and evaluation, and a fine-tuning run saves
it as `prompt_style.yaml`, so the text a model was trained on is the text it is prompted with later.
The completion the model should learn follows the prompt directly; the tokenizer's EOS token ends it.
Encode a prompt with `tokenizer.encode(style.apply(...), bos=style.add_bos)`: a chat template writes its own BOS.

    plain         instruction (newline, input)                 no template: for base models and raw text
    alpaca        "Below is an instruction ... ### Response:\n"  Stanford Alpaca's template (with/without input)
                                                              plus a newline after "### Response:", as alpaca-lora
                                                              and LitGPT use it
    chatml        <|im_start|>user ... <|im_end|> <|im_start|>assistant\n      ChatML without a system turn
    smollm2       chatml with SmolLM2-Instruct's default system turn, as its own chat template renders it
    llama2-chat   [INST] ... [/INST]                          Llama-2-chat; the answer is encoded on its own,
                                                              so sentencepiece gives it its leading space
    chat-template the checkpoint's own Jinja chat template     Llama-3, Qwen2.5, Mistral, ... (litft/chat_template.py)

Which style a prompt gets (`resolve_style`): the one named (`--prompt_style`); else the prompt_style.yaml of the
run or checkpoint directory; else, when the checkpoint's tokenizer_config.json has a chat template, that template;
else none (the text is continued as given). A chat-template style stores the template itself in
prompt_style.yaml, so a run directory carries it even when the base checkpoint is gone or changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from litft.chat_template import end_of_turn, find_template, render, token_variables
from litft.errors import UserError
from litft.files import atomic_write_text

FILE = "prompt_style.yaml"

_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_TEMPLATES = {  # smollm2: SmolLM2-Instruct's default system turn unless the conversation brings its own
    "chatml": _CHATML_TEMPLATE,
    "smollm2": ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SMOLLM2_SYSTEM + "<|im_end|>\n"
                "{% endif %}" + _CHATML_TEMPLATE),
}


@dataclass(frozen=True)
class PromptStyle:
    """A named template. `apply` returns the full prompt; the model's answer follows it."""

    name: str = "plain"

    def apply(self, instruction: str, input: str = "") -> str:
        if self.name == "plain":
            return f"{instruction}\n{input}" if input else instruction
        if self.name == "alpaca":
            return _ALPACA_INPUT.format(instruction=instruction, input=input) if input else _ALPACA.format(instruction=instruction)
        user = user_turn(instruction, input)
        if self.chat_template is not None:  # chatml, smollm2, the checkpoint's own template
            return self.render_turns([{"role": "user", "content": user}])
        if self.name == "llama2-chat":  # the tokenizer adds BOS; no trailing space (the answer brings its own)
            return f"[INST] {user} [/INST]"
        raise UserError(f"unknown prompt style {self.name!r}; choose one of {', '.join(STYLES)}")

    def render_turns(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """`messages` as this style's chat template writes them (a style whose chat_template is not None)."""
        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt)

    def exchange(self, instruction: str, input: str, output: str) -> str | None:
        """A question and its answer as this style's chat template writes them; None for the styles written out in
        Python, whose answer follows the prompt as it is. Data preparation learns the answer as the template writes
        it (Llama 3's trims it)."""
        if self.chat_template is None:
            return None
        turns = [{"role": "user", "content": user_turn(instruction, input)}, {"role": "assistant", "content": output}]
        return self.render_turns(turns, add_generation_prompt=False)

    @property
    def add_bos(self) -> bool | None:
        """Tokenizer.encode's `bos` for a prompt in this style: None, the checkpoint decides whether BOS leads."""
        return None

    @property
    def end_of_turn(self) -> str | None:
        """The text that closes the assistant's turn in this template (a stop marker for generation), if any."""
        return "<|im_end|>" if self.name in ("chatml", "smollm2") else None

    @property
    def chat_template(self) -> str | None:
        """This style as a Jinja chat template: what `apply` and a conversation (litft/conversation.py) render, and
        what exports whose readers prompt with one (GGUF, Hugging Face) carry. None for plain, alpaca and
        llama2-chat, which are written out in Python."""
        return _TEMPLATES.get(self.name)

    @classmethod
    def from_name(cls, name: str, *directories: Path) -> "PromptStyle":
        """The style called `name`; "chat-template" takes the template of the first directory that has one."""
        if name not in STYLES:
            raise UserError(f"unknown prompt style {name!r}; choose one of {', '.join(STYLES)}")
        if name != ChatTemplateStyle.NAME:
            return cls(name)
        for directory in directories:
            if directory is not None and (style := ChatTemplateStyle.from_checkpoint(directory)) is not None:
                return style
        where = " or ".join(str(d) for d in directories if d is not None) or "(no checkpoint given)"
        raise UserError(f"prompt style chat-template needs a chat template in tokenizer_config.json, and {where} has "
                        f"none; choose one of {', '.join(s for s in STYLES if s != name)}")

    def save(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / FILE, yaml.safe_dump({"name": self.name}))

    @classmethod
    def from_dir(cls, directory: Path) -> "PromptStyle | None":
        """The style saved in a run or checkpoint directory, or None when it has none."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); write `name: <style>` in it") from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise UserError(f"{path} must hold `name: <style>` with one of {', '.join(STYLES)}")
        if data["name"] == ChatTemplateStyle.NAME:
            return ChatTemplateStyle.from_yaml(data, path)
        return cls.from_name(data["name"])


@dataclass(frozen=True)
class ChatTemplateStyle(PromptStyle):
    """The checkpoint's own chat template, rendered for one user turn with the assistant's header after it.

    `tokens` are the special tokens' text the template refers to (bos_token, eos_token, ...). Both are saved
    in prompt_style.yaml, so the style does not depend on the checkpoint's files once chosen.
    """

    NAME = "chat-template"
    name: str = NAME
    template: str = ""
    tokens: dict[str, str] = field(default_factory=dict)

    def render_turns(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render(self.template, messages, add_generation_prompt=add_generation_prompt, **self.tokens)

    @property
    def add_bos(self) -> bool:
        """False: the template writes BOS itself when the model wants one ({{ bos_token }}), so the tokenizer
        adds none, as transformers' apply_chat_template encodes with add_special_tokens=False."""
        return False

    @property
    def end_of_turn(self) -> str | None:
        return end_of_turn(self.template, self.tokens)

    @property
    def chat_template(self) -> str | None:
        return self.template

    def save(self, directory: Path) -> None:
        data = {"name": self.name, "tokens": dict(self.tokens), "template": self.template}
        atomic_write_text(Path(directory) / FILE, yaml.dump(data, Dumper=_LiteralDumper, sort_keys=False,
                                                            allow_unicode=True))

    @classmethod
    def from_checkpoint(cls, directory: Path) -> "ChatTemplateStyle | None":
        """The chat template in a checkpoint's tokenizer files, or None when it has none."""
        template = find_template(directory)
        return cls(template=template, tokens=token_variables(directory)) if template else None

    @classmethod
    def from_yaml(cls, data: dict, path: Path) -> "ChatTemplateStyle":
        template, tokens = data.get("template"), data.get("tokens") or {}
        if not isinstance(template, str) or not template.strip() or not isinstance(tokens, dict):
            raise UserError(f"{path} names the chat-template style but holds no `template:` text (and `tokens:` "
                            "mapping); write the style again with --prompt_style chat-template")
        return cls(template=template, tokens={str(k): str(v) for k, v in tokens.items()})


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings (a chat template) as YAML literal blocks, readable as the template itself."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None  # PyYAML falls back to quoting when a block cannot hold the text
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_LiteralDumper.add_representer(str, _represent_str)

STYLES = ("plain", "alpaca", "chatml", "smollm2", "llama2-chat", ChatTemplateStyle.NAME)


def user_turn(instruction: str, input: str = "") -> str:
    """What the user says: the instruction, and the input (if any) after a blank line."""
    return f"{instruction}\n\n{input}" if input else instruction


def resolve_style(name: str | None, *directories: Path) -> PromptStyle | None:
    """Which style a prompt gets: `--prompt_style NAME`; else the first prompt_style.yaml among `directories`;
    else the first chat template in their tokenizer files; else None (the prompt is used as given)."""
    directories = tuple(d for d in directories if d is not None)
    if name:
        return PromptStyle.from_name(name, *directories)
    for directory in directories:
        if (style := PromptStyle.from_dir(directory)) is not None:
            return style
    for directory in directories:
        if (style := ChatTemplateStyle.from_checkpoint(directory)) is not None:
            return style
    return None
