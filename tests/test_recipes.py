"""The adapter, adapter v2 and full recipes over the shared loop, run as users run them; the YAML recipes in
recipes/ loaded through --config, read back by jsonargparse's --print_config and seen by the training loop."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, assert_user_error, run_script
from test_train import finetune, history, tiny, weights  # noqa: F401 — `tiny` is a fixture

FILES = {"adapter": "lit_model_adapter.pth", "adapter_v2": "lit_model_adapter_v2.pth", "full": "lit_model.pth"}


def test_full_finetune_lowers_loss_and_serves_like_a_checkpoint(tiny, tmp_path):
    out = tmp_path / "full"
    finetune(tiny, out, "--max_steps", "12", "--learning_rate", "3e-3", script="finetune/full.py")
    losses = [h["train_loss"] for h in history(out) if "train_loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    saved = weights(out / "lit_model.pth")
    assert "embed.weight" in saved and "lm_head.weight" not in saved  # tied: stored once, like any lit checkpoint
    prompt = ["--prompt", "colour 3", "--temperature", "0", "--max_new_tokens", "8"]
    via_full = run_script("generate/full.py", "--checkpoint_dir", tiny["ckpt"], "--finetuned_path", out / "lit_model.pth",
                          *prompt, check=True)
    via_base = run_script("generate/base.py", "--checkpoint_dir", out, *prompt, check=True)
    base_model = run_script("generate/base.py", "--checkpoint_dir", tiny["ckpt"], "--prompt_style", "plain", *prompt,
                            check=True)
    assert via_full.stdout == via_base.stdout != base_model.stdout


@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
def test_adapter_recipes_train_exactly_their_parameters_and_the_run_serves_what_it_learned(tiny, tmp_path, method):
    """The weights file holds exactly the method's parameters (named by the method's own definition on the same
    model), training moved them off their initial values, and generate/{method}.py prints what the base model with
    those weights loaded by hand samples from the same seed."""
    from litft.adapter import AdapterConfig, add_adapter
    from litft.adapter_v2 import AdapterV2Config, add_adapter_v2
    from litft.config import Config
    from litft.generate import generate
    from litft.model import Llama
    from litft.prompts import resolve_style
    from litft.tokenizer import Tokenizer

    out = tmp_path / method
    finetune(tiny, out, "--start_layer", "0", "--prompt_length", "4", script=f"finetune/{method}.py")
    saved = weights(out / FILES[method])

    model = Llama(Config.from_checkpoint(tiny["ckpt"]))
    base = weights(tiny["ckpt"] / "lit_model.pth")
    model.load_state_dict(base, strict=False)  # tied embeddings: lm_head.weight is embed.weight
    add, config = (add_adapter_v2, AdapterV2Config) if method == "adapter_v2" else (add_adapter, AdapterConfig)
    add(model, config(prompt_length=4, start_layer=0))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(saved[k].abs().min() > 0 for k in saved if k.endswith(".gate"))  # zero at init
    if method == "adapter_v2":
        assert all(not torch.equal(saved[k], torch.ones_like(saved[k])) for k in saved if k.endswith("adapter_scale"))
        assert all(not torch.equal(saved[k], torch.zeros_like(saved[k])) for k in saved if k.endswith("adapter_bias"))
        assert all(not torch.equal(saved[k], base[k]) for k in saved if k.endswith("norm.weight"))

    missing, unexpected = model.load_state_dict(saved, strict=False)
    assert not unexpected and not set(saved) & set(missing)
    tokenizer, style = Tokenizer(tiny["ckpt"]), resolve_style(None, out)  # the style the run recorded
    prompt = tokenizer.encode(style.apply("colour 3"), bos=style.add_bos)
    # Sampled, not greedy: after a few steps the most likely first token is still EOS (an empty answer).
    ids = list(generate(model.eval(), prompt, 8, temperature=1.0, top_k=50, stop_ids=tokenizer.stop_ids,
                        generator=torch.Generator().manual_seed(3)))
    assert ids, "the run should answer something before its stop token"
    served = run_script(f"generate/{method}.py", "--adapter_path", out / FILES[method], "--checkpoint_dir", tiny["ckpt"],
                        "--prompt", "colour 3", "--temperature", "1.0", "--top_k", "50", "--seed", "3",
                        "--max_new_tokens", "8", check=True)
    assert served.stdout == tokenizer.decode(ids) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adapter", "adapter_v2", "full"])
def test_recipes_run_under_fsdp_with_two_processes(tiny, tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--start_layer", "0"] if method.startswith("adapter") else []
    finetune(tiny, one, *extra, script=f"finetune/{method}.py")
    finetune(tiny, two, *extra, "--devices", "2", "--strategy", "fsdp", script=f"finetune/{method}.py")
    a, b = weights(one / FILES[method]), weights(two / FILES[method])
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


# ---- the YAML recipes in recipes/, loaded with --config ------------------------------------------------------

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def recipe_script(recipe) -> str:
    """The script a recipe is for, from the command its header gives: `# python finetune/lora.py --config ...`."""
    found = re.search(rf"^# python (\S+\.py) --config recipes/{re.escape(recipe.name)}", recipe.read_text(), re.M)
    assert found, f"{recipe.name} does not say which script loads it"
    return found.group(1)


def test_every_method_has_a_recipe():
    """DESIGN.md: recipes/ holds YAML per method; each finetune script's --config help points there."""
    scripts = {p.stem for p in (ROOT / "finetune").glob("*.py")}
    assert scripts <= {recipe_script(r).removeprefix("finetune/").removesuffix(".py") for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_against_its_script_and_every_value_lands(recipe):
    """jsonargparse's --print_config is the outside reader: every key of the YAML file is a flag of the script and
    comes back with the recipe's value (a misspelt key would be refused, a missing one would show the default)."""
    values = yaml.safe_load(recipe.read_text())
    printed = run_script(recipe_script(recipe), "--config", recipe, "--print_config", check=True)
    parsed = yaml.safe_load(printed.stdout)
    assert {k: parsed.get(k) for k in values} == values


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_a_recipe_reaches_the_training_loop(recipe, monkeypatch, tmp_path):
    """Run the recipe's script in-process up to `fit`, which is replaced by a probe: the TrainArgs and the method
    config it receives carry the recipe's values. (Converting the base and preparing data are skipped.)"""
    import runpy
    import sys

    import litft.cli
    import litft.train

    received = {}
    monkeypatch.setattr(litft.train, "fit", lambda args, method: received.update(args=args, method=method))
    monkeypatch.setattr(litft.cli, "ensure_checkpoint", lambda *a, **k: None)  # the recipes' bases are not here
    monkeypatch.setattr(litft.cli, "check_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr(litft.cli, "ensure_data", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)  # the recipe's relative out_dir and data resolve here, where nothing exists yet
    monkeypatch.setattr(sys, "argv", [recipe_script(recipe), "--config", str(recipe)])
    runpy.run_path(str(ROOT / recipe_script(recipe)), run_name="__main__")

    args, method = received["args"], received["method"]
    config = dict(method.config)  # the method's own flags: prompt_length, start_layer (adapters); lora_* below
    if method.name == "lora":
        config = {"lora_r": config["r"], "lora_alpha": config["alpha"], "lora_dropout": config["dropout"],
                  "lora_targets": ",".join(config["targets"])}
    for key, value in yaml.safe_load(recipe.read_text()).items():
        got = config[key] if key in config else getattr(args, key)
        assert (str(got) if isinstance(got, Path) else got) == value, key


def test_flags_win_over_config_and_a_bad_recipe_is_one_line_naming_it(tmp_path):
    recipe = ROOT / "recipes" / "lora.yaml"
    printed = run_script("finetune/lora.py", "--config", recipe, "--max_steps", "7", "--lora_r", "4", "--print_config",
                         check=True)
    parsed = yaml.safe_load(printed.stdout)
    assert (parsed["max_steps"], parsed["lora_r"], parsed["batch_size"]) == (7, 4, 64)
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("lora_r:", "lora_rank:"))
    assert_user_error(run_script("finetune/lora.py", "--config", bad, "--print_config"),
                      f"--config {bad}: unknown key 'lora_rank'")
    bad.write_text("lora_r: [\n")
    assert_user_error(run_script("finetune/lora.py", f"--config={bad}", "--print_config"),
                      f"--config {bad} is not valid YAML", "line 2, column 1")
    # a flag wins over the recipe wherever it stands: before --config, between two --config files
    for flags in (["--max_steps", "7", "--config", recipe, "--print_config"],
                  ["--print_config", "--max_steps", "7", "--config", recipe],  # the file last of all
                  ["--config", recipe, "--max_steps", "7", "--config", recipe, "--print_config"]):
        printed = run_script("finetune/lora.py", *flags, check=True)
        assert yaml.safe_load(printed.stdout)["max_steps"] == 7, flags
    # a flag is spelled whole (argparse's allow_abbrev would read --max_step as --max_steps); a near miss is named
    assert_user_error(run_script("finetune/lora.py", "--max_step", "7", "--config", recipe, "--print_config"),
                      "unrecognized arguments: --max_step 7 (did you mean --max_steps?)")
    # of two files, the one that holds the misspelt key is named
    assert_user_error(run_script("finetune/lora.py", "--config", recipe, "--config", bad, "--print_config"),
                      f"--config {bad}")
