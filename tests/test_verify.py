"""Every exporter verifies what it wrote (litft/verify.py), and HF exports carry their stop ids and chat template.

- Each of merge_lora.py, export_peft.py, convert_lit_checkpoint.py (and export_gguf.py, in test_export_gguf.py) run
  as a user runs it ends with a `verified: ...` line: transformers, peft or transformers' GGUF loader agrees with
  the litft model the output came from.
- A deliberately corrupted output — the writer monkeypatched, in this process, to swap two matrices, skip the
  q/k permutation, double α or nudge one merged weight — makes the same command stop with one line.
- transformers' `generate` on an HF export stops where litft's generate stops, at the chat template's end of turn
  that the checkpoint's generation_config.json does not list, and prompts with the style generate/ uses.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_script
from test_chat_formats import QWEN_TEMPLATE, chain_checkpoint, qwen_dir  # noqa: F401  (qwen_dir: a fixture)
from test_export_gguf import llama3_checkpoint, llama3_dir  # noqa: F401  (fixtures)
from test_merge_export import bases, hf_model, make_run  # noqa: F401  (bases: a fixture)

import litft.gguf_export
from litft.checkpoint import load_lit_model
from litft.errors import UserError
from litft.files import save_state_dict
from litft.generate import generate, stop_token_ids
from litft.load_finetuned import load_finetuned
from litft.lora import LINEAR, LoRAConfig, lora_state_dict
from litft.prompts import PromptStyle, resolve_style
from litft.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def lora_run(bases, tmp_path):  # noqa: F811
    base = bases[True]
    make_run(base, tmp_path / "run", LoRAConfig(r=4, alpha=8, targets=list(LINEAR)))
    return base, tmp_path / "run" / "lit_model_lora.pth"


def verified_line(proc, prompts: int = 4) -> str:
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("verified: ")]
    assert len(lines) == 1 and f"greedy text equal on {prompts}/{prompts} prompts" in lines[0], proc.stdout
    return lines[0]


def test_every_exporter_prints_its_verified_line(bases, tmp_path):  # noqa: F811
    base, lora = lora_run(bases, tmp_path)
    merge = run_script("scripts/merge_lora.py", "--checkpoint_dir", base, "--lora_path", lora, "--out_dir", tmp_path / "m")
    assert "(transformers vs litft)" in verified_line(merge)
    [summary] = [line for line in merge.stderr.splitlines() if line.startswith("merged ")]
    listed = summary.rsplit("(", 1)[1].rstrip(")").split(", ")
    assert sorted(listed) == sorted(p.name for p in (tmp_path / "m").iterdir())  # the line names every file written
    hf = run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", tmp_path / "m", "--output_dir", tmp_path / "hf")
    assert "(transformers vs litft)" in verified_line(hf)
    peft = run_script("scripts/export_peft.py", "--checkpoint_dir", base, "--lora_path", lora, "--output_dir", tmp_path / "p")
    assert "(peft vs litft)" in verified_line(peft)
    skipped = run_script("scripts/export_peft.py", "--checkpoint_dir", base, "--lora_path", lora, "--output_dir",
                         tmp_path / "p2", "--verify", "false")
    assert skipped.returncode == 0 and "verified" not in skipped.stdout


def corrupt_hf_names(original):
    """lit_to_hf_state_dict, but layer 0's gate and up matrices trade places."""
    def corrupted(state_dict):
        out = original(state_dict)
        gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
        out[gate], out[up] = out[up], out[gate]
        return out
    return corrupted


def test_corrupted_outputs_fail_verification(bases, llama3_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    """Each script's writer corrupted one way, in this process: each run must end in the one-line UserError."""
    import scripts.convert_lit_checkpoint as convert
    import scripts.export_gguf as gguf
    import scripts.export_peft as peft
    import scripts.merge_lora as merge
    from litft.lora import merge_lora

    base, lora = lora_run(bases, tmp_path)

    def nudged(model):  # merges, then moves one weight of layer 0
        merged = merge_lora(model)
        with torch.no_grad():
            merged.blocks[0].attn.q_proj.weight[0, 0] += 5.0
        return merged

    config = peft.adapter_config
    cases = [  # the nudged merge keeps the greedy text: its logits alone, past merge's 1e-2, refuse it
        (merge, "merge_lora", nudged, lambda: merge.main(lora, tmp_path / "m", base)),
        (convert, "lit_to_hf_state_dict", corrupt_hf_names(convert.lit_to_hf_state_dict),
         lambda: convert.main(base, tmp_path / "hf")),
        (peft, "adapter_config", lambda *a: {**config(*a), "lora_alpha": 32}, lambda: peft.main(lora, tmp_path / "p", base)),
        (litft.gguf_export, "permute_qk", lambda w, n: w, lambda: gguf.main(llama3_checkpoint, tmp_path / "m.gguf", dtype="f32")),
    ]
    for module, name, corrupted, call in cases:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, corrupted)
            with pytest.raises(UserError, match=r"^verification failed: .* differently from the litft model it came "
                                                r"from: max \|Δlogit\| .*; do not use it") as refused:
                call()
            if name == "merge_lora":
                assert "greedy text equal on 4/4 prompts (tolerance 0.01)" in str(refused.value)
    assert not (tmp_path / "m.gguf").exists()  # a GGUF that fails never takes its name


def test_without_the_readers_verification_is_one_line_before_anything_is_written(bases, tmp_path, monkeypatch):  # noqa: F811
    """Without peft, export_peft.py stops in one line before writing; merge_lora.py (and the other exporters, which
    read their output with transformers alone) still verify. Without transformers, every one stops."""
    import sys

    import scripts.convert_lit_checkpoint as convert
    import scripts.export_peft as export_peft
    import scripts.merge_lora as merge

    base, lora = lora_run(bases, tmp_path)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(UserError, match="pip install transformers peft, or pass --verify false"):
        export_peft.main(lora, tmp_path / "p", base)
    assert not (tmp_path / "p").exists()
    merge.main(lora, tmp_path / "m", base)  # its verification needs no peft
    assert (tmp_path / "m" / "lit_model.pth").is_file()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match="pip install transformers, or pass --verify false"):
        convert.main(bases[True], tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_who_reads_a_peft_export_with_new_tokens(bases, tmp_path, tied):  # noqa: F811
    """The readers howto/export.md names for a run that added tokens, each shown here: peft onto transformers'
    base grown to the tokenizer's size (the verified line), transformers' own `load_adapter` on that base, and
    AutoTokenizer on the export's directory, which knows the new tokens and adds BOS as litft does."""
    run = tmp_path / "run"
    model = make_run(bases[tied], run, LoRAConfig(r=4, alpha=8, targets=list(LINEAR), new_tokens=["<a>", "<b>"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("new_rows"):
                p.normal_(std=0.5)
    save_state_dict(lora_state_dict(model), run / "lit_model_lora.pth")
    proc = run_script("scripts/export_peft.py", "--checkpoint_dir", bases[tied], "--lora_path",
                      run / "lit_model_lora.pth", "--output_dir", tmp_path / "peft")
    assert "(peft vs litft)" in verified_line(proc, prompts=5)  # the fifth holds <a> and <b>
    # an export whose new input rows are wrong: no answer chooses <a>, but the fifth prompt reads it
    shutil.copytree(tmp_path / "peft", tmp_path / "bad")
    import safetensors.torch

    from scripts import export_peft

    weights = safetensors.torch.load_file(tmp_path / "bad" / "adapter_model.safetensors")
    [rows] = [k for k in weights if "embed_tokens" in k and "token_adapter" in k]
    weights[rows][0] = 5.0
    safetensors.torch.save_file(weights, tmp_path / "bad" / "adapter_model.safetensors")
    with pytest.raises(UserError, match="verification failed"):
        export_peft.verified(bases[tied], run / "lit_model_lora.pth", tmp_path / "bad", tmp_path / "bad", 2)

    text = "say <a> then <b>"
    ours = Tokenizer(tmp_path / "peft").encode(text)  # (T,): BOS, ..., 32000, ..., 32001
    assert {32000, 32001} <= set(ours.tolist())
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "peft")(text)["input_ids"] == ours.tolist()
    hf = hf_model(model.config)
    hf.resize_token_embeddings(32002)
    hf.load_adapter(tmp_path / "peft")
    expected = load_finetuned(bases[tied], run / "lit_model_lora.pth", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(ours[None]).logits, expected(ours[None]), atol=1e-4, rtol=0)


# ---- stopping travels with the model ---------------------------------------------------------------------------

@pytest.mark.parametrize("style", [None, "chatml"], ids=["its-template", "a-run's-chatml"])
def test_transformers_generate_stops_and_prompts_as_litft(qwen_dir, tmp_path, style):  # noqa: F811
    """Qwen2.5-base's layout: EOS <|endoftext|>, and the only generation_config.json eos is that one, but the chat
    template's turns end with <|im_end|>. A model that answers " fox dog" and then <|im_end|>: litft stops there;
    so must transformers on the export. With a run's prompt_style.yaml (chatml), the export's template is chatml."""
    checkpoint, chain = chain_checkpoint(qwen_dir, tmp_path / "qwen", "<|im_end|>")
    if style:
        PromptStyle.from_name(style).save(checkpoint)
    run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", checkpoint, "--output_dir", tmp_path / "hf",
               check=True)
    tokenizer, prompt_style = Tokenizer(checkpoint), resolve_style(None, checkpoint)
    stops = stop_token_ids(tokenizer, prompt_style)
    question = "What is LoRA?"
    ids = tokenizer.encode(prompt_style.apply(question), bos=prompt_style.add_bos)
    ours = list(generate(load_lit_model(checkpoint).eval(), ids, 6, temperature=0, stop_ids=stops))
    assert ours == chain[1:3]  # stopped at <|im_end|>

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == stops and tokenizer.token_to_id("<|im_end|>") in stops
    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=False)
    assert prompt == prompt_style.apply(question)  # the template litft prompts with
    assert (prompt_style.chat_template == QWEN_TEMPLATE) is (style is None)
    x = torch.tensor([ids.tolist()])
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=6)[0, x.shape[1]:]
    assert out.tolist() == chain[1:4]  # the answer and the stop token, then nothing
    assert hf_tokenizer.decode(out, skip_special_tokens=True) == tokenizer.decode(ours) == " fox dog"


def test_an_export_of_a_run_in_a_style_without_a_template_drops_the_bases_template(qwen_dir, tmp_path):  # noqa: F811
    """Truth: transformers reading the export. An alpaca-style fine-tune of a chat model must not be prompted in the
    base's ChatML by apply_chat_template; the summary line says the template went, and why."""
    checkpoint, _ = chain_checkpoint(qwen_dir, tmp_path / "qwen", "<|im_end|>")
    PromptStyle.from_name("alpaca").save(checkpoint)
    proc = run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", checkpoint, "--output_dir",
                      tmp_path / "hf", check=True)
    assert "chat_template removed: the alpaca style has none" in proc.stdout
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template is None
    assert transformers.AutoTokenizer.from_pretrained(checkpoint).chat_template == QWEN_TEMPLATE  # the base's own


def test_a_reader_with_fewer_output_tokens_than_the_model_fails_verification():
    """An output that lost vocabulary rows (a reader whose lm_head is narrower than litft's) cannot be compared
    token for token: verification stops, naming both widths. A wider one (a padded vocabulary) is compared on
    litft's columns."""
    from litft.config import Config
    from litft.model import Llama
    from litft.verify import Reader, compare, reference

    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny-gqa")).eval()
    ref = reference(model, None, None, set())  # token-id prompts
    with torch.no_grad():
        narrow = Reader("narrow", lambda ids: model(ids[None])[0][:, :-1])  # (T, 255)
        wide = Reader("wide", lambda ids: torch.nn.functional.pad(model(ids[None])[0], (0, 3)))  # (T, 259)
        with pytest.raises(UserError, match="narrow has 255 output tokens, litft's model 256"):
            compare(ref, narrow)
        outcome = compare(ref, wide)
    assert outcome.max_delta < 1e-5 and outcome.equal == outcome.total


def test_a_reader_whose_logits_are_not_finite_fails_verification():
    """A NaN (or inf) logit makes |Δ| NaN, which Python's max() would drop: the check must fail, even when the greedy
    answers (read from the answer positions, which are finite here) agree."""
    from litft.config import Config
    from litft.model import Llama
    from litft.verify import Reader, check, reference

    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny-gqa")).eval()
    ref = reference(model, None, None, set())  # token-id prompts of 8 ids, then the answer

    def at_prompt(value):  # litft's logits, `value` at every prompt position before the last
        def logits(ids):
            out = model(ids[None])[0].clone()
            out[:7] = value
            return out
        return logits

    with torch.no_grad():
        assert check(ref, Reader("exact", lambda ids: model(ids[None])[0]), "it").startswith("verified: ")
        for value in (float("nan"), float("inf")):
            with pytest.raises(UserError, match=r"verification failed: .* max \|Δlogit\| (nan|inf), greedy tokens equal "
                                                r"on 4/4 prompts \(prompt 1: a logit is not finite"):
                check(ref, Reader("broken", at_prompt(value)), "it")
