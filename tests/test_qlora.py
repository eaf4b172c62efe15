"""QLoRA (litft/qlora.py) against peft + bitsandbytes on transformers' Llama (bitsandbytes runs on a CPU), and a
QLoRA run as a user drives it: finetune/lora.py --quantize, generate/, merge_lora.py, export_peft.py.

Truth: transformers' Llama loaded with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") under
peft — its loss and LoRA gradients, and its logits once it has loaded our PEFT export; for the served and merged
forms of a run, the unmerged QLoRA model it was trained as.
"""

from __future__ import annotations

import copy
import re
import shutil
from functools import partial

import pytest
import torch
import yaml
from conftest import assert_user_error, run_script
from test_distributed import losses
from test_lora import copy_peft_lora_into, hf_to_lit_name, peft_model, tiny_pair
from test_merge_export import make_run
from test_train import assert_same, finetune, tiny, weights  # noqa: F401  (tiny is a fixture)

from litft import memory
from litft.adapter import AdapterConfig, add_adapter
from litft.adapter_v2 import AdapterV2Config, add_adapter_v2
from litft.checkpoint import load_lit_model, save_lit_checkpoint
from litft.config import Config
from litft.errors import UserError
from litft.fast import for_training
from litft.load_finetuned import load_finetuned, load_lora
from litft.lora import LoRAConfig, LoRALinear, add_lora, merge_lora
from litft.qlora import NF4Linear, QLoRALinear, dequantize, quantize

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def bnb_config(double: bool, dtype: torch.dtype = torch.float32):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=dtype)


def qlora_pair(tmp_path, scheme: str, config: LoRAConfig):
    """peft over transformers' Llama in bitsandbytes NF4, and litft's QLoRA model over the same weights and A, B."""
    hf, ours = tiny_pair("tiny-gqa")
    hf.save_pretrained(tmp_path)
    q = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config(scheme == "nf4-dq"),
                                                      device_map="cpu", dtype=torch.float32)
    pm = peft_model(q, config)
    torch.manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 would hide the update
    quantize(add_lora(ours, config), scheme)
    copy_peft_lora_into(pm, ours)
    return pm, ours


def use_bitsandbytes_absmax(pm, ours) -> float:
    """Give litft's double-quantized layers bitsandbytes' 8-bit absmaxes, which differ in a few ties of the search
    (tests/test_nf4.py); returns the share that differed. The 4-bit bytes must already be equal."""
    differ, total = 0, 0
    for name, layer in pm.named_modules():
        if type(layer).__name__ != "Linear4bit":
            continue
        key = hf_to_lit_name(name.removeprefix("base_model.model.").removesuffix(".base_layer"))
        ours_layer, state = ours.get_submodule(key), layer.weight.quant_state
        assert torch.equal(ours_layer.nf4, layer.weight.data.flatten())
        differ += (ours_layer.absmax != state.absmax).sum().item()
        total += state.absmax.numel()
        ours_layer.absmax.data.copy_(state.absmax)
    return differ / total


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq"])
def test_a_step_matches_peft_on_bitsandbytes(tmp_path, scheme, fast):
    """The loss and every LoRA gradient of a training step equal peft's on a bitsandbytes 4-bit base (fp32)."""
    config = LoRAConfig(r=4, alpha=8, dropout=0.0)
    pm, ours = qlora_pair(tmp_path, scheme, config)
    if scheme == "nf4-dq":
        assert use_bitsandbytes_absmax(pm, ours) < 0.01
    loss_fn = for_training(ours, fast)
    torch.manual_seed(0)
    x = torch.randint(0, ours.config.vocab_size, (2, 13))
    pm.train(), ours.train()
    expected = pm(input_ids=x, labels=x).loss
    expected.backward()
    loss = loss_fn(ours, x, x)  # labels aligned with the inputs, shifted inside, as transformers does
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    grads = 0
    for name, p in pm.named_parameters():
        if m := re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.default\.weight", name):
            ours_grad = ours.get_parameter(hf_to_lit_name(m.group(1)) + f".lora_{m.group(2)}").grad
            torch.testing.assert_close(ours_grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
            grads += 1
    assert grads == 2 * 7 * ours.config.n_layer


def test_the_backward_pass_keeps_no_dequantized_weight():
    """Autograd saves no (d_out, d_in) weight of a block for the backward pass: Ŵ is dequantized again there.
    The same model in plain LoRA saves them (F.linear keeps W), so the check can fail."""
    _, model = tiny_pair("tiny-gqa")
    add_lora(model, LoRAConfig(r=4, dropout=0.0))
    shapes = {s for m in model.blocks.modules() if isinstance(m, LoRALinear) for s in (m.weight.shape, m.weight.T.shape)}

    def saved_weights(m) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            m(torch.randint(0, 256, (2, 11))).sum().backward()
        return sum(torch.Size(shape) in shapes for shape in saved)

    assert saved_weights(model) >= 7 * (model.config.n_layer - 1)  # block 0's q, k, v read x, which needs no grad
    assert saved_weights(quantize(model, "nf4")) == 0


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq"])
def test_the_stored_weights_survive_a_cast_to_bf16(scheme):
    """--precision bf16-true casts the model's floating-point parameters; the absmaxes and scales, kept as int32
    bits, come through exactly, so Ŵ in bf16 is the fp32 Ŵ rounded once."""
    _, model = tiny_pair("tiny-gqa")
    quantize(model, scheme)
    before = {name: m.dequantize(torch.float32) for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    model.to(torch.bfloat16)
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            assert torch.equal(m.dequantize(torch.bfloat16), before[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("precision", ["bf16-true", "32-true"])
def test_the_4bit_base_is_quantized_from_the_checkpoints_own_values(tiny, precision):
    """bitsandbytes' quantize_4bit of the checkpoint's stored (fp32) weights is the 4-bit base a run trains on in
    every precision, and the one generate/ serves it on in bf16: NF4 made from a bf16 copy would be another Ŵ
    (a third of its elements differ), not the one A and B learnt to correct."""
    from lightning import Fabric

    from litft.train_args import Method, TrainArgs
    from litft.train_setup import build_model

    bnb = pytest.importorskip("bitsandbytes.functional")
    stored = load_lit_model(tiny["ckpt"])
    assert stored.embed.weight.dtype == torch.float32
    args = TrainArgs(checkpoint_dir=tiny["ckpt"], quantize="nf4", precision=precision)
    method = Method(name="lora", weights_name="w.pth", prepare=partial(add_lora, config=LoRAConfig(r=2)))
    trained = build_model(args, method, Fabric(accelerator="cpu", devices=1, precision=precision))
    served = load_finetuned(tiny["ckpt"], dtype=torch.bfloat16, quantize="nf4")
    for name, layer in stored.blocks.named_modules():
        if isinstance(layer, torch.nn.Linear):
            packed, state = bnb.quantize_4bit(layer.weight.data, blocksize=64, quant_type="nf4")
            for model in (trained, served):
                ours = model.blocks.get_submodule(name.removesuffix(".linear"))
                assert torch.equal(ours.nf4, packed.flatten()), name
                assert torch.equal(ours.absmax.view(torch.float32), state.absmax), name  # kept as its bits


def test_dequantized_and_merged_forms_compute_what_the_qlora_model_computes():
    """A QLoRA model, the same with Ŵ dequantized (LoRALinear over Ŵ), and that merged (Ŵ + (α/r)·B·A): the same
    logits in fp32; the merged model is a plain Llama."""
    _, model = tiny_pair("tiny-gqa")
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=["q", "v", "down", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    quantize(model.eval(), "nf4")
    assert sum(isinstance(m, QLoRALinear) for m in model.modules()) == 3 * model.config.n_layer
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = model(x)
        dequantize(model)
        assert not any(isinstance(m, NF4Linear) for m in model.modules())
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        merge_lora(model)
        assert not any("lora" in name for name, _ in model.named_parameters())
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_what_cannot_be_quantized_is_refused_in_one_line():
    _, model = tiny_pair("tiny-gqa")
    with pytest.raises(UserError, match=r"nf5: choose nf4 or nf4-dq"):
        quantize(model, "nf5")
    class CustomLinear(torch.nn.Linear):  # a kind of layer litft/qlora.py has no 4-bit form of
        pass

    model.blocks[0].mlp.up = CustomLinear(8, 8)
    with pytest.raises(UserError, match=r"mlp.up is a CustomLinear; quantize a base model, a full fine-tune, a LoRA"):
        quantize(model, "nf4")


@pytest.mark.slow
def test_a_qlora_run_trains_serves_merges_and_exports(tiny, tmp_path):
    """finetune/lora.py --quantize nf4 trains only A and B on a 4-bit base and records it. The QLoRA model it was
    trained as computes what it is served as: in NF4 (--quantize nf4), on Ŵ dequantized (no --quantize) and merged
    by merge_lora.py — not what the same A and B compute on the original W. generate/ prints the same text each way."""
    run = tmp_path / "run"
    proc = finetune(tiny, run, "--quantize", "nf4", "--lora_dropout", "0")
    assert "trainable parameters: 16,384 of " in proc.stderr
    assert yaml.safe_load((run / "lora.yaml").read_text())["quantize"] == "nf4"
    trained = torch.load(run / "lit_model_lora.pth", weights_only=True)
    assert trained and all(k.endswith(("lora_A", "lora_B")) for k in trained)
    merged = tmp_path / "merged"
    run_script("scripts/merge_lora.py", "--checkpoint_dir", tiny["ckpt"], "--lora_path", run / "lit_model_lora.pth",
               "--out_dir", merged, check=True)

    qlora = load_finetuned(tiny["ckpt"], run / "lit_model_lora.pth", quantize="nf4")
    assert sum(isinstance(m, QLoRALinear) for m in qlora.modules()) == 7 * qlora.config.n_layer
    served = [load_finetuned(tiny["ckpt"], run / "lit_model_lora.pth"), load_lit_model(merged).eval()]
    on_original_w = load_lora(load_lit_model(tiny["ckpt"]), run / "lit_model_lora.pth").eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = qlora(x)
        for model in served:
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        assert (on_original_w(x) - expected).abs().max() > 1e-3

    flags = ("--prompt", "colour 3", "--temperature", "0", "--max_new_tokens", "8", "--prompt_style", "plain")
    texts = {run_script("generate/lora.py", "--lora_path", run / "lit_model_lora.pth", *flags, *q, check=True).stdout
             for q in (("--quantize", "nf4"), ())}
    texts.add(run_script("generate/base.py", "--checkpoint_dir", merged, *flags, check=True).stdout)
    assert len(texts) == 1
    proc = run_script("generate/lora.py", "--lora_path", run / "lit_model_lora.pth", *flags, "--quantize", "nf4-dq")
    assert_user_error(proc, "trained on an nf4 base", "--quantize nf4")


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq"])
def test_the_peft_export_of_a_qlora_run_loads_onto_a_bitsandbytes_base(tmp_path, scheme):
    """export_peft.py of a QLoRA run, loaded by peft onto transformers' Llama in bitsandbytes NF4 (the settings
    export_peft.py prints), computes what litft's QLoRA model computes with --quantize."""
    hf, ours = tiny_pair("tiny-gqa")
    hf.save_pretrained(tmp_path / "hf")
    save_lit_checkpoint(ours, tmp_path / "base")
    run = tmp_path / "run"
    make_run(tmp_path / "base", run, LoRAConfig(r=4, alpha=8, quantize=scheme), style=None, seed=2)
    proc = run_script("scripts/export_peft.py", "--checkpoint_dir", tmp_path / "base", "--lora_path",
                      run / "lit_model_lora.pth", "--output_dir", tmp_path / "peft", check=True)
    double = scheme == "nf4-dq"
    assert f"bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant={double}" in proc.stderr
    assert "load the base with dtype=torch.float32 " in proc.stderr  # bitsandbytes quantizes what it loads
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", quantization_config=bnb_config(double),
                                                         device_map="cpu", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    qlora = load_finetuned(tmp_path / "base", run / "lit_model_lora.pth", quantize=scheme)
    if double:
        assert use_bitsandbytes_absmax(pm, qlora) < 0.01
    x = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        expected = qlora(x)
    torch.testing.assert_close(expected, fp32_logits(pm, x), atol=1e-5, rtol=0)


def fp32_logits(pm, x):
    """peft's logits through bitsandbytes' fp32 path. In eval mode without gradients bitsandbytes' CPU kernel
    repacks the 4-bit weight and computes in bf16 (logits off by ~2e-3 in this model), so run it as in training,
    with the dropouts off."""
    pm.train()
    for m in pm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    return pm(x).logits.detach()


@pytest.mark.parametrize("args,fragments", [
    (["--quantize", "nf5"], ["--quantize nf5: choose nf4 or nf4-dq"]),
])
def test_bad_quantize_flags_are_one_line(tiny, tmp_path, args, fragments):
    assert_user_error(finetune(tiny, tmp_path / "out", *args, check=False), *fragments)
    assert not (tmp_path / "out").exists()


def test_full_fine_tuning_cannot_train_on_a_4bit_base_and_says_so(tiny, tmp_path):
    proc = finetune(tiny, tmp_path / "out", "--quantize", "nf4", script="finetune/full.py", check=False)
    assert_user_error(proc, "--quantize nf4", "cannot train on a 4-bit base", "finetune/lora.py, adapter.py")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script,flags,saved", [
    ("finetune/lora.py", ("--lora_dropout", "0"), "lit_model_lora.pth"),
    ("finetune/adapter_v2.py", ("--start_layer", "0"), "lit_model_adapter_v2.pth")], ids=["lora", "adapter_v2"])
def test_fsdp_shards_the_4bit_base_and_trains_and_resumes_as_one_process(tiny, tmp_path, script, flags, saved):
    """2 processes (gloo, FSDP2), which shard the NF4 bytes and absmaxes like any parameter, take the optimizer
    steps of 1 process (fp32: the same losses to rounding); resumed from step 3 they end bit for bit where the
    straight run ends. LoRA and adapter v2 (which also scales and shifts the 4-bit base's outputs)."""
    flags = ("--quantize", "nf4-dq", *flags)
    finetune(tiny, tmp_path / "one", *flags, script=script)
    two = tmp_path / "two"
    finetune(tiny, two, *flags, "--devices", "2", "--strategy", "fsdp", script=script)
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(tmp_path / "one")), rtol=1e-5, atol=0)
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    (resumed / saved).unlink()
    proc = finetune(tiny, resumed, *flags, "--devices", "2", "--strategy", "fsdp", "--resume", "true", script=script)
    assert "resumed from step 3" in proc.stderr
    assert_same(weights(two / saved), weights(resumed / saved))


def test_qlora_holds_less_than_lora_and_saves_no_more():
    """SmolLM2-135M's shapes, micro batch 4 × 256, fp32, fast path, by the memory plan (which tests/test_memory.py
    checks against a real step): the NF4 base takes under 40 % of the fp32 weights, and QLoRA's layers share
    their dropout like LoRA's, so the activations are no larger."""
    config = Config.from_name("SmolLM2-135M")
    plans = {q: memory.plan(config, partial(add_lora, config=LoRAConfig()), 256, dtype=torch.float32, autocast=None,
                            quantize=q, activation_checkpointing=False, loss=lambda m: for_training(m, True),
                            device=torch.device("cpu")).with_micro_batch(4) for q in (None, "nf4")}
    assert plans["nf4"].weights < 0.4 * plans[None].weights
    assert plans["nf4"].activations <= plans[None].activations


def test_an_adapter_v1_model_runs_on_its_4bit_base():
    """Adapter v1 adds prompts, not linear layers: its blocks quantize, and compute what the same model computes
    on Ŵ in full precision."""
    _, model = tiny_pair("tiny-gqa")
    add_adapter(model.requires_grad_(False), AdapterConfig(start_layer=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.5)  # the adapter's zero-initialised gate open, so its prompts count
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        quantized = quantize(model.eval(), "nf4")(x)
        torch.testing.assert_close(dequantize(model)(x), quantized, atol=1e-5, rtol=0)


def bitsandbytes_dequantized(model):
    """A copy of `model` whose blocks' linear weights are Ŵ as bitsandbytes makes it: dequantize_4bit of its own
    quantize_4bit (NF4, blocks of 64)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.blocks.modules():
            if isinstance(getattr(layer, "weight", None), torch.Tensor) and layer.weight.dim() == 2:
                packed, state = bnb.quantize_4bit(layer.weight.data, blocksize=64, quant_type="nf4")
                layer.weight.copy_(bnb.dequantize_4bit(packed, state))
    return model


def test_adapter_v2_on_a_4bit_base_computes_and_learns_as_on_bitsandbytes_dequantized_weights():
    """Adapter v2 scales and shifts each 4-bit layer's output, s ⊙ (Ŵ x + b): its logits and the gradients of
    every trainable tensor (s, b, prompts, gates, norms) equal those of the same adapter over a plain model whose
    weights are bitsandbytes' Ŵ (fp32)."""
    _, model = tiny_pair("tiny-gqa")
    add_adapter_v2(model.requires_grad_(False), AdapterV2Config(start_layer=0))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # s ≠ 1, b ≠ 0, gates open: every adapter tensor counts
    reference = bitsandbytes_dequantized(model)
    quantize(model, "nf4")
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 7 * model.config.n_layer
    x, y = torch.randint(0, 256, (2, 2, 9))
    grads = []
    for m in (model, reference):
        logits = m(x)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        grads.append({name: p.grad for name, p in m.named_parameters() if p.requires_grad})
        grads[-1]["logits"] = logits.detach()
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) > 8 * model.config.n_layer
    for name, expected in grads[1].items():
        torch.testing.assert_close(grads[0][name], expected, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
def test_an_adapter_run_on_a_4bit_base_trains_and_is_served_on_that_base(tiny, tmp_path, method):
    """finetune/adapter*.py --quantize nf4 records the 4-bit base, and the run is used on it: in NF4
    (--quantize nf4) and on Ŵ in full precision (the default) it computes what its tensors compute over
    bitsandbytes' Ŵ — not what they compute over the original W. generate/ prints the same text both ways."""
    run = tmp_path / "run"
    finetune(tiny, run, "--quantize", "nf4", "--start_layer", "0", script=f"finetune/{method}.py")
    assert yaml.safe_load((run / f"{method}.yaml").read_text())["quantize"] == "nf4"
    trained = run / f"lit_model_{method}.pth"
    on_original_w = load_lit_model(tiny["ckpt"])
    add, config = (add_adapter_v2, AdapterV2Config) if method == "adapter_v2" else (add_adapter, AdapterConfig)
    add(on_original_w, config.from_dir(run))
    on_original_w.load_state_dict(torch.load(trained, weights_only=True), strict=False)
    reference = bitsandbytes_dequantized(on_original_w).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = reference(x)
        for q in ("nf4", None):
            torch.testing.assert_close(load_finetuned(tiny["ckpt"], trained, quantize=q)(x), expected, atol=1e-5,
                                       rtol=0)
        assert (on_original_w.eval()(x) - expected).abs().max() > 1e-3

    flags = ("--adapter_path", trained, "--prompt", "colour 3", "--temperature", "0", "--max_new_tokens", "8")
    texts = {run_script(f"generate/{method}.py", *flags, *q, check=True).stdout for q in (("--quantize", "nf4"), ())}
    assert len(texts) == 1
    proc = run_script(f"generate/{method}.py", *flags, "--quantize", "nf4-dq")
    assert_user_error(proc, "trained on an nf4 base", "--quantize nf4")
    settings = run / f"{method}.yaml"
    settings.write_text(settings.read_text().replace("quantize: nf4", "quantize: nf5"))  # edited by hand
    assert_user_error(run_script(f"generate/{method}.py", *flags), f"{settings} has quantize: nf5: choose nf4 or nf4-dq")
