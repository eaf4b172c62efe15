"""scripts/merge_lora.py, scripts/export_peft.py and generate/lora.py as a user runs them.

Truth: PEFT loading our export onto transformers' Llama; the merged checkpoint against the unmerged LoRA model;
generate/lora.py (which merges in memory) against greedy decoding of the unmerged LoRA model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import assert_user_error, run_main, run_script

from litft.adapter import AdapterConfig
from litft.base_checkpoint import record_base
from litft.checkpoint import load_lit_model, save_lit_checkpoint
from litft.config import Config
from litft.errors import UserError
from litft.files import save_state_dict
from litft.generate import greedy_without_cache, stop_token_ids
from litft.lora import LINEAR, TARGETS, LoRAConfig, add_lora, lora_state_dict
from litft.model import Llama
from litft.prepare import prepare
from litft.prompts import PromptStyle, resolve_style
from litft.tokenizer import Tokenizer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def hf_to_lit_name(name: str) -> str:
    name = name.replace("model.embed_tokens", "embed").replace("model.norm", "norm").replace("model.layers", "blocks")
    name = name.replace("self_attn", "attn").replace("input_layernorm", "attn_norm")
    return name.replace("post_attention_layernorm", "mlp_norm")


def base_config(tied: bool) -> Config:
    return Config.from_name("tiny-gqa" if tied else "tiny-mha", vocab_size=32000, block_size=64)


def hf_model(config: Config) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)  # the same weights every call: PEFT loading modifies a model in place
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config())).eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory, sentencepiece_model):
    """tied -> a lit checkpoint holding transformers' random tiny Llama over the real 32000-piece tokenizer."""
    out = {}
    for tied in (True, False):
        config = base_config(tied)
        model = Llama(config)
        model.load_state_dict({hf_to_lit_name(k): v for k, v in hf_model(config).state_dict().items()}, strict=False)
        model.tie_weights()
        out[tied] = directory = tmp_path_factory.mktemp("tied" if tied else "untied")
        save_lit_checkpoint(model, directory)
        shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    return out


def make_run(base_dir, run_dir, lora: LoRAConfig, style: str | None = "alpaca", seed: int = 1) -> Llama:
    """A LoRA run directory as finetune/lora.py leaves it, with random nonzero B; returns the LoRA model."""
    model = add_lora(load_lit_model(base_dir), lora).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or name.endswith("embed.lora_A"):
                p.normal_(std=0.05)
    save_state_dict(lora_state_dict(model), run_dir / "lit_model_lora.pth")
    lora.save(run_dir)
    model.config.save(run_dir)
    if style:
        PromptStyle.from_name(style).save(run_dir)
    return model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merged_checkpoint_equals_unmerged(bases, tmp_path, tied):
    base_dir = bases[tied]
    run_dir, out = tmp_path / "run", tmp_path / "merged"
    model = make_run(base_dir, run_dir, LoRAConfig(r=4, alpha=8, targets=list(TARGETS)))
    run_script("scripts/merge_lora.py", "--checkpoint_dir", base_dir, "--lora_path", run_dir / "lit_model_lora.pth",
               "--out_dir", out, check=True)
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.model", "prompt_style.yaml"} <= {p.name for p in out.iterdir()}
    merged = load_lit_model(out).eval()
    assert merged.config.tie_embeddings is False  # LoRA on embed and lm_head: the merged matrices differ
    x = torch.randint(0, 32000, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)
    # the merged model given as the base of the same run would take the update twice: refused, naming the base
    proc = run_main("scripts/merge_lora.py", "--checkpoint_dir", out, "--lora_path", run_dir, "--out_dir",
                    tmp_path / "twice", "--verify", "false")
    assert_user_error(proc, f"--checkpoint_dir {out} already has", "merged into it", f"pass the base, {base_dir}")
    if not tied:  # a new run at the same path, trained on the merged model (its base.yaml says so), merges into it
        record_base(run_dir, out)
        run_script("scripts/merge_lora.py", "--checkpoint_dir", out, "--lora_path", run_dir, "--out_dir",
                   tmp_path / "twice", "--verify", "false", check=True)
  # merged again into the same directory, from a run without a prompt style: the first's must go
        plain = make_run(base_dir, tmp_path / "plain-run", LoRAConfig(r=2, alpha=4), style=None)
        run_script("scripts/merge_lora.py", "--checkpoint_dir", base_dir, "--lora_path", tmp_path / "plain-run",
                   "--out_dir", out, "--verify", "false", check=True)  # the run directory stands for its weights
        assert resolve_style(None, out) is None
        with torch.no_grad():
            torch.testing.assert_close(load_lit_model(out).eval()(x), plain(x), atol=1e-5, rtol=0)
        return
    # generate/lora.py (which merges after loading) == greedy decoding of the unmerged LoRA model above
    prompt, style, tokenizer = "Name a primary color.", PromptStyle.from_name("alpaca"), Tokenizer(base_dir)
    ids = greedy_without_cache(model, tokenizer.encode(style.apply(prompt)), 20, stop_token_ids(tokenizer, style))
    flags = ("--prompt", prompt, "--temperature", "0", "--max_new_tokens", "20")
    lora = run_script("generate/lora.py", "--checkpoint_dir", base_dir, "--lora_path", run_dir / "lit_model_lora.pth",
                      *flags, check=True)
    plain = run_script("generate/base.py", "--checkpoint_dir", base_dir, "--prompt_style", "alpaca", *flags, check=True)
    assert lora.stdout.strip() and lora.stdout == tokenizer.decode(ids) + "\n"
    assert lora.stdout != plain.stdout  # the LoRA weights really change what is generated


@pytest.mark.parametrize("tied,targets,rslora", [(False, list(LINEAR), False), (True, list(LINEAR), True),
                                                  (True, list(TARGETS), False)], ids=["linear", "linear-rslora", "all"])
def test_export_loads_in_peft_and_matches(bases, tmp_path, tied, targets, rslora):
    base_dir = bases[tied]
    run_dir, out = tmp_path / "run", tmp_path / "peft"
    model = make_run(base_dir, run_dir, LoRAConfig(r=4, alpha=8, targets=targets, rslora=rslora))
    lora_path = run_dir if rslora else run_dir / "lit_model_lora.pth"  # the run directory or its weights file
    proc = run_script("scripts/export_peft.py", "--checkpoint_dir", base_dir, "--lora_path", lora_path, "--output_dir",
                      out, check=True)
    # stderr holds the exporter's own lines alone: no deprecation from transformers, no bitsandbytes kernel notice
    lines = proc.stderr.splitlines()
    adapts_tied = tied and "embed" in targets
    assert [line.split()[0] for line in lines] == ["wrote"] + ["the"] * adapts_tied, proc.stderr
    assert not adapts_tied or "adapts embed and lm_head" in lines[1] and "merge_and_unload" in lines[1]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["task_type"]) == (4, 8, rslora, "CAUSAL_LM")
    hf = hf_model(model.config)
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    loaded = [n for n, _ in pm.named_parameters() if "lora_" in n]
    assert len(loaded) == len(lora_state_dict(model))
    x = torch.randint(0, 32000, (2, 17))
    with torch.no_grad():
        expected = pm(x).logits
        with pm.disable_adapter():
            assert (pm(x).logits - expected).abs().max() > 1e-3  # the adapter is active
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
        if adapts_tied:  # what the exporter's line warns of: peft merges both updates into the one shared matrix
            assert (pm.merge_and_unload()(x).logits - expected).abs().max() > 1e-2


def test_user_errors_are_one_line_and_write_nothing(bases, tmp_path):
    base_dir = bases[True]
    config = Config.from_checkpoint(base_dir)
    other_base = tmp_path / "other_base"  # same vocabulary and depth, another width
    save_lit_checkpoint(Llama(Config.from_name("tiny-mha", vocab_size=32000, block_size=64, n_embd=32, n_head=2,
                                               n_query_groups=2)), other_base)
    foreign, rank, unknown = tmp_path / "foreign", tmp_path / "rank", tmp_path / "unknown"
    make_run(other_base, foreign, LoRAConfig(r=4))
    (foreign / "model_config.yaml").unlink()  # no name to compare: the shapes must tell
    make_run(base_dir, rank, LoRAConfig(r=4))
    (rank / "lora.yaml").write_text(yaml.safe_dump({**yaml.safe_load((rank / "lora.yaml").read_text()), "r": 8}))
    make_run(base_dir, unknown, LoRAConfig(r=4))
    (unknown / "lora.yaml").write_text(yaml.safe_dump({"r": 4, "targets": ["q", "query"]}))
    quoted = tmp_path / "quoted"  # a hand-edited yaml: "false" is a string, which Python takes as true
    make_run(base_dir, quoted, LoRAConfig(r=4))
    (quoted / "lora.yaml").write_text(yaml.safe_dump({"r": 4, "rslora": "false"}))
    boolean = tmp_path / "boolean"  # YAML's `r: true` is a bool, which Python would take as the integer 1
    make_run(base_dir, boolean, LoRAConfig(r=4))
    (boolean / "lora.yaml").write_text("r: true\n")
    adapter_file = tmp_path / "adapter_run"
    make_run(base_dir, adapter_file, LoRAConfig(r=4))
    save_state_dict({"blocks.0.attn.prefix.prompt": torch.zeros(3, config.n_embd)}, adapter_file / "lit_model_lora.pth")

    cases = [("scripts/merge_lora.py", "--out_dir", foreign, ["another base model", "width 64"]),
             ("generate/lora.py", None, rank, ["rank-4", "r=8"]),
             ("scripts/export_peft.py", "--output_dir", unknown, ["unknown LoRA target 'query'", "embed, lm_head"]),
             ("scripts/merge_lora.py", "--out_dir", adapter_file, ["holds no LoRA tensors"]),
             ("generate/lora.py", None, quoted, ["rslora is 'false', which is not true or false"]),
             ("generate/lora.py", None, boolean, ["r is True, which is not an integer"])]
    for script, out_flag, run_dir, fragments in cases:
        out = tmp_path / f"out_{run_dir.name}"
        args = (out_flag, out) if out_flag else ("--prompt", "hi", "--max_new_tokens", "5")
        proc = run_main(script, "--checkpoint_dir", base_dir, "--lora_path", run_dir / "lit_model_lora.pth", *args)
        assert_user_error(proc, *fragments)
        assert proc.stdout == "" and not out.exists()
    adapter_run = tmp_path / "adapter_v1_run"  # a LLaMA-Adapter run, given for its directory
    adapter_run.mkdir()
    AdapterConfig(prompt_length=2, start_layer=0).save(adapter_run)
    save_state_dict({"blocks.0.attn.prefix.prompt": torch.zeros(2, config.n_embd)}, adapter_run / "lit_model_adapter.pth")
    for script, out_flag in (("scripts/merge_lora.py", "--out_dir"), ("scripts/export_peft.py", "--output_dir")):
        proc = run_main(script, "--checkpoint_dir", base_dir, "--lora_path", adapter_run, out_flag, tmp_path / "out_a")
        assert_user_error(proc, "lit_model_adapter.pth is from an adapter run, not a LoRA run")


def test_a_run_put_on_another_base_of_its_shape_is_warned_about(bases, tmp_path):
    """The shapes agree, so nothing refuses it; base.yaml's fingerprint tells that the weights are not the ones the
    run was trained beside (one changed norm weight here), and every script that takes --checkpoint_dir says so."""
    from litft.base_checkpoint import record_base

    base_dir, other = bases[False], tmp_path / "other"
    shutil.copytree(base_dir, other)
    model = load_lit_model(other)
    with torch.no_grad():
        model.norm.weight[0] += 0.5
    save_lit_checkpoint(model, other)
    run_dir = tmp_path / "run"
    make_run(base_dir, run_dir, LoRAConfig(r=2, alpha=4))
    record_base(run_dir, base_dir)

    warning = f"warning: {run_dir / 'lit_model_lora.pth'} was trained on {base_dir.resolve()}, not on {other}"
    lora = ("--lora_path", run_dir / "lit_model_lora.pth")
    for script, *args in [("scripts/merge_lora.py", "--verify", "false", "--out_dir", tmp_path / "merged"),
                          ("generate/lora.py", "--prompt_style", "plain", "--max_new_tokens", "2", "--prompt", "hi"),
                          ("scripts/export_gguf.py", "--verify", "false", "--out_file", tmp_path / "run.gguf"),
                          ("scripts/export_peft.py", "--verify", "false", "--output_dir", tmp_path / "peft")]:
        proc = run_script(script, "--checkpoint_dir", other, *lora, *args, check=True)
        assert warning in proc.stderr and proc.stderr.count("warning:") == 1, (script, proc.stderr)
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 2
    prepare(rows, rows, task="text", source="test", destination_path=tmp_path / "data", checkpoint_dir=base_dir,
            max_seq_length=64, mask_inputs=True, prompt_style="alpaca", seed=0, val_split_fraction=0.5)
    for weights in (lora[1], run_dir):  # the run's directory stands for its weights file
        proc = run_script("scripts/evaluate.py", "--checkpoint_dir", other, "--weights_path", weights, "--data",
                          tmp_path / "data", "--limit", "1", "--max_new_tokens", "2", "--out", tmp_path / "eval.json",
                          check=True)
        assert warning in proc.stderr and proc.stderr.count("warning:") == 1, proc.stderr
    narrow = tmp_path / "narrow"  # another shape: refused, not warned about
    save_lit_checkpoint(Llama(Config.from_name("tiny-mha", vocab_size=32000, block_size=64, n_embd=32, n_head=2,
                                               n_query_groups=2)), narrow)
    proc = run_main("generate/lora.py", "--checkpoint_dir", narrow, *lora, "--prompt", "hi")
    assert_user_error(proc, "n_embd 64", "n_embd 32")
    assert "warning:" not in proc.stderr
    merged_on_its_own = run_script("scripts/merge_lora.py", "--checkpoint_dir", base_dir, *lora, "--verify", "false",
                                   "--out_dir", tmp_path / "merged", check=True)
    assert "warning:" not in merged_on_its_own.stderr


def test_merge_with_new_tokens_grows_vocabulary_and_tokenizer(bases, tmp_path):
    """Vocabulary 32000 -> 32003: merged rows equal the LoRA model's, and the merged tokenizer (read by
    sentencepiece itself) maps the new tokens to ids 32000.. and back."""
    import sentencepiece

    base_dir, run_dir, out = bases[True], tmp_path / "run", tmp_path / "merged"
    new = ["<sql>", "</sql>", "[R]"]
    model = make_run(base_dir, run_dir, LoRAConfig(r=4, targets=["q", "v"], new_tokens=new))
    with torch.no_grad():
        model.embed.new_rows.normal_(std=0.5)
    save_state_dict(lora_state_dict(model), run_dir / "lit_model_lora.pth")
    run_script("scripts/merge_lora.py", "--checkpoint_dir", base_dir, "--lora_path", run_dir / "lit_model_lora.pth",
               "--out_dir", out, check=True)
    merged = load_lit_model(out).eval()
    assert merged.config.vocab_size == 32003 and merged.config.tie_embeddings
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ids = sp.encode("a <sql>SELECT 1</sql> [R]")
    assert {32000, 32001, 32002} <= set(ids) and sp.decode(ids) == "a <sql>SELECT 1</sql> [R]"
    x = torch.tensor([ids])
    with torch.no_grad():  # the new rows (std 0.5) give logits near 40, where fp32 rounds in steps of 4e-6
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=2e-6)


def test_new_tokens_in_a_tokenizers_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from litft.new_tokens import grown_tokenizer_files

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat"] * 10, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    V = tok.get_vocab_size()
    grown = Tokenizer.from_str(grown_tokenizer_files(tmp_path, ["<r>", "<s2>"], V)["tokenizer.json"].decode())
    assert grown.encode("the <r> cat<s2>").ids[-3:] == [V, grown.token_to_id("cat"), V + 1]
    with pytest.raises(Exception, match="a vocabulary padded beyond its tokenizer"):
        grown_tokenizer_files(tmp_path, ["<r>"], V + 5)
    with pytest.raises(Exception, match="would not line up"):  # a tokenizer with more tokens than the model rows
        grown_tokenizer_files(tmp_path, ["<r>"], V - 1)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_with_new_tokens_loads_in_peft_and_matches(bases, tmp_path, tied):
    """New-token rows become PEFT trainable tokens: transformers' model grown to 32002 rows + our adapter gives our
    logits, on text that uses the new tokens, and the exported tokenizer (read by sentencepiece) knows them."""
    import sentencepiece

    base_dir, run_dir, out = bases[tied], tmp_path / "run", tmp_path / "peft"
    model = make_run(base_dir, run_dir, LoRAConfig(r=4, alpha=8, targets=list(LINEAR), new_tokens=["<a>", "<b>"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("new_rows"):
                p.normal_(std=0.5)
    save_state_dict(lora_state_dict(model), run_dir / "lit_model_lora.pth")
    run_script("scripts/export_peft.py", "--checkpoint_dir", base_dir, "--lora_path", run_dir / "lit_model_lora.pth",
               "--output_dir", out, check=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ids = sp.encode("say <a> then <b>")
    assert {32000, 32001} <= set(ids)
    hf = hf_model(model.config)
    hf.resize_token_embeddings(32002)
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    x = torch.tensor([ids, ids[::-1]])  # the new ids at other positions in the second row
    with torch.no_grad():
        expected = pm(x).logits  # (2, T, 32002)
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)


def test_both_tokenizer_files_are_grown(bases, tmp_path):
    """A base with tokenizer.model and tokenizer.json (most Llama-2 repositories): both get the new tokens, read
    back by sentencepiece and by tokenizers; no stale file is left in the output."""
    import sentencepiece
    from tokenizers import Tokenizer

    from litft.new_tokens import write_tokenizer

    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(bases[True] / "tokenizer.model", both / "tokenizer.model")
    fast = transformers.AutoTokenizer.from_pretrained(both)  # transformers' own conversion to tokenizer.json
    fast.backend_tokenizer.save(str(both / "tokenizer.json"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "special_tokens_map.json").write_text("{}")  # left over from something else
    write_tokenizer(both, out, ["<a>", "<b>"], 32000)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [sp.piece_to_id(t) for t in ("<a>", "<b>")] == [hf.token_to_id(t) for t in ("<a>", "<b>")] == [32000, 32001]
    assert 32001 in sp.encode("x <b> y") and 32001 in hf.encode("x <b> y").ids
    assert not (out / "special_tokens_map.json").exists()


def snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("target", ["a-file", "the-base", "the-run"])
def test_exporters_never_write_into_their_inputs_or_over_a_file(bases, tmp_path, smollm2_gguf, target):
    """Every script that writes a directory refuses a path that is a file or one it reads, in one line, and
    leaves that path exactly as it was."""
    base_dir = tmp_path / "base"
    shutil.copytree(bases[True], base_dir)
    run_dir = tmp_path / "run"
    make_run(base_dir, run_dir, LoRAConfig(r=4))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    out = {"a-file": a_file, "the-base": base_dir, "the-run": run_dir}[target]
    lora = ("--checkpoint_dir", base_dir, "--lora_path", run_dir / "lit_model_lora.pth")
    commands = [("scripts/merge_lora.py", *lora, "--out_dir", out),
                ("scripts/export_peft.py", *lora, "--output_dir", out),
                ("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", base_dir, "--output_dir", out)]
    if target == "a-file":
        commands += [("scripts/convert_gguf_checkpoint.py", "--gguf_path", smollm2_gguf, "--output_dir", out),
                     ("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", base_dir, "--output_dir", out)]
    before = {d: snapshot(d) for d in (base_dir, run_dir)}
    for script, *args in commands:
        if target == "the-base" and script.endswith("convert_lit_checkpoint.py"):
            args[-1] = base_dir  # its only input
        if target == "the-run" and script.endswith("convert_lit_checkpoint.py"):
            continue  # it reads no run
        assert_user_error(run_main(script, *args), "--o")
        assert a_file.read_text() == "keep me"
        assert {d: snapshot(d) for d in (base_dir, run_dir)} == before, script


def test_convert_lit_checkpoint_removes_an_earlier_exports_weights(bases, tmp_path):
    """A directory holding an older sharded export: transformers would load the stale shards (and tokenizer), so
    they go."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "model.safetensors.index.json").write_text("{}")
    (out / "tokenizer.json").write_text("{}")  # and a tokenizer, which transformers would load before tokenizer.model
    written_before_markers = snapshot(out)  # no litft_export.yaml: replaced only when asked to
    assert_user_error(run_main("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", bases[False], "--output_dir",
                               out), "did not write", "--overwrite true")
    assert snapshot(out) == written_before_markers
    run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", bases[False], "--output_dir", out,
               "--overwrite", "true", check=True)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert not (out / "tokenizer.json").exists() and (out / "tokenizer.model").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.vocab_size == 32000

    # an export whose verification fails leaves this one as it is, and nothing of its own
    def fails(*args):
        raise UserError("verification failed")

    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("litft.verify.check", fails)
        proc = run_main("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", bases[True], "--output_dir", out)
    assert_user_error(proc, "verification failed")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def foreign_checkpoint(bases, directory):
    """A directory holding someone's model that no exporter wrote: a copy of a base checkpoint."""
    shutil.copytree(bases[True], directory)
    return directory


def test_an_output_directory_is_replaced_only_when_the_same_script_wrote_it(bases, tmp_path):
    """A mistyped output path naming another model's directory is refused in one line and left byte for byte; an
    earlier output of the same script is replaced; --overwrite true replaces the other model's files."""
    base_dir, run_dir = bases[True], tmp_path / "run"
    make_run(base_dir, run_dir, LoRAConfig(r=4))
    lora = ("--checkpoint_dir", base_dir, "--lora_path", run_dir / "lit_model_lora.pth")
    adapter = tmp_path / "someones-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"theirs")
    commands = [("scripts/merge_lora.py", *lora, "--out_dir", foreign_checkpoint(bases, tmp_path / "a")),
                ("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", base_dir, "--output_dir",
                 foreign_checkpoint(bases, tmp_path / "b")),
                ("scripts/export_peft.py", *lora, "--output_dir", adapter)]
    for script, *args in commands:
        out = args[-1]
        before = snapshot(out)
        assert_user_error(run_main(script, *args, "--verify", "false"), f"{out} already holds files that {script} "
                          "did not write; choose another directory, or pass --overwrite true")
        assert snapshot(out) == before
        fresh = tmp_path / f"fresh-{out.name}"
        for _ in range(2):  # a new directory, then the same again: an earlier output of this script is replaced
            assert run_main(script, *args[:-1], fresh, "--verify", "false").returncode == 0
        assert yaml.safe_load((fresh / "litft_export.yaml").read_text())["written_by"] == script
        assert run_main(script, *args, "--verify", "false", "--overwrite", "true").returncode == 0
        assert snapshot(out) != before and (out / "litft_export.yaml").is_file()
    # merge_lora.py's output holds a lit checkpoint, the kind convert_lit_checkpoint.py's --output_dir may hold (its
    # HF files go beside one): only litft_export.yaml, which names merge_lora.py, refuses it
    merged = tmp_path / f"fresh-{commands[0][-1].name}"
    before = snapshot(merged)
    convert = run_main("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", base_dir, "--output_dir", merged,
                       "--verify", "false")
    assert_user_error(convert, "did not write; choose another directory")
    assert snapshot(merged) == before


def fail_verification(*args):
    raise UserError("verification failed: made to fail by the test")


@pytest.mark.parametrize("script", ["scripts/merge_lora.py", "scripts/export_peft.py"])
def test_a_failed_export_leaves_the_earlier_one_as_it_was(bases, tmp_path, script):
    """The output is written beside the earlier one and moved into place only once verified: a failed verification,
    or a tokenizer that cannot take the run's new tokens, leaves the earlier output byte for byte, and no scratch
    files."""
    base_dir, out = bases[False], tmp_path / "out"
    for name, lora in (("run", LoRAConfig(r=4)), ("other", LoRAConfig(r=2, alpha=4)),
                       ("new-tokens", LoRAConfig(r=2, targets=["q", "v"], new_tokens=["<x>"]))):
        make_run(base_dir, tmp_path / name, lora, seed=len(name))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(base_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    flag = "--out_dir" if script.endswith("merge_lora.py") else "--output_dir"
    run_script(script, "--checkpoint_dir", base_dir, "--lora_path", tmp_path / "run" / "lit_model_lora.pth", flag, out,
               check=True)
    before = snapshot(out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("litft.verify.check", fail_verification)
        failed = run_main(script, "--checkpoint_dir", base_dir, "--lora_path", tmp_path / "other" / "lit_model_lora.pth",
                          flag, out)
    assert_user_error(failed, "made to fail by the test")
    cannot_grow = run_main(script, "--checkpoint_dir", no_tokenizer, "--lora_path",
                           tmp_path / "new-tokens" / "lit_model_lora.pth", flag, out, "--verify", "false")
    assert_user_error(cannot_grow, "neither tokenizer.json nor tokenizer.model")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
