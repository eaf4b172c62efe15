"""LoRA layers against PEFT on transformers' Llama, and the bookkeeping around them (trainables, file, merge)."""

from __future__ import annotations

import re

import pytest
import torch

from litft.config import Config
from litft.errors import UserError
from litft.fast import for_training
from litft.fast.chunked_loss import chunked_next_token_loss
from litft.fast.cpu_decoding import prepare_for_cpu_decoding
from litft.fast.fused_lora import FusedLoRALinear
from litft.files import save_state_dict
from litft.load_finetuned import load_lora_state_dict
from litft.lora import (
    LINEAR,
    TARGETS,
    LoRAConfig,
    LoRAEmbedding,
    LoRALinear,
    add_lora,
    lora_state_dict,
    merge_lora,
)
from litft.model import Llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj", "embed": "embed_tokens", "lm_head": "lm_head"}


def hf_to_lit_name(name: str) -> str:
    """transformers' LlamaForCausalLM parameter name -> litft name (written here, independently of litft)."""
    name = name.replace("model.embed_tokens", "embed").replace("model.norm", "norm").replace("model.layers", "blocks")
    name = name.replace("self_attn", "attn").replace("input_layernorm", "attn_norm")
    return name.replace("post_attention_layernorm", "mlp_norm")


def tiny_pair(name: str = "tiny-gqa", seed: int = 0) -> tuple:
    """A random transformers Llama and the litft Llama holding the same weights."""
    config = Config.from_name(name)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config())).eval()
    ours = Llama(config).eval()
    sd = {hf_to_lit_name(k): v for k, v in hf.state_dict().items()}
    if config.tie_embeddings:
        sd.pop("lm_head.weight")
    ours.load_state_dict(sd, strict=not config.tie_embeddings)
    ours.tie_weights()
    return hf, ours


def peft_model(hf, cfg: LoRAConfig):
    lc = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, use_rslora=cfg.rslora,
                         target_modules=[HF_TARGETS[t] for t in cfg.targets])
    return peft.get_peft_model(hf, lc).eval()


def copy_peft_lora_into(pm, ours: Llama) -> int:
    """Copy PEFT's A/B into our LoRA model by name; returns how many tensors were copied."""
    ours_sd, n = lora_state_dict(ours), 0
    for name, p in pm.named_parameters():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_(embedding_)?([AB])(?:\.default(?:\.weight)?)", name)
        if m:
            key = hf_to_lit_name(m.group(1)) + f".lora_{m.group(3)}"
            ours_sd[key].copy_(p.detach())
            n += 1
    assert n == sum(".lora_" in k for k in ours_sd)
    return n


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa"])
def test_lora_at_init_is_the_base_model_exactly(name):
    _, ours = tiny_pair(name)
    x = torch.randint(0, ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        base = ours(x)
        add_lora(ours, LoRAConfig(targets=list(TARGETS)))
        assert torch.equal(ours(x), base)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("name,targets,rslora", [
    ("tiny-mha", list(LINEAR), False),
    ("tiny-gqa", list(LINEAR), True),
    ("tiny-gqa", list(TARGETS), False),  # tied embeddings, LoRA on embed and lm_head as well
])
def test_logits_match_peft(name, targets, rslora, fast):
    """Plain: LoRALinear as written. Fast: the fused layers training runs (litft/fast), then the merged model in
    the CPU decoding layout that generation runs."""
    hf, ours = tiny_pair(name)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets, rslora=rslora)
    pm = peft_model(hf, cfg)
    torch.manual_seed(1)
    for n, p in pm.named_parameters():  # make every B (and embedding A) nonzero so the update shows
        if "lora_B" in n or "lora_embedding" in n:
            torch.nn.init.normal_(p, std=0.1)
    add_lora(ours, cfg)
    copy_peft_lora_into(pm, ours)
    for_training(ours, fast)
    assert any(isinstance(m, FusedLoRALinear) for m in ours.modules()) == fast
    x = torch.randint(0, ours.config.vocab_size, (2, 13))
    with torch.no_grad():
        expected, got, base = pm(x).logits, ours(x), pm.get_base_model()
        with pm.disable_adapter():
            plain = base(x).logits
        decoding = prepare_for_cpu_decoding(merge_lora(ours))(x) if fast else got
    assert (expected - plain).abs().max() > 1e-2  # the LoRA update is really there
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(decoding, expected, atol=1e-4, rtol=0)


def test_the_fused_layer_with_a_bias_returns_autocasts_dtype():
    """Qwen2's q, k and v have biases. Under bf16 autocast torch's F.linear (what LoRALinear calls) returns bf16; the
    fused layer added its fp32 bias after the bf16 GEMM and returned fp32, twice the activations' memory."""
    lora = LoRALinear(torch.nn.Linear(16, 8, bias=True), LoRAConfig(r=2, dropout=0.0))
    torch.nn.init.normal_(lora.lora_B)
    fused = FusedLoRALinear.from_lora(lora, torch.nn.Identity())
    x = torch.randn(2, 3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = lora(x), fused(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0.02, rtol=1e-2)  # bf16 rounds differently in the two orders


@pytest.mark.parametrize("targets,fast,chunk_tokens", [
    (list(LINEAR), False, None), (list(LINEAR), True, None), (list(TARGETS), False, None), (list(TARGETS), True, None),
    (list(TARGETS), True, 5)], ids=["plain", "fast", "plain-lora-lm_head", "fast-lora-lm_head", "fast-many-slices"])
def test_training_loss_and_lora_gradients_match_peft(targets, fast, chunk_tokens):
    """The training loss and every LoRA gradient against PEFT's labels= loss: on the plain path (litft/loss.py,
    LoRALinear) and the fast one (litft/fast: the chunked loss, both of its branches, and the fused layers)."""
    hf, ours = tiny_pair("tiny-gqa")
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets)
    pm = peft_model(hf, cfg).train()
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.1)
    add_lora(ours, cfg)
    copy_peft_lora_into(pm, ours)
    loss_fn = for_training(ours, fast)
    x = torch.randint(0, ours.config.vocab_size, (2, 13))
    y = x.clone()
    y[:, :4] = -100  # a masked prompt
    expected = pm(input_ids=x, labels=y).loss
    expected.backward()
    if chunk_tokens:
        loss = chunked_next_token_loss(ours.lm_head, ours.hidden_states(x), y, chunk_tokens=chunk_tokens)
    else:
        loss = loss_fn(ours, x, y)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    theirs = {}
    for name, p in pm.named_parameters():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_(embedding_)?([AB])(?:\.default(?:\.weight)?)", name)
        if m:
            theirs[hf_to_lit_name(m.group(1)) + f".lora_{m.group(3)}"] = p.grad
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(ours_grads) == sorted(theirs)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def test_only_lora_is_trainable_and_saved(tmp_path):
    _, ours = tiny_pair("tiny-mha")
    add_lora(ours, LoRAConfig(r=4, targets=list(TARGETS)))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    sd = lora_state_dict(ours)
    assert trainable == set(sd)
    assert all(re.search(r"\.lora_[AB]$", n) for n in trainable)
    c = ours.config  # r · (d_in + d_out) per adapted layer, written out from the shapes
    per_block = 4 * (3 * (c.n_embd + c.n_embd) + (c.n_embd + c.n_embd)) + 4 * 3 * (c.n_embd + c.intermediate_size)
    assert count_trainable(ours) == c.n_layer * per_block + 2 * 4 * (c.vocab_size + c.n_embd)
    path = tmp_path / "lit_model_lora.pth"
    save_state_dict(sd, path)
    payload = sum(t.numel() * t.element_size() for t in sd.values())
    overhead = path.stat().st_size - payload
    assert 0 < overhead < 1024 + 512 * len(sd), (payload, overhead)  # zip entry + pickle per tensor


def test_trainable_count_llama2_7b_matches_formula_and_peft():
    c = Config.from_name("Llama-2-7b-hf")
    r, d, i = 8, c.n_embd, c.intermediate_size
    kv = c.n_query_groups * c.head_size
    shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, i), "up": (d, i), "down": (i, d)}
    hc = transformers.LlamaConfig(**c.to_hf_config())
    for targets, printed in ((["q", "v"], 4_194_304), (list(LINEAR), 19_988_480)):
        expected = c.n_layer * sum(r * sum(shapes[t]) for t in targets)
        with torch.device("meta"):
            model = Llama(c)
            hf = transformers.LlamaForCausalLM(hc)
        add_lora(model, LoRAConfig(r=r, targets=targets))
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=16, target_modules=[HF_TARGETS[t] for t in targets]))
        print(f"Llama-2-7B LoRA r={r} on {','.join(targets)}: {count_trainable(model):,} trainable parameters")
        assert count_trainable(model) == expected == pm.get_nb_trainable_parameters()[0] == printed


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa"])
def test_merged_equals_unmerged(name):
    _, ours = tiny_pair(name)
    add_lora(ours, LoRAConfig(r=4, targets=list(TARGETS)))
    torch.manual_seed(2)
    for n, p in ours.named_parameters():
        if n.endswith("lora_B") or n.endswith("embed.lora_A"):
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, ours.config.vocab_size, (2, 13))
    with torch.no_grad():
        unmerged = ours(x)
        merged = merge_lora(ours)
        assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in merged.modules())
        assert not any("lora" in k for k in merged.state_dict())
        assert merged.config.tie_embeddings is False  # a merged embed/lm_head update unties them
        torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=0)


def test_merge_keeps_tying_when_embeddings_are_not_adapted():
    _, ours = tiny_pair("tiny-gqa")
    add_lora(ours, LoRAConfig(r=4, targets=["q", "v"]))
    merged = merge_lora(ours)
    assert merged.config.tie_embeddings and merged.lm_head.weight is merged.embed.weight


def test_new_tokens_match_resized_transformers_model(tmp_path):
    """Vocabulary 256 -> 260: the new rows are trainable and saved alone; logits equal transformers' model
    resized to 260 rows holding the same new rows, under PEFT LoRA with the same A, B."""
    hf, ours = tiny_pair("tiny-gqa")
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=list(LINEAR), new_tokens=["<a>", "<b>", "<c>", "<d>"])
    add_lora(ours, cfg)
    sd = lora_state_dict(ours)
    assert sd["embed.new_rows"].shape == (4, ours.config.n_embd) and "lm_head.new_rows" not in sd  # tied: one copy
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(sd)
    torch.manual_seed(3)
    with torch.no_grad():
        ours.embed.new_rows.normal_(std=0.5)
        hf.resize_token_embeddings(260)
        hf.get_input_embeddings().weight[256:] = ours.embed.new_rows
    pm = peft_model(hf, cfg)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    copy_peft_lora_into(pm, ours)
    x = torch.tensor([[1, 256, 5, 259, 7, 257, 258]])
    with torch.no_grad():
        expected = pm(x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)
        merged = merge_lora(ours)
        assert merged.config.vocab_size == 260 and merged.config.tie_embeddings
        torch.testing.assert_close(merged(x), expected, atol=1e-4, rtol=0)


def test_config_errors_and_roundtrip(tmp_path):
    with pytest.raises(UserError, match=r"unknown LoRA target 'qq'.*q, k, v, o, gate, up, down, embed, lm_head"):
        LoRAConfig(targets=["q", "qq"])
    with pytest.raises(UserError, match="r ≥ 1"):
        LoRAConfig(r=0)
    cfg = LoRAConfig(r=16, alpha=32, targets=["q", "v", "lm_head"], rslora=True)
    cfg.save(tmp_path)
    assert LoRAConfig.from_dir(tmp_path) == cfg
    assert cfg.scaling == 32 / 4
    with pytest.raises(UserError, match="has no lora.yaml"):
        LoRAConfig.from_dir(tmp_path / "nothing")


def test_load_errors_are_one_line(tmp_path):
    src = tmp_path / "lit_model_lora.pth"
    small = add_lora(Llama(Config.from_name("tiny-mha")), LoRAConfig(r=4))
    other = add_lora(Llama(Config.from_name("tiny-mha", n_embd=32, n_head=2, n_query_groups=2)), LoRAConfig(r=4))
    with pytest.raises(UserError, match=r"made for another base model.*width 64"):
        load_lora_state_dict(small, lora_state_dict(other), src)
    rank8 = add_lora(Llama(Config.from_name("tiny-mha")), LoRAConfig(r=8))
    with pytest.raises(UserError, match=r"rank-8 LoRA tensors but lora.yaml says r=4"):
        load_lora_state_dict(small, lora_state_dict(rank8), src)
    with pytest.raises(UserError, match="holds no LoRA tensors"):
        load_lora_state_dict(small, {"blocks.0.attn.prefix": torch.zeros(3)}, src)
    qv = add_lora(Llama(Config.from_name("tiny-mha")), LoRAConfig(r=4, targets=["q", "v"]))
    with pytest.raises(UserError, match="lacks 20 LoRA tensors"):
        load_lora_state_dict(small, lora_state_dict(qv), src)
