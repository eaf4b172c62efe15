"""Prompt styles against outside truth: SmolLM2-Instruct's own chat template (the Jinja template shipped in its
GGUF file, rendered with jinja2 as transformers does) and Stanford Alpaca's published templates (PROMPT_DICT in
tatsu-lab/stanford_alpaca's train.py, typed out below)."""

from __future__ import annotations

import pytest

from litft.errors import UserError
from litft.prompts import STYLES, PromptStyle, resolve_style


@pytest.fixture(scope="module")
def smollm2_chat_template(smollm2_gguf) -> str:
    from gguf import GGUFReader

    return GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()


def render(template: str, messages: list[dict]) -> str:
    import jinja2

    return jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)


@pytest.mark.parametrize("instruction,input", [("Name three colors.", ""), ("Summarize the text.", "Cats sleep a lot.")])
def test_smollm2_matches_its_chat_template(smollm2_chat_template, instruction, input):
    user = f"{instruction}\n\n{input}" if input else instruction
    expected = render(smollm2_chat_template, [{"role": "user", "content": user}])
    assert PromptStyle("smollm2").apply(instruction, input) == expected


def test_chatml_is_the_template_without_a_system_turn(smollm2_chat_template):
    rendered = render(smollm2_chat_template, [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    system_turn = "<|im_start|>system\nS<|im_end|>\n"
    assert rendered.startswith(system_turn)
    assert PromptStyle("chatml").apply("Hi") == rendered[len(system_turn):]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another\n\none?"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "system-and-turns"])
def test_named_styles_as_chat_templates(smollm2_chat_template, messages):
    """What exports carry for chatml and smollm2 renders every conversation as litft lays it out, and smollm2's as
    SmolLM2-Instruct's own template; the styles without such a form carry none."""
    from litft.conversation import render_conversation

    for name in ("chatml", "smollm2"):
        style = PromptStyle(name)
        assert render(style.chat_template, messages) == render_conversation(style, messages)
    assert render(PromptStyle("smollm2").chat_template, messages) == render(smollm2_chat_template, messages)
    assert [PromptStyle(n).chat_template for n in ("plain", "alpaca", "llama2-chat")] == [None, None, None]


# Stanford Alpaca's PROMPT_DICT (https://github.com/tatsu-lab/stanford_alpaca/blob/main/train.py), as published.
STANFORD_ALPACA = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}
# The one difference: litft's alpaca style ends with a newline after "### Response:", as alpaca-lora's
# templates/alpaca.json and LitGPT's Alpaca style do (Stanford's ends at the colon).
AFTER_RESPONSE = "\n"


def test_alpaca_is_stanfords_template_with_a_newline_after_response():
    style = PromptStyle("alpaca")
    assert style.apply("Add the numbers.", "2 and 3") == STANFORD_ALPACA["prompt_input"].format(
        instruction="Add the numbers.", input="2 and 3") + AFTER_RESPONSE
    assert style.apply("Say hi.") == STANFORD_ALPACA["prompt_no_input"].format(instruction="Say hi.") + AFTER_RESPONSE


def test_llama2_chat_and_plain():
    assert PromptStyle("llama2-chat").apply("Hi", "there") == "[INST] Hi\n\nthere [/INST]"
    assert PromptStyle("plain").apply("Hi", "there") == "Hi\nthere"
    assert PromptStyle("plain").apply("Hi") == "Hi"


def test_end_of_turn_markers():
    assert PromptStyle("chatml").end_of_turn == PromptStyle("smollm2").end_of_turn == "<|im_end|>"
    assert PromptStyle("alpaca").end_of_turn is None


@pytest.mark.parametrize("name", [s for s in STYLES if s != "chat-template"])  # that one: test_chat_formats.py
def test_save_and_resolve_round_trip(tmp_path, name):
    PromptStyle.from_name(name).save(tmp_path)
    assert PromptStyle.from_dir(tmp_path) == PromptStyle(name)
    assert resolve_style(None, tmp_path / "missing", tmp_path) == PromptStyle(name)
    assert resolve_style("plain", tmp_path) == PromptStyle("plain")  # an explicit name wins


def test_unknown_and_broken_styles_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown prompt style 'vicuna'"):
        PromptStyle.from_name("vicuna")
    (tmp_path / "prompt_style.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        PromptStyle.from_dir(tmp_path)
    (tmp_path / "prompt_style.yaml").write_text("- alpaca\n")
    with pytest.raises(UserError, match="must hold `name: <style>`"):
        PromptStyle.from_dir(tmp_path)
    assert PromptStyle.from_dir(tmp_path / "nowhere") is None


# ---- the checkpoint's own chat template ------------------------------------------------------------------------

def write_template(directory, template: str, **tokens) -> None:
    import json

    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **tokens}))


def test_smollm2_chat_template_is_the_smollm2_style(smollm2_chat_template, tmp_path):
    """A SmolLM2 checkpoint without prompt_style.yaml now gets its template: the smollm2 style, byte for byte."""
    write_template(tmp_path, smollm2_chat_template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    style = resolve_style(None, tmp_path)
    assert style.name == "chat-template" and style.end_of_turn == "<|im_end|>"
    for instruction, input in [("Name three colors.", ""), ("Summarize the text.", "Cats sleep a lot.")]:
        assert style.apply(instruction, input) == PromptStyle("smollm2").apply(instruction, input)


def test_a_saved_style_wins_over_the_template_and_no_template_means_no_style(smollm2_chat_template, tmp_path):
    write_template(tmp_path, smollm2_chat_template)
    PromptStyle("alpaca").save(tmp_path)
    assert resolve_style(None, tmp_path) == PromptStyle("alpaca")
    assert resolve_style(None, tmp_path / "empty") is None  # an old checkpoint: the prompt as given


def test_template_renders_like_transformers_environment(tmp_path):
    """tojson writes plain JSON (Jinja's own escapes <, >, & for HTML); loop controls and strftime_now exist."""
    import json
    from datetime import datetime

    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m | tojson }}"
                "{% break %}{% endfor %}|{{ strftime_now('%Y') }}|{{ bos_token }}")
    write_template(tmp_path, template, bos_token={"content": "<s>", "lstrip": False})
    messages = [{"role": "user", "content": "<b>Tom & 'Jerry'</b> café"}]
    style = PromptStyle.from_name("chat-template", tmp_path)
    assert style.apply(messages[0]["content"]) == f"{json.dumps(messages[0], ensure_ascii=False)}|{datetime.now():%Y}|<s>"


def test_chat_template_user_errors(tmp_path):
    with pytest.raises(UserError, match="needs a chat template in tokenizer_config.json"):
        PromptStyle.from_name("chat-template", tmp_path)
    write_template(tmp_path, "{{ raise_exception('no system turns, please') }}")
    with pytest.raises(UserError, match="could not be rendered \\(no system turns, please\\)"):
        resolve_style(None, tmp_path).apply("Hi")
    write_template(tmp_path, "{% for %}")
    with pytest.raises(UserError, match="could not be rendered"):
        resolve_style(None, tmp_path).apply("Hi")
    (tmp_path / "prompt_style.yaml").write_text("name: chat-template\n")
    with pytest.raises(UserError, match="holds no `template:`"):
        PromptStyle.from_dir(tmp_path)
