"""The tokenizers and chat formats of Llama-3, Qwen2.5 and Mistral v0.3 against transformers.

Truth: `transformers.AutoTokenizer` loading the same directory — its `apply_chat_template(..., tokenize=True)`,
its encode and decode, its bos/eos — and the stop tokens the checkpoint files list. The tokenizers are built
here: byte-level BPEs trained with `tokenizers` that carry Llama-3's and Qwen2.5's special tokens, pre-tokenizer
and chat-template layout, and Mistral v0.3's real tokenizer.model (32768 pieces, [INST] as a control piece)
from the mistral-common wheel that also holds the v0.1 model the other tests use, alone and as transformers
saves it (tokenizer.json + chat_template.jinja). Generation is checked on a tiny model whose weights are set
so that greedy decoding walks a chosen chain of tokens into a chosen stop id.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_script

from litft.checkpoint import load_lit_model, save_lit_checkpoint
from litft.config import Config
from litft.conversation import render_conversation
from litft.errors import UserError
from litft.generate import generate, stop_token_ids
from litft.generate_cli import generate_cli
from litft.gguf import metadata, open_gguf, tokenizer_files
from litft.load_finetuned import load_finetuned
from litft.model import Llama
from litft.prepare import answer_end_id, encode_example
from litft.prompts import ChatTemplateStyle, PromptStyle, resolve_style
from litft.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# The chat templates, in the layout each family's tokenizer_config.json uses (written for these tests).
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\n' }}
{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\n\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('only user and assistant turns after the system turn') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + '[/INST]' }}
    {%- else %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# GPT-2-style splitting before byte-level BPE; Llama-3 groups up to three digits, Qwen2.5 splits every digit.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                   "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = ["What is LoRA? Low-rank adaptation trains two small matrices per layer.",
          "The quick brown fox jumps over the lazy dog; café, naïve, 2024-01-01, 12345.",
          "Name three primary colours: red, yellow and blue.\nAnswer briefly.\n\n  Indented line."] * 30

QUESTIONS = [("What is LoRA?", ""), ("Summarize the text.", "Cats sleep 16 hours a day.\nDogs sleep less."),
             ("  Spaces around, café 🦙  ", "")]


# ---- building the checkpoints' tokenizer directories ------------------------------------------------------


def byte_level_bpe(split: str, specials: list[str], nfc: bool = False):
    """A small byte-level BPE trained with `tokenizers`, with the family's pre-tokenizer and special tokens."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def added_tokens_decoder(tok) -> dict:
    """tokenizer_config.json's record of the added tokens, as transformers writes it."""
    return {str(id): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for id, t in tok.get_added_tokens_decoder().items()}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    """Llama-3.2-Instruct's layout: BOS added by the post-processor, eos <|eot_id|>, three stop ids."""
    from tokenizers import processors

    directory = tmp_path_factory.mktemp("llama3")
    tok = byte_level_bpe(LLAMA3_SPLIT, LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(str(directory / "tokenizer.json"))
    write_json(directory / "tokenizer_config.json", {
        "added_tokens_decoder": added_tokens_decoder(tok), "bos_token": "<|begin_of_text|>", "chat_template": LLAMA3_TEMPLATE,
        "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast"})
    write_json(directory / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    stops = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    write_json(directory / "generation_config.json", {"bos_token_id": bos, "eos_token_id": stops})
    return directory


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """Qwen2.5-base's layout: no BOS, eos <|endoftext|>, ChatML whose turns end with <|im_end|>; NFC-normalized."""
    from tokenizers import processors

    directory = tmp_path_factory.mktemp("qwen")
    tok = byte_level_bpe(QWEN_SPLIT, QWEN_SPECIALS, nfc=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(directory / "tokenizer.json"))
    write_json(directory / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": added_tokens_decoder(tok), "bos_token": None,
        "chat_template": QWEN_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
        "errors": "replace", "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    endoftext = tok.token_to_id("<|endoftext|>")
    write_json(directory / "generation_config.json", {"bos_token_id": endoftext, "eos_token_id": endoftext})
    return directory


@pytest.fixture(scope="module")
def mistral_model(sentencepiece_model, tmp_path_factory) -> Path:
    """Mistral v0.3's tokenizer.model, read out of the mistral-common wheel the v0.1 model came from."""
    wheels = sorted((sentencepiece_model.parent / "wheels").glob("mistral_common-*.whl"))
    if not wheels:
        pytest.skip(f"no mistral-common wheel in {sentencepiece_model.parent / 'wheels'}")
    path = tmp_path_factory.mktemp("mistral_v3_model") / "tokenizer.model"
    with zipfile.ZipFile(wheels[-1]) as z:
        path.write_bytes(z.read("mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"))
    return path


@pytest.fixture(scope="module")
def mistral_sp_dir(mistral_model, tmp_path_factory) -> Path:
    """Mistral-7B-Instruct-v0.3's layout with tokenizer.model only: control tokens 0..770 declared special."""
    from sentencepiece import SentencePieceProcessor

    directory = tmp_path_factory.mktemp("mistral_sp")
    (directory / "tokenizer.model").write_bytes(mistral_model.read_bytes())
    sp = SentencePieceProcessor(model_file=str(mistral_model))
    assert sp.vocab_size() == 32768 and sp.is_control(sp.piece_to_id("[INST]"))
    added = {str(i): {"content": sp.id_to_piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i in range(771)}
    write_json(directory / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": "<s>",
        "chat_template": MISTRAL_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "legacy": False, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"})
    return directory


@pytest.fixture(scope="module")
def mistral_gguf_dir(mistral_model, tmp_path_factory) -> Path:
    """The same tokenizer.model with the tokenizer_config.json litft/gguf.py writes for a sentencepiece GGUF file:
    bos/eos/unk named, no added_tokens_decoder. transformers still treats the named tokens and the control pieces
    ([INST], [/INST]) as special."""
    directory = tmp_path_factory.mktemp("mistral_gguf")
    (directory / "tokenizer.model").write_bytes(mistral_model.read_bytes())
    write_json(directory / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "tokenizer_class": "LlamaTokenizer", "chat_template": MISTRAL_TEMPLATE})
    return directory


@pytest.fixture(scope="module")
def mistral_chatml_dir(mistral_model, tmp_path_factory) -> Path:
    """A ChatML fine-tune of a sentencepiece model: <|im_end|> and <|im_start|> added past the tokenizer.model's
    32768 pieces, declared in added_tokens_decoder, <|im_end|> its EOS."""
    directory = tmp_path_factory.mktemp("mistral_chatml")
    (directory / "tokenizer.model").write_bytes(mistral_model.read_bytes())
    added = {str(32768 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True} for i, t in enumerate(["<|im_end|>", "<|im_start|>"])}
    write_json(directory / "tokenizer_config.json", {
        "add_bos_token": True, "added_tokens_decoder": added, "bos_token": "<s>", "eos_token": "<|im_end|>",
        "legacy": False, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "chat_template": MISTRAL_TEMPLATE})  # its turns end with eos_token, here <|im_end|>
    return directory


@pytest.fixture(scope="module")
def mistral_json_dir(mistral_sp_dir, tmp_path_factory) -> Path:
    """The same tokenizer as transformers saves it: tokenizer.json, and the template in chat_template.jinja."""
    directory = tmp_path_factory.mktemp("mistral_json")
    transformers.AutoTokenizer.from_pretrained(mistral_sp_dir).save_pretrained(directory)
    assert (directory / "chat_template.jinja").is_file() and not (directory / "tokenizer.model").exists()
    return directory


FAMILIES = ["llama3", "qwen", "mistral_sp", "mistral_json", "mistral_gguf", "mistral_chatml"]


@pytest.fixture(params=FAMILIES)
def family_dir(request) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


def reference(directory: Path):
    return transformers.AutoTokenizer.from_pretrained(directory)


# ---- chat template: the token ids transformers gives ---------------------------------------------------------


@pytest.mark.parametrize("instruction,input", QUESTIONS)
def test_chat_template_ids_equal_transformers(family_dir, instruction, input):
    style = resolve_style(None, family_dir)  # no --prompt_style, no prompt_style.yaml: the checkpoint's template
    assert isinstance(style, ChatTemplateStyle)
    content = f"{instruction}\n\n{input}" if input else instruction
    expected = reference(family_dir).apply_chat_template([{"role": "user", "content": content}],
                                                         add_generation_prompt=True, tokenize=True, return_dict=False)
    assert Tokenizer(family_dir).encode(style.apply(instruction, input), bos=style.add_bos).tolist() == expected


@pytest.mark.parametrize("output", ["Paris.", "Paris.\n", " Paris.", "a\n\nb  "])
def test_a_training_sample_is_the_exchange_transformers_renders(family_dir, output):
    """A training sample's ids are apply_chat_template's for the question and its answer, up to the end of the
    turn: Llama 3's and Mistral's templates trim the answer, so "Paris.\n" is learned as "Paris."."""
    style, tokenizer = resolve_style(None, family_dir), Tokenizer(family_dir)
    sample, _ = encode_example({"instruction": "Capital of France?", "input": "", "output": output}, tokenizer, style,
                               max_seq_length=512, mask_inputs=True)
    conversation = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": output}]
    expected = reference(family_dir).apply_chat_template(conversation, tokenize=True, return_dict=False)
    ids = sample["input_ids"].tolist()
    assert expected[:len(ids)] == ids and ids[-1] == answer_end_id(tokenizer, style)
    assert tokenizer.decode(expected[len(ids):]).strip() == ""  # what follows the end of turn: "\n" or nothing


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer and chat template, as llama.cpp's GGUF file of it carries them."""
    directory = tmp_path_factory.mktemp("smollm2")
    for name, content in tokenizer_files(metadata(open_gguf(smollm2_gguf))).items():
        (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return directory


@pytest.mark.parametrize("output", ["    return x", "\n\nParis.", "  - one\n  - two"])
@pytest.mark.parametrize("style_name", [None, "chatml"])
def test_an_answers_leading_whitespace_is_learned_whole(smollm2_tokenizer_dir, style_name, output):
    """SmolLM2's prompt ends in "\n", which its BPE merges with the whitespace an answer starts with ("\n    " is
    one token): an answer cut from the encoded exchange lost that whitespace to the prompt. What a sample teaches
    is the data's output as written."""
    tokenizer, style = Tokenizer(smollm2_tokenizer_dir), resolve_style(style_name, smollm2_tokenizer_dir)
    sample, _ = encode_example({"instruction": "Write it.", "input": "", "output": output}, tokenizer, style,
                               max_seq_length=512, mask_inputs=True)
    learned = sample["input_ids"][sample["labels"] != -100][:-1]  # the answer, without its end-of-turn token
    assert tokenizer.decode(learned) == output


def test_rendered_text_equals_transformers_and_keeps_special_tokens_whole(llama3_dir, qwen_dir, mistral_sp_dir):
    for directory, first_ids in ((llama3_dir, ["<|begin_of_text|>", "<|start_header_id|>"]),
                                 (qwen_dir, ["<|im_start|>"]), (mistral_sp_dir, ["<s>", "[INST]"])):
        style, tokenizer, hf = resolve_style(None, directory), Tokenizer(directory), reference(directory)
        text = style.apply("What is LoRA?")
        assert text == hf.apply_chat_template([{"role": "user", "content": "What is LoRA?"}],
                                              add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, bos=style.add_bos).tolist()
        assert ids[:len(first_ids)] == [tokenizer.token_to_id(t) for t in first_ids]  # one id each, BOS once


@pytest.mark.parametrize("template", [
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if tools is defined %}[tools: {{ tools }}]{% endif %}{% if documents is defined %}[documents]{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
], ids=["generation-block", "tools-defined"])
def test_templates_with_generation_blocks_and_tool_variables_render_as_transformers(qwen_dir, tmp_path, template):
    """Published templates mark the assistant's text with {% generation %} and test `tools is defined`:
    transformers renders the block's text and passes tools and documents (as None)."""
    shutil.copytree(qwen_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    write_json(tmp_path / "tokenizer_config.json", {**config, "chat_template": template})
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"}]
    expected = reference(tmp_path).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_conversation(resolve_style(None, tmp_path), messages) == expected


def test_template_errors_are_one_line(llama3_dir):
    style = resolve_style(None, llama3_dir)
    bad = ChatTemplateStyle(template=style.template.replace("['user', 'assistant']", "['nobody']"), tokens=style.tokens)
    with pytest.raises(UserError, match="only user and assistant turns"):
        bad.apply("Hi")
    loops_over_tools = ChatTemplateStyle(template="{% for t in tools %}{{ t }}{% endfor %}", tokens=style.tokens)
    with pytest.raises(UserError, match="the chat template failed .TypeError"):  # tools is None, as in transformers
        loops_over_tools.apply("Hi")
    assert loops_over_tools.end_of_turn is None
    with pytest.raises(UserError, match=r"messages\[1\].content is not valid UTF-8 \(at character 3\)"):
        render_conversation(style, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "caf\udce9"}])


# ---- encode / decode / bos / eos against transformers ------------------------------------------------------

SAMPLES = {
    "llama3": ["Hello, world!<|eot_id|>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
               "Numbers 12345 and café 🦙\ttabs\n\nnew paragraph", "text<|end_of_text|><|eom_id|>"],
    "qwen": ["<|im_start|>user\nWhat is LoRA?<|im_end|>\n<|im_start|>assistant\n", "done<|endoftext|>next",
             "cafe\u0301 and café, 2024 🦙", "  leading spaces\r\nand CRLF"],
    "mistral_sp": ["<s>[INST] What is LoRA?[/INST] Low-rank adaptation.</s>", "[INST]Hi[/INST]", "Plain text, 🦙 and café.",
                   "a</s>b <s> c"],
}
SAMPLES["mistral_json"] = SAMPLES["mistral_sp"] + ["  two leading spaces", "double  space"]
SAMPLES["mistral_gguf"] = SAMPLES["mistral_sp"]
SAMPLES["mistral_chatml"] = SAMPLES["qwen"][:2] + SAMPLES["mistral_sp"][2:]


def test_encode_decode_and_special_ids_equal_transformers(family_dir, request):
    family = request.node.callspec.params["family_dir"]
    tokenizer, hf = Tokenizer(family_dir), reference(family_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    for text in SAMPLES[family]:
        plain = hf(text, add_special_tokens=False).input_ids
        assert tokenizer.encode(text, bos=False).tolist() == plain, text
        assert tokenizer.encode(text).tolist() == hf(text).input_ids, text  # BOS as the checkpoint adds it
        assert tokenizer.decode(plain) == hf.decode(plain, skip_special_tokens=True), text


def test_bos_is_added_as_each_checkpoint_says(llama3_dir, qwen_dir, mistral_sp_dir):
    llama3, qwen, mistral = Tokenizer(llama3_dir), Tokenizer(qwen_dir), Tokenizer(mistral_sp_dir)
    assert llama3.add_bos and llama3.encode("Hi").tolist()[0] == llama3.token_to_id("<|begin_of_text|>")  # post-processor
    assert not qwen.add_bos and qwen.bos_id is None  # bos_token: null wins over generation_config's bos_token_id
    assert mistral.add_bos and mistral.encode("Hi").tolist()[0] == 1  # add_bos_token: true


def test_sentencepiece_without_config_is_the_library(mistral_model, tmp_path):
    """No tokenizer_config.json: text is sentencepiece's, control pieces in it are plain text (as before)."""
    from sentencepiece import SentencePieceProcessor

    (tmp_path / "tokenizer.model").write_bytes(mistral_model.read_bytes())
    sp, tokenizer = SentencePieceProcessor(model_file=str(mistral_model)), Tokenizer(tmp_path)
    for text in SAMPLES["mistral_sp"]:
        assert tokenizer.encode(text).tolist() == [sp.bos_id()] + sp.encode(text)


# ---- stop tokens ---------------------------------------------------------------------------------------------


def test_stop_ids_are_every_listed_eos_and_the_end_of_turn(llama3_dir, qwen_dir, mistral_json_dir):
    llama3 = Tokenizer(llama3_dir)
    listed = json.loads((llama3_dir / "generation_config.json").read_text())["eos_token_id"]
    assert stop_token_ids(llama3, resolve_style(None, llama3_dir)) == set(listed) == llama3.stop_ids
    assert resolve_style(None, llama3_dir).end_of_turn == "<|eot_id|>"
    qwen = Tokenizer(qwen_dir)  # base model: eos <|endoftext|>; the template's turns end with <|im_end|>
    assert stop_token_ids(qwen, None) == {qwen.token_to_id("<|endoftext|>")}
    assert stop_token_ids(qwen, resolve_style(None, qwen_dir)) == {qwen.token_to_id(t) for t in QWEN_SPECIALS[::2]}
    mistral = Tokenizer(mistral_json_dir)
    assert stop_token_ids(mistral, resolve_style(None, mistral_json_dir)) == {2}


def chain_model(vocab_size: int, chain: list[int]) -> Llama:
    """A tiny Llama whose greedy next token after chain[i] is chain[i + 1], whatever came before.

    The blocks' output projections are zero, so each position's final hidden state is its own token's
    embedding, normalized: token chain[i] is embedded as the unit vector e_i, and lm_head's row for
    chain[i + 1] points along e_i, so that row's logit (≈ 8·sqrt(n_embd)) beats every other (≈ 0).
    """
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny-mha", vocab_size=vocab_size, block_size=256)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.embed.weight.normal_(0, 1)
        model.lm_head.weight.normal_(0, 0.01)
        for i, (token, following) in enumerate(zip(chain, chain[1:])):
            model.embed.weight[token] = torch.nn.functional.one_hot(torch.tensor(i), model.config.n_embd).float()
            model.lm_head.weight[following, i] = 8.0
    return model


def chain_checkpoint(tokenizer_dir: Path, out: Path, stop_token: str) -> tuple[Path, list[int]]:
    """A lit checkpoint in `out`: the tokenizer files of `tokenizer_dir` and a chain model that answers the
    prompt "What is LoRA?" (in the checkpoint's chat template) with " fox dog" and then `stop_token`."""
    out.mkdir()
    for path in tokenizer_dir.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    tokenizer = Tokenizer(out)
    style = resolve_style(None, out)
    prompt = tokenizer.encode(style.apply("What is LoRA?"), bos=style.add_bos).tolist()
    words = [tokenizer.encode(w, bos=False).tolist()[0] for w in (" fox", " dog")]
    chain = [prompt[-1], *words, tokenizer.token_to_id(stop_token)]
    save_lit_checkpoint(chain_model(tokenizer.vocab_size, chain), out)
    return out, chain


@pytest.mark.parametrize("family,stop_token", [
    ("llama3", "<|end_of_text|>"), ("llama3", "<|eom_id|>"), ("llama3", "<|eot_id|>"),
    ("qwen", "<|endoftext|>"), ("qwen", "<|im_end|>")])
def test_generation_stops_at_each_stop_id(family, stop_token, request, tmp_path, capsys):
    checkpoint, chain = chain_checkpoint(request.getfixturevalue(f"{family}_dir"), tmp_path / family, stop_token)
    tokenizer, style = Tokenizer(checkpoint), resolve_style(None, checkpoint)
    prompt = tokenizer.encode(style.apply("What is LoRA?"), bos=style.add_bos)
    model = load_lit_model(checkpoint).eval()
    assert list(generate(model, prompt, 6, temperature=0))[:3] == chain[1:]  # the model does walk into the stop id
    assert list(generate(model, prompt, 6, temperature=0, stop_ids=stop_token_ids(tokenizer, style))) == chain[1:3]

    # generate_cli, as generate/base.py runs it: the checkpoint's template, its stop ids, stdout the answer only
    text = generate_cli(checkpoint, "What is LoRA?", max_new_tokens=6, temperature=0, precision="32-true",
                        load_model=load_finetuned, run_dir=None)
    out, err = capsys.readouterr()
    assert text == tokenizer.decode(chain[1:3]) == " fox dog"
    assert out == " fox dog\n" and "prompt style: chat-template" in err and "2 tokens" in err


def test_generate_script_uses_the_chat_template_and_stops_at_eot(llama3_dir, tmp_path):
    """generate/base.py as a user runs it on a Llama-3-style checkpoint: no --prompt_style, stops at <|eot_id|>."""
    checkpoint, _ = chain_checkpoint(llama3_dir, tmp_path / "llama3", "<|eot_id|>")
    proc = run_script("generate/base.py", "--checkpoint_dir", checkpoint, "--prompt", "What is LoRA?",
                      "--temperature", "0", "--max_new_tokens", "6", "--precision", "32-true", check=True)
    assert proc.stdout == " fox dog\n" and "2 tokens" in proc.stderr
    plain = run_script("generate/base.py", "--checkpoint_dir", checkpoint, "--prompt", "What is LoRA?",
                       "--prompt_style", "plain", "--temperature", "0", "--max_new_tokens", "3", check=True)
    assert "prompt style: plain" in plain.stderr  # an explicit style still wins


# ---- the style travels with a run -----------------------------------------------------------------------------


def test_chat_template_style_round_trips_through_prompt_style_yaml(llama3_dir, tmp_path):
    style = PromptStyle.from_name("chat-template", tmp_path / "missing", llama3_dir)
    style.save(tmp_path)
    assert "template: |" in (tmp_path / "prompt_style.yaml").read_text()  # the template, readable as written
    again = PromptStyle.from_dir(tmp_path)
    assert again == style and again.apply("Hi", "there") == style.apply("Hi", "there")
    assert resolve_style(None, tmp_path, Path("/nonexistent")) == style  # the run dir alone is enough


# ---- training data in the checkpoint's chat format ----------------------------------------------------------


@pytest.mark.parametrize("family,turn_end", [("llama3", "<|eot_id|>"), ("qwen", "<|im_end|>")])
def test_data_prep_with_the_chat_template_trains_the_format_transformers_renders(request, tmp_path, family, turn_end):
    """data_prep --prompt_style chat-template: each sample is transformers' apply_chat_template(user turn,
    add_generation_prompt=True), then the answer, then the token that closes the assistant's turn."""
    directory = request.getfixturevalue(f"{family}_dir")
    rows = [{"instruction": q, "input": i, "output": "Two small matrices."} for q, i in QUESTIONS] * 4
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    run_script("data_prep/json_data.py", "--data_file", tmp_path / "rows.json", "--destination_path", tmp_path / "data",
               "--checkpoint_dir", directory, "--prompt_style", "chat-template", "--val_split_fraction", "0",
               check=True)
    samples = torch.load(tmp_path / "data" / "train.pt", weights_only=True)
    hf = reference(directory)
    for sample in samples:
        content = f"{sample['instruction']}\n\n{sample['input']}" if sample["input"] else sample["instruction"]
        prompt = hf.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
        answer = hf.encode(sample["output"], add_special_tokens=False)
        assert sample["input_ids"].tolist() == prompt + answer + [hf.convert_tokens_to_ids(turn_end)]
    assert isinstance(PromptStyle.from_dir(tmp_path / "data"), ChatTemplateStyle)
