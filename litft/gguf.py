"""GGUF (llama.cpp's file format) → lit checkpoint: dequantize, un-permute, rename, rebuild the tokenizer.

A GGUF file is one header of typed key/value metadata followed by tensors. Everything needed to rebuild a
model is in it:

    llama.block_count, llama.embedding_length, llama.attention.head_count, ...   -> Config
    token_embd.weight, blk.{i}.attn_q.weight, ..., output_norm.weight            -> state dict
    tokenizer.ggml.model / tokens / merges / scores / token_type / bos_token_id   -> tokenizer files
    tokenizer.chat_template                                                       -> tokenizer_config.json

Two architectures convert: `llama` (Llama, Mistral, SmolLM2, TinyLlama) and `qwen2` (the same network with
biases on q, k and v). Five things differ from a PyTorch state dict:

1. **Quantized storage.** A Q8_0 tensor is stored in blocks of 32 weights: one float16 scale d and 32 int8
   values q, weight = d·q. Q4_0 packs 4-bit q with weight = d·(q − 8); Q4_1 adds a per-block minimum m,
   weight = d·q + m. `gguf.quants.dequantize` turns every supported type back into float32; the result is
   exactly the model llama.cpp runs, so quantization error is kept, not undone.
2. **Reversed shapes.** GGUF lists dimensions fastest-varying first (ggml's `ne`), so a PyTorch (out, in)
   weight is described as [in, out]. The bytes are the same; only the description is reversed.
3. **Permuted q/k rows.** Hugging Face's Llama applies RoPE to the channel pairs (i, i + hs/2) of each head
   ("rotate half"); llama.cpp rotates adjacent pairs (2i, 2i + 1). Its converter therefore reorders the rows
   of attn_q (per query head) and attn_k (per key/value head) so adjacent rows hold each pair:

       HF row   (j · hs/2 + i)   ->   GGUF row (2i + j)        j ∈ {0, 1}, i < hs/2, within each head

   litft uses rotate-half like Hugging Face, so `unpermute_qk` puts the rows back. (llama.cpp's qwen2
   architecture rotates halves itself, so its rows are stored in Hugging Face's order.)
4. **Names.** `blk.3.ffn_gate.weight` is litft's `blocks.3.mlp.gate_proj.weight`; a file without
   `output.weight` reuses `token_embd.weight` as the output layer (tied embeddings).
5. **RoPE scaling.** Llama 3.1's is not in the header: the file holds a `rope_freqs` tensor that divides each
   pair's frequency. `llama3_from_rope_freqs` recovers the llama3 settings from it and checks that they
   reproduce every divisor (litft/rope.py computes the frequencies from the settings).

The names, both row orders and the tokenizer tables live in litft/gguf_format.py, which the exporter
(litft/gguf_export.py) writes with. Nothing is written until the whole file has been checked, and each tensor is dequantized straight into the
output state dict, so the conversion holds one full copy of the weights (the GGUF itself is memory-mapped).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from litft.checkpoint import WEIGHTS, check_not_replacing
from litft.config import Config
from litft.errors import UserError
from litft.files import (
    TOKENIZER_FILES,
    WRITTEN_BY,
    atomic_path,
    check_not_hf_model,
    check_output_dir,
    save_state_dict,
    staged_output,
)
from litft.gguf_format import (
    ARCHITECTURES,
    CONTROL,
    NFC_PRE_TOKENIZERS,
    PRE_TOKENIZERS,
    ROPE_FREQS,
    USER_DEFINED,
    WHOLE_WORDS_FIRST,
    lit_name,
    unpermute_qk,
)
from litft.model import Llama
from litft.prompts import FILE as PROMPT_STYLE
from litft.rope import RoPEScaling, inverse_frequencies

# Storage types converted (all dequantized by gguf.quants); IQ* and the integer types are refused up front.
SUPPORTED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


# ---- reading ------------------------------------------------------------------------------------------------

def open_gguf(path: Path):
    """Memory-map a GGUF file; a missing or non-GGUF file is a UserError."""
    from gguf import GGUFReader

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass the .gguf file itself with --gguf_path")
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the .gguf file with --gguf_path")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0]}); it may be truncated") from None


def metadata(reader) -> dict[str, Any]:
    """The key/value header as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in PyTorch order (GGUF lists ggml's `ne`, fastest-varying dimension first)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}


# The header keys (after "<arch>.") that a model's shape is read from
REQUIRED = ("embedding_length", "attention.head_count", "block_count", "feed_forward_length",
            "attention.layer_norm_rms_epsilon")


def config_from_gguf(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], name: str = "",
                     rope_freqs: np.ndarray | None = None) -> Config:
    """The model's Config from the header; `rope_freqs` is the file's rope_freqs.weight tensor, if it has one."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"this GGUF holds a {arch!r} model; the architectures that convert to litft are "
                        f"{', '.join(ARCHITECTURES)} (Llama, Mistral, SmolLM2, TinyLlama, Qwen2)")
    missing = [f"{arch}.{key}" for key in REQUIRED if f"{arch}.{key}" not in meta]
    if missing:
        raise UserError(f"the GGUF header lacks {', '.join(missing)}; it does not describe a complete {arch} model")
    n_embd, n_head = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    head_size = n_embd // n_head
    for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.key_length", f"{arch}.attention.value_length"):
        if meta.get(key, head_size) != head_size:
            raise UserError(f"{key} = {meta[key]} differs from the head size {head_size}; not a plain Llama layout")
    rope_base = _float32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    try:
        return Config(
            name=name,
            vocab_size=shapes["token_embd.weight"][0],  # (vocab, n_embd); the vocab may be padded
            n_layer=meta[f"{arch}.block_count"],
            n_embd=n_embd,
            n_head=n_head,
            n_query_groups=meta.get(f"{arch}.attention.head_count_kv") or n_head,
            intermediate_size=meta[f"{arch}.feed_forward_length"],
            block_size=meta.get(f"{arch}.context_length", 4096),
            rope_base=rope_base,
            rope_scaling=rope_scaling(meta, arch, rope_base, head_size, rope_freqs),
            norm_eps=_float32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
            tie_embeddings="output.weight" not in shapes,
            qkv_bias=arch == "qwen2",
        )
    except (KeyError, ValueError) as e:
        raise UserError(f"the GGUF metadata does not describe a usable Llama model ({e})") from None


def rope_scaling(meta: dict[str, Any], arch: str, base: float, head_size: int,
                 rope_freqs: np.ndarray | None) -> RoPEScaling | None:
    """llama.cpp stores linear scaling in the header, and Llama 3.1's as a tensor of per-pair divisors."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_freqs is not None:
        return llama3_from_rope_freqs(rope_freqs, base, head_size)
    if kind in ("none", ""):
        return None
    if kind == "linear":
        return RoPEScaling(type="linear", factor=_float32(meta[f"{arch}.rope.scaling.factor"]))
    raise UserError(f"this GGUF's {arch}.rope.scaling.type {kind!r} does not convert; litft reads 'linear' and "
                    "Llama 3.1's rope_freqs tensor")


def llama3_from_rope_freqs(divisors: np.ndarray, base: float, head_size: int) -> RoPEScaling:
    """Recover llama3 RoPE settings from llama.cpp's rope_freqs tensor (θ_i is divided by divisors[i]).

    In the band between the two wavelengths, 1/divisor = (1 − s)/factor + s with s = L/(λ·(high − low)) −
    low/(high − low), linear in 1/λ: two in-band pairs fix the line, and the band's ends are where it reaches 0
    and 1. So low = 1, high = 1 − 1/b and L = −a/b (s = a/λ + b) reproduce every divisor. Checked, not assumed.
    """
    d = divisors.astype(np.float64)
    factor = float(d.max())
    theta = 1.0 / base ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size)
    band = (d > 1 + 1e-6) & (d < factor - 1e-6)
    scaling = None
    if factor > 1 and band.sum() >= 2:
        s = (1 / d[band] - 1 / factor) / (1 - 1 / factor)  # the blend of each in-band pair
        a, b = np.polyfit(theta[band] / (2 * np.pi), s, 1)  # s = a / λ + b
        if b < 0:
            scaling = RoPEScaling(type="llama3", factor=_float32(factor), original_max_position=int(round(-a / b)),
                                  low_freq_factor=1.0, high_freq_factor=float(np.round(1 - 1 / b, 4)))
    if scaling is None or not _reproduces(scaling, divisors, base, head_size):
        raise UserError("this GGUF's rope_freqs tensor is not Llama 3.1's RoPE scaling (or too few of its pairs are "
                        "scaled to recover it); litft cannot convert it exactly")
    return scaling


def _reproduces(scaling: RoPEScaling, divisors: np.ndarray, base: float, head_size: int) -> bool:
    config = Config(n_embd=head_size, n_head=1, n_query_groups=1, rope_base=base, rope_scaling=scaling)
    plain = inverse_frequencies(replace(config, rope_scaling=None), 1)[0]
    scaled = inverse_frequencies(config, 1)[0]
    return bool(np.allclose((plain / scaled).numpy(), divisors, rtol=1e-4, atol=0))


def _float32(x: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06. Keep the shortest decimal with that float32 value."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def model_tensors(reader) -> list:
    """The tensors that become weights: all but rope_freqs, which config_from_gguf reads as RoPE scaling."""
    return [t for t in reader.tensors if t.name != ROPE_FREQS]


def rope_freqs(reader) -> np.ndarray | None:
    found = [t for t in reader.tensors if t.name == ROPE_FREQS]
    return dequantize(found[0]).numpy() if found else None


def check_tensors(reader, config: Config) -> None:
    """Refuse unknown names, unsupported storage types and wrong shapes before anything is written."""
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in Llama(config).state_dict().items()}
    shapes = tensor_shapes(reader)
    shapes.pop(ROPE_FREQS, None)
    for t in model_tensors(reader):
        name = lit_name(t.name)
        if t.tensor_type.name not in SUPPORTED:
            raise UserError(f"tensor {t.name} is stored as {t.tensor_type.name}, which this converter does not "
                            f"dequantize; supported: {', '.join(SUPPORTED)}")
        if name not in expected:  # e.g. a block past the header's block_count, or q/k/v biases on a llama model
            raise UserError(f"the GGUF holds {t.name}, which the {config.n_layer}-layer model its header describes "
                            f"does not have; litft converts the plain {'Qwen2' if config.qkv_bias else 'Llama'} layout")
        if shapes[t.name] != expected[name]:
            raise UserError(f"tensor {t.name} has shape {shapes[t.name]} but the file's metadata implies "
                            f"{expected[name]}; the GGUF is inconsistent")
    missing = {name for name in expected if name != "lm_head.weight"} - {lit_name(n) for n in shapes}
    if missing:
        raise UserError(f"the GGUF lacks {len(missing)} tensors a {config.n_layer}-layer Llama needs (e.g. {min(missing)})")


# ---- weights ------------------------------------------------------------------------------------------------

def dequantize(tensor) -> Tensor:
    """One GGUF tensor -> float32 torch tensor in PyTorch's (out, in) order."""
    from gguf.quants import dequantize as gguf_dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml's ne order is reversed
    values = gguf_dequantize(np.asarray(tensor.data), tensor.tensor_type)  # a plain view of the memory map
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(shape))


def convert_weights(reader, config: Config, dtype: torch.dtype = torch.float32,
                    permuted_qk: bool = True) -> dict[str, Tensor]:
    """Every model tensor, dequantized; q/k rows un-permuted where llama.cpp permuted them (its llama arch)."""
    state_dict = {}
    for t in model_tensors(reader):
        w = dequantize(t)
        if permuted_qk and t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config.n_head)
        elif permuted_qk and t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config.n_query_groups)
        state_dict[lit_name(t.name)] = w.to(dtype)
    return state_dict


def convert_gguf(gguf_path: Path, output_dir: Path, dtype: torch.dtype = torch.float32,
                 name: str | None = None, overwrite: bool = False) -> str:
    """GGUF file -> lit checkpoint directory (lit_model.pth, model_config.yaml, tokenizer files). Returns a summary.

    `name` is the model's name in model_config.yaml (default: the directory's). Everything is read and checked
    before anything is written. A directory that holds a checkpoint is replaced only with `overwrite` (a mistyped
    path must not replace a model); then that model's tokenizer files, prompt_style.yaml and an exporter's record
    of having written it are removed too: they would be read in place of this one's.
    """
    output_dir = check_output_dir("--output_dir", Path(output_dir), "a checkpoint", gguf=Path(gguf_path).parent)
    check_not_hf_model("--output_dir", output_dir)
    check_not_replacing("--output_dir", output_dir, overwrite)
    reader = open_gguf(gguf_path)
    meta = metadata(reader)
    config = config_from_gguf(meta, tensor_shapes(reader), name or output_dir.name, rope_freqs(reader))
    check_tensors(reader, config)
    files = tokenizer_files(meta)

    state_dict = convert_weights(reader, config, dtype, permuted_qk=meta["general.architecture"] == "llama")
    # published together; an earlier model's other tokenizer files and prompt style go (the GGUF's chat template
    # is this model's style)
    with staged_output(output_dir, TOKENIZER_FILES + (PROMPT_STYLE, WRITTEN_BY)) as scratch:
        save_state_dict(state_dict, scratch / WEIGHTS)
        config.save(scratch)
        for file, contents in files.items():
            with atomic_path(scratch / file) as tmp:
                tmp.write_bytes(contents if isinstance(contents, bytes) else contents.encode())

    size = (output_dir / WEIGHTS).stat().st_size / 2**20
    types = "/".join(sorted({t.tensor_type.name for t in reader.tensors}))
    return (f"wrote {output_dir}: {len(state_dict)} tensors ({types} -> {str(dtype).removeprefix('torch.')}), "
            f"{WEIGHTS} {size:.0f} MiB, {', '.join(files)}")


# ---- tokenizer ----------------------------------------------------------------------------------------------

def tokenizer_files(meta: dict[str, Any]) -> dict[str, str | bytes]:
    """Rebuild the tokenizer from the metadata: {file name: contents} for the checkpoint directory."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        files: dict[str, str | bytes] = {"tokenizer.json": byte_level_bpe(meta)}
    elif kind == "llama":
        files = {"tokenizer.model": sentencepiece_model(meta)}
    elif kind is None:
        raise UserError("the GGUF has no tokenizer (no tokenizer.ggml.model); it cannot become a usable checkpoint")
    else:
        raise UserError(f"the GGUF's tokenizer type {kind!r} is not supported; supported: 'gpt2' (byte-level BPE), "
                        "'llama' (sentencepiece)")
    files["tokenizer_config.json"] = json.dumps(tokenizer_config(meta), indent=2, ensure_ascii=False)
    return files


def _special(meta: dict[str, Any], kind: str) -> str | None:
    id = meta.get(f"tokenizer.ggml.{kind}_token_id")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[id] if id is not None and 0 <= id < len(tokens) else None


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    sentencepiece = meta["tokenizer.ggml.model"] == "llama"
    config = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", sentencepiece)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        **{f"{k}_token": _special(meta, {"pad": "padding", "unk": "unknown"}.get(k, k)) for k in ("bos", "eos", "pad", "unk")},
        "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length"),
        "tokenizer_class": "LlamaTokenizer" if sentencepiece else "PreTrainedTokenizerFast",
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {k: v for k, v in config.items() if v is not None}


def byte_level_bpe(meta: dict[str, Any]) -> str:
    """GPT-2-style byte-level BPE (SmolLM2, Llama-3): vocab + merges + the splitting regex -> tokenizer.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"the GGUF's pre-tokenizer {pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               ignore_merges=pre in WHOLE_WORDS_FIRST))
    if pre in NFC_PRE_TOKENIZERS:
        tok.normalizer = normalizers.NFC()
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, y in zip(tokens, types) if y == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, y in zip(tokens, types) if y == USER_DEFINED])
    bos = _special(meta, "bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:  # the post-processor adds BOS
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return tok.to_str(pretty=True)


def sentencepiece_model(meta: dict[str, Any]) -> bytes:
    """A Llama-style sentencepiece vocabulary (pieces, scores, types) -> a tokenizer.model file."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    model = pb.ModelProto()
    for piece, score, type in zip(tokens, scores, types or [1] * len(tokens)):
        model.pieces.add(piece=piece, score=score, type=type)
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(tokens), 6 in types
    for kind, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos")):
        id = meta.get(f"tokenizer.ggml.{key}_token_id", -1)
        setattr(spec, f"{kind}_id", id)
        if id >= 0:
            setattr(spec, f"{kind}_piece", tokens[id])
    spec.pad_id = -1
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
    data = model.SerializeToString()
    try:
        SentencePieceProcessor(model_proto=data)  # sentencepiece checks it is a consistent model
    except RuntimeError as e:
        raise UserError(f"the GGUF's sentencepiece vocabulary is inconsistent ({str(e).splitlines()[0]})") from None
    return data
