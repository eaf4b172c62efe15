"""RoPE as checkpoints define it, judged by transformers: tiny random Llamas whose config.json scales RoPE the way
Llama 3.1, YaRN, position interpolation and dynamic NTK checkpoints do, run past their original context.
Truth: transformers' LlamaForCausalLM (logits and greedy `generate`) on the same config.json and weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_script

transformers = pytest.importorskip("transformers")

L = 64  # the "original" context of the scaled variants; every check runs well past it
VARIANTS = {  # rope_scaling as a hub config.json writes it, max_position_embeddings
    "default": (None, 256),
    "linear": ({"rope_type": "linear", "factor": 2.0}, 256),
    "dynamic": ({"type": "dynamic", "factor": 4.0}, L),  # the older spelling "type" is still common on the hub
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": L}, 1024),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}, L),
    "yarn-betas": ({"rope_type": "yarn", "factor": 3.0, "beta_fast": 16.0, "beta_slow": 2.0,
                    "attention_factor": 1.2, "original_max_position_embeddings": L}, L),
}


def hub_config(rope_scaling: dict | None, max_position: int, **overrides) -> dict:
    """A config.json as checkpoints on the hub spell it (rope_theta and rope_scaling at the top level)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
            "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": max_position, "rope_theta": 10000.0, "rope_scaling": rope_scaling,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": None,
            "eos_token_id": None, **overrides}


def hf_model_dir(tmp_path: Path, config: dict, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """transformers builds the model from our config.json; random weights large enough for varied greedy text."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    hf_config = transformers.AutoConfig.from_pretrained(d)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(d / "saved")  # weights only are used from here; config.json stays the hub spelling
    for f in (d / "saved").iterdir():
        if f.name != "config.json":
            f.rename(d / f.name)
    return d, model


def convert(hf_dir: Path, out_dir: Path):
    from litft.checkpoint import load_lit_model

    run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", hf_dir, "--output_dir", out_dir, check=True)
    return load_lit_model(out_dir).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_greedy_text_match_transformers_past_the_original_context(tmp_path, variant):
    from litft.generate import generate

    hf_dir, hf = hf_model_dir(tmp_path, hub_config(*VARIANTS[variant]))
    ours = convert(hf_dir, tmp_path / "lit")
    assert (ours.config.rope_scaling is None) == (variant == "default")

    x = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(1))  # 100 > L
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4

    prompt, n_new = x[0, :20], 70  # decoding crosses L: dynamic NTK re-scales at every step past it
    with torch.no_grad():  # the config names no EOS: both sides decode all n_new tokens
        expected = hf.generate(prompt[None], attention_mask=torch.ones(1, 20, dtype=torch.long), do_sample=False,
                               max_new_tokens=n_new)[0, 20:].tolist()
    assert len(expected) == n_new
    assert len(set(expected)) > 10
    assert list(generate(ours, prompt, n_new, temperature=0)) == expected


@pytest.mark.parametrize("variant", ["dynamic", "llama3"])
def test_packed_samples_get_the_rope_each_gets_alone_in_transformers(tmp_path, variant):
    """A packed row longer than L holding samples shorter than L: dynamic NTK scaling depends on the sequence's
    length, which for these samples is theirs (under L: unscaled), not the row's (transformers sees each alone)."""
    hf_dir, hf = hf_model_dir(tmp_path, hub_config(*VARIANTS[variant]))
    ours = convert(hf_dir, tmp_path / "lit")
    a, b = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))  # 40 < L, 80 > L
    pos = torch.cat([torch.arange(40), torch.arange(40)])[None]
    with torch.no_grad():
        packed = ours(torch.cat([a, b])[None], packed_pos=pos)[0]  # (80, vocab)
        assert (packed[:40] - hf(a[None]).logits[0]).abs().max().item() <= 1e-4
        assert (packed[40:] - hf(b[None]).logits[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["llama3", "yarn", "dynamic"])
def test_rope_scaling_survives_the_round_trip_to_transformers(tmp_path, variant):
    """lit -> HF: transformers reads back the same RoPE, so the exported model's logits equal ours."""
    hf_dir, _ = hf_model_dir(tmp_path, hub_config(*VARIANTS[variant]))
    ours = convert(hf_dir, tmp_path / "lit")
    run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", tmp_path / "lit",
               "--output_dir", tmp_path / "back", check=True)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    x = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(x) - back(x).logits).abs().max().item() <= 1e-4


def test_the_transformers_5_spelling_reads_the_same(tmp_path):
    """transformers 5 saves `rope_parameters` (rope_theta inside); both spellings give one Config."""
    from litft.config import Config

    hub = hub_config(*VARIANTS["llama3"])
    hf_config = transformers.AutoConfig.for_model(**hub)
    hf_config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved
    assert Config.from_hf_config(saved) == Config.from_hf_config(hub)


UNSUPPORTED = {  # what a config.json says -> the field the one-line error must name
    "longrope": ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                   "original_max_position_embeddings": 32}}, "longrope"),
    "yarn-mscale": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7, "mscale_all_dim": 0.7,
                                      "original_max_position_embeddings": 32}}, "mscale"),
    "partial-rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act"),
    "mlp-bias": ({"mlp_bias": True}, "mlp_bias"),
    "llama-attention-bias": ({"attention_bias": True}, "attention_bias"),
    "head-dim": ({"head_dim": 32}, "head_dim"),
    "other-architecture": ({"model_type": "gemma"}, "model_type"),
    "chunked-attention": ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_a_setting_litft_does_not_model_is_refused_and_nothing_written(tmp_path, case):
    overrides, field = UNSUPPORTED[case]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({**hub_config(None, 64), **overrides}))
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", hf_dir, "--output_dir", tmp_path / "out")
    assert_user_error(proc, field)
    assert not (tmp_path / "out").exists()


def test_a_sliding_window_caps_the_context(tmp_path):
    """Mistral v0.1 attends over 4096 tokens at most: litft runs it on sequences no longer than that, where full
    causal attention is exact; Qwen2's window counts only when use_sliding_window is on."""
    from litft.config import Config

    mistral = hub_config(None, 32768, model_type="mistral", sliding_window=4096)
    assert Config.from_hf_config(mistral).block_size == 4096
    qwen = hub_config(None, 32768, model_type="qwen2", sliding_window=4096, use_sliding_window=False)
    assert Config.from_hf_config(qwen).block_size == 32768


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 1.5, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "truncate": False},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
], ids=["yarn-1.5", "yarn-2", "yarn-4-untruncated", "llama3"])
def test_frequencies_and_attention_factor_equal_transformers_at_real_sizes(scaling):
    """Head size 128 and an original context of thousands, as real checkpoints have, where YaRN's default β_fast 32
    and β_slow 1 both fall inside the head's pairs (the tiny models above clamp them away), and factors under 2,
    whose attention factor 0.1 · ln(factor) + 1 is still applied. Truth: transformers' ROPE_INIT_FUNCTIONS."""
    from types import SimpleNamespace

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from litft.rope import inverse_frequencies, rope_from_hf

    hf = {"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0, "rope_scaling": scaling,
          "max_position_embeddings": int(scaling["factor"] * scaling["original_max_position_embeddings"])}
    expected, expected_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](transformers.LlamaConfig(**hf), "cpu")
    base, rope_scaling = rope_from_hf(hf)
    got, factor = inverse_frequencies(SimpleNamespace(head_size=128, rope_base=base, rope_scaling=rope_scaling),
                                      scaling["original_max_position_embeddings"])
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12) and (factor > 1) == (scaling["rope_type"] == "yarn")
