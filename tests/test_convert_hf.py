"""HF ↔ litft conversion, judged by transformers: its LlamaForCausalLM is the reference for logits, and its
from_pretrained is the reader of what convert_lit_checkpoint.py writes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_main, run_script
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

SHAPES = {  # name: (num_attention_heads, num_key_value_heads, tie_word_embeddings)
    "multi-head": (4, 4, False),
    "grouped-query": (4, 2, False),
    "tied": (4, 1, True),
}


def tiny_hf_llama(heads: int, kv_heads: int, tied: bool, seed: int = 0) -> "transformers.LlamaForCausalLM":
    """A random LlamaForCausalLM with non-default rope_theta / rms_norm_eps and random norm weights too."""
    g = torch.Generator().manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, tie_word_embeddings=tied, max_position_embeddings=128,
        bos_token_id=5, eos_token_id=7,
        rope_theta=float(torch.randint(500, 50_000, (1,), generator=g)),
        rms_norm_eps=float(torch.rand(1, generator=g)) * 1e-3,
        attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def convert(hf_dir: Path, out_dir: Path, *args: str) -> torch.nn.Module:
    from litft.checkpoint import load_lit_model

    run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", hf_dir, "--output_dir", out_dir, *args,
               check=True)
    return load_lit_model(out_dir).eval()


def max_logit_diff(ours: torch.nn.Module, hf: torch.nn.Module, vocab: int = 96) -> float:
    x = torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(x) - hf(x).logits).abs().max().item()


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(tmp_path, shape, fast):
    """fast: in the CPU decoding layout generation uses (litft/fast/cpu_decoding.py)."""
    from litft.fast.cpu_decoding import prepare_for_cpu_decoding

    hf = tiny_hf_llama(*SHAPES[shape])
    hf.save_pretrained(tmp_path / "hf")
    ours = convert(tmp_path / "hf", tmp_path / "lit")
    assert ours.config.rope_base == hf.config.rope_parameters["rope_theta"]
    assert ours.config.norm_eps == hf.config.rms_norm_eps
    if SHAPES[shape][2]:
        assert ours.lm_head.weight is ours.embed.weight
    if fast:
        prepare_for_cpu_decoding(ours)
    assert max_logit_diff(ours, hf) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_against_transformers(dtype):
    """transformers' LlamaRMSNorm: equal in fp32; in 16 bits at least as close as it to the exact (fp64) value."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from litft.model import RMSNorm

    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(0)) * 4
    weight = 1 + 0.3 * torch.randn(96, generator=torch.Generator().manual_seed(1))
    ours, theirs, exact = RMSNorm(96, 1e-5), LlamaRMSNorm(96, eps=1e-5), LlamaRMSNorm(96, eps=1e-5).double()
    for norm in (ours, theirs, exact):
        norm.weight.data.copy_(weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    with torch.no_grad():
        ours_y, theirs_y, exact_y = ours(x.to(dtype)), theirs(x.to(dtype)), exact(x.to(dtype).double())
    if dtype == torch.float32:
        assert torch.equal(ours_y, theirs_y)
    else:
        assert ours_y.dtype == dtype
        assert (ours_y.double() - exact_y).abs().max() <= (theirs_y.double() - exact_y).abs().max()


def save_bin(model, directory: Path, n_shards: int, legacy: bool) -> None:
    """What older transformers wrote with safe_serialization=False: pytorch_model*.bin (+ an index when sharded)."""
    model.config.save_pretrained(directory)
    sd = model.state_dict()
    names = [list(sd)[k::n_shards] for k in range(n_shards)]
    files = ["pytorch_model.bin"] if n_shards == 1 else [f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
                                                         for k in range(n_shards)]
    for shard, fname in zip(names, files):
        torch.save({k: sd[k] for k in shard}, directory / fname, _use_new_zipfile_serialization=not legacy)
    if n_shards > 1:
        weight_map = {k: fname for shard, fname in zip(names, files) for k in shard}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("save", ["sharded-safetensors", "bin-legacy", "sharded-bin"])
def test_sharded_and_bin_checkpoints_convert(tmp_path, save):
    """Read in-process (the CLI around it is covered above); transformers first confirms the files are valid."""
    from litft.convert_hf import hf_to_lit_state_dict, read_hf_config
    from litft.model import Llama

    hf = tiny_hf_llama(4, 2, False, seed=3)
    if save == "sharded-safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="40KB")
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    else:
        save_bin(hf, tmp_path, n_shards=3 if save == "sharded-bin" else 1, legacy=save == "bin-legacy")
        reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        x = torch.randint(0, 96, (1, 9))
        with torch.no_grad():
            assert torch.equal(reloaded(x).logits, hf(x).logits)
    config = read_hf_config(tmp_path)
    ours = Llama(config)
    ours.load_state_dict(hf_to_lit_state_dict(tmp_path, config), strict=True)
    assert max_logit_diff(ours.eval(), hf) <= 1e-4
    if save == "sharded-safetensors":  # a cast is a plain .to(dtype) of each transformers tensor
        cast = hf_to_lit_state_dict(tmp_path, config, torch.bfloat16)
        assert torch.equal(cast["blocks.1.mlp.up_proj.weight"], hf.model.layers[1].mlp.up_proj.weight.bfloat16())
        assert {t.dtype for t in cast.values()} == {torch.bfloat16}


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                 "rope_parameters", "hidden_act", "bos_token_id", "eos_token_id")


@pytest.mark.parametrize("shape,dtype,shard", [("grouped-query", torch.float32, "5.0"),
                                               ("tied", torch.bfloat16, "0.00002")])
def test_hf_lit_hf_round_trip(tmp_path, shape, dtype, shard, sentencepiece_model):
    hf = tiny_hf_llama(*SHAPES[shape], seed=7).to(dtype)
    hf.save_pretrained(tmp_path / "hf")
    if shape == "tied":  # into a lit directory with only a sentencepiece model: bos/eos must come from it
        lit = tmp_path / "lit"
        run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "hf", "--output_dir", lit,
                   check=True)
        (lit / "generation_config.json").unlink()
        shutil.copyfile(sentencepiece_model, lit / "tokenizer.model")
    else:  # the default: in place, next to the HF files
        lit = tmp_path / "hf"
        run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", lit, check=True)
        assert (lit / "model_config.yaml").read_text().startswith("name: hf\n")
    run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", lit, "--output_dir", tmp_path / "back",
               "--max_shard_gb", shard, check=True)

    before, after = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file() == (shard != "5.0")

    cfg_a = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    cfg_b = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "back")
    if shape == "tied":  # the special ids are the sentencepiece model's now (1, 2), not the original 5, 7
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
        cfg_a.bos_token_id, cfg_a.eos_token_id = sp.bos_id(), sp.eos_id()
        assert (tmp_path / "back" / "tokenizer.model").read_bytes() == sentencepiece_model.read_bytes()
    assert (gen.bos_token_id, gen.eos_token_id) == (cfg_a.bos_token_id, cfg_a.eos_token_id) != (None, None)
    for field in CONFIG_FIELDS:
        assert getattr(cfg_a, field) == getattr(cfg_b, field), field

    # transformers loads both directories the same way (it recomputes rope tables in fp32 on load)
    original, back = (transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
                      for d in (tmp_path / "hf", tmp_path / "back"))
    assert back.dtype == dtype
    x = torch.randint(0, 96, (2, 19))
    with torch.no_grad():
        assert torch.equal(back(x).logits, original(x).logits)


@pytest.mark.parametrize("fast,chunk_tokens", [(False, None), (True, None), (True, 8)],
                         ids=["plain", "fast", "fast-many-slices"])
def test_training_loss_and_gradients_match_transformers(tmp_path, fast, chunk_tokens):
    """The training loss against transformers' `labels=` loss: value and every gradient, full fine-tuning.

    plain: litft/loss.py on the logits; fast: the chunked loss as training calls it (46 positions, one slice);
    fast-many-slices: six slices of 8."""
    from litft.convert_hf import hf_to_lit_name
    from litft.fast import for_training
    from litft.fast.chunked_loss import chunked_next_token_loss

    hf = tiny_hf_llama(4, 2, tied=True)
    hf.save_pretrained(tmp_path / "hf")
    ours = convert(tmp_path / "hf", tmp_path / "lit")
    x = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[0, :9], y[1, 15:] = -100, -100  # a masked prompt, and padding
    expected = hf(x, labels=y).loss
    expected.backward()
    loss_fn = for_training(ours, fast)
    if chunk_tokens is None:
        loss = loss_fn(ours, x, y)
    else:
        loss = chunked_next_token_loss(ours.lm_head, ours.hidden_states(x), y, chunk_tokens=chunk_tokens)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    grads = {hf_to_lit_name(n): p.grad for n, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_training_loss_under_16_bit_autocast_matches_transformers(tmp_path, fast, dtype):
    """bf16-mixed and 16-mixed: the training loss and its gradients against transformers' under the same autocast;
    both round to 16 bits, so they agree to that precision, not fp32's. Under fp16 the fast loss takes its other
    branch (lm_head recomputed per slice in backward; litft/fast/chunked_loss.py), which this covers on a CPU,
    where Fabric runs 16-mixed as bf16."""
    from litft.convert_hf import hf_to_lit_name
    from litft.fast import for_training

    hf = tiny_hf_llama(4, 2, tied=True)
    hf.save_pretrained(tmp_path / "hf")
    ours = convert(tmp_path / "hf", tmp_path / "lit")
    x = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(3))
    loss_fn = for_training(ours, fast)
    with torch.autocast("cpu", dtype=dtype):
        expected, loss = hf(x, labels=x).loss, loss_fn(ours, x, x)
    expected.backward()
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=2e-2, rtol=0)
    grads = {hf_to_lit_name(n): p.grad for n, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.grad.dtype == torch.float32
        error = (p.grad - grads[name]).norm() / grads[name].norm()
        assert error < 5e-2, (name, float(error))


def test_converting_over_another_checkpoint_leaves_none_of_its_prompting(tmp_path, tiny_checkpoint,
                                                                        sentencepiece_model):
    """Converted into a directory that held another model: a tokenizer.json, chat template or prompt_style.yaml of
    that model would be read before the new model's files. Truth: sentencepiece on the new model's tokenizer.model."""
    import sentencepiece as spm

    from litft.convert_hf import convert_hf_checkpoint
    from litft.errors import UserError
    from litft.prompts import PromptStyle, resolve_style
    from litft.tokenizer import Tokenizer

    tiny_hf_llama(4, 2, False).save_pretrained(tmp_path / "hf")
    shutil.copyfile(sentencepiece_model, tmp_path / "hf" / "tokenizer.model")
    out = shutil.copytree(tiny_checkpoint, tmp_path / "lit")  # a byte-level BPE tokenizer.json ...
    (out / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # ... its chat template, its style
    PromptStyle("alpaca").save(out)

    with pytest.raises(UserError, match=f"--output_dir {out} already holds a checkpoint.*--overwrite true"):
        convert_hf_checkpoint(tmp_path / "hf", out)  # a mistyped path: refused, the other model untouched
    assert resolve_style(None, out).name == "alpaca"
    convert_hf_checkpoint(tmp_path / "hf", out, overwrite=True)
    assert resolve_style(None, out) is None  # the new model brings no style and no template
    text = "the quick brown fox jumps over naïve cafés"
    expected = spm.SentencePieceProcessor(model_file=str(sentencepiece_model)).encode(text)
    assert Tokenizer(out).encode(text, bos=False).tolist() == expected


@pytest.mark.parametrize("script", ["convert_hf_checkpoint", "convert_gguf_checkpoint"])
def test_converting_into_a_hugging_face_model_directory_is_refused_and_leaves_it_as_it_was(tmp_path, script,
                                                                                         smollm2_gguf):
    """A mistyped --output_dir that names a download must not lose its tokenizer or generation_config.json."""
    from conftest import assert_user_error, run_main

    hf = tiny_hf_llama(4, 2, False)
    hf.save_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "download")  # another model, as scripts/download.py left it
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "download" / name).write_text("{}")
    before = {p.name: p.read_bytes() for p in (tmp_path / "download").iterdir()}
    source = ["--checkpoint_dir", tmp_path / "hf"] if script == "convert_hf_checkpoint" else ["--gguf_path",
                                                                                               smollm2_gguf]
    proc = run_main(f"scripts/{script}.py", *source, "--output_dir", tmp_path / "download")
    assert_user_error(proc, "holds a Hugging Face model (config.json)", "choose a new directory")
    assert {p.name: p.read_bytes() for p in (tmp_path / "download").iterdir()} == before


def test_a_conversion_failing_after_the_weights_leaves_the_earlier_checkpoint_as_it_was(tmp_path, monkeypatch):
    """Weights and model_config.yaml are published together: a failure between them (here in writing the config)
    leaves the earlier pair, never new weights beside the old config."""
    from litft.config import Config
    from litft.convert_hf import convert_hf_checkpoint

    tiny_hf_llama(4, 2, False, seed=1).save_pretrained(tmp_path / "earlier")
    tiny_hf_llama(4, 4, False, seed=2).save_pretrained(tmp_path / "new")
    out = tmp_path / "lit"
    convert_hf_checkpoint(tmp_path / "earlier", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(Config, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_hf_checkpoint(tmp_path / "new", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_killed_conversion_leaves_the_earlier_checkpoint_whole_and_the_next_one_no_leftovers(tmp_path,
                                                                                           smollm2_gguf):
    """SIGKILL (as the out-of-memory killer sends it) while the weights are being written: the directory still
    holds the earlier checkpoint, its weights whole, and the next conversion removes the partial file (a 7B's
    would be 13 GB hidden on disk)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    from litft.checkpoint import load_lit_model

    out = tmp_path / "ckpt"
    cmd = [sys.executable, str(ROOT / "scripts/convert_gguf_checkpoint.py"), "--gguf_path", str(smollm2_gguf),
           "--output_dir", str(out), "--overwrite", "true"]  # the second conversion replaces the first
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    earlier = (out / "lit_model.pth").read_bytes()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 2**20 for p in out.rglob(".lit_model.pth.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "lit_model.pth").read_bytes() == earlier
    load_lit_model(out)
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    assert sorted(p.name for p in out.iterdir()) == ["lit_model.pth", "model_config.yaml", "tokenizer.json",
                                                     "tokenizer_config.json"]


def test_the_export_line_names_each_file_it_wrote_once(tiny_checkpoint, tmp_path):
    """Truth: the directory itself. A checkpoint whose tokenizer_config.json is copied and then given its prompt
    style's chat template had that file listed twice."""
    shutil.copytree(tiny_checkpoint, tmp_path / "lit")
    (tmp_path / "lit" / "prompt_style.yaml").write_text("name: chatml\n")  # its template goes into the export
    wrote = run_main("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", tmp_path / "lit", "--output_dir",
                     tmp_path / "hf", "--verify", "false").stdout.splitlines()[0]
    listed = re.sub(r" \([^)]*\)", "", wrote.split(": ", 1)[1]).split(", ")  # what changed in a file, in (...)
    assert "tokenizer_config.json (chat_template)" in wrote
    assert sorted(listed) == sorted(p.name for p in (tmp_path / "hf").iterdir())
