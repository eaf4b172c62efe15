"""What a Hugging Face export says about prompting and stopping, so that transformers' `generate` answers as
litft's generate/ does — the files people forget, and the cause of exports that never stop.

    generation_config.json   eos_token_id: EOS first, then every other id generate/ stops at — the end-of-turn
                             token of the prompt style (<|eot_id|>, <|im_end|>) and any listed stop id
    tokenizer_config.json    chat_template: the template of the style generate/ prompts with (a run's
                             prompt_style.yaml wins over the base's template, as in generate/)
                             add_bos_token, bos_token, eos_token: for a bare sentencepiece tokenizer.model, the BOS
                             rule litft follows (transformers adds no BOS to a tokenizer.model without them)

A chat_template.jinja that disagrees with the style is removed: transformers would read it before the config.
A style with no template form (plain, alpaca, llama2-chat) removes the base's unless it lays a question out as
the style does (Llama-2-chat's own template and llama2-chat): a model fine-tuned in another layout would otherwise
be prompted in the base's by every reader of the template (apply_chat_template, vLLM).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from litft.chat_template import find_template, render, token_variables
from litft.errors import UserError
from litft.files import atomic_write_text
from litft.prompts import PromptStyle
from litft.tokenizer import Tokenizer


def generation_config(existing: dict[str, Any], special: dict[str, int], stops: set[int]) -> dict[str, Any]:
    """`existing` generation_config.json with the checkpoint's bos/eos ids and every stop id as eos_token_id."""
    generation = {**existing, **special}
    if stops:  # EOS first: transformers takes the first as the tokenizer's own
        eos = [special["eos_token_id"]] if "eos_token_id" in special else []
        ids = eos + sorted(stops - set(eos))
        generation["eos_token_id"] = ids if len(ids) > 1 else ids[0]
    return generation


def write_tokenizer_config(directory: Path, tokenizer: Tokenizer, style: PromptStyle | None) -> list[str]:
    """Update `directory`'s tokenizer_config.json (see above); returns what changed, for the summary line."""
    directory = Path(directory)
    config = read_json(directory / "tokenizer_config.json")
    updated = {**config}
    if style is not None:  # the base's template goes when the run's style lays prompts out another way
        jinja = directory / "chat_template.jinja"
        template = style.chat_template or kept_base_template(directory, style)
        if jinja.is_file() and jinja.read_text(encoding="utf-8") != template:
            jinja.unlink()
        if template is None:
            updated.pop("chat_template", None)
        else:
            updated["chat_template"] = template
    if tokenizer.backend == "sentencepiece" and "add_bos_token" not in config:
        updated["add_bos_token"] = tokenizer.add_bos
        for kind, id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id)):
            if id is not None and f"{kind}_token" not in config:
                updated[f"{kind}_token"] = tokenizer.token_text(id)
    if updated == config:
        return []
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(updated, indent=2, ensure_ascii=False))
    changes = [key for key, value in updated.items() if config.get(key) != value]
    if "chat_template" in config and "chat_template" not in updated:
        changes.append(f"chat_template removed: the {style.name} style has none, so prompt it in that style yourself")
    return [f"tokenizer_config.json ({', '.join(changes)})"]


def kept_base_template(directory: Path, style: PromptStyle) -> str | None:
    """The directory's own template, when it lays a question out as `style` does (Llama-2-chat's template and the
    llama2-chat style); None when it lays it out another way, or there is none."""
    template = find_template(directory)
    if template is None:
        return None
    tokens, question = token_variables(directory), "What is LoRA?"
    try:
        text = render(template, [{"role": "user", "content": question}], **tokens)
    except UserError:
        return None
    return template if text.removeprefix(tokens.get("bos_token", "")) == style.apply(question) else None


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else {}
