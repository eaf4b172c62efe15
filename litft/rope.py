"""Rotary position embeddings (RoPE), Su et al. 2021 — https://arxiv.org/abs/2104.09864 — and the ways
checkpoints stretch them past the context they were pretrained on.

Each head's channel pair (i, i + hs/2) is rotated by the angle  pos · θ_i,  with  θ_i = base^(-2i/hs) (the paper
pairs adjacent channels (2i, 2i + 1); Hugging Face checkpoints permute q's and k's rows so that this split is the same):

    q' = q · cos(pos θ) + rotate_half(q) · sin(pos θ)          rotate_half(x1, x2) = (-x2, x1)

so the score q'·k' depends only on the distance between the two positions. Fast-turning pairs (large θ_i)
encode local order, slow ones (wavelength 2π/θ_i longer than the pretraining context) were never seen to turn
far. Longer contexts change θ, and a checkpoint's config.json says how (`rope_scaling` / `rope_parameters`):

    linear     θ_i / factor: every position is squeezed by `factor` (Chen et al. 2023, position interpolation).
    dynamic    NTK-aware: past the original context L, base grows to
               base · (factor · T / L − (factor − 1))^(hs / (hs − 2)) for a sequence of T tokens, recomputed as
               T grows (the keys already in a KV cache keep the angles they were written with).
    llama3     Llama 3.1+: pairs whose wavelength is longer than L / low_freq_factor turn `factor` times slower
               (θ_i / factor), those shorter than L / high_freq_factor are kept, and the band between is blended.
    yarn       Peng et al. 2023 (https://arxiv.org/abs/2309.00071): interpolate slow pairs, keep fast pairs,
               ramp linearly between β_fast and β_slow rotations within L, and scale cos and sin by
               0.1 · ln(factor) + 1 (the "attention factor").

All four equal transformers' `modeling_rope_utils` computations in float32 (tests/test_rope.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from litft.errors import UserError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RoPEScaling:
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # how much longer the new context is
    original_max_position: int = 0  # L: the context the model was pretrained on (dynamic, llama3, yarn)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: pairs turning more than β_fast times within L are kept
    beta_slow: float = 1.0  # yarn: pairs turning fewer than β_slow times are interpolated
    attention_factor: float | None = None  # yarn: cos and sin scale; 0.1 · ln(factor) + 1 when None
    truncate: bool = True  # yarn: round the ramp's ends to whole channels

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise UserError(f"rope_scaling type {self.type!r} is not supported; litft implements {', '.join(ROPE_TYPES)}")
        if self.type != "default" and not self.factor > 0:
            raise UserError(f"rope_scaling factor must be > 0, got {self.factor}")
        if self.type in ("dynamic", "llama3", "yarn") and self.original_max_position < 1:
            raise UserError(f"rope_scaling type {self.type!r} needs original_max_position_embeddings ≥ 1")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise UserError("rope_scaling llama3 needs high_freq_factor > low_freq_factor")

    def context_length(self, max_position: int) -> int:
        """The longest sequence the scaled model is meant for: dynamic and yarn stretch L by `factor`."""
        if self.type in ("dynamic", "yarn"):
            return max(max_position, int(self.factor * self.original_max_position))
        return max_position


# ---- the tables the model uses --------------------------------------------------------------------------

class RoPEConfig(Protocol):
    """What the tables need from a model's Config (litft/config.py)."""

    head_size: int
    rope_base: float
    rope_scaling: RoPEScaling | None


def rope_tables(config: RoPEConfig, n_positions: int, device: torch.device | None = None,
                seq_len: int | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin for positions 0 .. n_positions - 1, each (n_positions, head_size), in float32.

    `seq_len` (default n_positions) is the length of the sequence being run; only `dynamic` depends on it,
    once it passes L. A table longer than the sequence can then be cached and sliced.
    """
    inv_freq, attention_factor = inverse_frequencies(config, seq_len or n_positions, device)  # (hs/2,)
    angles = torch.outer(torch.arange(n_positions, device=device, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs): pair (i, i + hs/2) shares an angle
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, heads, T, hs); cos, sin: (T, hs), or (B, 1, T, hs) when each row has its own positions (packed rows,
    rows decoded at different positions). Rotates each (first-half, second-half) channel pair."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, hs/2) each
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def inverse_frequencies(config: RoPEConfig, seq_len: int, device=None) -> tuple[Tensor, float]:
    """θ_i for i < hs/2 (float32) and the factor that scales cos and sin, as `config.rope_scaling` defines them."""
    s, hs, base = config.rope_scaling or RoPEScaling(), config.head_size, config.rope_base
    if s.type == "dynamic" and seq_len > s.original_max_position:
        base = base * (s.factor * seq_len / s.original_max_position - (s.factor - 1)) ** (hs / (hs - 2))
    theta = 1.0 / base ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)  # (hs/2,)
    if s.type == "linear":
        return theta / s.factor, 1.0
    if s.type == "llama3":
        return llama3_frequencies(theta, s), 1.0
    if s.type == "yarn":
        return yarn_frequencies(theta, s, hs, base)
    return theta, 1.0


def llama3_frequencies(theta: Tensor, s: RoPEScaling) -> Tensor:
    """Slow the long-wavelength pairs `factor` times (θ / factor), keep the short ones, blend the band in between."""
    wavelength = 2 * math.pi / theta
    long_wave, short_wave = s.original_max_position / s.low_freq_factor, s.original_max_position / s.high_freq_factor
    scaled = torch.where(wavelength > long_wave, theta / s.factor, theta)
    smooth = (s.original_max_position / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelength >= short_wave) & (wavelength <= long_wave)
    return torch.where(in_band, blended, scaled)


def yarn_frequencies(theta: Tensor, s: RoPEScaling, hs: int, base: float) -> tuple[Tensor, float]:
    """Keep pairs that turn more than β_fast times within L, interpolate those under β_slow, ramp in between."""
    def channel_of(rotations: float) -> float:  # the pair index that turns `rotations` times within L
        return hs * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = channel_of(s.beta_fast), channel_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hs - 1)
    high = high + 0.001 if low == high else high  # a ramp of width zero would divide by zero
    ramp = ((torch.arange(hs // 2, dtype=torch.float32, device=theta.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep θ), 0: interpolate (θ / factor)
    mixed = theta / s.factor * (1 - keep) + theta * keep
    attention = s.attention_factor if s.attention_factor is not None else (
        0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
    return mixed, attention


# ---- reading a Hugging Face config ------------------------------------------------------------------------

_HF_KEYS = {"factor": "factor", "original_max_position_embeddings": "original_max_position",
            "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor", "beta_fast": "beta_fast",
            "beta_slow": "beta_slow", "attention_factor": "attention_factor", "truncate": "truncate"}
_IGNORED = {"rope_type", "type", "rope_theta"}


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, RoPEScaling | None]:
    """(base, scaling) from config.json: transformers 5 writes `rope_parameters` (with rope_theta inside),
    older checkpoints `rope_theta` plus `rope_scaling`. Any setting litft does not model is refused by name."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    base = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("config.json field partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return base, None
    unknown = sorted(set(params) - set(_HF_KEYS) - _IGNORED - {"partial_rotary_factor"})
    if unknown or rope_type not in ROPE_TYPES:
        field = f"rope_scaling.{unknown[0]}" if rope_type in ROPE_TYPES else f"rope_scaling type {rope_type!r}"
        raise UserError(f"config.json {field} is not supported; litft implements RoPE types {', '.join(ROPE_TYPES)}")
    values = {_HF_KEYS[k]: v for k, v in params.items() if k in _HF_KEYS and v is not None}
    if rope_type == "dynamic":  # transformers measures dynamic scaling from max_position_embeddings
        values["original_max_position"] = hf["max_position_embeddings"]
    values.setdefault("original_max_position", hf.get("original_max_position_embeddings", hf["max_position_embeddings"]))
    return base, RoPEScaling(type=rope_type, **values)


def rope_to_hf(base: float, s: RoPEScaling | None) -> dict[str, Any]:
    """The `rope_parameters` dict transformers reads back (the inverse of rope_from_hf)."""
    if s is None or s.type == "default":
        return {"rope_type": "default", "rope_theta": base}
    keep = {"linear": ("factor",), "dynamic": ("factor",),
            "llama3": ("factor", "original_max_position", "low_freq_factor", "high_freq_factor"),
            "yarn": ("factor", "original_max_position", "beta_fast", "beta_slow", "attention_factor", "truncate")}
    back = {v: k for k, v in _HF_KEYS.items()}
    out = {"rope_type": s.type, "rope_theta": base}
    out.update({back[f.name]: getattr(s, f.name) for f in fields(s) if f.name in keep[s.type]
                and getattr(s, f.name) is not None})
    return out
