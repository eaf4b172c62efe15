"""Prompt styles against outside truth: SmolLM2-Instruct's own chat template (the Jinja template shipped in its
GGUF file, rendered with jinja2 as transformers does) and Stanford Alpaca's published template layout."""

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


def test_alpaca_templates():
    with_input = PromptStyle("alpaca").apply("Add the numbers.", "2 and 3")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    without = PromptStyle("alpaca").apply("Say hi.")
    assert "### Input:" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_llama2_chat_and_plain():
    assert PromptStyle("llama2-chat").apply("Hi", "there") == "[INST] Hi\n\nthere [/INST]"
    assert PromptStyle("plain").apply("Hi", "there") == "Hi\nthere"
    assert PromptStyle("plain").apply("Hi") == "Hi"


def test_end_of_turn_markers():
    assert PromptStyle("chatml").end_of_turn == PromptStyle("smollm2").end_of_turn == "<|im_end|>"
    assert PromptStyle("alpaca").end_of_turn is None


@pytest.mark.parametrize("name", STYLES)
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
