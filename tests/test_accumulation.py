"""Gradient accumulation weighs every trained token alike (litft/train.py, `Loop.accumulate`).

Truth: transformers' Llama on the whole batch at once, whose loss is the mean over every labelled token of it.
litft's step over the same samples cut into micro batches of any size must give that loss and those gradients;
weighing each micro batch's mean alike (what many trainers do) gives other gradients when lengths differ.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_user_error
from lightning.fabric import Fabric
from test_lora import hf_to_lit_name, tiny_pair
from test_train import finetune, refused, tiny  # noqa: F401  (tiny is a fixture)

from litft.data import collate
from litft.fast import for_training
from litft.loss import IGNORE_INDEX
from litft.train import Loop
from litft.train_args import TrainArgs
from litft.train_data import check_lengths, check_trained_tokens

transformers = pytest.importorskip("transformers")


def samples_of_uneven_length() -> list[dict]:
    """4 samples of 3 to 40 tokens, each with its prompt (the first half) masked."""
    torch.manual_seed(3)
    out = []
    for n in (40, 3, 17, 6):
        ids = torch.randint(2, 256, (n,))
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def litft_step(model, samples: list[dict], micro_batch_size: int, fast: bool, multiple_of: int = 1
               ) -> tuple[float, dict]:
    """One step of litft's loop (forward and backward only) over `samples` in micro batches, each padded to a
    multiple of `multiple_of` tokens (--pad_to_multiple_of); loss and gradients."""
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    loss_fn = for_training(model, fast)
    loop = Loop(fabric=fabric, model=fabric.setup_module(model), raw=model, optimizer=None, scheduler=None,
                loss_fn=loss_fn, args=TrainArgs(), method=None, tokenizer=None, style=None, val_data=[], run_id="")
    micro = [(*collate(samples[i:i + micro_batch_size], pad_id=0, multiple_of=multiple_of), None)  # no packing
             for i in range(0, len(samples), micro_batch_size)]
    loss, trained = loop.accumulate(micro)
    assert trained == sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples)
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("multiple_of", [1, 16], ids=["to-longest", "to-16"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("micro_batch_size", [4, 2, 1], ids=["1x4", "2x2", "4x1"])
def test_every_trained_token_weighs_the_same_however_the_step_is_cut(micro_batch_size, fast, multiple_of):
    """Also: padding a micro batch past its longest sample (to 16 or 48 tokens here) changes nothing."""
    hf, ours = tiny_pair("tiny-gqa")
    samples = samples_of_uneven_length()
    x, y = collate(samples, pad_id=0)
    expected = hf(input_ids=x, labels=y).loss  # the mean over all labelled tokens of the batch
    expected.backward()
    loss, grads = litft_step(ours.train(), samples, micro_batch_size, fast, multiple_of)
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert len(grads) == len([p for p in hf.parameters() if p.grad is not None])
    for name, p in hf.named_parameters():
        if name != "lm_head.weight":  # tied: its gradient is embed's
            torch.testing.assert_close(grads[hf_to_lit_name(name)], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_mean_of_micro_batch_means_is_not_that():
    """The check above can fail: averaging the 4 samples' own mean losses gives another gradient."""
    hf, _ = tiny_pair("tiny-gqa")
    samples = samples_of_uneven_length()
    x, y = collate(samples, pad_id=0)
    hf(input_ids=x, labels=y).loss.backward()
    token_mean = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad()
    for s in samples:
        xs, ys = collate([s], pad_id=0)
        (hf(input_ids=xs, labels=ys).loss / len(samples)).backward()
    differs = max((p.grad - token_mean[n]).abs().max().item() for n, p in hf.named_parameters())
    assert differs > 1e-3


@pytest.mark.parametrize("multiple_of", [1, 16])
@pytest.mark.parametrize("micro_batch_size", [4, 1], ids=["1x4", "4x1"])
def test_throughput_counts_the_samples_not_the_padding(micro_batch_size, multiple_of):
    """A step's tokens: the batches' size as collate pads them, the samples' own tokens, and the trained ones."""
    _, model = tiny_pair("tiny-gqa")
    samples = samples_of_uneven_length()
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    loop = Loop(fabric=fabric, model=model, raw=model, optimizer=None, scheduler=None, loss_fn=None,
                args=TrainArgs(pad_to_multiple_of=multiple_of), method=None, tokenizer=None, style=None,
                val_data=[], run_id="")
    micro = [samples[i:i + micro_batch_size] for i in range(0, len(samples), micro_batch_size)]
    counted = loop.tokens(micro, trained=7)
    assert counted["padded"] == sum(collate(m, pad_id=0, multiple_of=multiple_of)[0].numel() for m in micro)
    assert counted["real"] == 40 + 3 + 17 + 6 and counted["trained"] == 7
    assert loop.tokens_seen == counted


def test_a_sample_with_nothing_to_train_on_is_refused_in_one_line(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    samples = torch.load(data / "train.pt", weights_only=True)
    samples[5]["labels"][:] = IGNORE_INDEX
    torch.save(samples, data / "train.pt")
    proc = refused(tiny, tmp_path / "out", "--data", data)
    assert_user_error(proc, "train.pt sample 5 has no token to train on")
    assert not (tmp_path / "out").exists()


def test_a_cut_that_leaves_only_the_end_token_is_refused_with_the_length_that_keeps_an_answer(tiny, tmp_path):
    """--max_seq_length shorter than a prompt would train the end token alone, predicted from inside the prompt."""
    samples = torch.load(tiny["data"] / "train.pt", weights_only=True)
    longest_prompt = max(int((s["labels"] != IGNORE_INDEX).nonzero()[0]) for s in samples)
    proc = refused(tiny, tmp_path / "out", "--max_seq_length", str(longest_prompt))
    assert_user_error(proc, "lose their whole answer to --max_seq_length", f"at least {longest_prompt + 2}")
    assert not (tmp_path / "out").exists()
    check_trained_tokens(TrainArgs(data=tiny["data"], max_seq_length=longest_prompt + 2), samples)  # enough


def test_a_sample_longer_than_the_models_context_is_refused_with_the_length_that_fits(tiny, tmp_path):
    """Positions past block_size are ones the model never learnt (past a sliding window, which block_size is capped
    at, attention would not even be the model's): refused unless --max_seq_length cuts the samples to fit."""
    short = tmp_path / "short"
    shutil.copytree(tiny["ckpt"], short)
    config = short / "model_config.yaml"
    config.write_text(config.read_text().replace("block_size: 256", "block_size: 10"))
    proc = refused(tiny, tmp_path / "out", "--checkpoint_dir", short)
    assert_user_error(proc, "train.pt holds a sample of", "longer than the model's context (10)",
                      "--max_seq_length 10")
    assert not (tmp_path / "out").exists()
    samples = torch.load(tiny["data"] / "train.pt", weights_only=True)
    check_lengths(TrainArgs(data=tiny["data"], max_seq_length=10), 10, train=samples)  # cut to fit: accepted


def test_an_empty_training_split_is_refused_in_one_line(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    torch.save([], data / "train.pt")
    proc = refused(tiny, tmp_path / "out", "--data", data)
    assert_user_error(proc, "train.pt holds no samples")
    assert not (tmp_path / "out").exists()
