"""Load a model for inference from a base checkpoint plus, optionally, a fine-tuning run's weights file.

The run directory (the folder holding the weights file) says which method produced it: `lora.yaml` for LoRA,
`adapter.yaml` / `adapter_v2.yaml` for LLaMA-Adapter, nothing for a full fine-tune or a merged checkpoint. The run
directory itself may be given instead of its weights file.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from litft import adapter, adapter_v2
from litft.checkpoint import load_lit_model
from litft.config import Config
from litft.errors import UserError
from litft.files import load_state_dict, run_dir_of
from litft.lora import FILE as LORA_FILE
from litft.lora import WEIGHTS as LORA_WEIGHTS
from litft.lora import LoRAConfig, add_lora, is_lora_key, lora_state_dict
from litft.model import Llama
from litft.nf4 import check_scheme
from litft.qlora import as_used

# A run directory's method, by the config file it holds: (config file, weights file)
RUN_FILES = {"lora": (LORA_FILE, LORA_WEIGHTS), "adapter": (adapter.FILE, adapter.WEIGHTS),
             "adapter_v2": (adapter_v2.FILE, adapter_v2.WEIGHTS)}
SETTINGS = {"lora": LoRAConfig, "adapter": adapter.AdapterConfig, "adapter_v2": adapter_v2.AdapterV2Config}


def load_finetuned(checkpoint_dir: Path, weights_path: Path | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, method: str | None = None, mmap: bool = True,
                   quantize: str | None = None) -> Llama:
    """The base model from `checkpoint_dir`, with the method's weights from `weights_path` applied.

    `method` (adapter, adapter_v2, full, ...) says what `weights_path` must be; by default the run directory
    says it (see above). `mmap`: see load_lit_model. `quantize` (nf4, nf4-dq) stores the frozen linear weights of
    the blocks in NF4; a LoRA trained on an NF4 base is used on those weights either way (litft/qlora.py's
    `as_used`). The model is returned in eval mode, with the method's layers as trained (litft/fast's
    for_generation merges a LoRA for speed).
    """
    check_scheme(quantize)
    weights_path = weights_in(weights_path)
    quantizing = quantize is not None or trained_quantize(weights_path, method) is not None
    # NF4 is made from the checkpoint's own values (as training makes it, whatever the precision), on the CPU,
    # layer by layer; then cast and moved
    load_base = partial(load_lit_model, device="cpu" if quantizing else device, dtype=None if quantizing else dtype,
                        mmap=mmap and not quantizing)
    model = load_method(checkpoint_dir, weights_path, method, load_base)
    return as_used(model, trained_quantize(weights_path, method), quantize).to(device, dtype).eval()


def load_method(checkpoint_dir: Path, weights_path: Path | None, method: str | None,
                load_base: Callable[..., Llama]) -> Llama:
    if weights_path is None:
        return load_base(checkpoint_dir)
    weights_path = Path(weights_path)
    method = method or detect_method(weights_path)
    if method == "full":
        return load_full(checkpoint_dir, weights_path, load_base)
    if method in ("adapter", "adapter_v2"):
        return load_adapter(checkpoint_dir, weights_path, load_base, v2=method == "adapter_v2")
    if method == "lora":
        return load_lora_run(checkpoint_dir, weights_path, load_base)
    raise UserError(f"unknown method {method!r}; choose lora, adapter, adapter_v2 or full")


def weights_in(weights_path: Path | None) -> Path | None:
    """A LoRA or adapter run directory given for its weights: the weights file inside it. (A full fine-tune's
    directory is a checkpoint of its own, and stays as it is.)"""
    if weights_path is None or not Path(weights_path).is_dir():
        return weights_path
    method = detect_method(Path(weights_path))
    if method in RUN_FILES:
        return Path(weights_path) / RUN_FILES[method][1]
    for config_file, weights in RUN_FILES.values():  # a run's weights without the settings saved beside them
        found = [(Path(weights_path) / name).is_file() for name in (weights, config_file, "lit_model.pth")]
        if found == [True, False, False]:
            raise UserError(f"{weights_path} holds {weights} but no {config_file}, which its run saved beside it; "
                            "restore that file, or pass a complete run directory")
    return Path(weights_path)


def trained_quantize(weights_path: Path | None, method: str | None) -> str | None:
    """nf4 or nf4-dq for a LoRA or adapter run trained on a quantized base (QLoRA), else None."""
    method = None if weights_path is None else method or detect_method(Path(weights_path))
    run_dir = None if weights_path is None else Path(weights_path).parent
    if method not in SETTINGS or not (run_dir / RUN_FILES[method][0]).is_file():  # load_method says what is missing
        return None
    scheme = SETTINGS[method].from_dir(run_dir).quantize
    check_scheme(scheme, flag=f"{run_dir / RUN_FILES[method][0]} has quantize:")  # a hand-edited file
    return scheme


def detect_method(weights_path: Path) -> str:
    run_dir = run_dir_of(weights_path)
    found = [method for method, (config_file, _) in RUN_FILES.items() if (run_dir / config_file).is_file()]
    return found[0] if len(found) == 1 else "full"


def lora_settings(lora_path: Path) -> LoRAConfig:
    """The LoRA settings (lora.yaml) of the run whose weights are `lora_path`; another method's run is named."""
    method = detect_method(lora_path)
    if method != "lora" and method in RUN_FILES:
        raise UserError(f"{lora_path} is from an {method} run, not a LoRA run; this command takes a LoRA run "
                        f"(lit_model_lora.pth beside lora.yaml); generate/{method}.py --adapter_path serves that one")
    return LoRAConfig.from_dir(Path(lora_path).parent)


# What makes one base's weights meaningless on another, in model_config.yaml's names: shapes, and how heads are
# shared. (A run's weights can fit another base's shapes: 2 or 4 key/value heads of the same width.)
ARCHITECTURE = ("n_embd", "n_layer", "n_head", "n_query_groups", "intermediate_size", "vocab_size", "tie_embeddings",
                "qkv_bias")


def check_same_base(run_dir: Path, base: Config, source: Path) -> None:
    """A run directory's model_config.yaml names the model it was trained on; refuse a base of another
    architecture. (block_size and RoPE may differ: a base's context can be set for use.)"""
    if not (Path(run_dir) / "model_config.yaml").is_file():
        return
    trained = Config.from_checkpoint(run_dir)
    if differ := [k for k in ARCHITECTURE if getattr(trained, k) != getattr(base, k)]:
        def fields(config: Config) -> str:
            return ", ".join(f"{k} {getattr(config, k)}" for k in differ[:3])  # the first three that differ

        raise UserError(f"{source} was trained on {trained.name or 'a model'} ({fields(trained)}), not "
                        f"{base.name or 'this model'} ({fields(base)}); pass the --checkpoint_dir it was trained on")


def load_adapter(checkpoint_dir: Path, weights_path: Path, load_base: Callable[..., Llama], v2: bool) -> Llama:
    """Base model + LLaMA-Adapter (v1 or v2); prompt length and start layer come from the run directory."""
    state_dict = load_state_dict(weights_path)
    config_cls, add, load = ((adapter_v2.AdapterV2Config, adapter_v2.add_adapter_v2, adapter_v2.load_adapter_v2_state_dict)
                             if v2 else (adapter.AdapterConfig, adapter.add_adapter, adapter.load_adapter_state_dict))
    adapter.check_not_other_method(state_dict, weights_path, v2)
    config = config_cls.from_dir(weights_path.parent)
    check_same_base(weights_path.parent, Config.from_checkpoint(checkpoint_dir), weights_path)
    model = load_base(checkpoint_dir)
    add(model, config)
    load(model, state_dict, weights_path)
    return model


def load_lora_run(checkpoint_dir: Path, weights_path: Path, load_base: Callable[..., Llama]) -> Llama:
    """Base model + LoRA; r, alpha, targets (and new tokens) come from the run directory's lora.yaml."""
    lora_settings(weights_path)  # fail before the base model is read
    check_same_base(weights_path.parent, Config.from_checkpoint(checkpoint_dir), weights_path)
    return load_lora(load_base(checkpoint_dir), weights_path)


def load_full(checkpoint_dir: Path, weights_path: Path, load_base: Callable[..., Llama]) -> Llama:
    """A full fine-tune: the run's weights file, or a run directory that is itself a lit checkpoint."""
    if (method := detect_method(weights_path)) != "full":
        raise UserError(f"{weights_path} holds {method} weights (its run directory has {method}.yaml), not a full "
                        f"fine-tune; serve it with generate/{method}.py")
    if weights_path.is_dir():  # finetune/full.py's run directory is a lit checkpoint of its own
        return load_base(weights_path)
    config = Config.from_checkpoint(checkpoint_dir)
    check_same_base(weights_path.parent, config, weights_path)
    return load_base(checkpoint_dir, config=config, weights_path=weights_path)


def load_lora_state_dict(model: Llama, state_dict: dict[str, Tensor], source_path: Path) -> None:
    """Load LoRA tensors into a model prepared with `add_lora`, with one-line errors for the usual mix-ups."""
    check_lora_state_dict(model, state_dict, source_path)
    model.load_state_dict(state_dict, strict=False)


def check_lora_state_dict(model: Llama, state_dict: dict[str, Tensor], source_path: Path) -> None:
    """Raise a one-line UserError unless `state_dict` holds exactly the LoRA tensors `model` expects."""
    expected, src, cfg = lora_state_dict(model), source_path, model.config
    if not any(is_lora_key(k) for k in state_dict):
        raise UserError(f"{src} holds no LoRA tensors (first key {next(iter(state_dict), None)!r}); "
                        "is it an adapter or full checkpoint? Use the generate script for its method")
    for k, t in state_dict.items():
        if k not in expected:
            raise UserError(f"{src} has {k}, which this model has not: it was trained on another base or with other "
                            f"targets than lora.yaml says (this base: {cfg.name or 'unnamed'}, {cfg.n_layer} layers)")
        e = expected[k]
        if t.shape == e.shape:
            continue
        r_dim = {"lora_A": 0, "lora_B": 1}.get(k.rsplit(".", 1)[-1])
        if r_dim is not None and t.shape[1 - r_dim] == e.shape[1 - r_dim]:
            raise UserError(f"{src} holds rank-{t.shape[r_dim]} LoRA tensors but lora.yaml says r={e.shape[r_dim]}; "
                            "the file and its lora.yaml do not belong together")
        if k.endswith("new_rows") and t.shape[1:] == e.shape[1:]:
            raise UserError(f"{src} holds {t.shape[0]} new-token rows but lora.yaml names {e.shape[0]} new tokens; "
                            "the file and its lora.yaml do not belong together")
        raise UserError(f"{src} was made for another base model: {k} is {tuple(t.shape)} in the file but "
                        f"{tuple(e.shape)} for {cfg.name or 'this base'} (width {cfg.n_embd}); "
                        "pass the --checkpoint_dir it was trained on")
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise UserError(f"{src} lacks {len(missing)} LoRA tensors lora.yaml asks for (first: {missing[0]})")


def load_lora(model: Llama, lora_path: Path) -> Llama:
    """Add LoRA to `model` as its run dir's lora.yaml describes and load `lora_path` into it."""
    lora_path = Path(lora_path)
    config = LoRAConfig.from_dir(lora_path.parent)
    state_dict = load_state_dict(lora_path)
    add_lora(model, config)
    load_lora_state_dict(model, state_dict, lora_path)
    return model


def tokenizer_dir(run_dir: Path | None, checkpoint_dir: Path) -> Path:
    """The tokenizer to use with a run: its own grown one when its LoRA added tokens, else the base's."""
    if run_dir is None or not (Path(run_dir) / LORA_FILE).is_file():
        return Path(checkpoint_dir)
    new_tokens = LoRAConfig.from_dir(run_dir).new_tokens
    if not new_tokens:
        return Path(checkpoint_dir)
    if not any((Path(run_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{run_dir} adds new tokens {new_tokens} but holds no tokenizer file; copy back the "
                        "tokenizer.json / tokenizer.model that finetune/lora.py wrote there")
    return Path(run_dir)
