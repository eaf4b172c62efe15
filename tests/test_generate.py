"""Generation: the KV-cache loop against a cache-free loop and against transformers' `generate`, the sampling
filters against a hand computation in numpy, and generate/base.py as a user runs it."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_main, run_script

from litft.checkpoint import save_lit_checkpoint
from litft.config import Config
from litft.errors import UserError
from litft.fast.cpu_decoding import PackedLinear, prepare_for_cpu_decoding
from litft.generate import generate, greedy_without_cache, sample, stop_token_ids, top_p_filter
from litft.model import Llama
from litft.prompts import PromptStyle
from litft.tokenizer import Tokenizer

N_NEW = 40


def tiny_model(name: str, seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(Config.from_name(name, **overrides)).eval()
    with torch.no_grad():  # larger weights than the default init: peaked, varied predictions, no near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def hf_to_litft(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' LlamaForCausalLM names -> litft names (only renaming: the tensors are the same)."""
    renames = [("model.", ""), ("layers.", "blocks."), ("self_attn.", "attn."), ("input_layernorm", "attn_norm"),
               ("post_attention_layernorm", "mlp_norm"), ("embed_tokens", "embed")]
    out = {}
    for name, tensor in state_dict.items():
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = tensor
    return out


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa"])
def test_kv_cache_greedy_equals_greedy_without_cache(name):
    model = tiny_model(name)
    prompt = torch.randint(0, model.config.vocab_size, (7,))
    cached = list(generate(model, prompt, N_NEW, temperature=0))
    assert len(set(cached)) > 5  # a varied sequence, so agreement means something
    assert cached == greedy_without_cache(model, prompt, N_NEW)


@pytest.mark.parametrize("packed", [False, True], ids=["as-loaded", "cpu-decoding-layout"])
@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 4, False), (4, 2, False), (4, 1, True)])
def test_greedy_equals_transformers_generate(heads, kv_heads, tied, packed):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    ours = Llama(Config.from_hf_config(hf_config.to_dict()))
    ours.load_state_dict(hf_to_litft(hf.state_dict()), strict=not tied)
    ours.tie_weights()

    prompt = torch.randint(3, 256, (9,))
    with torch.no_grad():  # min_new_tokens keeps transformers from stopping at EOS; we pass no stop ids
        expected = hf.generate(prompt[None], attention_mask=torch.ones(1, 9, dtype=torch.long), do_sample=False,
                               max_new_tokens=N_NEW, min_new_tokens=N_NEW)[0, 9:].tolist()
    assert len(expected) == N_NEW and len(set(expected)) > 5
    if packed:  # what generate_cli does on a CPU: every Linear's weight reordered for oneDNN
        prepare_for_cpu_decoding(ours)
        assert {type(m) for m in ours.modules()} & {torch.nn.Linear, PackedLinear} == {PackedLinear}
    assert list(generate(ours, prompt, N_NEW, temperature=0)) == expected


def test_bf16_decoding_with_the_kv_cache_is_as_close_to_fp32_as_transformers_bf16():
    """bf16-true generation. transformers' greedy text in bf16 is fed token by token through litft's KV-cached
    decoding in bf16 (teacher forcing: a near-tie cannot derail the rest). The outside truth is the same model in
    fp32: litft's bf16 logits must be as close to it as transformers' own bf16 logits are (within 1.5×), and pick
    transformers' token wherever that choice is clear (top two fp32 logits apart by more than the bf16 error)."""
    transformers = pytest.importorskip("transformers")
    from litft.generate import next_token_logits

    hf_config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    ours = Llama(Config.from_hf_config(hf_config.to_dict()))
    ours.load_state_dict(hf_to_litft(hf.state_dict()))
    ours = ours.eval().to(torch.bfloat16)
    prompt = torch.randint(3, 256, (9,))
    with torch.no_grad():
        fp32_hf, hf = hf, copy.deepcopy(hf).to(torch.bfloat16)
        full = hf.generate(prompt[None], attention_mask=torch.ones(1, 9, dtype=torch.long), do_sample=False,
                           max_new_tokens=N_NEW, min_new_tokens=N_NEW)[0]
        exact = fp32_hf(full[None]).logits[0, 8:-1]  # (N_NEW, vocab): fp32 logits at the steps that chose tokens
        theirs = hf(full[None]).logits[0, 8:-1].float()
        ours.set_kv_cache(1, len(full), dtype=torch.bfloat16)
        got = [next_token_logits(ours, prompt[None], torch.arange(9))]
        for t in range(9, len(full) - 1):
            got.append(next_token_logits(ours, full[None, t:t + 1], torch.tensor([t])))
    got = torch.cat(got).float()  # (N_NEW, vocab)
    their_error, our_error = (theirs - exact).abs().max().item(), (got - exact).abs().max().item()
    assert 0 < our_error <= 1.5 * their_error, (our_error, their_error)
    top2 = exact.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * their_error
    assert clear.sum() >= 5  # enough clear steps for the check below to mean something
    assert torch.equal(got.argmax(-1)[clear], full[9:][clear])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d_out", [10, 49])  # sizes no kernel's block divides
def test_packed_linear_equals_nn_linear(bias, d_out):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, d_out, bias=bias)
    x = torch.randn(3, 5, 24)
    for rows in (x, x[0], x[0, :1], x[:, :2].transpose(0, 1)):  # (B, T, d), (T, d), one row, not contiguous
        torch.testing.assert_close(PackedLinear(linear)(rows), linear(rows), rtol=1e-5, atol=1e-6)


def test_a_model_in_the_cpu_decoding_layout_refuses_to_be_saved():
    model = prepare_for_cpu_decoding(tiny_model("tiny-gqa"))
    with pytest.raises(RuntimeError, match="save the model before prepare_for_cpu_decoding"):
        model.state_dict()


def test_cpu_decoding_layout_leaves_lora_and_bf16_models_alone():
    from litft.lora import LoRAConfig, LoRALinear, add_lora

    lora = add_lora(tiny_model("tiny-gqa"), LoRAConfig(targets=("q", "v")))
    prepare_for_cpu_decoding(lora)
    assert isinstance(lora.blocks[0].attn.q_proj, LoRALinear) and isinstance(lora.blocks[0].attn.k_proj, PackedLinear)
    bf16 = prepare_for_cpu_decoding(tiny_model("tiny-gqa").to(torch.bfloat16))
    assert not any(isinstance(m, PackedLinear) for m in bf16.modules())


def test_top_k_1_is_greedy():
    model = tiny_model("tiny-gqa")
    prompt = torch.randint(0, 256, (5,))
    gen = torch.Generator().manual_seed(0)
    assert list(generate(model, prompt, 20, temperature=1.5, top_k=1, generator=gen)) == \
        greedy_without_cache(model, prompt, 20)


def numpy_nucleus(probs: np.ndarray, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose total probability is >= top_p, by hand."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    n = int(np.searchsorted(cumulative, top_p, side="left")) + 1  # first prefix reaching top_p
    return set(order[:n].tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.4, 0.1, 0.25, 0.2])
    kept = torch.isfinite(top_p_filter(torch.tensor(np.log(probs))[None], 0.7))[0]
    assert set(kept.nonzero().flatten().tolist()) == {1, 3, 4}  # 0.4 + 0.25 < 0.7 <= 0.4 + 0.25 + 0.2

    rng = np.random.default_rng(0)
    for _ in range(200):
        probs = rng.dirichlet(np.full(12, 0.5))
        top_p = float(rng.uniform(0.05, 0.99))
        if np.min(np.abs(np.cumsum(np.sort(probs)[::-1]) - top_p)) < 1e-5:
            continue  # too close to a boundary for float32 to call
        logits = torch.tensor(np.log(probs), dtype=torch.float32)[None]
        kept = torch.isfinite(top_p_filter(logits, top_p))[0]
        assert set(kept.nonzero().flatten().tolist()) == numpy_nucleus(probs, top_p)


@pytest.mark.parametrize("top_p", [0.0, 1e-9])
def test_top_p_near_0_keeps_the_most_likely_token_as_transformers_does(top_p):
    """OpenAI's API takes top_p in [0, 1]; transformers' TopPLogitsWarper keeps at least the best token."""
    from transformers import TopPLogitsWarper

    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    hf_kept = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
    assert torch.equal(torch.isfinite(top_p_filter(logits, top_p)), hf_kept)
    assert torch.equal(hf_kept.sum(-1), torch.ones(8, dtype=torch.long))
    draws = sample(logits, temperature=1.0, top_p=top_p, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draws, logits.argmax(-1))


def test_sampling_draws_only_from_the_filtered_set():
    probs = np.array([0.05, 0.4, 0.1, 0.25, 0.2])
    logits = torch.tensor(np.log(probs), dtype=torch.float32).expand(4000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, top_p=0.7, generator=gen)
    counts = torch.bincount(draws, minlength=5).double() / 4000
    expected = torch.tensor([0, 0.4, 0, 0.25, 0.2], dtype=torch.float64) / 0.85  # renormalised nucleus
    torch.testing.assert_close(counts, expected, atol=0.03, rtol=0)
    draws = sample(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(draws.tolist()) == {1, 3}


def test_a_vanishing_temperature_draws_the_argmax():
    # z / τ → the argmax as τ → 0 (the limit that defines temperature 0); 1e-45 overflowed z / τ to inf before
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 10
    for temperature in (1e-45, 1e-30):
        draws = sample(logits, temperature=temperature, top_p=0.9, generator=torch.Generator().manual_seed(1))
        assert torch.equal(draws, logits.argmax(dim=-1))


def test_seeded_sampling_is_reproducible():
    model = tiny_model("tiny-mha")
    prompt = torch.randint(0, 256, (5,))

    def run(seed):
        return list(generate(model, prompt, 30, temperature=1.0, top_k=50, top_p=0.9,
                             generator=torch.Generator().manual_seed(seed)))

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_sampling_without_seed_uses_the_documented_default(tiny_checkpoint):
    """howto/generate.md: the draw is seeded by --seed, default 1234."""
    directory, _ = tiny_checkpoint
    flags = ("--checkpoint_dir", directory, "--prompt", "hi", "--temperature", "1", "--max_new_tokens", "24")
    texts = [run_main("generate/base.py", *flags, *seed).stdout for seed in ((), ("--seed", "1234"), ("--seed", "7"))]
    assert texts[0] == texts[1] != texts[2]


def test_stops_at_a_stop_token_without_yielding_it():
    model = tiny_model("tiny-mha")
    prompt = torch.randint(0, 256, (5,))
    full = greedy_without_cache(model, prompt, N_NEW)
    cut = next(i for i in range(3, N_NEW) if full[i] not in full[:i])  # first occurrence, past a few tokens
    assert list(generate(model, prompt, N_NEW, temperature=0, stop_ids={full[cut], 10_000})) == full[:cut]


def test_prompt_plus_new_tokens_must_fit_block_size():
    model = tiny_model("tiny-mha", block_size=32)
    with pytest.raises(UserError, match="block_size"):
        next(generate(model, torch.zeros(20, dtype=torch.long), 13, temperature=0))
    fits = list(generate(model, torch.zeros(20, dtype=torch.long), 12, temperature=0))  # 20 + 12 = block_size
    assert fits == greedy_without_cache(model, torch.zeros(20, dtype=torch.long), 12) and len(fits) == 12


# ---- generate/base.py as a user runs it ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, sentencepiece_model):
    """A random small model over the real 32000-piece sentencepiece tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_checkpoint")
    model = tiny_model("tiny-gqa", vocab_size=32000, block_size=64)
    save_lit_checkpoint(model, directory)
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    return directory, model


@pytest.mark.parametrize("fast", ["true", "false"], ids=["fast", "plain"])
def test_cli_stdout_is_exactly_the_greedy_completion(tiny_checkpoint, fast):
    """fast: the CPU decoding layout (litft/fast); plain: the model as loaded. Both give the reference's text."""
    directory, model = tiny_checkpoint
    prompt = "The capital of France is"
    proc = run_script("generate/base.py", "--checkpoint_dir", directory, "--prompt", prompt, "--fast", fast,
                      "--temperature", "0", "--max_new_tokens", "24", "--precision", "32-true", check=True)
    tokenizer = Tokenizer(directory)  # sentencepiece decodes; our greedy reference picks the ids
    ids = greedy_without_cache(model, tokenizer.encode(prompt), 24, stop_ids={tokenizer.eos_id})
    expected = tokenizer.decode(ids) + "\n"
    assert proc.stdout == expected.replace("\r\n", "\n").replace("\r", "\n")
    for diagnostic in ("time to first token", "tokens/s", "peak memory"):
        assert diagnostic in proc.stderr


def test_cli_wraps_the_prompt_in_the_checkpoint_prompt_style(tiny_checkpoint, tmp_path):
    source, model = tiny_checkpoint
    directory = shutil.copytree(source, tmp_path / "styled")
    PromptStyle("alpaca").save(directory)
    proc = run_script("generate/base.py", "--checkpoint_dir", directory, "--prompt", "Name a color.",
                      "--temperature", "0", "--max_new_tokens", "8", check=True)
    tokenizer = Tokenizer(directory)
    wrapped = PromptStyle("alpaca").apply("Name a color.")
    assert wrapped.startswith("Below is an instruction")
    ids = greedy_without_cache(model, tokenizer.encode(wrapped), 8, stop_ids={tokenizer.eos_id})
    assert proc.stdout == (tokenizer.decode(ids) + "\n").replace("\r\n", "\n").replace("\r", "\n")


def test_chatml_stops_at_im_end_as_well_as_eos(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    tokenizer = Tokenizer(tmp_path)
    eos, im_end = hf.token_to_id("<|endoftext|>"), hf.token_to_id("<|im_end|>")
    assert stop_token_ids(tokenizer, PromptStyle("chatml")) == {eos, im_end}
    assert stop_token_ids(tokenizer, None) == {eos}


def test_cli_user_errors(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    for flags, fragment in (
            (["--prompt", "hi", "--max_new_tokens", "abc"], "--max_new_tokens: expected an integer, got 'abc'"),
            (["--prompt", "hi", "--top_k", "1.5"], "--top_k: expected an integer or null, got '1.5'"),
            (["--prompt", "hi", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
            (["--prompt", "hi", "--temp", "0"], "unrecognized arguments: --temp 0"),  # argparse's default: temperature
            ([], "arguments are required: prompt")):
        proc = run_main("generate/base.py", "--checkpoint_dir", directory, *flags)
        assert_user_error(proc, fragment, "--help")
        assert proc.stderr.count("\n") == 1, proc.stderr  # the line alone: jsonargparse's usage block is not printed
    assert_user_error(run_main("generate/base.py", "--checkpoint_dir", directory, "--prompt", "hi", "--top-k", "1"),
                      "unrecognized arguments: --top-k 1 (did you mean --top_k?)")
    assert_user_error(run_main("generate/chat.py", "--checkpoint_dir", directory, "--prompt", "hi"),
                      "unrecognized arguments: --prompt hi")  # not --prompt_style: chat reads its prompts from stdin
    assert_user_error(run_main("generate/base.py", "--checkpoint_dir", tmp_path / "nope", "--prompt", "hi"),
                      "does not exist")
    (tmp_path / "empty").mkdir()  # no run of any kind: it exists, but holds no weights
    assert_user_error(run_main("generate/adapter.py", "--checkpoint_dir", directory, "--adapter_path",
                               tmp_path / "empty", "--prompt", "hi", "--max_new_tokens", "5"),
                      "empty is a directory, not a weights file")
    assert_user_error(run_main("generate/base.py", "--checkpoint_dir", directory, "--prompt", "hi",
                               "--max_new_tokens", "100"), "block_size")
    assert_user_error(run_main("generate/base.py", "--checkpoint_dir", directory, "--prompt", "hi",
                               "--precision", "fp8"), "--precision")
    (tmp_path / "lora.yaml").write_text("r: 2\nalpha: 4\n")
    for text in ("r: 2\nalpha: 4\n", "hello world\n"):  # files torch.save did not write: torch's unpickler raises
        (tmp_path / "notes.txt").write_text(text)       # IndexError and KeyError on these two
        assert_user_error(run_main("generate/lora.py", "--checkpoint_dir", directory, "--lora_path",
                                   tmp_path / "notes.txt", "--prompt", "hi", "--max_new_tokens", "4"),
                          "is not a checkpoint (not a file torch.save wrote)")


def test_a_reader_that_stops_early_ends_the_program_quietly(tiny_checkpoint):
    """`generate/base.py ... | head -c 3`: the pipe closes under the answer; no traceback (Python's "Note on
    SIGPIPE": stdout is pointed at devnull and the program exits with status 1)."""
    import subprocess
    import sys

    from conftest import ROOT

    directory, _ = tiny_checkpoint
    generate = subprocess.Popen([sys.executable, str(ROOT / "generate/base.py"), "--checkpoint_dir", str(directory),
                                 "--prompt", "red green", "--max_new_tokens", "60", "--temperature", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    generate.stdout.read(3)
    generate.stdout.close()  # as head does once it has its bytes
    stderr = generate.stderr.read().decode()
    assert generate.wait(timeout=120) == 1 and "Traceback" not in stderr, stderr


def test_a_prompt_that_is_not_utf8_and_bad_sampling_flags_are_one_line(tiny_checkpoint):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    directory, _ = tiny_checkpoint
    argv = [sys.executable, str(ROOT / "generate/base.py"), "--checkpoint_dir", str(directory), "--prompt",
            b"caf\xe9 in Latin-1"]  # bytes as a shell passes them: Python sees lone surrogates
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_user_error(proc, "--prompt is not valid UTF-8")
    for flag, value in (("--temperature", "-0.5"), ("--temperature", "nan"), ("--top_k", "0"), ("--top_p", "1.5"),
                        ("--top_p", "-0.1")):
        assert_user_error(run_main("generate/base.py", "--checkpoint_dir", directory, "--prompt", "hi", flag, value),
                          flag)


def analytic_sampling_distribution(z: list[float], temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """What `sample` must draw from, by hand: softmax(z / τ) over the k largest logits, then the smallest most likely
    prefix of that distribution whose mass reaches top_p, renormalised. {token id: probability}."""
    import math

    top = sorted(range(len(z)), key=lambda i: -z[i])[:top_k]
    weights = {i: math.exp(z[i] / temperature) for i in top}
    total = sum(weights.values())
    kept, mass = {}, 0.0
    for i in top:  # most likely first
        if mass >= top_p:
            break
        kept[i] = weights[i] / total
        mass += kept[i]
    return {i: p / mass for i, p in kept.items()}


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 6, 0.88), (2.0, 7, 0.8), (1.5, 3, 0.95)])
def test_sampling_frequencies_at_a_temperature_with_top_k_and_top_p_match_the_analytic_distribution(
        temperature, top_k, top_p):
    """20,000 seeded draws against softmax(z / τ) restricted by top-k then top-p: tokens outside the kept set are
    never drawn, every kept one is, and a chi-square test does not reject their frequencies (p > 0.001). The analytic
    distribution is itself checked against transformers' logits warpers (temperature, top-k, top-p in that order)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    z = [2.0, 1.6, 1.1, 0.9, 0.4, 0.1, -0.3, -0.8, -1.5, -2.5]
    expected = analytic_sampling_distribution(z, temperature, top_k, top_p)
    warped = torch.tensor([z], dtype=torch.float64)
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        warped = warper(None, warped)
    hf = warped.softmax(-1)[0]
    torch.testing.assert_close(hf, torch.tensor([expected.get(i, 0.0) for i in range(len(z))], dtype=torch.float64))

    n = 20_000
    draws = sample(torch.tensor(z).expand(n, -1), temperature, top_k, top_p, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(z)).double()
    assert set(draws.unique().tolist()) == set(expected)  # exact: nothing outside the kept set, everything in it
    observed = counts[list(expected)]
    predicted = n * torch.tensor(list(expected.values()), dtype=torch.float64)
    chi2 = float(((observed - predicted) ** 2 / predicted).sum())
    dof = len(expected) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))  # chi-square survival
    assert p_value > 1e-3, (chi2, counts.tolist(), expected)


def test_a_model_that_generated_first_can_still_be_trained():
    """generate runs under inference mode, where the RoPE tables are first built; tensors made there cannot be
    saved for a backward pass, so tables cached then would break every later training step of the same model."""
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny-gqa")).eval()
    assert len(list(generate(model, torch.tensor([1, 2, 3]), 3, temperature=0))) == 3
    model.train()
    model(torch.randint(0, 256, (1, 8))).logsumexp(-1).mean().backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def test_generators_stepped_in_turn_on_one_model_each_decode_their_own_prompt():
    """Two streams served by one model, their steps interleaved (as a simple server would): each keeps its own
    KV cache, so each text is transformers' greedy `generate` of its own prompt."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    ours = Llama(Config.from_hf_config(hf_config.to_dict()))
    ours.load_state_dict(hf_to_litft(hf.state_dict()))
    prompts = [torch.randint(3, 256, (n,)) for n in (9, 4)]
    with torch.no_grad():
        expected = [hf.generate(p[None], attention_mask=torch.ones(1, p.numel(), dtype=torch.long), do_sample=False,
                                max_new_tokens=N_NEW, min_new_tokens=N_NEW)[0, p.numel():].tolist() for p in prompts]
    assert expected[0] != expected[1] and len(set(expected[0])) > 5
    first, second = (generate(ours, p, N_NEW, temperature=0) for p in prompts)
    assert [list(pair) for pair in zip(*zip(first, second))] == expected
