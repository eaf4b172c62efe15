"""Hugging Face LlamaForCausalLM ↔ litft: the weights are the same matrices under other names.

    HF (transformers)                                litft
    model.embed_tokens.weight                        embed.weight
    model.layers.{i}.input_layernorm.weight          blocks.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight blocks.{i}.attn.{q,k,v,o}_proj.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.bias     blocks.{i}.attn.{q,k,v}_proj.bias (Qwen2 only)
    model.layers.{i}.post_attention_layernorm.weight blocks.{i}.mlp_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight  blocks.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight                                norm.weight
    lm_head.weight                                   lm_head.weight (absent when tied to the embedding)

No tensor is reshaped or permuted: transformers' Llama rotates the (first half, second half) channel pairs of
each head, exactly as litft/rope.py does. Rotary `inv_freq` buffers, which old checkpoints stored, are
recomputed from rope_base and rope_scaling and dropped. With tied embeddings the matrix is stored once.

Memory. A 7B model is 13.5 GB in bf16, so a conversion must not hold it twice. HF weights are read one shard
at a time, one tensor at a time, as memory-mapped views of the file (safetensors, and the zip-format .bin files
that `torch.save` has written since PyTorch 1.6): reading costs page cache, which the OS can evict, not RAM.
The output dict references those views and `torch.save` streams them into lit_model.pth. With a dtype cast each
tensor is cast as it is read, so RAM peaks at ONE copy of the model in the target dtype. Only a legacy
(pre-zip) .bin shard is read into RAM whole; even then the peak is the output so far plus that one shard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from litft.checkpoint import WEIGHTS, check_not_replacing, check_shapes
from litft.config import CONFIGS, Config
from litft.errors import UserError
from litft.files import (
    TOKENIZER_FILES,
    atomic_path,
    check_not_hf_model,
    check_output_dir,
    copy_files,
    load_state_dict,
    save_state_dict,
    staged_output,
)
from litft.model import Llama
from litft.prompts import FILE as PROMPT_STYLE

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER = {  # HF suffix after model.layers.{i}. -> litft suffix after blocks.{i}.
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    **{f"self_attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvo"},
    **{f"self_attn.{p}_proj.bias": f"attn.{p}_proj.bias" for p in "qkv"},  # Qwen2
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}


# ---- names ---------------------------------------------------------------------------------------------

def hf_to_lit_name(name: str) -> str | None:
    """The litft name of HF tensor `name`, or None for a buffer litft recomputes (rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        return f"blocks.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise UserError(f"HF tensor {name!r} has no place in a Llama model (biases, other architectures are not supported)")


def lit_to_hf_name(name: str) -> str:
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_BACK:
        return f"model.layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"
    raise UserError(f"litft tensor {name!r} has no Hugging Face name (is it a LoRA/adapter tensor? merge it first)")


# ---- reading an HF checkpoint directory ------------------------------------------------------------------

def hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight shards in `checkpoint_dir`: safetensors preferred over .bin, an index file's shards in order."""
    d = Path(checkpoint_dir)
    for index, single in (("model.safetensors.index.json", "model*.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        if (d / index).is_file():
            weight_map = json.loads((d / index).read_text())["weight_map"]
            shards = [d / f for f in dict.fromkeys(weight_map.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise UserError(f"{d / index} lists {missing[0]} but it is not there; the download is incomplete")
            return shards
        if files := sorted(d.glob(single)):
            return files
    raise UserError(f"{d} holds no model*.safetensors or pytorch_model*.bin weights; "
                    "download them with scripts/download.py")


def iter_hf_tensors(checkpoint_dir: Path) -> Iterator[tuple[str, Tensor]]:
    """Yield (HF name, tensor) shard by shard; tensors are memory-mapped views wherever the format allows."""
    from safetensors import SafetensorError, safe_open

    for path in hf_weight_files(checkpoint_dir):
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except SafetensorError as e:
                raise UserError(f"{path} is not a readable safetensors file ({e}); re-download it") from None
        else:
            shard = load_state_dict(path)  # weights_only=True: a .bin file never runs code
            while shard:
                yield shard.popitem()
            del shard


def hf_to_lit_state_dict(checkpoint_dir: Path, config: Config, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Read HF weights into a litft state dict, checked against `config` (one-line errors on mismatch)."""
    out: dict[str, Tensor] = {}
    for hf_name, tensor in iter_hf_tensors(checkpoint_dir):
        name = hf_to_lit_name(hf_name)
        if name is None or (name == "lm_head.weight" and config.tie_embeddings):
            continue  # a tied head is the embedding; store it once
        out[name] = tensor if dtype is None else tensor.to(dtype)
    with torch.device("meta"):
        model = Llama(config)
    check_shapes(model, out, Path(checkpoint_dir))
    return out


def lit_to_hf_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a litft state dict to HF names (a tied lm_head is not in it, and HF re-ties it on load)."""
    return {lit_to_hf_name(k): v.contiguous() for k, v in state_dict.items()}


def read_hf_config(checkpoint_dir: Path, name: str = "") -> Config:
    """Config from config.json; `name` (the directory name by default) picks up hf_repo for known models."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{checkpoint_dir} has no config.json; is it a Hugging Face model directory?")
    try:
        config = Config.from_hf_config(path, name=name or Path(checkpoint_dir).name)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    except KeyError as e:
        raise UserError(f"{path} lacks the field {e}; is it a Llama-architecture config?") from None
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    except (TypeError, AttributeError) as e:  # e.g. rope_scaling as a list, a factor as a string
        raise UserError(f"{path}: a setting has a value of the wrong type ({e})") from None
    known = CONFIGS.get(config.name)
    return Config(**{**config.to_dict(), "hf_repo": known.hf_repo}) if known else config


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---- writing -------------------------------------------------------------------------------------------

def save_hf_safetensors(state_dict: dict[str, Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write model.safetensors, or model-0000k-of-0000n.safetensors + index.json when larger than one shard."""
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for shard, fname in zip(shards, names):
        with atomic_path(Path(out_dir) / fname) as tmp:
            save_file(shard, tmp, metadata={"format": "pt"})
            tmp.chmod(0o644)  # safetensors creates the file anew, private to its owner
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: fname for shard, fname in zip(shards, names) for k in shard}}
        with atomic_path(Path(out_dir) / "model.safetensors.index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=2))
        names.append("model.safetensors.index.json")
    return names


def convert_hf_checkpoint(checkpoint_dir: Path, output_dir: Path | None = None, dtype: str | None = None,
                          overwrite: bool = False) -> str:
    """HF directory -> lit checkpoint (lit_model.pth, model_config.yaml, tokenizer files). Returns a summary line.
    An output directory other than the HF one that already holds a checkpoint is replaced only with `overwrite`."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {checkpoint_dir} does not exist; download it with scripts/download.py")
    output_dir = check_output_dir("--output_dir", output_dir, "a checkpoint") if output_dir is not None else checkpoint_dir
    in_place = output_dir.resolve() == checkpoint_dir.resolve()
    if not in_place:
        check_not_hf_model("--output_dir", output_dir)
        check_not_replacing("--output_dir", output_dir, overwrite)
    config = read_hf_config(checkpoint_dir)
    state_dict = hf_to_lit_state_dict(checkpoint_dir, config, parse_dtype(dtype))  # all checked before writing

    # Everything is written into a scratch folder, then moved into place. Only then are an earlier model's other
    # tokenizer files (and, when not in place, its prompt_style.yaml) removed: they would be read instead of these.
    with staged_output(output_dir, TOKENIZER_FILES + (() if in_place else (PROMPT_STYLE,))) as scratch:
        save_state_dict(state_dict, scratch / WEIGHTS)
        config.save(scratch)
        copied = copy_files(checkpoint_dir, scratch)
    n_params = sum(t.numel() for t in state_dict.values())
    dtypes = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in state_dict.values()}))
    return (f"wrote {output_dir / WEIGHTS}: {len(state_dict)} tensors, {n_params:,} parameters, {dtypes}; "
            f"model_config.yaml ({config.name}); copied {', '.join(copied) or 'no tokenizer files'}")
