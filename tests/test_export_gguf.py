"""scripts/export_gguf.py against outside truth.

- Round trip: scripts/convert_gguf_checkpoint.py (tested against transformers' GGUF loader in test_gguf.py) reads the
  exported file back into the same weights — bit for bit in f32, and in q8_0 exactly what `gguf`'s own Q8_0
  quantization of each weight gives — the same Config (llama3 RoPE scaling included) and the same tokenizer.
- transformers' GGUF loader, with its own tokenizer, chat template and `generate`, writes the same greedy text as
  litft: on SmolLM2-135M-Instruct (q8_0) and on a Llama-3-style tiny model (byte-level BPE, llama3 RoPE scaling).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_main, run_script
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from test_chat_formats import CORPUS, llama3_dir, qwen_dir  # noqa: F401  (fixtures)
from test_merge_export import make_run

from litft.checkpoint import load_lit_model, save_lit_checkpoint
from litft.config import Config
from litft.errors import UserError
from litft.files import save_state_dict
from litft.generate import generate, stop_token_ids
from litft.gguf import metadata, open_gguf
from litft.lora import LoRAConfig, lora_state_dict
from litft.model import Llama
from litft.new_tokens import write_tokenizer
from litft.prompts import resolve_style
from litft.rope import RoPEScaling
from litft.tokenizer import Tokenizer

SCRIPT = "scripts/export_gguf.py"
TEXTS = CORPUS[:3] + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "  naïve café 🦙 12345\n\n x"]


def tiny_checkpoint(out, tokenizer_dir, rope: RoPEScaling | None, tied: bool, qkv_bias: bool = False):
    """A tiny random lit checkpoint in `out` with the tokenizer files of `tokenizer_dir`."""
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, out / path.name)
    config = Config(name="tiny", vocab_size=Tokenizer(out).vocab_size, n_layer=2, n_embd=64, n_head=4,
                    n_query_groups=2, intermediate_size=128, block_size=256, rope_scaling=rope, tie_embeddings=tied, qkv_bias=qkv_bias)
    torch.manual_seed(0)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.08)
    save_lit_checkpoint(model, out)
    return out


@pytest.fixture(scope="module")
def llama3_checkpoint(llama3_dir, tmp_path_factory):  # noqa: F811
    """Llama-3-style: byte-level BPE with Llama-3's specials and chat template, llama3 RoPE scaling, untied head."""
    rope = RoPEScaling(type="llama3", factor=8.0, original_max_position=64, low_freq_factor=1.0, high_freq_factor=4.0)
    return tiny_checkpoint(tmp_path_factory.mktemp("llama3_lit"), llama3_dir, rope, tied=False)


@pytest.fixture(scope="module")
def sentencepiece_checkpoint(sentencepiece_model, tmp_path_factory):
    """Llama-2-style: Mistral v0.1's 32000-piece sentencepiece model (BOS added), tied embeddings, no scaling."""
    tokenizer = tmp_path_factory.mktemp("sp")
    shutil.copy(sentencepiece_model, tokenizer / "tokenizer.model")
    return tiny_checkpoint(tmp_path_factory.mktemp("sp_lit"), tokenizer, None, tied=True)


@pytest.fixture(scope="module")
def qwen_checkpoint(qwen_dir, tmp_path_factory):  # noqa: F811
    """Qwen2-style: q, k, v biases (llama.cpp's qwen2 architecture), NFC-normalized BPE without BOS."""
    return tiny_checkpoint(tmp_path_factory.mktemp("qwen_lit"), qwen_dir, None, tied=True, qkv_bias=True)


@pytest.fixture(params=["llama3", "sentencepiece"])
def checkpoint(request):
    return request.getfixturevalue(f"{request.param}_checkpoint")


def convert_back(gguf_file, out_dir):
    """scripts/convert_gguf_checkpoint.py, in this process."""
    from scripts.convert_gguf_checkpoint import main

    main(gguf_file, out_dir)
    return load_lit_model(out_dir)


def export(checkpoint, out_file, dtype, *flags):
    return run_script(SCRIPT, "--checkpoint_dir", checkpoint, "--out_file", out_file, "--dtype", dtype, *flags)


def stored(w: torch.Tensor, qtype) -> torch.Tensor:
    """What `gguf` stores for w in `qtype`, read back as float32."""
    data = quantize(w.float().numpy(), qtype)
    return torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32).reshape(w.shape))


@pytest.mark.parametrize("kind,dtype", [("llama3", "f32"), ("llama3", "q8_0"), ("sentencepiece", "f32"), ("qwen", "f16")])
def test_round_trip_weights_config_tokenizer(request, tmp_path, kind, dtype):
    checkpoint = request.getfixturevalue(f"{kind}_checkpoint")
    proc = export(checkpoint, tmp_path / "m.gguf", dtype)
    assert proc.returncode == 0, proc.stderr
    assert "verified: " in proc.stdout and "greedy text equal on 4/4 prompts" in proc.stdout, proc.stdout
    ours, back = load_lit_model(checkpoint), convert_back(tmp_path / "m.gguf", tmp_path / "back")

    original = {k: v for k, v in ours.state_dict().items()}
    returned = back.state_dict()
    errors = []
    for name, w in original.items():
        expected = w if dtype == "f32" or w.dim() == 1 else stored(w, {"q8_0": Q.Q8_0, "f16": Q.F16}[dtype])
        assert torch.equal(returned[name], expected), name  # bit for bit what the file stores
        errors.append((returned[name] - w).abs().max().item())
    print(f"\n{dtype} round trip: max |Δweight| {max(errors):.3g}")  # q8_0: half a block's step at most

    config, again = ours.config.to_dict(), back.config.to_dict()
    assert {k: v for k, v in again.items() if k != "name"} == {k: v for k, v in config.items() if k != "name"}
    original_tok, back_tok = Tokenizer(checkpoint), Tokenizer(tmp_path / "back")
    for text in TEXTS:
        assert back_tok.encode(text).tolist() == original_tok.encode(text).tolist(), text
    assert (back_tok.bos_id, back_tok.eos_id, back_tok.add_bos) == \
        (original_tok.bos_id, original_tok.eos_id, original_tok.add_bos)
    config_file = checkpoint / "tokenizer_config.json"
    template = json.loads(config_file.read_text())["chat_template"] if config_file.is_file() else None
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text()).get("chat_template") == template


def transformers_answer(gguf_file, question: str, n: int) -> str:
    """transformers on its own: GGUF model and tokenizer, the file's chat template, greedy generate (RoPE divided
    by the file's rope_freqs, as llama.cpp does: transformers' loader skips that tensor)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from litft.readers import llama_cpp_rope_divisors

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    if (divisors := llama_cpp_rope_divisors(gguf_file)) is not None:
        model.model.rotary_emb.inv_freq /= torch.tensor(divisors)
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(question, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def litft_answer(checkpoint, question: str, n: int, model=None) -> str:
    tokenizer, style = Tokenizer(checkpoint), resolve_style(None, checkpoint)
    model = model if model is not None else load_lit_model(checkpoint).eval()
    ids = tokenizer.encode(style.apply(question), bos=style.add_bos) if style else tokenizer.encode(question)
    return tokenizer.decode(list(generate(model, ids, n, temperature=0, stop_ids=stop_token_ids(tokenizer, style))))


def test_llama3_greedy_text_equals_transformers_gguf_loader(llama3_checkpoint, tmp_path):
    """Past L = 64 positions. llama.cpp reads the scaling from the file's rope_freqs tensor, which transformers'
    loader skips: applied as llama.cpp applies it, the logits are litft's; left out, they are not. (The
    sentencepiece model's text is compared with transformers' in its round trip's verification.)"""
    from transformers import AutoModelForCausalLM

    from litft.readers import gguf_file

    export(llama3_checkpoint, tmp_path / "m.gguf", "f32", "--verify", "false")
    ours = load_lit_model(llama3_checkpoint).eval()
    question = "What is LoRA? " * 14
    tokenizer, style = Tokenizer(llama3_checkpoint), resolve_style(None, llama3_checkpoint)
    ids = tokenizer.encode(style.apply(question), bos=style.add_bos)
    unscaled = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        expected = ours(ids[None])[0]
        assert len(ids) > 64 and (gguf_file(tmp_path / "m.gguf").logits(ids) - expected).abs().max() < 1e-4
        assert (unscaled(ids[None]).logits[0] - expected).abs().max() > 1e-2
    answer = litft_answer(llama3_checkpoint, question, 24, ours)
    assert answer and transformers_answer(tmp_path / "m.gguf", question, 24) == answer


def test_llama_cpp_reads_the_export(checkpoint, tmp_path):
    """llama.cpp itself (llama-cpp-python, when installed): the same prompt ids and the same greedy answer."""
    llama_cpp = pytest.importorskip("llama_cpp")

    export(checkpoint, tmp_path / "m.gguf", "f32", "--verify", "false")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ours, tokenizer, style = load_lit_model(checkpoint).eval(), Tokenizer(checkpoint), resolve_style(None, checkpoint)
    for question in ("What is LoRA? " * 14, "Name a colour."):
        text = style.apply(question) if style else question
        ids = tokenizer.encode(text, bos=style.add_bos if style else None)
        bos = tokenizer.add_bos if style is None or style.add_bos is None else style.add_bos
        assert llm.tokenize(text.encode(), add_bos=bos, special=True) == ids.tolist()
        expected = list(generate(ours, ids, 24, temperature=0, stop_ids=stop_token_ids(tokenizer, style)))
        answer = []
        for token in llm.generate(ids.tolist(), top_k=1, temp=0.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(answer) == 24:
                break
            answer.append(token)
        assert answer == expected


def test_smollm2_q8_0_round_trip_and_transformers_text(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct exported in q8_0: the weights come back as Q8_0 stores them, and transformers reading
    the file (its tokenizer, the chat template it carries, its generate) answers as litft does on the file."""
    base = tmp_path / "smollm2"
    source = convert_back(smollm2_gguf, base).eval()
    proc = export(base, tmp_path / "smol.gguf", "q8_0", "--verify", "false")
    assert proc.returncode == 0, proc.stderr
    ours, llama_cpps = (metadata(open_gguf(path)) for path in (tmp_path / "smol.gguf", smollm2_gguf))
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token"):
        assert ours.get(f"tokenizer.ggml.{key}") == llama_cpps.get(f"tokenizer.ggml.{key}"), key
    back = convert_back(tmp_path / "smol.gguf", tmp_path / "back").eval()
    for name, w in source.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(back.state_dict()[name], w if w.dim() == 1 else stored(w, Q.Q8_0)), name

    question = "What is the capital of France?"
    answer = litft_answer(tmp_path / "back", question, 20, back)
    assert "Paris" in answer and transformers_answer(tmp_path / "smol.gguf", question, 20) == answer
    ids = Tokenizer(base).encode(resolve_style(None, base).apply(question), bos=False)
    with torch.no_grad():
        delta = (back(ids[None]) - source(ids[None])).abs().max().item()
    print(f"\nSmolLM2 q8_0: max |Δlogit| {delta:.3f} against the f32 source")
    assert delta < 2.0


def test_a_lora_run_with_new_tokens_is_merged_into_the_file(llama3_checkpoint, tmp_path):
    """A LoRA run that added two tokens: the file holds the merged model with the grown vocabulary, verified against
    the unmerged run, and transformers' GGUF tokenizer matches the new tokens whole, as litft's grown one does."""
    from transformers import AutoTokenizer

    run, V = tmp_path / "run", Config.from_checkpoint(llama3_checkpoint).vocab_size
    model = make_run(llama3_checkpoint, run, LoRAConfig(r=4, alpha=8, new_tokens=["<sql>", "</sql>"]), style=None)
    with torch.no_grad():
        model.embed.new_rows.normal_(std=0.5)
    save_state_dict(lora_state_dict(model), run / "lit_model_lora.pth")
    write_tokenizer(llama3_checkpoint, run, ["<sql>", "</sql>"], V)  # as finetune/lora.py leaves the run
    proc = export(llama3_checkpoint, tmp_path / "m.gguf", "f32", "--lora_path", run)  # the run's directory will do
    assert proc.returncode == 0 and "greedy text equal on 4/4 prompts" in proc.stdout, proc.stderr
    text = "a <sql>SELECT 1</sql> b"
    ids = Tokenizer(run).encode(text, bos=False).tolist()
    assert {V, V + 1} <= set(ids)
    reader = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert reader(text, add_special_tokens=False)["input_ids"] == ids


# ---- what is refused ------------------------------------------------------------------------------------------

def test_user_errors_are_one_line_and_write_nothing(llama3_checkpoint, tmp_path):
    yarn = tmp_path / "yarn"
    shutil.copytree(llama3_checkpoint, yarn)
    config = Config.from_checkpoint(yarn)
    Config(**{**config.to_dict(), "rope_scaling": RoPEScaling(type="yarn", factor=4.0, original_max_position=64)}).save(yarn)
    adapter = run_main(SCRIPT, "--checkpoint_dir", llama3_checkpoint, "--out_file", tmp_path / "a.gguf",
                       "--adapter_path", tmp_path / "x.pth")
    assert_user_error(adapter, "cannot be exported")
    yarn_scaling = run_main(SCRIPT, "--checkpoint_dir", yarn, "--out_file", tmp_path / "y.gguf")
    assert_user_error(yarn_scaling, "'yarn' RoPE scaling")
    from scripts.export_gguf import main  # the same checks, in this process (no interpreter start)

    for out_file, fragment in ((llama3_checkpoint / "in.gguf", "inside the base checkpoint"), (tmp_path, "is a directory")):
        with pytest.raises(UserError, match=fragment):
            main(llama3_checkpoint, out_file)
    assert not any(p.suffix == ".gguf" for p in [*tmp_path.iterdir(), *llama3_checkpoint.iterdir()])


def someone_elses_gguf(path):
    """A GGUF file that litft did not write (as a downloaded one, e.g. the offline SmolLM2 asset)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    writer.add_name("someone else's model")
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_out_file_is_checked_before_work_and_only_an_earlier_export_is_replaced(llama3_checkpoint, tmp_path):
    """--out_file under a file, or naming a GGUF file litft did not write, is refused in one line before any work,
    the file left byte for byte; an earlier export is replaced, and with --overwrite true any GGUF file. Of an
    existing file only the first bytes are read: a 1 TiB (sparse) non-GGUF file is refused at once."""
    from gguf import GGUFReader

    notes, foreign, ours = tmp_path / "notes.txt", someone_elses_gguf(tmp_path / "foreign.gguf"), tmp_path / "ours.gguf"
    notes.write_text("keep me")
    before = foreign.read_bytes()
    export = ("--checkpoint_dir", llama3_checkpoint, "--dtype", "f32", "--verify", "false", "--out_file")
    assert_user_error(run_main(SCRIPT, *export, notes / "x.gguf"), f"--out_file {notes / 'x.gguf'}: {notes} is a file")
    assert_user_error(run_main(SCRIPT, *export, foreign), f"--out_file {foreign} is a GGUF file that "
                      "scripts/export_gguf.py did not write; name a new .gguf file, or pass --overwrite true")
    assert notes.read_text() == "keep me" and foreign.read_bytes() == before
    for _ in range(2):
        assert run_main(SCRIPT, *export, ours).returncode == 0
    assert run_main(SCRIPT, *export, foreign, "--overwrite", "true").returncode == 0
    assert GGUFReader(foreign).fields["general.name"].contents() == llama3_checkpoint.name
    huge = tmp_path / "huge.gguf"
    with open(huge, "wb") as f:
        f.truncate(2**40)  # reading it whole would need 1 TiB of memory
    assert_user_error(run_main(SCRIPT, *export, huge), "exists and is not a GGUF file")


@pytest.mark.parametrize("change", ["unigram", "normalizer"])
def test_sentencepiece_models_llama_cpp_cannot_reproduce_are_refused(sentencepiece_model, tmp_path, change):
    """llama.cpp's 'llama' vocabulary is a BPE sentencepiece model without text normalization (Mistral's, the
    asset, is one); a unigram model, or one that normalizes text (NFKC here), is refused, either way."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from litft.gguf_vocab import sentencepiece_vocab

    proto = pb.ModelProto()
    proto.ParseFromString(sentencepiece_model.read_bytes())
    assert sentencepiece_vocab(sentencepiece_model)["tokenizer.ggml.model"] == "llama"
    if change == "unigram":
        proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    else:
        proto.normalizer_spec.name = "nmt_nfkc"
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(UserError, match="is not a Llama-style sentencepiece model"):
        sentencepiece_vocab(tmp_path / "tokenizer.model")


def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from litft.gguf_vocab import vocab_metadata

    tok = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="holds a WordLevel model"):
        vocab_metadata(tmp_path, 3, None)
    bpe = HFTokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()  # a sentencepiece-like BPE: no byte-level rule of llama.cpp
    bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="none of llama.cpp's named pre-tokenizers"):
        vocab_metadata(tmp_path, 3, None)
