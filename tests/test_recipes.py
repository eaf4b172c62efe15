"""The adapter, adapter v2 and full recipes over the shared loop, run as users run them."""

import pytest
import torch

from conftest import run_script
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
def test_adapter_recipes_train_only_their_parameters(tiny, tmp_path, method):
    out = tmp_path / method
    finetune(tiny, out, "--start_layer", "0", script=f"finetune/{method}.py")
    saved = weights(out / FILES[method])
    assert any(k.endswith(".prefix.prompt") for k in saved) and any(k.endswith(".prefix.gate") for k in saved)
    assert not any(k.endswith(("_proj.weight", "embed.weight")) for k in saved)  # nothing frozen is saved
    assert (out / f"{method}.yaml").is_file()


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
