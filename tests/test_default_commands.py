"""The two commands of the README's first line, run literally: `finetune/<method>.py --data games`, then
`generate/<method>.py --prompt "..."` with no other flag.

Each test works in a temporary directory, as a user in a fresh clone would: the scripts resolve their default
paths (checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct, data/games, out/<method>) against the working
directory, so a tiny checkpoint placed at the default base's path stands in for SmolLM2 (one test converts the
real GGUF). The outside truth: the no-flag command prints exactly what the fully spelled-out command prints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_script

DEFAULT_BASE = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
TINY_RUN = ["--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "4", "--warmup_steps", "1",
            "--eval_interval", "2", "--eval_iters", "1", "--save_interval", "2", "--sample_tokens", "4"]
PROMPT = "Is there a mediocre racing game?"
WEIGHTS = {"lora": "lit_model_lora.pth", "adapter": "lit_model_adapter.pth", "adapter_v2": "lit_model_adapter_v2.pth",
           "full": "lit_model.pth"}
PATH_FLAG = {"lora": "--lora_path", "adapter": "--adapter_path", "adapter_v2": "--adapter_path", "full": "--finetuned_path"}


def write_tiny_games_checkpoint(directory: Path) -> None:
    """A tiny random Llama whose byte-level BPE tokenizer is trained on the games task, so samples stay short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_prep.games import generate_examples
    from litft import Config, Llama
    from litft.checkpoint import save_lit_checkpoint

    torch.manual_seed(0)
    save_lit_checkpoint(Llama(Config.from_name("tiny-gqa", vocab_size=640, block_size=512)), directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [" ".join(e.values()) + " user assistant" for e in generate_examples(300, seed=0)]
    tok.train_from_iterator(texts, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "add_bos_token": True}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A fresh working directory whose default base path holds a tiny checkpoint, and nothing else."""
    cwd = tmp_path_factory.mktemp("workspace")
    write_tiny_games_checkpoint(cwd / DEFAULT_BASE)
    return cwd


@pytest.fixture(scope="module")
def lora_run(workspace) -> Path:
    """The first command, `python finetune/lora.py --data games` (a few steps), run in the workspace."""
    proc = run_script("finetune/lora.py", "--data", "games", *TINY_RUN, cwd=workspace, check=True)
    assert "--data games: preparing data/games with data_prep/games.py" in proc.stderr
    return workspace / "out" / "lora"


def test_the_two_commands_of_the_readme(workspace, lora_run):
    assert (workspace / "data" / "games" / "train.pt").is_file()
    base = yaml_mapping(lora_run / "base.yaml")
    assert Path(base["path"]) == (workspace / DEFAULT_BASE).resolve() and len(base["fingerprint"]) == 16

    served = run_script("generate/lora.py", "--prompt", PROMPT, cwd=workspace, check=True)
    spelled_out = run_script("generate/lora.py", "--prompt", PROMPT, "--checkpoint_dir", DEFAULT_BASE,
                             "--lora_path", "out/lora/lit_model_lora.pth", cwd=workspace, check=True)
    assert served.stdout and served.stdout == spelled_out.stdout


def test_the_run_path_alone_is_enough_from_anywhere(workspace, lora_run, tmp_path):
    served = run_script("generate/lora.py", "--lora_path", lora_run / "lit_model_lora.pth", "--prompt", PROMPT,
                        "--temperature", "0", "--max_new_tokens", "12", cwd=tmp_path, check=True)
    spelled_out = run_script("generate/lora.py", "--lora_path", lora_run / "lit_model_lora.pth", "--prompt", PROMPT,
                             "--temperature", "0", "--max_new_tokens", "12", "--checkpoint_dir",
                             workspace / DEFAULT_BASE, cwd=tmp_path, check=True)
    assert served.stdout == spelled_out.stdout
    # merging and exporting find the base the same way: the same files as with --checkpoint_dir spelled out
    for script, out in (("scripts/merge_lora.py", "--out_dir"), ("scripts/export_peft.py", "--output_dir")):
        run_script(script, "--lora_path", lora_run, out, tmp_path / "found", "--verify", "false", cwd=tmp_path,
                   check=True)
        run_script(script, "--lora_path", lora_run, out, tmp_path / "named", "--verify", "false", "--checkpoint_dir",
                   workspace / DEFAULT_BASE, cwd=tmp_path, check=True)
        found, named = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("found", "named"))
        assert found == named
        for f in found:
            assert same_content(tmp_path / "found" / f, tmp_path / "named" / f), f
        for d in ("found", "named"):
            shutil.rmtree(tmp_path / d)


def same_content(a: Path, b: Path) -> bool:
    """Equal files; for torch.save's, equal tensors (its archive is named after the temporary file it was written to)."""
    if a.suffix != ".pth":
        return a.read_bytes() == b.read_bytes()
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("method", ["adapter", "adapter_v2", "full"])
def test_the_two_commands_for_the_other_methods(workspace, lora_run, method):
    extra = ["--start_layer", "0"] if method.startswith("adapter") else []  # the tiny model has 2 layers
    run_script(f"finetune/{method}.py", "--data", "games", *TINY_RUN, *extra, cwd=workspace, check=True)
    served = run_script(f"generate/{method}.py", "--prompt", PROMPT, cwd=workspace, check=True)
    spelled_out = run_script(f"generate/{method}.py", "--prompt", PROMPT, "--checkpoint_dir", DEFAULT_BASE,
                             PATH_FLAG[method], Path("out", method, WEIGHTS[method]), cwd=workspace, check=True)
    assert served.stdout and served.stdout == spelled_out.stdout


def test_a_missing_default_run_says_to_train_it_first(tmp_path):
    assert_user_error(run_script("generate/adapter.py", "--prompt", PROMPT, cwd=tmp_path),
                      "out/adapter/lit_model_adapter.pth does not exist", "python finetune/adapter.py")


def test_a_changed_base_is_refused_in_one_line_unless_named(workspace, lora_run, tmp_path):
    """The base's weights change after training: serving the run on its recorded base is refused; an explicit
    --checkpoint_dir still serves it (checked only for the model's shape), and so does a run without base.yaml."""
    shutil.copytree(workspace / DEFAULT_BASE, tmp_path / DEFAULT_BASE)
    run_script("finetune/lora.py", "--data", workspace / "data" / "games", *TINY_RUN, "--max_steps", "1",
               cwd=tmp_path, check=True)
    weights = tmp_path / DEFAULT_BASE / "lit_model.pth"
    state_dict = torch.load(weights, weights_only=True)
    state_dict["blocks.0.attn.q_proj.weight"] += 1e-3  # a tensor in the middle of the file
    torch.save(state_dict, weights)

    assert_user_error(run_script("generate/lora.py", "--prompt", PROMPT, cwd=tmp_path),
                      "changed since", "out/lora", "--checkpoint_dir")
    (tmp_path / "out" / "lora" / "base.yaml").unlink()  # a run from before runs recorded their base
    assert_user_error(run_script("generate/lora.py", "--prompt", PROMPT, cwd=tmp_path),
                      "does not record its base", "--checkpoint_dir")
    run_script("generate/lora.py", "--prompt", PROMPT, "--checkpoint_dir", DEFAULT_BASE, "--max_new_tokens", "4",
               cwd=tmp_path, check=True)


def test_a_named_data_set_offline_says_how_to_pass_a_local_file(workspace):
    offline = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}  # nothing listens there
    proc = run_script("finetune/lora.py", "--data", "alpaca", "--out_dir", "out/alpaca", cwd=workspace, env=offline)
    assert_user_error(proc, "--data alpaca: could not download", "python data_prep/alpaca.py --data_file FILE")
    assert not (workspace / "data" / "alpaca" / "train.pt").exists() and not (workspace / "out" / "alpaca").exists()


def test_the_default_base_is_converted_from_the_offline_gguf(smollm2_gguf, tmp_path):
    proc = run_script("data_prep/games.py", "--num_examples", "20", cwd=tmp_path, check=True)
    said = [line for line in proc.stderr.splitlines() if "GGUF" in line]
    assert len(said) == 1 and "converting" in said[0] and str(DEFAULT_BASE) in said[0], proc.stderr
    base = tmp_path / DEFAULT_BASE
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json"} <= {p.name for p in base.iterdir()}
    assert [p.name for p in base.parent.iterdir()] == [base.name]  # the scratch directory is gone
    assert yaml_mapping(base / "model_config.yaml")["name"] == base.name  # not the scratch directory's name
    assert json.loads((tmp_path / "data" / "games" / "meta.json").read_text())["checkpoint_dir"] == str(DEFAULT_BASE)


def yaml_mapping(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())

