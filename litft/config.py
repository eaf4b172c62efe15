"""Model configuration: one dataclass describes every Llama-architecture model litft runs.

A checkpoint directory stores it as `model_config.yaml`; Hugging Face checkpoints describe the same model
in `config.json`, which `Config.from_hf_config` reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from litft.errors import UserError
from litft.files import atomic_write_text, read_yaml_mapping
from litft.rope import RoPEScaling, rope_from_hf, rope_to_hf


@dataclass(frozen=True)
class Config:
    name: str = ""
    hf_repo: str = ""  # where scripts/download.py fetches the weights from
    vocab_size: int = 32000
    n_layer: int = 32
    n_embd: int = 4096
    n_head: int = 32
    n_query_groups: int = 32  # key/value heads; < n_head is grouped-query attention
    intermediate_size: int = 11008  # SwiGLU hidden width
    block_size: int = 4096  # longest sequence litft runs the model on
    rope_base: float = 10000.0
    rope_scaling: RoPEScaling | None = None  # longer contexts: linear, dynamic, llama3 or yarn (litft/rope.py)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # lm_head shares the token-embedding matrix
    qkv_bias: bool = False  # Qwen2: the q, k and v projections add a bias

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "n_layer", "n_embd", "n_head", "n_query_groups", "intermediate_size", "block_size")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.rope_base > 0 and self.norm_eps > 0):
            raise ValueError(f"rope_base and norm_eps must be > 0, got {self.rope_base} and {self.norm_eps}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_query_groups {self.n_query_groups}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    # ---- named configs -------------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in CONFIGS:
            raise UserError(f"unknown model name {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return replace(CONFIGS[name], **overrides)

    # ---- model_config.yaml ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, checkpoint_dir: Path) -> None:
        atomic_write_text(Path(checkpoint_dir) / "model_config.yaml", yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Rebuild a Config from model_config.yaml, refusing unknown fields and values of the wrong type."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise UserError(f"model_config.yaml has unknown fields {sorted(unknown)}")
        d = dict(d)
        for name, value in d.items():
            _check_type(name, value, known[name].type)
        if isinstance(d.get("rope_scaling"), dict):
            scaling_fields = {f.name: f.type for f in fields(RoPEScaling)}
            for name, value in d["rope_scaling"].items():
                if name not in scaling_fields:
                    raise UserError(f"model_config.yaml has an unknown rope_scaling field {name!r}")
                _check_type(f"rope_scaling.{name}", value, scaling_fields[name])
            d["rope_scaling"] = RoPEScaling(**d["rope_scaling"])
        try:
            return cls(**d)
        except ValueError as e:
            raise UserError(f"model_config.yaml: {e}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> "Config":
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise UserError(f"checkpoint directory {checkpoint_dir} does not exist; download or convert a model first")
        d = read_yaml_mapping(checkpoint_dir / "model_config.yaml",
                              f"{checkpoint_dir} has no model_config.yaml; convert it with scripts/convert_hf_checkpoint.py")
        return cls.from_dict(d)

    # ---- Hugging Face config.json --------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, path_or_dict: Path | dict[str, Any], name: str = "") -> "Config":
        """Read config.json of a Llama, Mistral or Qwen2 checkpoint; any setting litft does not model is refused."""
        hf = path_or_dict if isinstance(path_or_dict, dict) else json.loads(Path(path_or_dict).read_text())
        check_hf_fields(hf)
        hf = {**HF_DEFAULTS[hf.get("model_type", "llama")], **hf}  # what transformers assumes for a missing field
        n_head = hf["num_attention_heads"]
        rope_base, rope_scaling = rope_from_hf(hf)
        block_size = hf["max_position_embeddings"]
        if rope_scaling is not None:
            block_size = rope_scaling.context_length(block_size)
        if window := sliding_window(hf):  # attention is exact as long as no sequence is longer than the window
            block_size = min(block_size, window)
        return cls(
            name=name or hf.get("_name_or_path", ""),
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_embd=hf["hidden_size"],
            n_head=n_head,
            n_query_groups=hf.get("num_key_value_heads") or n_head,
            intermediate_size=hf["intermediate_size"],
            block_size=block_size,
            rope_base=rope_base,
            rope_scaling=rope_scaling,
            norm_eps=hf["rms_norm_eps"],
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=hf.get("model_type") == "qwen2",
        )

    def to_hf_config(self) -> dict[str, Any]:
        """config.json for transformers: LlamaForCausalLM, or Qwen2ForCausalLM when q, k and v have biases."""
        s = self.rope_scaling
        max_position = s.original_max_position if s is not None and s.type == "dynamic" else self.block_size
        rope = rope_to_hf(self.rope_base, s)
        arch, model_type = ("Qwen2ForCausalLM", "qwen2") if self.qkv_bias else ("LlamaForCausalLM", "llama")
        return {
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_query_groups,
            "head_dim": self.head_size,
            "max_position_embeddings": max_position,
            "rope_theta": rope.pop("rope_theta"),
            "rope_scaling": None if rope["rope_type"] == "default" else rope,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "torch_dtype": "float32",
        }


# ---- what config.json may say ------------------------------------------------------------------------------

MODEL_TYPES = ("llama", "mistral", "qwen2")


# transformers' values for fields a config.json leaves out (LlamaConfig, MistralConfig, Qwen2Config)
HF_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "sliding_window": 4096,
                "num_key_value_heads": 8},
    # Qwen2's window (4096 by default) applies only with use_sliding_window: true
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "sliding_window": 4096,
              "num_key_value_heads": 32},
}
SIZES = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
         "max_position_embeddings")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")  # null: as many key/value heads as heads, width / heads


def check_hf_fields(hf: dict[str, Any]) -> None:
    """Refuse, by name, every config.json setting that would make litft's model differ from the checkpoint's."""
    if not isinstance(hf, dict):
        raise UserError(f"config.json holds a JSON {type(hf).__name__}, not an object of settings")
    for field in SIZES + OPTIONAL_SIZES:  # a missing required one is named where it is read
        if field not in hf or (hf[field] is None and field in OPTIONAL_SIZES):
            continue
        if type(hf[field]) is not int or hf[field] < 1:
            raise UserError(f"config.json field {field} = {hf[field]!r} should be a positive integer")
    model_type = hf.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise UserError(f"config.json model_type {model_type!r} is not supported; litft runs {', '.join(MODEL_TYPES)}")
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias")),  # Llama's: a bias on q, k, v *and* o
        "mlp_bias": bool(hf.get("mlp_bias")),
        "pretraining_tp": hf.get("pretraining_tp", 1) not in (1, None),
    }
    n_head, width = hf["num_attention_heads"], hf["hidden_size"]
    unsupported["head_dim"] = (hf.get("head_dim") or width // n_head) * n_head != width
    kinds = set(hf.get("layer_types") or ()) - {"full_attention", "sliding_attention"}
    unsupported["layer_types"] = bool(kinds)
    for field, bad in unsupported.items():
        if bad:
            raise UserError(f"config.json field {field} = {hf.get(field)!r} is not supported by litft's Llama; "
                            "this checkpoint cannot be converted exactly")


def sliding_window(hf: dict[str, Any]) -> int | None:
    """The attention window, when config.json turns one on (Mistral v0.1: 4096; Qwen2 only with use_sliding_window)."""
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window"):
        return None
    window = hf.get("sliding_window")
    return window if isinstance(window, int) and window > 0 else None


def _check_type(name: str, value: Any, annotation: str) -> None:
    """One line for a model_config.yaml value whose type is wrong ("false" for a bool, 2.5 for an int, ...)."""
    allowed = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
    base = annotation.split(" | ")[0]
    if value is None and "None" in annotation:
        return
    if base in allowed:
        ok = isinstance(value, allowed[base]) and (base == "bool" or not isinstance(value, bool))
    else:  # a nested dataclass (rope_scaling)
        ok = isinstance(value, dict)
    if not ok:
        raise UserError(f"model_config.yaml: {name} = {value!r} should be {'a mapping' if base not in allowed else base}")


def _llama2(name: str, repo: str, n_layer: int, n_embd: int, n_head: int, groups: int, inter: int) -> Config:
    return Config(name=name, hf_repo=repo, vocab_size=32000, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                  n_query_groups=groups, intermediate_size=inter, block_size=4096)


def _smollm2(name: str, n_layer: int, n_embd: int, n_head: int, groups: int, inter: int, block: int) -> Config:
    return Config(name=name, hf_repo=f"HuggingFaceTB/{name}", vocab_size=49152, n_layer=n_layer, n_embd=n_embd,
                  n_head=n_head, n_query_groups=groups, intermediate_size=inter, block_size=block,
                  rope_base=100000.0 if n_embd < 2048 else 130000.0, tie_embeddings=True)


def _llama3(name: str, n_layer: int, n_embd: int, n_head: int, inter: int, factor: float, tied: bool) -> Config:
    """Llama 3.1+: 128,256 tokens, 8 KV heads, θ base 500,000 stretched from 8K to 128K by llama3 RoPE."""
    rope = RoPEScaling(type="llama3", factor=factor, original_max_position=8192, low_freq_factor=1.0,
                       high_freq_factor=4.0)
    return Config(name=name, hf_repo=f"meta-llama/{name}", vocab_size=128256, n_layer=n_layer, n_embd=n_embd,
                  n_head=n_head, n_query_groups=8, intermediate_size=inter, block_size=131072, rope_base=500000.0,
                  rope_scaling=rope, tie_embeddings=tied)


def _qwen25(name: str, vocab: int, n_layer: int, n_embd: int, n_head: int, groups: int, inter: int, block: int,
            tied: bool) -> Config:
    """Qwen2.5: biases on q, k, v; θ base 1,000,000; RMSNorm eps 1e-6."""
    return Config(name=name, hf_repo=f"Qwen/{name}", vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                  n_query_groups=groups, intermediate_size=inter, block_size=block, rope_base=1000000.0,
                  norm_eps=1e-6, tie_embeddings=tied, qkv_bias=True)


# The shapes are those of each repository's config.json; tests/test_config.py checks them against the parameter
# counts the model cards publish.
_BASE = [
    _llama2("Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008),
    _llama2("Llama-2-13b-hf", "meta-llama/Llama-2-13b-hf", 40, 5120, 40, 40, 13824),
    _llama2("Llama-2-70b-hf", "meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672),
    _llama3("Llama-3.2-1B", 16, 2048, 32, 8192, factor=32.0, tied=True),
    _llama3("Llama-3.2-3B", 28, 3072, 24, 8192, factor=32.0, tied=True),
    _llama3("Llama-3.1-8B", 32, 4096, 32, 14336, factor=8.0, tied=False),
    _llama3("Llama-3.3-70B-Instruct", 80, 8192, 64, 28672, factor=8.0, tied=False),
    _qwen25("Qwen2.5-0.5B", 151936, 24, 896, 14, 2, 4864, 32768, tied=True),
    _qwen25("Qwen2.5-1.5B", 151936, 28, 1536, 12, 2, 8960, 32768, tied=True),
    _qwen25("Qwen2.5-7B", 152064, 28, 3584, 28, 4, 18944, 32768, tied=False),
    _smollm2("SmolLM2-135M", 30, 576, 9, 3, 1536, 8192),
    _smollm2("SmolLM2-360M", 32, 960, 15, 5, 2560, 8192),
    _smollm2("SmolLM2-1.7B", 24, 2048, 32, 32, 8192, 8192),
    Config(name="TinyLlama-1.1B-intermediate-step-1431k-3T", hf_repo="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
           vocab_size=32000, n_layer=22, n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=5632, block_size=2048),
    Config(name="TinyLlama-1.1B-Chat-v1.0", hf_repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
           vocab_size=32000, n_layer=22, n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=5632, block_size=2048),
    # v0.1 attends over a sliding window of 4096 tokens: litft runs it on sequences no longer than that
    Config(name="Mistral-7B-v0.1", hf_repo="mistralai/Mistral-7B-v0.1", vocab_size=32000, n_layer=32, n_embd=4096,
           n_head=32, n_query_groups=8, intermediate_size=14336, block_size=4096),
    Config(name="Mistral-7B-v0.3", hf_repo="mistralai/Mistral-7B-v0.3", vocab_size=32768, n_layer=32, n_embd=4096,
           n_head=32, n_query_groups=8, intermediate_size=14336, block_size=32768, rope_base=1000000.0),
    # Tiny configs for tests and quick experiments: random weights, seconds on a CPU.
    Config(name="tiny-mha", vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_query_groups=4, intermediate_size=128,
           block_size=256),
    Config(name="tiny-gqa", vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128,
           block_size=256, tie_embeddings=True),
]


def _instruct(c: Config) -> Config | None:
    """The chat / instruction-tuned sibling of a base model: the same shapes under another name."""
    if c.name.startswith("Llama-2"):
        name = c.name.replace("-hf", "-chat-hf")
    elif c.name.startswith(("SmolLM2", "Llama-3.2", "Llama-3.1", "Qwen2.5")):
        name = c.name + "-Instruct"
    elif c.name == "Mistral-7B-v0.3":
        name = "Mistral-7B-Instruct-v0.3"
    else:
        return None
    return replace(c, name=name, hf_repo=f"{c.hf_repo.split('/')[0]}/{name}")


_INSTRUCT = [_instruct(c) for c in _BASE]
CONFIGS: dict[str, Config] = {c.name: c for c in _BASE + [c for c in _INSTRUCT if c is not None]}
