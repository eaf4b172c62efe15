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
from torch import Tensor

from litft.checkpoint import lit_state_dict
from litft.config import Config
from litft.errors import UserError
from litft.gguf_format import ROPE_FREQS, gguf_name, permute_qk, unpermute_qk
from litft.model import Llama
from litft.rope import inverse_frequencies

DTYPES = ("f32", "f16", "bf16", "q8_0")


def storage_type(dtype: str, shape: tuple[int, ...]):
    """The GGML type a tensor of `shape` is stored as under --dtype `dtype`."""
    from gguf import GGMLQuantizationType as Q

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


def tensors(model: Llama) -> Iterator[tuple[str, str, Tensor]]:
    """(GGUF name, lit name, float32 tensor in the file's row order) for every weight the file holds."""
    c = model.config
    permuted = not c.qkv_bias  # llama.cpp's llama architecture rotates adjacent pairs; qwen2 rotates halves
    for name, w in lit_state_dict(model).items():
        w = w.detach().float()
        if permuted and name.endswith("attn.q_proj.weight"):
            w = permute_qk(w, c.n_head)
        elif permuted and name.endswith("attn.k_proj.weight"):
            w = permute_qk(w, c.n_query_groups)
        yield gguf_name(name), name, w


def header(writer, config: Config, dtype: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType, RopeScalingType

    writer.add_name(name)
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


def add_metadata(writer, meta: dict[str, Any]) -> None:
    """Typed key/values: ids are uint32, token types int32, scores float32, as llama.cpp reads them."""
    from gguf import GGUFValueType as V

    scalar = {bool: V.BOOL, int: V.UINT32, float: V.FLOAT32, str: V.STRING}
    element = {bool: V.BOOL, int: V.INT32, float: V.FLOAT32, str: V.STRING}
    for key, value in meta.items():
        if isinstance(value, list):
            writer.add_key_value(key, value, V.ARRAY, sub_type=element[type(value[0])])
        else:
            writer.add_key_value(key, value, scalar[type(value)])


def write_gguf(path: Path, model: Llama, vocab: dict[str, Any], dtype: str, name: str) -> dict[str, int]:
    """Write `model` and its tokenizer metadata to `path`; returns how many tensors each storage type holds."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter

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
    stored = {}
    for n, lit, w in tensors(model):
        stored[lit] = write_tensor(writer, w.numpy(), storage_type(dtype, tuple(w.shape)))
    for n, a in extra.items():
        write_tensor(writer, a, storage_type(dtype, a.shape))
    writer.close()
    hold_stored_values(model, stored)
    return count_types(plan)


def write_tensor(writer, w: np.ndarray, qtype) -> Tensor:
    """Convert one float32 tensor to its storage type, write it, and return the value it stores (float32)."""
    from gguf.quants import dequantize, quantize

    data = quantize(w, qtype)
    writer.write_tensor_data(data)
    return torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32).reshape(w.shape))


def hold_stored_values(model: Llama, stored: dict[str, Tensor]) -> None:
    """Replace every weight by the value the file stores for it (q/k rows put back into litft's order)."""
    c = model.config
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in stored.items():
            if not c.qkv_bias and name.endswith("attn.q_proj.weight"):
                value = unpermute_qk(value, c.n_head)
            elif not c.qkv_bias and name.endswith("attn.k_proj.weight"):
                value = unpermute_qk(value, c.n_query_groups)
            params[name].copy_(value)


def count_types(plan: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, qtype in plan:
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts
