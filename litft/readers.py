"""The outside programs an export is read back with, for litft/verify.py: each returns what `compare` needs,
the reader's logits on a sequence of ids and, where the output carries a tokenizer, its encode and decode.

    a Hugging Face directory   transformers' AutoModelForCausalLM and AutoTokenizer, as a user loads them
    a lit checkpoint           transformers' Llama (Qwen2) holding its weights, renamed in memory
    a PEFT adapter             peft.PeftModel.from_pretrained onto transformers' base model
    a GGUF file                transformers' GGUF loader (dequantizes with `gguf`, un-permutes q/k itself) and
                               its GGUF tokenizer

transformers' GGUF loader reads neither llama.cpp's RoPE-scaling keys nor the rope_freqs tensor, so the reader
is given them the way llama.cpp applies them: θ_i divided by rope_freqs[i] (Llama 3.1), or by the linear
factor. Everything else about the file — every weight, the tokenizer, the tied or separate output layer — is
transformers' own reading.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from litft.checkpoint import lit_state_dict
from litft.config import Config
from litft.convert_hf import lit_to_hf_state_dict
from litft.errors import UserError
from litft.gguf_format import ROPE_FREQS
from litft.lora import is_lora_key
from litft.model import Llama
from litft.verify import Reader


def require_readers(peft: bool = False) -> None:
    """Check that the readers are installed — transformers, and peft for a PEFT adapter — (one line if not), and keep
    their logging to errors: a deprecation inside them, or bitsandbytes (imported by peft) missing an optional CPU
    kernel, is nothing the user of an exporter can act on."""
    names = ["transformers", "peft"] if peft else ["transformers"]
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for module in ("transformers", "peft"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    # export_peft.py says what this warning of peft's is about, in terms of litft's tools
    warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`", category=UserWarning)
    try:
        transformers, *_ = [importlib.import_module(name) for name in names]
    except ImportError as e:
        raise UserError(f"verifying this export reads it with {' and '.join(names)} ({e.name} is missing): pip install "
                        f"{' '.join(names)}, or pass --verify false") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def from_model(name: str, model, tokenizer=None) -> Reader:
    model = model.eval()
    logits = lambda ids: model(ids[None]).logits[0]  # noqa: E731  (1, T) -> (T, vocab)
    if tokenizer is None:
        return Reader(name, logits)
    return Reader(name, logits, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                  lambda text, bos: tokenizer(text, add_special_tokens=bos is not False)["input_ids"])


def hf_directory(directory: Path) -> Reader:
    """A Hugging Face model directory, loaded as `from_pretrained(directory)`."""
    require_readers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer(directory) else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"verification failed: transformers cannot load {directory} ({str(e).splitlines()[0]})") from None
    return from_model("transformers", model, tokenizer)


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def hf_model(config: Config, state_dict: dict[str, Tensor]):
    """transformers' own Llama (or Qwen2) for `config`, holding a litft state dict under HF names."""
    require_readers()
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    hf_config = config.to_hf_config()
    with no_init_weights():  # the weights come next; random ones would only cost time
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(lit_to_hf_state_dict(state_dict), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise UserError(f"verification failed: transformers' model lacks {unexpected[:1]} / has no {missing[:1]}")
    model.tie_weights()
    return model


def lit_checkpoint(model: Llama) -> Reader:
    """A lit checkpoint's weights (e.g. a merged model) in transformers' Llama, renamed in memory."""
    return from_model("transformers", hf_model(model.config, lit_state_dict(model)))


def peft_adapter(lora_model: Llama, adapter_dir: Path, n_new_tokens: int = 0) -> Reader:
    """peft's LoRA on transformers' copy of the frozen base inside `lora_model` (for a QLoRA run: the dequantized
    NF4 weights Ŵ its A and B were trained on), grown by `n_new_tokens` rows as export_peft.py's docs say."""
    require_readers(peft=True)
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = {k: v for k, v in lit_state_dict(lora_model).items() if not is_lora_key(k)}
    model = hf_model(lora_model.config, base)
    if n_new_tokens:
        model.resize_token_embeddings(lora_model.config.vocab_size + n_new_tokens)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir) if has_tokenizer(adapter_dir) else None  # new tokens
    return from_model("peft", PeftModel.from_pretrained(model, adapter_dir), tokenizer)


def gguf_file(path: Path) -> Reader:
    """A GGUF file through transformers' GGUF loader (model and tokenizer), with llama.cpp's RoPE scaling."""
    require_readers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    divisors = llama_cpp_rope_divisors(path)
    if divisors is not None:
        rotary = model.model.rotary_emb
        rotary.inv_freq = rotary.inv_freq / torch.as_tensor(divisors, dtype=rotary.inv_freq.dtype)
    return from_model("transformers' GGUF loader", model, tokenizer)


def llama_cpp_rope_divisors(path: Path) -> np.ndarray | None:
    """What llama.cpp divides each pair's θ_i by: rope_freqs.weight, or the linear scaling factor; None if neither."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    found = [t for t in reader.tensors if t.name == ROPE_FREQS]
    if found:
        return np.array(found[0].data, dtype=np.float32)  # a copy: the file is memory-mapped read-only
    arch = reader.fields["general.architecture"].contents()
    kind = reader.fields.get(f"{arch}.rope.scaling.type")
    if kind is not None and kind.contents() == "linear":
        return np.float32(reader.fields[f"{arch}.rope.scaling.factor"].contents())
    return None
