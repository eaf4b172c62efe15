"""LLaMA-Adapter v1/v2 and full fine-tune inference: the prompt path against the paper's equation written out
here with transformers' RoPE helper, v2's s ⊙ (W x + b) against the equation in float64 and against transformers'
Llama with s and b folded into biased linears, base-model identity at init, what trains and what is saved, parameter
counts from a formula, cached vs uncached greedy decoding, and generate/{adapter,adapter_v2,full}.py as users
run them, including their one-line errors."""

from __future__ import annotations

import math
import re
import shutil
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error, run_main, run_script

from litft.adapter import AdapterConfig, adapter_state_dict, add_adapter
from litft.adapter_v2 import AdapterV2Config, ScaledLinear, adapter_v2_state_dict, add_adapter_v2
from litft.checkpoint import save_lit_checkpoint
from litft.config import Config
from litft.errors import UserError
from litft.files import save_state_dict
from litft.generate import generate, greedy_without_cache
from litft.load_finetuned import load_finetuned
from litft.model import Llama
from litft.prompts import PromptStyle
from litft.tokenizer import Tokenizer
from litft.train import param_groups


def tiny_model(name: str = "tiny-gqa", seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(Config.from_name(name, **overrides)).eval()
    with torch.no_grad():  # larger weights than the default init: peaked, varied predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def randomize(model: torch.nn.Module, names: set[str], seed: int = 1) -> None:
    """Give the method's parameters non-trivial values, as training would, so the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---- the prompt path is the paper's equation -------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa"])
def test_attention_equals_the_papers_gated_prefix_equation(name):
    """Zhang et al. eq. 6-8: scores over [prompt; tokens] split, softmax each part, gate the prompt part."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    model = tiny_model(name)
    add_adapter(model, AdapterConfig(prompt_length=5, start_layer=0))
    attn = model.blocks[1].attn
    randomize(model, trainable(model))
    B, T, C, nh, nkv, hs = 2, 7, 64, attn.n_head, attn.n_kv, attn.head_size
    x = torch.randn(B, T, C)
    cos, sin = torch.randn(T, hs), torch.randn(T, hs)  # any rotation tables: q and K rotate, the prompt does not

    P, g = attn.prefix.prompt, attn.prefix.gate  # (L, C), (nh,)
    q = attn.q_proj(x).view(B, T, nh, hs).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, nkv, hs).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, nkv, hs).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    k, v = repeat_kv(k, nh // nkv), repeat_kv(v, nh // nkv)  # (B, nh, T, hs)
    kp = repeat_kv(attn.k_proj(P).view(1, -1, nkv, hs).transpose(1, 2), nh // nkv)  # (1, nh, L, hs)
    vp = repeat_kv(attn.v_proj(P).view(1, -1, nkv, hs).transpose(1, 2), nh // nkv)
    L = P.size(0)

    scores = torch.cat((q @ kp.transpose(-1, -2), q @ k.transpose(-1, -2)), dim=-1) / math.sqrt(hs)  # (B, nh, T, L+T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    s_prompt = scores[..., :L].softmax(-1) * g.view(1, nh, 1, 1)
    s_tokens = scores[..., L:].masked_fill(~causal, float("-inf")).softmax(-1)
    y = torch.cat((s_prompt, s_tokens), dim=-1) @ torch.cat((vp.expand(B, -1, -1, -1), v), dim=2)  # (B, nh, T, hs)
    expected = attn.o_proj(y.transpose(1, 2).reshape(B, T, nh * hs))

    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, None, None), expected, atol=1e-5, rtol=1e-5)


# ---- at init the model is the base model; only the method trains ------------------------------------------


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa"])
@pytest.mark.parametrize("v2", [False, True])
def test_at_init_logits_equal_the_base_models_exactly(name, v2):
    model = tiny_model(name)
    idx = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        base = model(idx)
        (add_adapter_v2(model, AdapterV2Config(start_layer=0)) if v2 else add_adapter(model, AdapterConfig(start_layer=0)))
        assert torch.equal(model(idx), base)


def test_v1_trains_and_saves_exactly_prompts_and_gates():
    model = tiny_model("tiny-mha", n_layer=4)
    add_adapter(model, AdapterConfig(prompt_length=3, start_layer=1))
    expected = {f"blocks.{i}.attn.prefix.{p}" for i in range(1, 4) for p in ("prompt", "gate")}
    assert trainable(model) == expected
    assert set(adapter_state_dict(model)) == expected

    # Zero-init attention: at step 0 only the gates get a gradient (the prompt's path is multiplied by g = 0).
    model.train()
    idx = torch.randint(0, 256, (2, 9))
    F.cross_entropy(model(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == expected
    assert all(grads[n].abs().sum() > 0 for n in expected if n.endswith("gate"))
    assert all(torch.equal(grads[n], torch.zeros_like(grads[n])) for n in expected if n.endswith("prompt"))


def test_v2_trains_and_saves_prompts_scales_biases_and_norms():
    model = tiny_model("tiny-gqa", n_layer=3)  # tied embeddings: lm_head's W stays the embedding matrix
    add_adapter_v2(model, AdapterV2Config(prompt_length=3, start_layer=2))
    linears = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    expected = {"blocks.2.attn.prefix.prompt", "blocks.2.attn.prefix.gate", "norm.weight",
                "lm_head.adapter_bias", "lm_head.adapter_scale"}
    for i in range(3):
        expected |= {f"blocks.{i}.attn_norm.weight", f"blocks.{i}.mlp_norm.weight"}
        expected |= {f"blocks.{i}.{lin}.adapter_{p}" for lin in linears for p in ("bias", "scale")}
    assert trainable(model) == expected
    assert set(adapter_v2_state_dict(model)) == expected
    assert model.lm_head.weight is model.embed.weight


def test_a_base_checkpoint_loads_into_an_adapter_v2_model():
    base = tiny_model("tiny-mha")
    adapted = add_adapter_v2(Llama(base.config), AdapterV2Config(start_layer=1))  # random base weights
    missing, unexpected = adapted.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(n.endswith(("adapter_bias", "adapter_scale", "prefix.prompt", "prefix.gate")) for n in missing)
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(adapted.eval()(idx), base(idx))


# ---- v2's bias tuning is the paper's equation ----------------------------------------------------------------


@pytest.mark.parametrize("frozen_bias", [False, True], ids=["llama", "qwen2-qkv"])
def test_scaled_linear_equals_the_papers_equation_in_float64(frozen_bias):
    """Gao et al. 2023, eq. 4: y = s ⊙ (W x + b), with non-trivial s and b; a frozen b₀ (Qwen2) adds inside."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=frozen_bias, dtype=torch.float64)
    layer = ScaledLinear(base)
    s, b = torch.rand(40, dtype=torch.float64) * 3 - 1, torch.randn(40, dtype=torch.float64)  # s in [-1, 2)
    with torch.no_grad():
        layer.adapter_scale.copy_(s)
        layer.adapter_bias.copy_(b)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    b0 = base.bias if frozen_bias else torch.zeros(40, dtype=torch.float64)
    expected = s * (x @ base.weight.T + b0 + b)  # (2, 5, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)


def test_adapter_v2_logits_equal_transformers_llama_with_the_scale_and_bias_folded_into_its_linears():
    """s ⊙ (W x + b) = (s ⊙ W) x + s ⊙ b: a transformers Llama with attention_bias and mlp_bias, weights s ⊙ W and
    biases s ⊙ b, is the outside model of every adapted block (float64). Its lm_head has no bias, so the head's
    equation is applied to its logits by hand: s_head ⊙ (logits + b_head). Gates stay 0: no prompt path."""
    transformers = pytest.importorskip("transformers")
    shapes = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    torch.manual_seed(0)
    ours = Llama(Config.from_hf_config(transformers.LlamaConfig(**shapes).to_dict())).double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    add_adapter_v2(ours, AdapterV2Config(prompt_length=3, start_layer=0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("adapter_scale", "norm.weight")):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            elif name.endswith("adapter_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))

    def hf_name(name: str) -> str:  # litft -> transformers naming
        for old, new in [("blocks.", "model.layers."), ("attn_norm", "input_layernorm"), ("attn.", "self_attn."),
                         ("mlp_norm", "post_attention_layernorm")]:
            name = name.replace(old, new)
        return {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}.get(name, name)

    state = {hf_name(n): p.detach() for n, p in ours.named_parameters() if n == "embed.weight" or n.endswith("norm.weight")}
    for name, module in ours.named_modules():
        if isinstance(module, ScaledLinear):
            s = module.adapter_scale.detach()
            if name == "lm_head":
                state["lm_head.weight"] = module.weight.detach()  # its s and b are applied below
            else:
                state[f"{hf_name(name)}.weight"] = s[:, None] * module.weight.detach()
                state[f"{hf_name(name)}.bias"] = s * module.adapter_bias.detach()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shapes, attention_bias=True, mlp_bias=True))
    hf.double().eval().load_state_dict(state, strict=True)

    idx = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        head = ours.lm_head
        expected = head.adapter_scale * (hf(idx).logits + head.adapter_bias)  # (2, 11, vocab)
        # Both models compute RMSNorm and the RoPE tables in float32, so float64 agrees to ~1e-5, not to 1e-12.
        torch.testing.assert_close(ours(idx), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_head,n_kv,tied", [(4, 4, False), (4, 2, True), (8, 2, False)])
def test_adapter_logits_equal_peft_adaption_prompt(tmp_path, n_head, n_kv, tied):
    """peft's AdaptionPrompt is another implementation of LLaMA-Adapter v1 on transformers' Llama: the same base
    weights (converted with litft's converter), the same prompts and nonzero gates in the top 3 of 4 layers, the
    same logits. peft has one gate per layer; litft's per-head gates are all set to it."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from litft.convert_hf import hf_to_lit_state_dict, read_hf_config

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=n_head,
        num_key_value_heads=n_kv, max_position_embeddings=128, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    config = read_hf_config(tmp_path)
    ours = Llama(config).eval()
    ours.load_state_dict(hf_to_lit_state_dict(tmp_path, config), strict=False)
    adapted = peft.get_peft_model(hf, peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=3,
                                                                task_type="CAUSAL_LM")).eval()
    add_adapter(ours, AdapterConfig(prompt_length=5, start_layer=1)).eval()
    layers = [m for m in adapted.modules() if hasattr(m, "adaption_gate")]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block, layer in zip(ours.blocks[1:], layers, strict=True):
            layer.adaption_prompt.copy_(torch.randn(layer.adaption_prompt.shape, generator=gen))
            layer.adaption_gate.copy_(0.5 + torch.rand(1, generator=gen))
            block.attn.prefix.prompt.copy_(layer.adaption_prompt[0])
            block.attn.prefix.gate.fill_(layer.adaption_gate.item())
        idx = torch.randint(0, 256, (2, 13))
        expected = adapted(input_ids=idx).logits
        with adapted.disable_adapter():
            assert (expected - adapted(input_ids=idx).logits).abs().max() > 1  # the prompts matter
        torch.testing.assert_close(ours(idx), expected, atol=1e-4, rtol=1e-4)


# ---- trainable parameter counts on Llama-2-7B ----------------------------------------------------------


def test_parameter_counts_on_llama2_7b():
    c = Config.from_name("Llama-2-7b-hf")
    L, start = 10, 2
    adapted_layers = c.n_layer - start
    v1_expected = adapted_layers * L * c.n_embd + adapted_layers * c.n_head  # prompts + one gate per head
    kv = c.n_query_groups * c.head_size
    d_out_per_layer = c.n_embd + kv + kv + c.n_embd + 2 * c.intermediate_size + c.n_embd  # q k v o gate up down
    v2_expected = (v1_expected + 2 * (c.n_layer * d_out_per_layer + c.vocab_size)  # bias + scale, lm_head too
                   + (2 * c.n_layer + 1) * c.n_embd)  # two norms per layer and the final one

    counts = {}
    for v2 in (False, True):
        with torch.device("meta"):
            model = Llama(c)
        add_adapter_v2(model, AdapterV2Config(L, start)) if v2 else add_adapter(model, AdapterConfig(L, start))
        counts[v2] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Llama-2-7B trainable: adapter v1 {counts[False]:,}, adapter v2 {counts[True]:,}")
    assert counts[False] == v1_expected == 1_229_760
    assert counts[True] == v2_expected
    assert round(counts[False] / 1e6, 1) == 1.2  # the LLaMA-Adapter paper's figure


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="prompt_length"):
        AdapterConfig(prompt_length=0)
    with pytest.raises(UserError, match="prompt_length"):
        AdapterV2Config(prompt_length=-3)
    with pytest.raises(UserError, match="start_layer"):
        add_adapter(tiny_model(), AdapterConfig(start_layer=2))  # tiny models have 2 layers


# ---- decoding with the KV cache -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa"])
@pytest.mark.parametrize("v2", [False, True])
def test_cached_greedy_equals_uncached_greedy(name, v2):
    model = tiny_model(name)
    if v2:
        add_adapter_v2(model, AdapterV2Config(prompt_length=4, start_layer=0))
    else:
        add_adapter(model, AdapterConfig(prompt_length=4, start_layer=0))
    base_tokens_model = tiny_model(name)
    prompt = torch.randint(0, 256, (6,))
    randomize(model, trainable(model))
    cached = list(generate(model, prompt, 30, temperature=0))
    assert len(set(cached)) > 5
    assert cached == greedy_without_cache(model, prompt, 30)
    assert cached != greedy_without_cache(base_tokens_model, prompt, 30)  # the adapter changed the output


@pytest.mark.parametrize("v2", [False, True])
def test_cached_and_packed_logits_equal_the_whole_forward(v2):
    """The prompt has no position, so decoding token by token from the KV cache, and a row that packs three
    samples (positions restarting, attention kept within each), give each sample's logits of a plain forward."""
    model = tiny_model("tiny-gqa")
    add_adapter_v2(model, AdapterV2Config(4, 0)) if v2 else add_adapter(model, AdapterConfig(4, 0))
    randomize(model, trainable(model))
    idx = torch.randint(0, 256, (2, 12))
    samples = [torch.randint(0, 256, (n,)) for n in (4, 5, 3)]
    with torch.no_grad():
        whole = model(idx)
        model.set_kv_cache(2, 32)
        steps = [model(idx[:, :5], input_pos=torch.arange(5))]
        steps += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(5, 12)]
        model.clear_kv_cache()
        positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
        packed = model(torch.cat(samples)[None], packed_pos=positions)[0]
        alone = torch.cat([model(s[None])[0] for s in samples])
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(packed, alone, atol=2e-4, rtol=1e-4)


# ---- the generate scripts as users run them ------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, sentencepiece_model):
    """A random small model over the real 32000-piece sentencepiece tokenizer."""
    directory = tmp_path_factory.mktemp("base")
    save_lit_checkpoint(tiny_model("tiny-gqa", vocab_size=32000, block_size=64), directory)
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    return directory


def make_run(base_dir, run_dir, v2: bool, style: str | None = "alpaca", config=None, model_config=True) -> Llama:
    """What a fine-tuning run leaves behind: the method's weights, its yaml, the prompt style, model_config."""
    model = tiny_model("tiny-gqa", vocab_size=32000, block_size=64) if config is None else Llama(config)
    cfg = AdapterV2Config(prompt_length=3, start_layer=1) if v2 else AdapterConfig(prompt_length=3, start_layer=1)
    (add_adapter_v2 if v2 else add_adapter)(model, cfg)
    randomize(model, trainable(model))
    sd = (adapter_v2_state_dict if v2 else adapter_state_dict)(model)
    save_state_dict(sd, run_dir / ("lit_model_adapter_v2.pth" if v2 else "lit_model_adapter.pth"))
    cfg.save(run_dir)
    if style:
        PromptStyle(style).save(run_dir)
    if model_config:
        model.config.save(run_dir)
    return model.eval()


def expected_text(model, base_dir, prompt: str, n: int) -> str:
    tokenizer = Tokenizer(base_dir)
    ids = greedy_without_cache(model, tokenizer.encode(prompt), n, stop_ids={tokenizer.eos_id})
    return tokenizer.decode(ids) + "\n"


@pytest.mark.parametrize("v2", [False, True])
def test_generate_adapter_prints_the_adapted_greedy_completion(base_dir, tmp_path, v2):
    model = make_run(base_dir, tmp_path, v2)
    script, weights = ("generate/adapter_v2.py", "lit_model_adapter_v2.pth") if v2 else ("generate/adapter.py", "lit_model_adapter.pth")
    flags = ("--checkpoint_dir", base_dir, "--prompt", "Name a color.", "--temperature", "0", "--max_new_tokens", "12")
    via_file = run_script(script, "--adapter_path", tmp_path / weights, *flags, check=True)
    via_dir = run_script(script, "--adapter_path", tmp_path, *flags, check=True)  # the run directory: its weights
    # the run's prompt style (alpaca) wraps the prompt; adapter.yaml gives L and start_layer
    assert via_file.stdout == via_dir.stdout == expected_text(model, base_dir, PromptStyle("alpaca").apply("Name a color."), 12)


def test_generate_full_serves_a_weights_file_and_a_checkpoint_dir_like_base(base_dir, tmp_path):
    tuned = tiny_model("tiny-gqa", seed=5, vocab_size=32000, block_size=64)  # stands in for fine-tuned weights
    save_lit_checkpoint(tuned, tmp_path / "ckpt")  # a run dir that is a lit checkpoint
    shutil.copy(base_dir / "tokenizer.model", tmp_path / "ckpt")
    shutil.copy(tmp_path / "ckpt" / "lit_model.pth", tmp_path / "lit_model_finetuned.pth")
    flags = ("--prompt", "Once upon a time", "--temperature", "0", "--max_new_tokens", "12")
    expected = expected_text(tuned, base_dir, "Once upon a time", 12)
    via_file = run_script("generate/full.py", "--checkpoint_dir", base_dir, "--finetuned_path",
                          tmp_path / "lit_model_finetuned.pth", *flags, check=True)
    via_dir = run_script("generate/full.py", "--checkpoint_dir", base_dir, "--finetuned_path", tmp_path / "ckpt",
                         *flags, check=True)
    via_base = run_script("generate/base.py", "--checkpoint_dir", tmp_path / "ckpt", *flags, check=True)
    assert via_file.stdout == via_dir.stdout == via_base.stdout == expected
    # a base of another shape is refused for the run directory as for its weights file, not fed to the model
    save_lit_checkpoint(tiny_model("tiny-gqa", n_layer=1, vocab_size=32000, block_size=64), tmp_path / "other")
    shutil.copy(base_dir / "tokenizer.model", tmp_path / "other")
    for finetuned in (tmp_path / "ckpt", tmp_path / "ckpt" / "lit_model.pth"):
        assert_user_error(run_main("generate/full.py", "--checkpoint_dir", tmp_path / "other", "--finetuned_path",
                                   finetuned, *flags), "was trained on", "pass the --checkpoint_dir it was trained on")


def test_generate_adapter_user_errors(base_dir, tmp_path):
    def adapter_cli(weights):
        return run_main("generate/adapter.py", "--checkpoint_dir", base_dir, "--adapter_path", weights,
                        "--prompt", "hi", "--max_new_tokens", "2")

    # an adapter trained on another model size (the run's model_config.yaml says so)
    other = replace(Config.from_name("tiny-gqa", n_embd=32, vocab_size=32000, block_size=64), name="tiny-gqa-w32")
    (tmp_path / "other").mkdir()
    make_run(base_dir, tmp_path / "other", v2=False, config=other)
    assert_user_error(adapter_cli(tmp_path / "other" / "lit_model_adapter.pth"), "tiny-gqa-w32", "n_embd 32",
                      "n_embd 64")
    # the same width and layers, but 4 key/value heads where the run had 2: every adapter tensor fits, and the
    # keys and values its prompt meets would be another model's
    mha = replace(Config.from_name("tiny-gqa", vocab_size=32000, block_size=64), n_query_groups=4, name="tiny-kv4")
    (tmp_path / "kv4").mkdir()
    make_run(base_dir, tmp_path / "kv4", v2=False, config=mha)
    assert_user_error(adapter_cli(tmp_path / "kv4" / "lit_model_adapter.pth"), "tiny-kv4 (n_query_groups 4), not "
                      "tiny-gqa (n_query_groups 2); pass the --checkpoint_dir it was trained on")
    # an adapter run given to generate/lora.py is named, with the script that serves it
    (tmp_path / "v1").mkdir()
    make_run(base_dir, tmp_path / "v1", v2=False)
    lora_cli = run_main("generate/lora.py", "--checkpoint_dir", base_dir, "--lora_path", tmp_path / "v1",
                        "--prompt", "hi", "--max_new_tokens", "2")
    assert_user_error(lora_cli, "is from an adapter run, not a LoRA run; pass it as --adapter_path (to "
                      "generate/adapter.py or generate/chat.py)")
    # lit-llama's and LitGPT's naming of the same method
    litgpt = {"transformer.h.1.attn.adapter_wte.weight": torch.zeros(3, 64),
              "transformer.h.1.attn.gating_factor": torch.zeros(1, 4, 1, 1)}
    (tmp_path / "litgpt").mkdir()
    make_run(base_dir, tmp_path / "litgpt", v2=False)
    save_state_dict(litgpt, tmp_path / "litgpt" / "lit_model_adapter.pth")
    assert_user_error(adapter_cli(tmp_path / "litgpt" / "lit_model_adapter.pth"), "lit-llama's or LitGPT's naming")

    lora = {"blocks.0.attn.q_proj.lora_A": torch.zeros(8, 64), "blocks.0.attn.q_proj.lora_B": torch.zeros(64, 8)}
    save_state_dict(lora, tmp_path / "lit_model_lora.pth")
    assert_user_error(adapter_cli(tmp_path / "lit_model_lora.pth"), "LoRA", "generate/lora.py")

    (tmp_path / "zero").mkdir()
    make_run(base_dir, tmp_path / "zero", v2=False)
    (tmp_path / "zero" / "adapter.yaml").write_text("prompt_length: 0\nstart_layer: 1\n")
    assert_user_error(adapter_cli(tmp_path / "zero" / "lit_model_adapter.pth"), "prompt_length")


def test_load_finetuned_refuses_files_of_another_model_or_method(base_dir, tmp_path):
    """The same checks in-process (each CLI turns these UserErrors into one line, as tested above)."""
    other = replace(Config.from_name("tiny-gqa", n_embd=32, vocab_size=32000, block_size=64), name="tiny-gqa-w32")
    for sub, v2, config in (("w32", False, other), ("v1", False, None), ("v2", True, None)):
        (tmp_path / sub).mkdir()
        make_run(base_dir, tmp_path / sub, v2=v2, config=config, model_config=False)
    v1, v2 = tmp_path / "v1" / "lit_model_adapter.pth", tmp_path / "v2" / "lit_model_adapter_v2.pth"
    cases = [
        (tmp_path / "w32" / "lit_model_adapter.pth", "adapter", "width 32"),  # no model_config.yaml: shapes tell
        (v2, "adapter", "generate/adapter_v2.py"),
        (v1, "adapter_v2", "generate/adapter.py"),
        (v1, "full", "generate/adapter.py"),
    ]
    for weights, method, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            load_finetuned(base_dir, weights, method=method)
    (tmp_path / "bare").mkdir()  # a run's weights copied without its adapter.yaml: not taken for a full fine-tune
    shutil.copy(v1, tmp_path / "bare")
    bare = f"{tmp_path / 'bare'} holds lit_model_adapter.pth but no adapter.yaml"
    with pytest.raises(UserError, match=re.escape(bare)):
        load_finetuned(base_dir, tmp_path / "bare")
    assert isinstance(load_finetuned(base_dir, v2).lm_head, ScaledLinear)  # the run dir names the method


def test_adamw_decays_the_adapter_v2_matrices_but_not_its_scales_biases_and_norms():
    """Weight decay pulls toward zero: right for a prompt matrix, wrong for a norm weight or a scale that starts
    at 1 (torch's AdamW applied to zero gradients shows it: a vector in the decayed group shrinks)."""
    model = add_adapter_v2(Llama(Config.from_name("tiny-gqa")), AdapterV2Config(prompt_length=4, start_layer=0))
    groups = param_groups(model, weight_decay=0.5)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    vector_names = [n for n, p in trainable if p.dim() < 2]
    assert any("norm" in n for n in vector_names) and any("scale" in n for n in vector_names)
    assert {n for n, p in trainable if id(p) in decayed} == {n for n, p in trainable if p.dim() >= 2}
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    start = {n: p.detach().clone() for n, p in trainable}
    for _ in range(5):
        for _, p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    for n, p in trainable:  # with no gradient, only decay moves a weight: the matrices shrink, the vectors stay
        if p.dim() < 2:
            assert torch.equal(p, start[n]), n
        elif start[n].abs().sum() > 0:
            assert p.abs().sum() < start[n].abs().sum(), n



@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_fp32_adapter_weights_over_a_bf16_base_compute_in_bf16_under_autocast(v2):
    """bf16-mixed over a bf16 checkpoint keeps the adapter's weights (and v2's norms) in fp32 (litft/precision.py).
    torch's autocast must still carry the residual stream in bf16, as over the all-bf16 model: v2's s ⊙ (W x + b)
    with an fp32 s made it fp32 (twice the activations), and an fp32 norm weight took F.rms_norm off its fused
    kernel (torch warns "Mismatch dtype between input and weight")."""
    from litft.precision import train_in_fp32

    def built(master_weights_in_fp32: bool) -> Llama:
        torch.manual_seed(0)
        model = Llama(Config.from_name("tiny-gqa")).to(torch.bfloat16).requires_grad_(False)
        (add_adapter_v2 if v2 else add_adapter)(model, (AdapterV2Config if v2 else AdapterConfig)(3, start_layer=0))
        return train_in_fp32(model) if master_weights_in_fp32 else model

    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = built(False).hidden_states(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = built(True).hidden_states(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)  # bf16 rounds the two a little apart
