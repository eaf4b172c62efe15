"""GGUF conversion against outside truth.

- Tiny GGUF files are written here with `gguf.GGUFWriter` from a random transformers LlamaForCausalLM, the way
  llama.cpp's converter writes them (q/k rows permuted, shapes in ggml order, tensors quantized with
  `gguf.quants.quantize`). The reference is that same transformers model holding `dequantize(quantize(W))`,
  computed by `gguf` on the *unpermuted* weights — so the converter's un-permutation is checked, not assumed.
- The real SmolLM2-135M-Instruct GGUF is compared with transformers' own GGUF loader, tensor by tensor and
  logit by logit.
- Tokenizers rebuilt from GGUF metadata are compared with the `tokenizers` / `sentencepiece` originals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_main, run_script
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer as HFTokenizer

from litft.checkpoint import load_lit_model
from litft.errors import UserError
from litft.gguf import byte_level_bpe
from litft.tokenizer import Tokenizer

SCRIPT = "scripts/convert_gguf_checkpoint.py"
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["Hello, world!", "the quick brown fox\n\tjumps", "naïve café 🦙", "  spaced  out  ", "<|im_start|>user\nhi<|im_end|>"]


# ---- writing GGUF files the way llama.cpp does -------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py: per head, rows (i, i + hs/2) become adjacent rows (2i, 2i + 1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    module, kind = rest.rsplit(".", 1)  # kind: weight, or bias (Qwen2's q, k, v)
    return f"blk.{layer}.{parts[module]}.{kind}"


def tiny_hf_llama(vocab_size: int, tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def write_tiny_gguf(path: Path, hf, types: list[Q], tokenizer: dict, float64: str = "", arch: str = "llama",
                    rope_freqs: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Write `hf` as a GGUF whose matrices cycle through `types`; return the dequantized HF state dict.
    The tensor named `float64` (a GGUF name) is stored as F64, a type the converter refuses. llama.cpp permutes
    q/k rows for its llama architecture only; Llama 3.1's RoPE scaling travels as the rope_freqs tensor."""
    c = hf.config
    writer = GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    for key, value in tokenizer.items():
        writer.add_key_value(key, *value)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    reference, matrices = {}, 0
    for name, w in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = w.numpy()
        qtype = Q.F32 if w.ndim == 1 else types[matrices % len(types)]
        matrices += w.ndim == 2
        reference[name] = torch.from_numpy(dequantize(quantize(w, qtype), qtype).reshape(w.shape).copy())
        if "q_proj" in name and arch == "llama":
            w = llama_cpp_permute(w, c.num_attention_heads)
        elif "k_proj" in name and arch == "llama":
            w = llama_cpp_permute(w, c.num_key_value_heads)
        data = quantize(w, qtype) if gguf_name(name) != float64 else w.astype(np.float64)
        writer.add_tensor(gguf_name(name), data, raw_dtype=None if data.dtype != np.uint8 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def trained_bpe():
    """A small byte-level BPE trained with `tokenizers`, and its GGUF metadata (as llama.cpp stores 'gpt2')."""
    from gguf import GGUFValueType as V
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 30, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    meta = {
        "tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": ("default", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY), "tokenizer.ggml.merges": (merges, V.ARRAY),
        "tokenizer.ggml.token_type": ([3 if t in specials else 1 for t in tokens], V.ARRAY),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.eos_token_id": (2, V.UINT32),
        "tokenizer.ggml.add_bos_token": (True, V.BOOL), "tokenizer.chat_template": (CHATML, V.STRING),
    }
    return tok, meta


def hf_with(hf, state_dict):
    hf.load_state_dict(state_dict, strict=not hf.config.tie_word_embeddings)
    return hf


# ---- tiny files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie,types", [
    (False, [Q.Q8_0, Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1]),
    (True, [Q.Q4_1, Q.Q8_0, Q.F32]),
])
def test_tiny_gguf_logits_match_dequantized_transformers(tmp_path, tie, types):
    tok, meta = trained_bpe()
    hf = tiny_hf_llama(tok.get_vocab_size(), tie)
    reference = write_tiny_gguf(tmp_path / "tiny.gguf", hf, types, meta)
    hf = hf_with(hf, reference)
    out = tmp_path / "ckpt"
    run_script(SCRIPT, "--gguf_path", tmp_path / "tiny.gguf", "--output_dir", out, check=True)
    assert not (out / "prompt_style.yaml").exists()  # the chat template in tokenizer_config.json is the style

    ours = load_lit_model(out)
    assert ours.config.tie_embeddings is tie and ours.config.n_query_groups == 2 and ours.config.rope_base == 5000.0
    x = torch.randint(0, hf.config.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)

    tokenizer = Tokenizer(out)  # the rebuilt tokenizer.json encodes as the trained original does
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (1, 2, True)
    for text in TEXTS:
        assert tokenizer.encode(text).tolist() == [1] + tok.encode(text, add_special_tokens=False).ids
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML


def test_converting_over_another_checkpoint_leaves_none_of_its_prompting(tmp_path, sentencepiece_model):
    """Converted into a directory that held another model: that model's tokenizer.model, chat_template.jinja and
    prompt_style.yaml would be read before this GGUF's own tokenizer and template, so none of them stays."""
    from litft.prompts import PromptStyle, resolve_style

    tok, meta = trained_bpe()
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(tok.get_vocab_size(), True), [Q.F32], meta)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    (out / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    PromptStyle("alpaca").save(out)

    run_script(SCRIPT, "--gguf_path", tmp_path / "tiny.gguf", "--output_dir", out, check=True)
    assert resolve_style(None, out).template == CHATML  # the GGUF's tokenizer.chat_template
    # the GGUF's own directory may hold what came with it (a hub repo's tokenizer files): refused, left as it was
    assert_user_error(run_main(SCRIPT, "--gguf_path", tmp_path / "tiny.gguf", "--output_dir", tmp_path),
                      "is the gguf directory this command reads")
    assert not (tmp_path / "lit_model.pth").exists()
    assert sorted(p.name for p in out.iterdir()) == ["lit_model.pth", "model_config.yaml", "tokenizer.json",
                                                     "tokenizer_config.json"]

    # a checkpoint there now: a second conversion (a mistyped --output_dir) had replaced it unasked
    (out / "litft_export.yaml").write_text("written_by: scripts/merge_lora.py\n")  # as a merge's output holds
    before = (out / "lit_model.pth").read_bytes()
    assert_user_error(run_main(SCRIPT, "--gguf_path", tmp_path / "tiny.gguf", "--output_dir", out),
                      f"--output_dir {out} already holds a checkpoint (lit_model.pth)", "--overwrite true")
    assert (out / "lit_model.pth").read_bytes() == before and (out / "litft_export.yaml").is_file()
    run_script(SCRIPT, "--gguf_path", tmp_path / "tiny.gguf", "--output_dir", out, "--overwrite", "true", check=True)
    assert not (out / "litft_export.yaml").exists()  # its record of the merge no longer says what the folder holds


def llama_cpp_rope_freqs(theta: float, head_size: int, factor: float, low: float, high: float, L: int) -> np.ndarray:
    """llama.cpp's converter for Llama 3.1: each pair's divisor of θ_i (1 fast, `factor` slow, blended between)."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_size, 2) / head_size):
        wavelength = 2 * np.pi / freq
        if wavelength < L / high:
            out.append(1.0)
        elif wavelength > L / low:
            out.append(factor)
        else:
            smooth = (L / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


@pytest.mark.parametrize("low,high,L", [(1.0, 4.0, 64), (1.0, 8.0, 200)])
def test_llama3_gguf_keeps_its_rope_scaling(tmp_path, low, high, L):
    """A Llama-3.1-style file (RoPE scaling stored as rope_freqs) converts to the same model: logits past L
    equal transformers' on the original llama3 config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, meta = trained_bpe()
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": L}
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, rope_parameters=rope)).eval()
    divisors = llama_cpp_rope_freqs(10000.0, 16, 8.0, low, high, L)
    assert ((divisors > 1) & (divisors < 8)).sum() >= 2  # the blended band the converter recovers the settings from
    write_tiny_gguf(tmp_path / "llama3.gguf", hf, [Q.F32], meta, rope_freqs=divisors)
    run_script(SCRIPT, "--gguf_path", tmp_path / "llama3.gguf", "--output_dir", tmp_path / "ckpt", check=True)
    ours = load_lit_model(tmp_path / "ckpt").eval()
    assert ours.config.rope_scaling.type == "llama3" and ours.config.rope_scaling.factor == 8.0
    x = torch.randint(0, hf.config.vocab_size, (1, 3 * L // 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


def test_qwen2_gguf_converts_with_biases_and_unpermuted_rows(tmp_path):
    """llama.cpp's qwen2 architecture: q, k, v biases, q/k rows in Hugging Face's order, Qwen's pre-tokenizer."""
    from gguf import GGUFValueType as V
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok, meta = trained_bpe()
    meta["tokenizer.ggml.pre"] = ("qwen2", V.STRING)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, rope_theta=5000.0, tie_word_embeddings=True)).eval()
    with torch.no_grad():  # transformers starts biases at zero, which would hide a dropped one
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    reference = write_tiny_gguf(tmp_path / "qwen2.gguf", hf, [Q.Q8_0, Q.F16], meta, arch="qwen2")
    hf = hf_with(hf, reference)
    run_script(SCRIPT, "--gguf_path", tmp_path / "qwen2.gguf", "--output_dir", tmp_path / "ckpt", check=True)
    ours = load_lit_model(tmp_path / "ckpt").eval()
    assert ours.config.qkv_bias
    x = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    tokenizer = Tokenizer(tmp_path / "ckpt")  # Qwen's split: digits one at a time
    assert tokenizer.encode("12345", bos=False).tolist() == [tok.token_to_id(d) for d in "12345"]


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    tok, meta = trained_bpe()
    hf = tiny_hf_llama(tok.get_vocab_size(), tie=True)
    write_tiny_gguf(tmp_path / "odd.gguf", hf, [Q.F32], meta, rope_freqs=np.linspace(1, 3, 8) ** 2)
    proc = run_main(SCRIPT, "--gguf_path", tmp_path / "odd.gguf", "--output_dir", tmp_path / "out")
    assert_user_error(proc, "rope_freqs")
    assert not (tmp_path / "out").exists()


def test_sentencepiece_vocabulary_round_trips(tmp_path, sentencepiece_model):
    """A 'llama' (sentencepiece) GGUF vocabulary — pieces, scores and types, as llama.cpp stores Mistral's
    tokenizer.model — becomes a tokenizer.model that encodes exactly as the original."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    from litft.gguf import tokenizer_files

    proto = pb.ModelProto()
    proto.ParseFromString(sentencepiece_model.read_bytes())
    meta = {  # the header fields llama.cpp writes for a sentencepiece vocabulary
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }
    for name, contents in tokenizer_files(meta).items():
        (tmp_path / name).write_bytes(contents if isinstance(contents, bytes) else contents.encode())

    original = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    tok = Tokenizer(tmp_path)
    assert tok.backend == "sentencepiece" and (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    # (special tokens written in text, "<s>", are ids as in transformers: test_chat_formats.py's mistral_gguf)
    for text in TEXTS + ["Größe 12345\n\n  x", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⁂ 日本語"]:
        ids = original.encode(text)
        assert tok.encode(text, bos=False).tolist() == ids and tok.decode(ids) == original.decode(ids)


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "float64"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    path, message = tmp_path / "missing.gguf", "missing.gguf does not exist"
    if case == "float64":  # checked before any weight is converted: nothing may be written
        tok, meta = trained_bpe()
        path, message = tmp_path / "f64.gguf", "blk.1.ffn_up.weight is stored as F64, which this converter does not"
        write_tiny_gguf(path, tiny_hf_llama(tok.get_vocab_size(), tie=True), [Q.Q8_0], meta, float64="blk.1.ffn_up.weight")
    out = tmp_path / "out"
    assert_user_error(run_main(SCRIPT, "--gguf_path", path, "--output_dir", out), message)
    assert not out.exists()


def test_not_gguf_not_llama_and_inconsistent_are_user_errors(tmp_path):
    from litft.gguf import check_tensors, config_from_gguf, metadata, open_gguf, tensor_shapes

    (tmp_path / "weights.gguf").write_text("hello")
    with pytest.raises(UserError, match="is not a GGUF file"):
        open_gguf(tmp_path / "weights.gguf")
    writer = GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(UserError, match="holds a 'gpt2' model; the architectures that convert to litft are llama, qwen2"):
        config_from_gguf(metadata(open_gguf(tmp_path / "gpt2.gguf")), {})

    tok, meta = trained_bpe()
    hf = tiny_hf_llama(tok.get_vocab_size(), tie=False)
    hf.config.intermediate_size = 96  # the header now disagrees with the 128-wide MLP tensors
    write_tiny_gguf(tmp_path / "inconsistent.gguf", hf, [Q.F32], meta)
    reader = open_gguf(tmp_path / "inconsistent.gguf")
    config = config_from_gguf(metadata(reader), tensor_shapes(reader))
    with pytest.raises(UserError, match=r"blk.0.ffn_gate.weight has shape \(128, 64\) but the file's metadata implies \(96, 64\)"):
        check_tensors(reader, config)
    hf = tiny_hf_llama(tok.get_vocab_size(), tie=False)
    hf.config.num_hidden_layers = 1  # the header now says one block; the file holds two
    write_tiny_gguf(tmp_path / "extra.gguf", hf, [Q.F32], meta)
    reader = open_gguf(tmp_path / "extra.gguf")
    with pytest.raises(UserError, match="the GGUF holds blk.1.attn_q.weight, which the 1-layer model its header"):
        check_tensors(reader, config_from_gguf(metadata(reader), tensor_shapes(reader)))
    header = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2}
    with pytest.raises(UserError, match="the GGUF header lacks llama.attention.head_count, llama.feed_forward_length"):
        config_from_gguf(header, {"token_embd.weight": (96, 64)})


def test_unsupported_tokenizer_type_is_a_user_error():
    from litft.gguf import tokenizer_files

    with pytest.raises(UserError, match="tokenizer type 'bert' is not supported"):
        tokenizer_files({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# ---- the real model -----------------------------------------------------------------------------------------

def test_smollm2_gguf_matches_transformers_gguf_loader(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct (F32/Q8_0/Q4_1): our conversion equals transformers' own GGUF loading, tensor for
    tensor (so q/k are un-permuted as transformers does), and litft's Llama gives its logits and says Paris, as
    loaded (plain) and in the CPU decoding layout generation uses (fast)."""
    from transformers import AutoModelForCausalLM

    from litft.fast.cpu_decoding import prepare_for_cpu_decoding

    out = tmp_path / "SmolLM2-135M-Instruct"
    run_script(SCRIPT, "--gguf_path", smollm2_gguf, "--output_dir", out, check=True)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                     dtype=torch.float32).eval()
    ours = load_lit_model(out).eval()
    assert ours.config.tie_embeddings and reference.config.tie_word_embeddings
    converted = ours.state_dict()
    for hf_name, tensor in reference.state_dict().items():
        if hf_name != "lm_head.weight":  # tied: the same tensor as the embedding
            torch.testing.assert_close(converted[lit_from_hf(hf_name)], tensor, atol=1e-6, rtol=0)

    tokenizer = Tokenizer(out)
    ids = tokenizer.encode("The capital of France is")[None]  # (1, T)
    with torch.no_grad():
        expected = reference(ids).logits
        plain = ours(ids)
        fast = prepare_for_cpu_decoding(ours)(ids)
    for logits in (plain, fast):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        assert logits[0].argmax(-1).tolist() == expected[0].argmax(-1).tolist()
        assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def lit_from_hf(name: str) -> str:
    parts = {"input_layernorm": "attn_norm", "self_attn": "attn", "post_attention_layernorm": "mlp_norm"}
    top = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if name in top:
        return top[name]
    layer, module, rest = name.removeprefix("model.layers.").split(".", 2)  # "3", "self_attn", "q_proj.weight"
    return f"blocks.{layer}.{parts.get(module, module)}.{rest}"


def test_unknown_tensors_and_a_missing_freq_base():
    """A tensor a Llama does not have is one line (not a KeyError later); a header without rope.freq_base means
    llama.cpp's default base, 10000 (as transformers' LlamaConfig too)."""
    from transformers import LlamaConfig

    from litft.gguf import config_from_gguf, lit_name

    for name in ("blk.0.attn_qkv.weight", "blk.0.ffn_gate_exps.weight", "token_types.weight"):
        with pytest.raises(UserError, match="a plain Llama does not have"):
            lit_name(name)
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.layer_norm_rms_epsilon": 1e-5}
    config = config_from_gguf(meta, {"token_embd.weight": (96, 64)})
    assert config.rope_base == LlamaConfig().rope_parameters["rope_theta"] == 10000.0


@pytest.mark.parametrize("pre, tokens", [("llama-bpe", ["Ġabc"]), ("gpt2", ["Ġa", "bc"])])
def test_llama3_words_are_looked_up_whole_before_merging(pre, tokens):
    """llama.cpp's rule for the llama-bpe pre-tokenizer (Llama 3's tokenizer.json: "ignore_merges": true): a word
    that is a token is that token, though no chain of merges reaches it (" abc" here: merges give Ġa + bc).
    Other pre-tokenizers merge as BPE does."""
    vocab = ["Ġ", "a", "b", "c", "Ġa", "bc", "Ġabc"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": vocab,
            "tokenizer.ggml.token_type": [1] * len(vocab), "tokenizer.ggml.merges": ["Ġ a", "b c"]}
    assert HFTokenizer.from_str(byte_level_bpe(meta)).encode(" abc").tokens == tokens
