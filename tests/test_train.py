"""The shared training loop, run as a user runs it: finetune/*.py in a subprocess on a tiny model.

Outside truths here are the run's own observable contract: the loss goes down, resuming reproduces an
uninterrupted run bit for bit, several processes (DDP, FSDP over gloo) reach the same weights as one process,
and user mistakes end in one line.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, assert_user_error, run_main, run_script
from safetensors.torch import load_file

from litft.checkpoint import load_lit_model

COMMON = ["--max_steps", "6", "--batch_size", "4", "--micro_batch_size", "2", "--eval_interval", "3",
          "--eval_iters", "2", "--save_interval", "3", "--warmup_steps", "1", "--learning_rate", "3e-2",
          "--sample_tokens", "4"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint and a small prepared instruction dataset."""
    root = tmp_path_factory.mktemp("tiny")
    rows = [{"instruction": f"{kind} {i}", "input": "", "output": word}
            for i in range(40) for kind, word in (("colour", "red"), ("animal", "cat"), ("number", "two"))]
    (root / "rows.json").write_text(json.dumps(rows))
    run_script("data_prep/json_data.py", "--data_file", root / "rows.json", "--destination_path", root / "data",
               "--checkpoint_dir", tiny_checkpoint, "--max_seq_length", "48", "--prompt_style", "plain",
               "--val_split_fraction", "0.1", check=True)
    return {"ckpt": tiny_checkpoint, "data": root / "data"}


def finetune(tiny, out_dir: Path, *extra: str, script: str = "finetune/lora.py", check: bool = True):
    return run_script(script, "--checkpoint_dir", tiny["ckpt"], "--data", tiny["data"], "--out_dir", out_dir,
                      *COMMON, *extra, check=check)


def refused(tiny, out_dir: Path, *extra: str, script: str = "finetune/lora.py"):
    """`finetune` for a run that must be refused before its first step: in this process (conftest.run_main)."""
    return run_main(script, "--checkpoint_dir", tiny["ckpt"], "--data", tiny["data"], "--out_dir", out_dir, *COMMON,
                    *extra)


def history(out_dir: Path) -> list[dict]:
    last = sorted((out_dir / "checkpoints").glob("step-*"))[-1]
    return json.loads((last / "meta.json").read_text())["history"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_lora_run_lowers_loss_and_writes_everything(tiny, tmp_path):
    out = tmp_path / "run"
    finetune(tiny, out, "--max_steps", "12", "--eval_interval", "6", "--save_interval", "6")
    losses = [h["train_loss"] for h in history(out) if "train_loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    for name in ("lit_model_lora.pth", "lora.yaml", "model_config.yaml", "prompt_style.yaml", "hyperparameters.yaml",
                 "loss.png"):
        assert (out / name).is_file(), name
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = weights(out / "lit_model_lora.pth")
    assert saved and all(k.endswith(("lora_A", "lora_B")) for k in saved)
    summary = json.loads((out / "summary.json").read_text())  # throughput of the samples, not of their padding
    assert 0 < summary["padding_share"] < 1 and 0 < summary["trained_tokens_per_s"] < summary["tokens_per_s"]
    assert 0 < summary["train_seconds"] < summary["wall_seconds"]  # the steps' own time: evaluating is not training
    hyper = yaml.safe_load((out / "hyperparameters.yaml").read_text())  # the machine's defaults, made explicit
    assert (hyper["precision"], hyper["pad_to_multiple_of"]) == ("32-true", 1)


def test_a_16_bit_run_pads_to_multiples_of_16_and_says_so(tiny, tmp_path):
    """In 16 bits micro batches are rounded up to 16 tokens (litft/data.py batch_length): the plan counts the
    longest batch so, and hyperparameters.yaml records the value the run used."""
    out = tmp_path / "run"
    proc = finetune(tiny, out, "--precision", "bf16-true", "--max_steps", "2", "--eval_interval", "2",
                    "--save_interval", "2")
    longest = max(len(s["input_ids"]) for s in torch.load(tiny["data"] / "train.pt", weights_only=True))
    assert f"micro batch 2 × {-(-longest // 16) * 16} tokens" in proc.stderr
    hyper = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert (hyper["precision"], hyper["pad_to_multiple_of"]) == ("bf16-true", 16)


@pytest.mark.parametrize("micro", [5, 16])
def test_val_loss_weighs_every_token_alike(tiny, tmp_path, micro):
    """Outside truth: torch's cross-entropy over each test sample's own answer tokens, summed and divided by their
    number. A learning rate of 1e-30 keeps the LoRA at zero effect, so the run's step-1 validation loss is the
    base model's. Answers of 1 to 12 words give the micro batches different numbers of tokens. The 12 test samples
    make two micro batches of 5 (the first 10 samples), or, with a micro batch of 16, larger than the split, one
    batch of all 12."""
    rows = [{"instruction": f"count to {i % 12 + 1}", "input": "", "output": " ".join(["one"] * (i % 12 + 1))}
            for i in range(120)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    run_script("data_prep/json_data.py", "--data_file", tmp_path / "rows.json", "--destination_path",
               tmp_path / "data", "--checkpoint_dir", tiny["ckpt"], "--max_seq_length", "48", "--prompt_style",
               "plain", "--val_split_fraction", "0.1", check=True)
    tiny = {**tiny, "data": tmp_path / "data"}
    out = tmp_path / "run"
    finetune(tiny, out, "--max_steps", "1", "--batch_size", str(micro), "--micro_batch_size", str(micro),
             "--eval_interval", "1", "--eval_iters", "2", "--save_interval", "1", "--learning_rate", "1e-30",
             "--warmup_steps", "0")
    logged = [h["val_loss"] for h in history(out) if "val_loss" in h]
    samples = torch.load(tiny["data"] / "test.pt", weights_only=True)
    assert len(samples) == 12 and len(logged) == 1
    assert logged[0] == pytest.approx(base_loss(tiny["ckpt"], samples[:10] if micro == 5 else samples), rel=1e-5)


def base_loss(checkpoint_dir: Path, samples: list[dict]) -> float:
    """torch's cross-entropy of the base model over the samples' answer tokens, summed and divided by their number."""
    model = load_lit_model(checkpoint_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            logits, targets = model(s["input_ids"][None])[0, :-1], s["labels"][1:]  # (T - 1, vocab), (T - 1,)
            keep = targets != -100
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


@pytest.mark.slow
def test_a_test_split_smaller_than_the_processes_is_evaluated(tiny, tmp_path):
    """One test sample, two processes (DDP): one process evaluates it, the other runs it too (every process runs the
    same forwards) without counting it. The validation loss is the base model's on that sample (lr 1e-30 keeps the
    LoRA at zero effect), not NaN, and summary.json is standard JSON."""
    rows = [{"instruction": f"colour {i}", "input": "", "output": "red"} for i in range(24)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    run_script("data_prep/json_data.py", "--data_file", tmp_path / "rows.json", "--destination_path",
               tmp_path / "data", "--checkpoint_dir", tiny["ckpt"], "--max_seq_length", "48", "--prompt_style",
               "plain", "--val_split_fraction", "0.04", check=True)
    samples = torch.load(tmp_path / "data" / "test.pt", weights_only=True)
    assert len(samples) == 1
    out = tmp_path / "run"
    finetune({**tiny, "data": tmp_path / "data"}, out, "--devices", "2", "--strategy", "ddp", "--max_steps", "1",
             "--eval_interval", "1", "--save_interval", "1", "--learning_rate", "1e-30", "--warmup_steps", "0")
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert summary["val_loss"] == pytest.approx(base_loss(tiny["ckpt"], samples), rel=1e-5)


@pytest.mark.parametrize("processes", [(), pytest.param(("--devices", "2", "--strategy", "fsdp"), marks=pytest.mark.slow),
                                       pytest.param(("--devices", "2", "--strategy", "ddp"), marks=pytest.mark.slow),
                                       ("--packing", "true", "--max_seq_length", "40")],
                         ids=["one-process", "fsdp-two-processes", "ddp-two-processes", "packed"])
def test_resume_is_bit_identical(tiny, tmp_path, processes):
    """6 steps straight vs. the same run resumed from its step-3 checkpoint: identical LoRA weights (under FSDP,
    each process restores its own shards of the parameters and AdamW moments; under DDP every process reads rank
    0's copy; packed, the resumed run packs the same rows again)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune(tiny, straight, *processes)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    (resumed / "lit_model_lora.pth").unlink()
    if "fsdp" in processes:  # its checkpoints hold each process's shards, which DDP cannot load: one line
        assert_user_error(refused(tiny, resumed, "--resume", "true", "--devices", "2", "--strategy", "ddp"),
                          "holds FSDP's shards, which --strategy auto or ddp cannot load")
    proc = finetune(tiny, resumed, "--resume", "true", *processes)
    assert "resumed from step 3" in proc.stderr
    assert_same(weights(straight / "lit_model_lora.pth"), weights(resumed / "lit_model_lora.pth"))


@pytest.mark.parametrize("extra, message", [
    (("--micro_batch_size", "128", "--batch_size", "128"), "the training split has 108 samples"),
    (("--micro_batch_size", "64", "--batch_size", "64", "--packing", "true", "--max_seq_length", "48"),
     "--packing put the 108 training samples in"),
])
def test_a_split_smaller_than_one_micro_batch_is_refused_before_the_run_directory_is_written(tiny, tmp_path, extra,
                                                                                             message):
    """Found at the first batch, the refusal had left a run.yaml that a rerun refused ("holds an earlier run") and
    --resume refused too ("no complete checkpoint")."""
    out = tmp_path / "run"
    assert_user_error(refused(tiny, out, *extra), message, "fewer than one micro batch", "lower --micro_batch_size")
    assert not out.exists()


def test_a_resume_may_change_the_precision(tiny, tmp_path):
    """A run started in bf16-true (weights and AdamW's moments in bf16) resumed in 32-true: the moments restored
    take the fp32 parameters' dtype, as AdamW requires, and the next checkpoint holds them in fp32."""
    out = tmp_path / "run"
    finetune(tiny, out, "--precision", "bf16-true", "--max_steps", "1")
    proc = finetune(tiny, out, "--resume", "true", "--precision", "32-true", "--max_steps", "2")
    assert "resumed from step 1" in proc.stderr
    state = load_file(out / "checkpoints" / "step-000002" / "state-rank0.safetensors")
    moments = {k: v for k, v in state.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert moments and all(v.dtype == torch.float32 and v.isfinite().all() for v in moments.values())


def test_a_resume_trains_at_its_own_learning_rate(tiny, tmp_path):
    """The remedy a non-finite loss suggests, a lower --learning_rate and --resume, must take effect: resumed at
    1e-12, AdamW (whose step is about lr per weight) leaves the weights where the checkpoint had them; at the
    checkpoint's own 3e-2 they would move by about 1e-2. A warmup that outlasts the run is warned about."""
    out = tmp_path / "run"
    finetune(tiny, out, "--max_steps", "3")
    before = weights(out / "lit_model_lora.pth")
    proc = finetune(tiny, out, "--resume", "true", "--learning_rate", "1e-12", "--min_lr", "0", "--warmup_steps", "6")
    assert "resumed from step 3" in proc.stderr and "--warmup_steps 6 is not below --max_steps 6" in proc.stderr
    after = weights(out / "lit_model_lora.pth")
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-9


class RunsCode:
    """A pickle that runs code when it is loaded: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_resume_past_a_damaged_checkpoint_replaces_it_and_a_run_without_one_is_told_to_start_again(tiny, tmp_path):
    """A power loss can leave a checkpoint renamed complete with its meta.json empty: --resume goes back to the one
    before it and, at that step, replaces it with its own (the rename had failed with a traceback), ending where
    an uninterrupted run ends. A run stopped before its first checkpoint cannot be resumed, and a fresh start
    into its directory is refused ("holds an earlier run"): --resume now points to --overwrite, not back."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune(tiny, straight)
    shutil.copytree(straight, resumed)
    (resumed / "checkpoints" / "step-000006" / "meta.json").write_text("")
    (resumed / "lit_model_lora.pth").unlink()
    proc = finetune(tiny, resumed, "--resume", "true")
    assert "resumed from step 3" in proc.stderr
    assert json.loads((resumed / "checkpoints" / "step-000006" / "meta.json").read_text())["step"] == 6
    assert_same(weights(straight / "lit_model_lora.pth"), weights(resumed / "lit_model_lora.pth"))

    for name in ("checkpoints", "lit_model_lora.pth", "summary.json"):  # what a run killed at its first step left
        shutil.rmtree(resumed / name) if name == "checkpoints" else (resumed / name).unlink()
    assert_user_error(refused(tiny, resumed, "--resume", "true"), "no complete checkpoint",
                      "start the run again with --overwrite true")


def test_resume_never_unpickles_what_the_run_directory_holds(tiny, tmp_path):
    """Whatever a checkpoint directory holds, --resume reads only safetensors and JSON: planted pickles (the
    `.metadata` torch's distributed checkpoint reads with pickle, a tensor file) never run."""
    import pickle

    out, marker = tmp_path / "run", tmp_path / "code-ran"
    finetune(tiny, out)
    last = out / "checkpoints" / "step-000006"
    for name in (".metadata", "__0_0.distcp", "rng-0.pt", "meta.pt"):
        (last / name).write_bytes(pickle.dumps(RunsCode(marker)))
    proc = finetune(tiny, out, "--resume", "true", "--max_steps", "7")
    assert "resumed from step 6" in proc.stderr and not marker.exists()

    for name in os.listdir(last):  # an old-format (pickled) checkpoint alone: refused in one line, nothing run
        if not name.startswith((".metadata", "__0_0")):
            os.remove(last / name)
    shutil.rmtree(out / "checkpoints" / "step-000007")
    assert_user_error(finetune(tiny, out, "--resume", "true", "--max_steps", "8", check=False), "unpickles")
    assert not marker.exists()


def test_killed_runs_resume_from_last_complete_checkpoint(tiny, tmp_path):
    """SIGKILL mid-run, plus what a kill mid-write leaves (a partial checkpoint directory and weights file): --resume
    continues from the last complete checkpoint and ends with the weights of a run never interrupted. The schedule is
    flat (--min_lr = --learning_rate), so that run can stop at the same step without changing its learning rates."""
    out, flags = tmp_path / "run", ("--min_lr", "3e-2", "--save_interval", "2", "--eval_interval", "1000000")
    args = [sys.executable, str(ROOT / "finetune/lora.py"), "--checkpoint_dir", str(tiny["ckpt"]), "--data",
            str(tiny["data"]), "--out_dir", str(out), *COMMON, *flags, "--max_steps", "1000000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 300  # however slow the machine: wait for checkpoints past step 4, then kill
    saved = lambda: [int(d.name[5:]) for d in (out / "checkpoints").glob("step-*") if d.name[5:].isdigit()]  # noqa: E731
    while max(saved(), default=0) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert saved(), "no checkpoint within 5 minutes"
    proc.send_signal(signal.SIGKILL)  # killed during training, wherever it is
    proc.wait()
    # What a kill during a checkpoint write leaves behind: a partial .tmp directory and a partial weights file.
    partial = out / "checkpoints" / "step-999998.tmp"
    partial.mkdir()
    (partial / "meta.json").write_text('{"step": 99')
    (out / ".lit_model_lora.pth.x.tmp").write_bytes(b"PK\x03\x04 truncated")
    step = max(saved())
    done = finetune(tiny, out, *flags, "--resume", "true", "--max_steps", str(step + 2))
    assert f"resumed from step {step}" in done.stderr
    finetune(tiny, tmp_path / "uninterrupted", *flags, "--max_steps", str(step + 2))
    assert_same(weights(out / "lit_model_lora.pth"), weights(tmp_path / "uninterrupted" / "lit_model_lora.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tiny, tmp_path, strategy):
    """Same global batch, same data order: 2 processes (gloo) save the weights one process saves. Micro batches of
    1 sample: one process accumulates 4 a step, each of two accumulates 2 (DDP syncs on the last, FSDP on each)."""
    one, two = tmp_path / "one", tmp_path / "two"
    finetune(tiny, one, "--lora_dropout", "0", "--micro_batch_size", "1")
    proc = finetune(tiny, two, "--lora_dropout", "0", "--micro_batch_size", "1", "--devices", "2",
                    "--strategy", strategy)
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    newest = sorted((two / "checkpoints").glob("step-*"))[-1]  # DDP's replicas are alike: rank 0's tensors alone
    tensors = ["state-rank0.safetensors", "state-rank1.safetensors"][:2 if strategy == "fsdp" else 1]
    assert sorted(p.name for p in newest.iterdir()) == sorted(["meta.json", "state-rank0.json", "state-rank1.json",
                                                                *tensors])
    assert_same(weights(one / "lit_model_lora.pth"), weights(two / "lit_model_lora.pth"), atol=1e-5)


@pytest.mark.parametrize("base", [(), ("--quantize", "nf4")], ids=["lora", "qlora"])
def test_compiled_blocks_train_to_the_same_weights(tiny, tmp_path, monkeypatch, base):
    """--compile: inductor's generated kernels (an implementation of the same ops outside litft) reach the
    weights the eager run reaches, to float rounding; with an NF4 base too (whose dequantization stays eager)."""
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX"), "g++", "clang++") if cxx):
        pytest.skip("no C++ compiler for inductor here; the next test checks the one-line error such a machine gets")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    finetune(tiny, eager, "--lora_dropout", "0", *base)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    finetune(tiny, compiled, "--lora_dropout", "0", "--compile", "true", *base)
    assert any((tmp_path / "inductor").rglob("*.py")), "no kernels were generated: the blocks did not compile"
    assert_same(weights(eager / "lit_model_lora.pth"), weights(compiled / "lit_model_lora.pth"), atol=1e-4)


def test_compile_on_a_cpu_without_a_cpp_compiler_is_one_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ to be found
    assert_user_error(finetune(tiny, tmp_path / "run", "--compile", "true", check=False), "--compile", "C++ compiler")
    assert not (tmp_path / "run" / "lit_model_lora.pth").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--batch_size", "5"], ["--batch_size 5", "--micro_batch_size 2"]),
    (["--resume", "true"], ["--resume", "no complete checkpoint", "run without --resume to start"]),
    (["--seed=-1"], ["--seed -1: must be between 0 and 4294967295"]),  # had been numpy's traceback
    (["--precision", "16-true"], ["--precision 16-true: AdamW's eps (1e-8) is 0 in float16"]),  # NaN at step 1
    (["--seed", str(2**32 - 1), "--devices", "2"], [f"--seed {2**32 - 1}: must be between 0 and {2**32 - 2}"]),
    (["--lora_targets", "q,banana"], ["unknown LoRA target", "banana"]),
    (["--micro_batch_size", "x"], ["--micro_batch_size: expected an integer or one of 'auto', got 'x'"]),
])
def test_user_errors_are_one_line(tiny, tmp_path, args, fragments):
    assert_user_error(refused(tiny, tmp_path / "run", *args), *fragments)


def test_a_run_gone_non_finite_names_a_finite_checkpoint(tiny, tmp_path):
    """A step that goes non-finite ends the run in one line naming the last good checkpoint, and it is good: every
    weight in it is finite. At lr 1e30 step 1 leaves huge but finite weights, and step 2's loss is NaN."""
    out, what = tmp_path / "run", "loss became nan at step 2"
    proc = finetune(tiny, out, "--learning_rate", "1e30", "--grad_clip", "0", "--save_interval", "1", check=False)
    assert_user_error(proc, what, "last good checkpoint")
    named = re.search(r"last good checkpoint: (\S+)", proc.stderr).group(1)
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert [str(d) for d in saved[-1:]] == ([named] if named != "none" else [])
    for checkpoint in saved:
        state = load_file(checkpoint / "state-rank0.safetensors")
        assert all(v.isfinite().all() for k, v in state.items() if k.startswith("param:")), checkpoint.name
    if named == "none":
        assert not (out / "lit_model_lora.pth").exists()


def test_16_mixed_is_refused_only_without_a_gpu(tmp_path, monkeypatch):
    """On a CPU Lightning runs --precision 16-mixed as bf16-mixed while hyperparameters.yaml says 16-mixed; refused
    there, before anything is converted or prepared (validate), and accepted where a GPU is."""
    from litft.errors import UserError
    from litft.train_args import TrainArgs

    args = TrainArgs(precision="16-mixed", out_dir=tmp_path / "run", micro_batch_size=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--precision 16-mixed: fp16 autocast needs a GPU"):
        args.validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args.validate()


def test_weights_gone_non_finite_are_saved_as_neither_weights_file_nor_checkpoint(tmp_path):
    """An update that is itself NaN (fp16 AdamW's 0 / 0, refused as --precision 16-true) leaves a finite loss and
    gradients: the save finds the weights, and the run stops without writing them."""
    from lightning.fabric import Fabric

    from litft.errors import UserError
    from litft.train import Loop
    from litft.train_args import TrainArgs
    from litft.train_state import State

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = torch.nn.Linear(3, 2)
    loop = Loop(fabric=fabric, model=model, raw=model, optimizer=torch.optim.AdamW(model.parameters()),
                scheduler=None, loss_fn=None, args=TrainArgs(out_dir=tmp_path), method=None, tokenizer=None,
                style=None, val_data=[], run_id="r")
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(UserError, match="the weights became non-finite at step 3; last good checkpoint: none"):
        loop.save(State(step=3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_non_finite_gradient_stops_before_adamw_steps(tmp_path, grad_clip):
    """The gradient norm is checked before AdamW's step (with --grad_clip 0 too, whose gradients stay exactly as
    they are): an infinite gradient would make the weights NaN, and the next checkpoint would hold them."""
    from lightning.fabric import Fabric

    from litft.errors import UserError
    from litft.train import Loop
    from litft.train_args import TrainArgs
    from litft.train_state import State

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    loop = Loop(fabric=fabric, model=model, raw=model, optimizer=optimizer, scheduler=None, loss_fn=None,
                args=TrainArgs(out_dir=tmp_path, grad_clip=grad_clip), method=None, tokenizer=None, style=None,
                val_data=[], run_id="r")
    model.weight.grad, model.bias.grad = torch.full((2, 3), 1e-3), torch.tensor([2e-3, -1e-3])
    grads = [p.grad.clone() for p in model.parameters()]
    loop.clip_gradients(State(step=4))
    if not grad_clip:
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    model.bias.grad[0] = math.inf
    with pytest.raises(UserError, match="the gradient norm became inf at step 5; last good checkpoint: none"):
        loop.clip_gradients(State(step=4))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_lora_trains_over_a_float16_checkpoint(tiny, tmp_path, precision):
    """Llama 2's checkpoints are stored in fp16. LoRA weights made in the base's dtype stepped to NaN at once: B
    starts at 0, so A's first gradient is 0, and AdamW's eps (1e-8) is 0 in fp16, so its update was 0 / 0. As peft
    keeps adapters over a 16-bit base in fp32 (autocast_adapter_dtype), a run trains them in fp32."""
    ckpt = tmp_path / "fp16"
    shutil.copytree(tiny["ckpt"], ckpt)
    torch.save({k: v.half() for k, v in weights(ckpt / "lit_model.pth").items()}, ckpt / "lit_model.pth")
    finetune({**tiny, "ckpt": ckpt}, tmp_path / "out", "--precision", precision, "--max_steps", "3")
    losses = [value for h in history(tmp_path / "out") for key, value in h.items() if key != "step"]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)  # 3 steps, 1 validation
    assert {v.dtype for v in weights(tmp_path / "out" / "lit_model_lora.pth").values()} == {torch.float32}


def test_two_full_fine_tuning_steps_equal_transformers_with_torchs_clipping_adamw_and_cosine(tiny, tmp_path):
    """Truth: transformers' LlamaForCausalLM (token-weighted loss over the batch), torch's clip_grad_norm_ and
    AdamW with the Trainer's decay rule (matrices decay, norm weights not), and transformers' cosine schedule. Four
    samples of different lengths are the whole training split, so both steps see the same batch, here in two micro
    batches (accumulated token-weighted); the second step runs at half the rate. The gradient norms TensorBoard
    logs are torch's, before clipping. (AdamW's betas barely show in two
    steps on one batch: its moments then hold the gradient and its square whatever they are.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from litft.convert_hf import lit_to_hf_state_dict
    from litft.data import collate

    transformers = pytest.importorskip("transformers")
    rows = [{"instruction": f"colour {i}" + " blue" * i, "input": "", "output": "red " * (1 + i)} for i in range(4)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "val.json").write_text(json.dumps(rows[:1]))
    run_script("data_prep/json_data.py", "--data_file", tmp_path / "train.json", "--val_file", tmp_path / "val.json",
               "--destination_path", tmp_path / "data", "--checkpoint_dir", tiny["ckpt"], "--prompt_style", "plain",
               check=True)
    run_script("finetune/full.py", "--checkpoint_dir", tiny["ckpt"], "--data", tmp_path / "data", "--out_dir",
               tmp_path / "out", "--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2",
               "--learning_rate", "1e-2", "--weight_decay", "0.1", "--grad_clip", "0.5", "--warmup_steps", "0",
               "--eval_interval", "100", "--save_interval", "100", "--precision", "32-true", check=True)

    base = load_lit_model(tiny["ckpt"], dtype=torch.float32)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base.config.to_hf_config()))
    hf.load_state_dict(lit_to_hf_state_dict(base.state_dict()), strict=False)
    hf.tie_weights()
    decayed = [p for p in hf.parameters() if p.dim() == 2]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1},
                                   {"params": [p for p in hf.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95))
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=2)
    x, y = collate(torch.load(tmp_path / "data" / "train.pt", weights_only=True), pad_id=0)
    norms = []
    for _ in range(2):
        hf(input_ids=x, labels=y).loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5).item())  # the norm before clipping
        optimizer.step(), schedule.step(), optimizer.zero_grad()
    logged = EventAccumulator(str(next((tmp_path / "out" / "logs").rglob("events.out.tfevents.*")))).Reload()
    assert [e.value for e in logged.Scalars("train/grad_norm")] == pytest.approx(norms, rel=1e-4)
    ours, theirs = weights(tmp_path / "out" / "lit_model.pth"), lit_state_of(hf)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():  # updates are ~1e-2: a wrong decay group, clip or rate shows at once
        torch.testing.assert_close(tensor, theirs[name], atol=1e-4, rtol=0, msg=name)
    assert max((v - base.state_dict()[k]).abs().max() for k, v in ours.items()) > 5e-3


def lit_state_of(hf) -> dict[str, torch.Tensor]:
    """transformers' weights under litft's names (its tied lm_head left out, as litft saves it)."""
    from litft.convert_hf import hf_to_lit_name

    return {hf_to_lit_name(k): v.detach() for k, v in hf.state_dict().items()
            if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}


def test_bf16_true_warns_how_many_weights_a_step_of_the_learning_rate_leaves_unchanged(tiny, tmp_path):
    """bf16 keeps 8 significant bits: AdamW's first step (±lr, its moments being the gradient's) rounds away on a
    weight more than ~256 × lr in size. Truth: the weights one real full fine-tuning step left unchanged; the
    warning's share is at most that (a zero gradient, or a step down at a power of two, adds a few)."""
    flags = ("--learning_rate", "2e-5", "--max_steps", "1", "--warmup_steps", "0", "--save_interval", "1")
    proc = finetune(tiny, tmp_path / "true", "--precision", "bf16-true", *flags, script="finetune/full.py")
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("warning: under --precision bf16-true")]
    warned = float(re.search(r"leaves ([\d.]+)% of the trained weights unchanged", line).group(1))
    before = {k: v.to(torch.bfloat16) for k, v in weights(tiny["ckpt"] / "lit_model.pth").items()}
    after = weights(tmp_path / "true" / "lit_model.pth")
    same = sum(int((after[k] == v).sum()) for k, v in before.items())
    unchanged = 100 * same / sum(v.numel() for v in before.values())
    assert 30 < warned <= unchanged + 1, (warned, unchanged)  # measured: 42.8 % and 42.8 %
    mixed = finetune(tiny, tmp_path / "mixed", "--precision", "bf16-mixed", *flags, script="finetune/full.py")
    assert "warning: under --precision" not in mixed.stderr  # fp32 copies: every step counts


def test_a_resumed_16_mixed_run_keeps_its_loss_scale(tmp_path):
    """Under 16-mixed torch's GradScaler halves the loss scale at each step whose gradients overflow (and skips it),
    and doubles it only after 2000 good steps: a resume that started again from 65536 would skip those steps again.
    torch's GradScaler for the CPU stands in for the GPU's (Fabric itself runs 16-mixed as bf16 on a CPU)."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    from litft.train_state import State, load, save

    def fresh_run():
        scaler = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[scaler])
        linear = torch.nn.Linear(3, 2)
        model, optimizer = fabric.setup(linear, torch.optim.AdamW(linear.parameters()))
        return fabric, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    fabric, model, optimizer, scheduler = fresh_run()
    for _ in range(2):  # two overflowing steps
        fabric.backward(model(torch.ones(1, 3)).sum() * math.inf)
        optimizer.step()
        optimizer.zero_grad()
    assert fabric.strategy.precision.scaler.get_scale() == 65536 / 4
    save(fabric, model, optimizer, scheduler, State(step=2), tmp_path, run_id="r")
    fabric, model, optimizer, scheduler = fresh_run()
    load(fabric, model, optimizer, scheduler, tmp_path, run_id="r")
    assert fabric.strategy.precision.scaler.get_scale() == 65536 / 4


@pytest.mark.parametrize("script", ["finetune/lora.py", "finetune/full.py"])
def test_the_plain_path_trains_what_the_fast_path_trains(tiny, tmp_path, script):
    """--fast false (litft/loss.py and LoRALinear as written) against the default fast path (litft/fast: the chunked
    loss, fused LoRA layers): without dropout the same computation in another order. The first step's loss agrees
    to fp32 rounding; later steps drift only as far as Adam amplifies that rounding (at --learning_rate 3e-2, 0.1 %).
    Each path is checked against transformers and PEFT in test_lora.py and test_convert_hf.py."""
    extra = ("--lora_dropout", "0") if "lora" in script else ()
    finetune(tiny, tmp_path / "fast", *extra, script=script)
    finetune(tiny, tmp_path / "plain", *extra, "--fast", "false", script=script)
    fast, plain = (history(tmp_path / run) for run in ("fast", "plain"))
    assert [h.keys() for h in fast] == [h.keys() for h in plain] and len(fast) == 8  # 6 steps, 2 validations
    assert abs(fast[0]["train_loss"] - plain[0]["train_loss"]) < 1e-5
    for a, b in zip(fast, plain):
        for key in a.keys() - {"step"}:
            assert a[key] == pytest.approx(b[key], rel=1e-3), (a, b)
