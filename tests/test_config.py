"""Named configs against the parameter counts their model cards publish, and model_config.yaml's one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from litft.config import CONFIGS, Config
from litft.errors import UserError
from litft.model import Llama

# Parameter counts as the Hugging Face model pages list them (the safetensors total; tied matrices once).
PUBLISHED = {
    "Llama-2-7b-hf": 6_738_415_616,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.3-70B-Instruct": 70_553_706_496,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-1.5B": 1_543_714_304,
    "Qwen2.5-7B": 7_615_616_512,
    "Mistral-7B-v0.3": 7_248_023_552,
    "SmolLM2-135M": 134_515_008,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_named_config_has_the_published_parameter_count(name):
    with torch.device("meta"):
        model = Llama(CONFIGS[name])
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]  # parameters() counts a tied matrix once


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith("tiny")])
def test_named_config_survives_config_json(name):
    """to_hf_config -> transformers' config class -> from_hf_config gives the named config back (RoPE included)."""
    transformers = pytest.importorskip("transformers")
    config = CONFIGS[name]
    hf = transformers.AutoConfig.for_model(**config.to_hf_config()).to_dict()
    assert Config.from_hf_config(hf, name=name) == Config(**{**config.__dict__, "hf_repo": ""})
    assert CONFIGS[name].hf_repo.endswith("/" + name)


def test_instruct_siblings_share_the_shapes():
    assert CONFIGS["Llama-3.1-8B-Instruct"].rope_scaling == CONFIGS["Llama-3.1-8B"].rope_scaling
    assert CONFIGS["Qwen2.5-7B-Instruct"].qkv_bias and CONFIGS["Mistral-7B-Instruct-v0.3"].vocab_size == 32768


BAD_VALUES = {  # model_config.yaml field: a value of the wrong type
    "tie_embeddings": "false",
    "n_head": "4",
    "n_layer": 2.5,
    "rope_base": [1, 2],
    "rope_scaling": "llama3",
    "qkv_bias": 1,
    "n_query_groups": 0,
    "norm_eps": -1e-5,
}


@pytest.mark.parametrize("field", BAD_VALUES)
def test_a_wrongly_typed_model_config_value_is_one_line(tmp_path, field):
    config = Config.from_name("tiny-gqa").to_dict()
    config[field] = BAD_VALUES[field]
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=field):
        Config.from_checkpoint(tmp_path)


def test_rope_scaling_round_trips_through_model_config_yaml(tmp_path):
    config = CONFIGS["Llama-3.2-1B"]
    config.save(tmp_path)
    assert Config.from_checkpoint(tmp_path) == config
    bad = yaml.safe_load((tmp_path / "model_config.yaml").read_text())
    bad["rope_scaling"]["factor"] = "8"
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="rope_scaling.factor"):
        Config.from_checkpoint(tmp_path)


SHAPE = {"vocab_size": 128, "hidden_size": 256, "num_attention_heads": 32, "num_hidden_layers": 1,
         "intermediate_size": 128}


@pytest.mark.parametrize("model_type,given", [("llama", {}), ("mistral", {}), ("qwen2", {}),
                                              ("qwen2", {"use_sliding_window": True, "max_window_layers": 0})])
def test_fields_config_json_leaves_out_mean_what_transformers_assumes(model_type, given):
    from transformers import AutoConfig

    hf = AutoConfig.for_model(model_type, **SHAPE, **given)
    config = Config.from_hf_config({"model_type": model_type, **SHAPE, **given})
    window = hf.sliding_window if getattr(hf, "sliding_window", None) else hf.max_position_embeddings
    assert config.norm_eps == hf.rms_norm_eps
    assert config.n_query_groups == hf.num_key_value_heads
    assert config.block_size == min(hf.max_position_embeddings, window)  # exact while no sequence is longer


@pytest.mark.parametrize("change,message", [
    ({"num_attention_heads": None}, "num_attention_heads = None should be a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads = 0 should be a positive integer"),
    ({"max_position_embeddings": None}, "max_position_embeddings = None should be a positive integer"),
    ({"vocab_size": "128"}, "vocab_size = '128' should be a positive integer"),
    ({"rope_scaling": [1]}, "a setting has a value of the wrong type"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "a setting has a value of the wrong type"),
])
def test_a_malformed_config_json_is_one_line(tmp_path, change, message):
    from litft.convert_hf import read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({**SHAPE, **change}))
    with pytest.raises(UserError, match=message):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a JSON list, not an object"):
        read_hf_config(tmp_path)
