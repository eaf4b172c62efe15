"""lit model → GGUF, the file llama.cpp and Ollama run: the inverse of litft/gguf.py.

    Config                  -> llama.block_count, llama.embedding_length, llama.attention.head_count, ...
    state dict              -> token_embd.weight, blk.{i}.attn_q.weight, ..., output_norm.weight (+ output.weight
                               unless the embeddings are tied), q/k rows in llama.cpp's order (litft/gguf_format.py)
    RoPE scaling            -> linear: llama.rope.scaling.type/factor; llama3: rope_freqs.weight, the divisor
                               θ_i / θ'_i of each channel pair (llama.cpp divides θ_i by it)
    tokenizer               -> tokenizer.ggml.* and tokenizer.chat_template (litft/gguf_vocab.py)

A model with q, k, v biases (Qwen2) is written as llama.cpp's `qwen2` architecture, whose rows keep HF's order.

Storage (`--dtype`): norms and rope_freqs stay f32, as llama.cpp's converter keeps them; every matrix is f32,
f16, bf16 or q8_0. Q8_0 cuts each row into blocks of 32 weights and stores one f16 scale d = max|w| / 127 and 32
int8 values q = round(w / d) per block: w ≈ d·q, 8.5 bits per weight, an error of at most d/2 per weight. A
matrix whose rows are not a multiple of 32 long cannot be cut so and is stored in f16 instead.

The file is written as a stream: first the header and every tensor's name, shape and type, then the tensors one
after another, each converted just before it is written, so no second copy of the model is built. The model is
left holding exactly what the file stores (every weight replaced by its stored value, read back): the reference
that the verification compares an outside reader of the file with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUFWriter, LlamaFileType, RopeScalingType
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf.quants import dequantize, quantize
from torch import Tensor

from litft.checkpoint import lit_state_dict
from litft.config import Config
from litft.errors import UserError
from litft.gguf_format import ROPE_FREQS, gguf_name, permute_qk
from litft.model import Llama
from litft.rope import inverse_frequencies

DTYPES = ("f32", "f16", "bf16", "q8_0")
EXPORTED_BY = "litft.exported_by"  # a file this writes names its writer here: only such a file is replaced unasked
EXPORTER = "scripts/export_gguf.py"


def storage_type(dtype: str, shape: tuple[int, ...]):
    """The GGML type a tensor of `shape` is stored as under --dtype `dtype`."""
    if len(shape) == 1:
        return Q.F32
    if dtype == "q8_0" and shape[-1] % 32:
        return Q.F16  # q8_0 blocks are 32 weights of one row
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


def check_exportable(config: Config) -> None:
    s = config.rope_scaling
    if s is not None and s.type not in ("default", "linear", "llama3"):
        raise UserError(f"this model uses {s.type!r} RoPE scaling; the GGUF export writes linear and llama3 scaling "
                        "only, so llama.cpp would run it with other positions")


def llama3_rope_freqs(config: Config) -> np.ndarray:
    """(hs/2,) float32: θ_i / θ'_i, the plain frequency over the llama3-scaled one (1 fast, `factor` slow)."""
    plain = Config(n_embd=config.head_size, n_head=1, n_query_groups=1, rope_base=config.rope_base)
    return (inverse_frequencies(plain, 1)[0] / inverse_frequencies(config, 1)[0]).numpy().astype(np.float32)


def tensors(model: Llama) -> Iterator[tuple[str, str, Tensor, Tensor]]:
    """(GGUF name, lit name, the float32 tensor, the same in the file's row order) for every weight the file holds."""
    c = model.config
    permuted = not c.qkv_bias  # llama.cpp's llama architecture rotates adjacent pairs; qwen2 rotates halves
    for name, w in lit_state_dict(model).items():
        w = w.detach().float()
        if permuted and name.endswith("attn.q_proj.weight"):
            yield gguf_name(name), name, w, permute_qk(w, c.n_head)
        elif permuted and name.endswith("attn.k_proj.weight"):
            yield gguf_name(name), name, w, permute_qk(w, c.n_query_groups)
        else:
            yield gguf_name(name), name, w, w


def header(writer, config: Config, dtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_string(EXPORTED_BY, EXPORTER)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.rope_scaling is not None and config.rope_scaling.type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)
    file_types = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                  "q8_0": LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(GGML_QUANT_VERSION)


def exported_by(path: Path) -> str | None:
    """What a GGUF file's EXPORTED_BY key names (its header read through a memory map), or None."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get(EXPORTED_BY)
    except Exception:  # noqa: BLE001  a file gguf cannot parse was not written here
        return None
    return str(field.contents()) if field is not None else None


def add_metadata(writer, meta: dict[str, Any]) -> None:
    """Typed key/values: ids are uint32, token types int32, scores float32, as llama.cpp reads them."""
    scalar = {bool: V.BOOL, int: V.UINT32, float: V.FLOAT32, str: V.STRING}
    arrays = {"tokenizer.ggml.token_type": V.INT32, "tokenizer.ggml.scores": V.FLOAT32}  # else lists of strings
    for key, value in meta.items():
        if isinstance(value, list):
            writer.add_key_value(key, value, V.ARRAY, sub_type=arrays.get(key, V.STRING))
        else:
            writer.add_key_value(key, value, scalar[type(value)])


def write_gguf(path: Path, model: Llama, vocab: dict[str, Any], dtype: str, name: str) -> dict[str, int]:
    """Write `model` and its tokenizer metadata to `path`; returns how many tensors each storage type holds. The
    model is left holding the values the file stores."""
    config = model.config
    check_exportable(config)
    extra = {ROPE_FREQS: llama3_rope_freqs(config)} if config.rope_scaling and config.rope_scaling.type == "llama3" else {}
    shapes = {gguf_name(n): tuple(w.shape) for n, w in lit_state_dict(model).items()}  # permuting keeps shapes
    plan = [(n, shape, storage_type(dtype, shape)) for n, shape in shapes.items()]
    plan += [(n, a.shape, storage_type(dtype, a.shape)) for n, a in extra.items()]

    writer = GGUFWriter(path, "qwen2" if config.qkv_bias else "llama")
    header(writer, config, dtype, name)
    add_metadata(writer, vocab)
    for n, shape, qtype in plan:  # declared before any data: name, shape (ggml reverses it), type, size
        block, size = GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(n, shape, np.float32, int(np.prod(shape)) // block * size, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    params = dict(model.named_parameters())
    for _, lit, w, in_file in tensors(model):  # one tensor at a time: converted, written, read back
        qtype = storage_type(dtype, tuple(w.shape))
        writer.write_tensor_data(quantize(in_file.numpy(), qtype))
        if qtype != Q.F32:
            with torch.no_grad():
                params[lit].copy_(read_back(w, qtype))
    for n, a in extra.items():
        writer.write_tensor_data(quantize(a, storage_type(dtype, a.shape)))
    writer.close()
    return count_types(plan)


def read_back(w: Tensor, qtype) -> Tensor:
    """The value storing `w` as `qtype` keeps, float32. Computed in litft's row order, not from the permuted rows
    written: rounding acts within a row, so it is the same value, and the verification's reference does not rest
    on the exporter's own permutation."""
    data = quantize(w.numpy(), qtype)
    return torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32).reshape(w.shape))


def count_types(plan: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, qtype in plan:
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts
