"""Qwen2 / Qwen2.5 as a member of the Llama family: the same network with a bias on q, k and v.

Truth: transformers' Qwen2ForCausalLM (logits, greedy `generate`, from_pretrained of our export) and PEFT on it
(LoRA loss and gradients on biased layers, the PEFT export). Biases are made random: transformers starts them
at zero, which would hide a dropped bias.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 128, "hidden_size": 64,
         "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
         "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 2, "bos_token_id": None,
         "eos_token_id": None}


def qwen2(tied: bool, seed: int = 0) -> "transformers.Qwen2ForCausalLM":
    config = transformers.Qwen2Config(**{**QWEN2, "tie_word_embeddings": tied}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def convert(hf: torch.nn.Module, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    from litft.checkpoint import load_lit_model

    hf.save_pretrained(tmp_path / "hf")
    run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "hf", "--output_dir",
               tmp_path / "lit", check=True)
    return tmp_path / "lit", load_lit_model(tmp_path / "lit").eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_logits_and_greedy_text_match_transformers(tmp_path, tied, fast):
    """fast: in the CPU decoding layout generation uses (litft/fast/cpu_decoding.py)."""
    from litft.fast.cpu_decoding import prepare_for_cpu_decoding
    from litft.generate import generate

    hf = qwen2(tied)
    _, ours = convert(hf, tmp_path)
    assert ours.config.qkv_bias and ours.blocks[0].attn.o_proj.bias is None
    if fast:
        prepare_for_cpu_decoding(ours)
    x = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
        expected = hf.generate(x[:1, :9], attention_mask=torch.ones(1, 9, dtype=torch.long), do_sample=False,
                               max_new_tokens=30)[0, 9:].tolist()
    assert len(expected) == 30 and len(set(expected)) > 8
    assert list(generate(ours, x[0, :9], 30, temperature=0)) == expected


def test_hf_to_lit_to_hf_is_bit_exact(tmp_path):
    lit_dir, _ = convert(qwen2(tied=False), tmp_path)
    run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", lit_dir, "--output_dir", tmp_path / "back",
               check=True)
    original, back = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(back)
    assert any(k.endswith("q_proj.bias") for k in back)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")).__name__ == "Qwen2ForCausalLM"


def lit_name(peft_name: str) -> str:
    """PEFT's base_model.model.model.layers.0.self_attn.q_proj -> blocks.0.attn.q_proj (written independently)."""
    name = peft_name.removeprefix("base_model.model.").replace("model.layers", "blocks").replace("self_attn", "attn")
    name = name.replace("input_layernorm", "attn_norm").replace("post_attention_layernorm", "mlp_norm")
    return name.replace("model.embed_tokens", "embed").replace("model.norm", "norm")


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_lora_on_biased_layers_matches_peft_loss_and_gradients(fast):
    from litft.checkpoint import check_shapes
    from litft.config import Config
    from litft.fast import for_training
    from litft.lora import LoRAConfig, add_lora
    from litft.model import Llama

    hf = qwen2(tied=False)
    ours = Llama(Config.from_hf_config(hf.config.to_dict()))
    sd = {lit_name("base_model.model." + k): v for k, v in hf.state_dict().items()}
    check_shapes(ours, sd, Path("qwen2"))
    ours.load_state_dict(sd)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["q", "k", "v", "o", "gate", "up", "down", "lm_head"])
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])).train()
    add_lora(ours, cfg)
    loss_fn = for_training(ours, fast)
    torch.manual_seed(1)
    ours_params = dict(ours.named_parameters())
    for name, p in pm.named_parameters():
        if m := re.fullmatch(r"(.+)\.lora_([AB])\.default\.weight", name):
            torch.nn.init.normal_(p, std=0.1)
            ours_params[f"{lit_name(m.group(1))}.lora_{m.group(2)}"].data.copy_(p.data)
    x = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[:, :4] = -100
    expected = pm(input_ids=x, labels=y).loss
    expected.backward()
    loss = loss_fn(ours, x, y)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    theirs = {f"{lit_name(m.group(1))}.lora_{m.group(2)}": p.grad for name, p in pm.named_parameters()
              if (m := re.fullmatch(r"(.+)\.lora_([AB])\.default\.weight", name))}
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(theirs) and len(grads) == 2 * (7 * 2 + 1)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def lora_run(lit_dir: Path, run_dir: Path):
    """A LoRA run directory on the Qwen2 checkpoint, with random nonzero B, as finetune/lora.py leaves it."""
    from litft.checkpoint import load_lit_model
    from litft.files import save_state_dict
    from litft.lora import LoRAConfig, add_lora, lora_state_dict

    config = LoRAConfig(r=4, alpha=8, targets=["q", "k", "v", "o", "gate", "up", "down"])
    model = add_lora(load_lit_model(lit_dir), config).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    save_state_dict(lora_state_dict(model), run_dir / "lit_model_lora.pth")
    config.save(run_dir)
    model.config.save(run_dir)
    return model


def test_merge_and_peft_export_stay_exact(tmp_path):
    from litft.checkpoint import load_lit_model

    hf = qwen2(tied=True)
    lit_dir, _ = convert(hf, tmp_path)
    model = lora_run(lit_dir, tmp_path / "run")
    lora_path = tmp_path / "run" / "lit_model_lora.pth"
    x = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        unmerged = model(x)

    run_script("scripts/merge_lora.py", "--checkpoint_dir", lit_dir, "--lora_path", lora_path,
               "--out_dir", tmp_path / "merged", check=True)
    merged = load_lit_model(tmp_path / "merged").eval()
    run_script("scripts/export_peft.py", "--checkpoint_dir", lit_dir, "--lora_path", lora_path,
               "--output_dir", tmp_path / "peft", check=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged, atol=1e-4, rtol=0)  # logits of size ~30: fp32 rounding
        torch.testing.assert_close(pm(x).logits, unmerged, atol=1e-4, rtol=0)
        with pm.disable_adapter():
            assert (pm(x).logits - unmerged).abs().max() > 1e-2  # the adapter really changes the output


def test_adapter_v2_keeps_the_frozen_bias(tmp_path):
    """At init, LLaMA-Adapter v2 on Qwen2 is the base model: s ⊙ (W x + b₀ + b) with s = 1, b = 0 keeps b₀."""
    from litft.adapter_v2 import AdapterV2Config, add_adapter_v2

    hf = qwen2(tied=False)
    _, ours = convert(hf, tmp_path)
    add_adapter_v2(ours, AdapterV2Config(prompt_length=4, start_layer=0))
    x = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
    assert not ours.blocks[0].attn.q_proj.bias.requires_grad
