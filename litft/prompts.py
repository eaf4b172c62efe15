"""Prompt styles: how an instruction (and optional input) is turned into the text the model sees.

One style object is used by data preparation, training, generation and evaluation, and a fine-tuning run saves
it as `prompt_style.yaml`, so the text a model was trained on is the text it is prompted with later.
The completion the model should learn follows the prompt directly; the tokenizer's EOS token ends it.

    plain         instruction (newline, input)                 no template: for base models and raw text
    alpaca        "Below is an instruction ... ### Response:\n"  Stanford Alpaca's template, with/without input
    chatml        <|im_start|>user ... <|im_end|> <|im_start|>assistant\n      ChatML without a system turn
    smollm2       chatml with SmolLM2-Instruct's default system turn, as its own chat template renders it
    llama2-chat   [INST] ... [/INST]                          Llama-2-chat; the answer is encoded on its own,
                                                              so sentencepiece gives it its leading space
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from litft.errors import UserError

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


@dataclass(frozen=True)
class PromptStyle:
    """A named template. `apply` returns the full prompt; the model's answer follows it."""

    name: str = "plain"

    def apply(self, instruction: str, input: str = "") -> str:
        if self.name == "plain":
            return f"{instruction}\n{input}" if input else instruction
        if self.name == "alpaca":
            return _ALPACA_INPUT.format(instruction=instruction, input=input) if input else _ALPACA.format(instruction=instruction)
        user = f"{instruction}\n\n{input}" if input else instruction
        if self.name == "chatml":  # Qwen, SmolLM2-Instruct (without its system turn) and others
            return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        if self.name == "smollm2":
            return f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n" + PromptStyle("chatml").apply(instruction, input)
        if self.name == "llama2-chat":  # the tokenizer adds BOS; no trailing space (the answer brings its own)
            return f"[INST] {user} [/INST]"
        raise UserError(f"unknown prompt style {self.name!r}; choose one of {', '.join(STYLES)}")

    @property
    def end_of_turn(self) -> str | None:
        """The text that closes the assistant's turn in this template (a stop marker for generation), if any."""
        return "<|im_end|>" if self.name in ("chatml", "smollm2") else None

    @classmethod
    def from_name(cls, name: str) -> "PromptStyle":
        if name not in STYLES:
            raise UserError(f"unknown prompt style {name!r}; choose one of {', '.join(STYLES)}")
        return cls(name)

    def save(self, directory: Path) -> None:
        from litft.checkpoint import atomic_write_text

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
        return cls.from_name(data["name"])


STYLES = ("plain", "alpaca", "chatml", "smollm2", "llama2-chat")


def resolve_style(name: str | None, *directories: Path) -> PromptStyle | None:
    """`--prompt_style NAME` wins; otherwise the first directory that carries a prompt_style.yaml; else None."""
    if name:
        return PromptStyle.from_name(name)
    for directory in directories:
        if directory is not None and (style := PromptStyle.from_dir(directory)) is not None:
            return style
    return None
