"""A run directory's lifecycle, run as a user runs finetune/*.py (subprocesses on the tiny model).

What is checked is what a user sees and keeps: a used out_dir is refused unless --overwrite (which removes the old
run's files and nothing else), a --resume that asks for another run (or another strategy, or no step more) is
refused before any file changes, the rotation of checkpoints spares other runs' and a resume never continues
theirs, a run killed in its last save resumes to its last step's weights, weights are saved without validation
data, data from another tokenizer is refused, every bad flag value is one line, and Ctrl-C is
`error: interrupted` with exit 130.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, assert_user_error, run_script
from test_train import COMMON, assert_same, finetune, refused, tiny, weights  # noqa: F401 — `tiny` is a fixture

from litft import train_state
from litft.errors import UserError


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` with its size and modification time: equal snapshots, nothing touched."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done_run(tiny, tmp_path_factory) -> Path:
    """A finished 6-step LoRA run (checkpoints at steps 3 and 6); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("done") / "run"
    finetune(tiny, out)
    return out


def copy_run(done_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(done_run, out)
    return out


# ---- class 2 + 3: fresh, overwrite, resume -----------------------------------------------------------------------


def killed_run(out: Path) -> None:
    """What a run killed after its first checkpoint leaves: run files and checkpoints/, no final weights."""
    for name in ("lit_model_lora.pth", "summary.json", "loss.png"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "step-000006")


def only_an_orphan(out: Path) -> None:
    """Only the temporary file of a killed weights save is left."""
    (out / ".lit_model_lora.pth.k3x9.tmp").write_bytes(b"PK\x03\x04 truncated")
    for p in list(out.iterdir()):
        if not p.name.endswith(".tmp"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.mark.parametrize("leave", [lambda out: None, killed_run, only_an_orphan],
                         ids=["finished-run", "killed-run", "orphaned-tmp-file"])
def test_a_fresh_run_into_a_used_out_dir_is_refused_untouched(tiny, done_run, tmp_path, leave):
    out = copy_run(done_run, tmp_path)
    leave(out)
    before = snapshot(out)
    proc = finetune(tiny, out, "--max_steps", "2", check=False)
    assert_user_error(proc, f"--out_dir {out} holds an earlier run", "--resume true", "--overwrite true")
    assert snapshot(out) == before


def test_overwrite_replaces_the_run_and_keeps_everything_else(tiny, done_run, tmp_path):
    out = copy_run(done_run, tmp_path)
    kept = {"notes.txt": "my notes", "eval/answers.jsonl": "{}", "checkpoints/README": "mine", "logs/mine.txt": "x"}
    for name, text in kept.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    (out / "checkpoints" / "step-000005.tmp").mkdir()  # a killed save's directory
    events = {p.name for p in (out / "logs").glob("events.out.tfevents.*")}
    assert events
    proc = finetune(tiny, out, "--overwrite", "true", "--max_steps", "2", "--save_interval", "1", "--lora_r", "4")
    assert "removing the earlier run's files" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["README", "step-000001", "step-000002"]
    assert all((out / name).read_text() == text for name, text in kept.items())
    assert yaml.safe_load((out / "lora.yaml").read_text())["r"] == 4
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert not events & {p.name for p in (out / "logs").glob("events.out.tfevents.*")}  # TensorBoard shows one run


def other_base(tiny, tmp_path: Path) -> list[str]:
    """A copy of the base whose weights differ: another fingerprint."""
    base = tmp_path / "other-base"
    shutil.copytree(tiny["ckpt"], base)
    state = torch.load(base / "lit_model.pth", weights_only=True)
    state["blocks.0.attn.q_proj.weight"] += 1e-3
    torch.save(state, base / "lit_model.pth")
    return ["--checkpoint_dir", str(base)]


def other_data(tiny, tmp_path: Path) -> list[str]:
    """The same data with one answer changed: another data fingerprint."""
    data = tmp_path / "other-data"
    shutil.copytree(tiny["data"], data)
    samples = torch.load(data / "train.pt", weights_only=True)
    samples[0]["labels"][-2] = samples[0]["input_ids"][-2] = 7
    torch.save(samples, data / "train.pt")
    return ["--data", str(data)]


def other_prompt_style(tiny, tmp_path: Path) -> list[str]:
    """The same samples with another prompt style recorded (generation would prompt unlike training): the data
    fingerprint covers prompt_style.yaml."""
    data = tmp_path / "other-style"
    shutil.copytree(tiny["data"], data)
    (data / "prompt_style.yaml").write_text(yaml.safe_dump({"name": "alpaca"}))
    return ["--data", str(data)]


@pytest.mark.parametrize("change, named", [
    (lambda tiny, tmp: ["--lora_r", "16"], "--lora_r 8, this run has --lora_r 16"),
    (lambda tiny, tmp: ["--lora_targets", "q,v"], "this run has --lora_targets q,v;"),
    (lambda tiny, tmp: ["--lora_alpha", "4"], "--lora_alpha 16.0, this run has --lora_alpha 4.0"),
    (lambda tiny, tmp: ["--quantize", "nf4"], "--quantize None, this run has --quantize nf4"),
    (lambda tiny, tmp: ["--micro_batch_size", "1"], "--micro_batch_size 2, this run has --micro_batch_size 1"),
    (lambda tiny, tmp: ["--seed", "7"], "--seed 1337"),
    (lambda tiny, tmp: ["--packing", "true"], "--packing False, this run has --packing True"),
    (other_base, "this run has base"),
    (other_data, "this run has data"),
    (other_prompt_style, "this run has data"),
    (lambda tiny, tmp: ["--devices", "2", "--strategy", "ddp"],
     "1 process (--devices × --num_nodes), this run has 2 processes"),
], ids=["lora_r", "lora_targets", "lora_alpha", "quantize", "micro_batch_size", "seed", "packing", "other-base",
        "other-data", "other-prompt-style", "processes"])
def test_a_resume_that_asks_for_another_run_is_refused_untouched(tiny, done_run, tmp_path, change, named):
    out = copy_run(done_run, tmp_path)
    before = snapshot(out)
    proc = finetune(tiny, out, "--resume", "true", "--max_steps", "9", *change(tiny, tmp_path), check=False)
    assert_user_error(proc, f"--resume: {out} was started with", named, "run.yaml")
    assert snapshot(out) == before


def test_a_resume_with_another_method_is_refused_untouched(tiny, done_run, tmp_path):
    out = copy_run(done_run, tmp_path)
    before = snapshot(out)
    proc = finetune(tiny, out, "--resume", "true", "--start_layer", "0", script="finetune/adapter.py", check=False)
    assert_user_error(proc, "method lora, this run has method adapter")
    assert snapshot(out) == before


def test_resume_removes_orphans_and_rotation_spares_other_runs(tiny, done_run, tmp_path):
    """A resume on a copy of the base (another path, the same fingerprint) goes ahead, and with
    --micro_batch_size auto it takes the size the run started with (2, where auto alone would pick 4 of the batch
    of 4); the temporary files of a killed save are gone; it continues from this run's step 6, not from the later
    step 8 another run wrote, and the rotation deletes this run's step 3 but not that other run's checkpoint."""
    out = copy_run(done_run, tmp_path)
    foreign = out / "checkpoints" / "step-000008"
    shutil.copytree(out / "checkpoints" / "step-000006", foreign)
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps({**meta, "step": 8, "run_id": "another-run"}))
    orphans = [out / ".lit_model_lora.pth.a1b2.tmp", out / ".summary.json.c3d4.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"partial")
    (out / "checkpoints" / "step-000007.tmp").mkdir()
    base = tmp_path / "moved-base"
    shutil.copytree(tiny["ckpt"], base)

    proc = finetune(tiny, out, "--resume", "true", "--max_steps", "9", "--checkpoint_dir", base,
                    "--micro_batch_size", "auto")
    assert "resumed from step 6" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008", "step-000009"]
    assert not any(orphan.exists() for orphan in orphans)


def test_another_runs_later_checkpoint_does_not_count_as_this_runs_progress(tiny, done_run, tmp_path):
    """Another run's step 8 lies past --max_steps 7, this run's newest is step 6: the resume goes on to step 7."""
    out = copy_run(done_run, tmp_path)
    foreign = out / "checkpoints" / "step-000008"
    shutil.copytree(out / "checkpoints" / "step-000006", foreign)
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps({**meta, "step": 8, "run_id": "another-run"}))
    proc = finetune(tiny, out, "--resume", "true", "--max_steps", "7")
    assert "resumed from step 6" in proc.stderr
    assert (out / "checkpoints" / "step-000007").is_dir() and foreign.is_dir()


def test_removing_a_run_removes_checkpoints_and_logs_only_when_nothing_else_is_in_them(tmp_path):
    from litft.run_dir import remove

    for folder, mine in (("checkpoints", None), ("logs", "mine.txt")):
        (tmp_path / folder / "step-000001").mkdir(parents=True)
        (tmp_path / folder / "step-000001" / "meta.json").write_text("{}")
        if mine:
            (tmp_path / folder / mine).write_text("the user's")
        remove([tmp_path / folder / "step-000001"])
        if mine:
            assert [p.name for p in (tmp_path / folder).iterdir()] == [mine]
        else:
            assert not (tmp_path / folder).exists()


def test_a_new_run_with_micro_batch_size_auto_trains_and_records_the_size_it_picked(tiny, tmp_path):
    """The README's `--micro_batch_size auto` on a fresh run: the plan names the size, run.yaml keeps it."""
    out = tmp_path / "auto"
    proc = finetune(tiny, out, "--micro_batch_size", "auto", "--max_steps", "1")
    assert "micro batch 4 × " in proc.stderr, proc.stderr
    assert yaml.safe_load((out / "run.yaml").read_text())["must_match"]["micro_batch_size"] == 4


def test_a_resume_past_max_steps_is_refused_and_one_at_it_writes_the_summary(tiny, done_run, tmp_path):
    """A finished 6-step run resumed with --max_steps 4 is past it: one line saying where the run is, and nothing
    touched. Resumed with --max_steps 6, as a run killed after its last checkpoint but before its summary is: no
    step is trained, the weights file stays the last step's, and summary.json is written."""
    out = copy_run(done_run, tmp_path)
    before = snapshot(out)
    proc = refused(tiny, out, "--resume", "true", "--max_steps", "4")
    assert_user_error(proc, f"--resume: {out} is at step 6 already (step-000006), past --max_steps 4",
                      "pass a larger --max_steps")
    assert snapshot(out) == before
    (out / "summary.json").unlink()
    proc = finetune(tiny, out, "--resume", "true", "--max_steps", "6")
    assert "nothing left to train" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert_same(weights(done_run / "lit_model_lora.pth"), weights(out / "lit_model_lora.pth"))


def test_a_run_yaml_without_a_run_id_is_refused_in_one_line(tiny, done_run, tmp_path):
    out = copy_run(done_run, tmp_path)
    record = yaml.safe_load((out / "run.yaml").read_text())
    del record["run_id"]
    (out / "run.yaml").write_text(yaml.safe_dump(record))
    assert_user_error(refused(tiny, out, "--resume", "true", "--max_steps", "9"), "records no run_id",
                      "--overwrite true")


def test_a_resume_that_fails_to_load_leaves_the_run_as_it_was(tiny, done_run, tmp_path):
    """A damaged checkpoint shows only when it loads, after the model: refused in one line, and the run's record
    (hyperparameters.yaml, run.yaml, ...) still says what the run was trained with, not the refused flags."""
    out = copy_run(done_run, tmp_path)
    state = out / "checkpoints" / "step-000006" / "state-rank0.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    before = snapshot(out)
    proc = refused(tiny, out, "--resume", "true", "--max_steps", "9", "--learning_rate", "1e-3")
    assert_user_error(proc, "step-000006 is damaged", "remove it")
    assert snapshot(out) == before


def test_a_resume_with_another_strategy_is_refused_untouched(tiny, done_run, tmp_path):
    """A checkpoint holds whole tensors (one process, DDP) or each process's FSDP shards, and one strategy cannot
    load the other's: refused in one line before anything loads (the way back from FSDP:
    tests/test_train.py::test_resume_is_bit_identical[fsdp-two-processes])."""
    out = copy_run(done_run, tmp_path)
    before = snapshot(out)
    proc = refused(tiny, out, "--resume", "true", "--max_steps", "9", "--strategy", "fsdp")
    assert_user_error(proc, "step-000006 holds whole tensors, which --strategy fsdp cannot load",
                      "the --strategy the run started with")
    assert snapshot(out) == before


KILLED = """
import os, runpy, sys
from litft import train, train_state

module, name = {where}
real, calls = getattr(module, name), []

def killed(*args, **kwargs):
    calls.append(None)
    if len(calls) == 2:  # the save at step 6 of 6 (one every 3 steps)
        os._exit(137)  # as SIGKILL: nothing after this point runs
    return real(*args, **kwargs)

setattr(module, name, killed)
sys.argv[0] = {script!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("writing", ["weights-file", "checkpoint"])
def test_a_run_killed_in_its_last_save_resumes_to_its_last_steps_weights(tiny, done_run, tmp_path, writing):
    """Killed as the final save (step 6) begins writing the weights file, or the checkpoint: the newest checkpoint is
    never of a later step than the weights file, so --resume goes on from step 3 and ends with the weights of the
    run never killed (done_run), not with step 3's left in place."""
    where = "train, 'save_state_dict'" if writing == "weights-file" else "train_state, 'save'"
    (tmp_path / "killed.py").write_text(KILLED.format(where=where, script=str(ROOT / "finetune/lora.py")))
    out = tmp_path / "run"
    proc = run_script(tmp_path / "killed.py", "--checkpoint_dir", tiny["ckpt"], "--data", tiny["data"], "--out_dir",
                      out, *COMMON)
    assert proc.returncode == 137, proc.stderr[-3000:]
    resumed = finetune(tiny, out, "--resume", "true")
    assert "resumed from step 3" in resumed.stderr
    assert_same(weights(out / "lit_model_lora.pth"), weights(done_run / "lit_model_lora.pth"))


# ---- class 4: no validation data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_val_data(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("noval")
    rows = [{"instruction": f"colour {i}", "input": "", "output": "red"} for i in range(24)]
    (root / "rows.json").write_text(json.dumps(rows))
    run_script("data_prep/json_data.py", "--data_file", root / "rows.json", "--destination_path", root / "data",
               "--checkpoint_dir", tiny["ckpt"], "--max_seq_length", "48", "--prompt_style", "plain",
               "--val_split_fraction", "0", check=True)
    return root / "data"


@pytest.mark.parametrize("script, weights_file", [("finetune/lora.py", "lit_model_lora.pth"),
                                                  ("finetune/full.py", "lit_model.pth")], ids=["lora", "full"])
def test_an_empty_validation_split_trains_and_saves(tiny, no_val_data, tmp_path, script, weights_file):
    out = tmp_path / "run"
    proc = run_script(script, "--checkpoint_dir", tiny["ckpt"], "--data", no_val_data, "--out_dir", out, *COMMON,
                      check=True)
    notes = [line for line in proc.stderr.splitlines() if "validation is skipped" in line]
    assert len(notes) == 1 and "test.pt holds no samples" in notes[0], proc.stderr
    assert weights(out / weights_file)
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


# ---- class 6: data of another tokenizer ---------------------------------------------------------------------------


def data_of_another_tokenizer(tiny, tmp_path: Path) -> Path:
    """Data prepared with a checkpoint whose tokenizer numbers its special tokens the other way round."""
    from conftest import tiny_bpe

    ckpt = tmp_path / "other-tokenizer"
    shutil.copytree(tiny["ckpt"], ckpt)
    tiny_bpe(["</s>", "<s>"]).save(str(ckpt / "tokenizer.json"))
    rows = [{"instruction": f"colour {i}", "input": "", "output": "red"} for i in range(24)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    run_script("data_prep/json_data.py", "--data_file", tmp_path / "rows.json", "--destination_path",
               tmp_path / "data", "--checkpoint_dir", ckpt, "--max_seq_length", "48", "--prompt_style", "plain",
               check=True)
    return tmp_path / "data"


def data_with_an_id_beyond_the_vocabulary(tiny, tmp_path: Path, token_id: int = 300) -> Path:
    """Data without a tokenizer record (prepared before it was kept) holding an id the tiny model lacks (256)."""
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    samples = torch.load(data / "train.pt", weights_only=True)
    samples[3]["input_ids"][1] = token_id
    torch.save(samples, data / "train.pt")
    meta = json.loads((data / "meta.json").read_text())
    del meta["tokenizer"]
    (data / "meta.json").write_text(json.dumps(meta))
    return data


@pytest.mark.parametrize("make, fragments", [
    (data_of_another_tokenizer, ["was encoded by the tokenizer of", "prepare the data again with --checkpoint_dir"]),
    (data_with_an_id_beyond_the_vocabulary, ["train.pt holds token id 300", "outside the 256 ids"]),
    (lambda tiny, tmp: data_with_an_id_beyond_the_vocabulary(tiny, tmp, -3), ["train.pt holds token id -3"]),
], ids=["other-tokenizer", "id-beyond-vocabulary", "negative-id"])
def test_data_for_another_tokenizer_is_refused(tiny, tmp_path, make, fragments):
    data = make(tiny, tmp_path)
    proc = refused(tiny, tmp_path / "run", "--data", data)
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "run").exists()


# ---- class 8: flag values -------------------------------------------------------------------------------------------


def not_writable(tmp_path: Path) -> str:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return str(locked / "run")


FLAG_CASES = {
    "micro_batch_size-0": (["--micro_batch_size", "0"], ["--micro_batch_size 0", "at least 1"]),
    "micro_batch_size-negative": (["--micro_batch_size=-2"], ["--micro_batch_size -2", "at least 1"]),
    "batch_size-0": (["--batch_size", "0"], ["--batch_size 0", "at least 1"]),
    "batch_size-negative": (["--batch_size=-4"], ["--batch_size -4", "at least 1"]),
    "batch_size-not-a-multiple": (["--batch_size", "5"], ["--batch_size 5", "not a multiple"]),
    "learning_rate-0": (["--learning_rate", "0"], ["--learning_rate 0", "positive"]),
    "learning_rate-negative": (["--learning_rate=-1e-3"], ["--learning_rate -0.001", "positive"]),
    "learning_rate-nan": (["--learning_rate", "nan"], ["learning_rate"]),  # jsonargparse's own refusal
    "learning_rate-overflowing": (["--learning_rate", "1e38"], ["--learning_rate 1e+38", "overflows float32"]),
    "precision": (["--precision", "bogus"], ["--precision bogus", "bf16-mixed"]),
    "devices-0": (["--devices", "0"], ["--devices 0", "at least 1"]),
    "num_nodes-0": (["--num_nodes", "0"], ["--num_nodes 0", "at least 1"]),
    "max_seq_length-0": (["--max_seq_length", "0"], ["--max_seq_length 0", "at least 2"]),
    "max_seq_length-1": (["--max_seq_length", "1"], ["--max_seq_length 1", "at least 2"]),
    "warmup_steps-negative": (["--warmup_steps=-5"], ["--warmup_steps -5", "0 or more"]),
    "max_steps-0": (["--max_steps", "0"], ["--max_steps 0", "at least 1"]),
    "pad_to_multiple_of-0": (["--pad_to_multiple_of", "0"], ["--pad_to_multiple_of 0", "at least 1"]),
    "eval_interval-0": (["--eval_interval", "0"], ["--eval_interval 0", "at least 1"]),
    "save_interval-0": (["--save_interval", "0"], ["--save_interval 0", "at least 1"]),
    "resume-and-overwrite": (["--resume", "true", "--overwrite", "true"], ["--resume", "--overwrite", "choose one"]),
    "lora_r-0": (["--lora_r", "0"], ["r ≥ 1", "r=0"]),
    "lora_dropout-1": (["--lora_dropout", "1"], ["dropout < 1"]),
    "lora_alpha-negative": (["--lora_alpha=-1"], ["alpha > 0"]),
}


@pytest.mark.parametrize("args, fragments", FLAG_CASES.values(), ids=FLAG_CASES.keys())
def test_bad_flag_values_are_one_line_and_write_nothing(tiny, tmp_path, args, fragments):
    proc = finetune(tiny, tmp_path / "run", *args, check=False)
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "run").exists()


def test_the_smallest_allowed_values_are_accepted(tiny, tmp_path):
    """The other side of the boundaries above: --max_seq_length 2 (a token and EOS), --warmup_steps 0 and
    --min_lr equal to --learning_rate pass the checks."""
    from litft.train_args import TrainArgs

    TrainArgs(data=str(tiny["data"]), checkpoint_dir=tiny["ckpt"], out_dir=tmp_path / "run", max_seq_length=2,
              warmup_steps=0, min_lr=3e-4, learning_rate=3e-4).validate()
    assert not (tmp_path / "run").exists()


def test_sample_tokens_0_turns_the_sample_off(tiny, tmp_path):
    proc = finetune(tiny, tmp_path / "run", "--sample_tokens", "0", "--max_steps", "1")
    evaluations = [line for line in proc.stderr.splitlines() if "val loss" in line]
    assert len(evaluations) == 1 and "sample" not in evaluations[0], proc.stderr


def test_a_world_size_other_than_the_launchers_is_one_line(tiny, tmp_path):
    """torchrun started 4 processes (2 per node) while the flags say 2: without the check every process would wait
    for ranks that never come."""
    from litft.train_args import TrainArgs

    with pytest.raises(UserError, match=r"--devices 2 × --num_nodes 1 is 2 processes, but the launcher started 4 "
                                        r"\(WORLD_SIZE\); pass --devices 2 --num_nodes 2"):
        TrainArgs(devices=2).check_launcher({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    TrainArgs(devices=2, num_nodes=2).check_launcher({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    TrainArgs(devices=2).check_launcher({})  # no launcher: Fabric starts the processes itself
    with pytest.raises(UserError, match=r"--num_nodes 2 needs a launcher on each node \(torchrun, srun\)"):
        TrainArgs(num_nodes=2).check_launcher({})  # had waited for node 1 until the 30-minute rendezvous timeout
    TrainArgs(devices=8, num_nodes=2).check_launcher({"SLURM_NTASKS": "16"})  # srun: Fabric reads SLURM's variables
    TrainArgs(devices=8, num_nodes=2).check_launcher({"NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    env = {"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29599"}
    proc = run_script("finetune/lora.py", "--checkpoint_dir", tiny["ckpt"], "--data", tiny["data"], "--out_dir",
                      tmp_path / "run", *COMMON, "--devices", "2", "--strategy", "ddp", env=env)
    assert_user_error(proc, "--devices 2 × --num_nodes 1 is 2 processes", "started 3 (WORLD_SIZE)",
                      "pass --devices 3 --num_nodes 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where, fragments", [
    (lambda tiny, tmp: (tmp / "file").write_text("x") and str(tmp / "file"), ["is a file, not a directory"]),
    (lambda tiny, tmp: (tmp / "file").write_text("x") and str(tmp / "file" / "run"), ["is a file, not a directory"]),
    (lambda tiny, tmp: not_writable(tmp), ["is not writable"]),
    (lambda tiny, tmp: str(tiny["ckpt"]), ["is the base directory"]),
    (lambda tiny, tmp: str(tiny["data"]), ["is the data directory"]),
    (lambda tiny, tmp: str(tiny["data"].parent), ["contains --data"]),
], ids=["file", "under-a-file", "not-writable", "the-base", "the-data", "holds-the-data"])
def test_a_bad_out_dir_is_one_line_and_touches_nothing(tiny, tmp_path, where, fragments):
    out = where(tiny, tmp_path)
    around = Path(out).parent if Path(out).parent.exists() else tmp_path
    before = snapshot(around)
    assert_user_error(finetune(tiny, out, check=False), f"--out_dir {out}", *fragments)
    assert snapshot(around) == before


@pytest.mark.parametrize("args, fragments", [
    (["--prompt_length", "0"], ["--prompt_length must be at least 1"]),
    (["--start_layer=-1"], ["--start_layer must be >= 0"]),
    (["--start_layer", "9"], ["--start_layer 9", "2 layers", "pass --start_layer 1 or less"]),
], ids=["prompt_length-0", "start_layer-negative", "start_layer-beyond"])
def test_bad_adapter_flags_are_one_line(tiny, tmp_path, args, fragments):
    proc = refused(tiny, tmp_path / "run", *args, script="finetune/adapter.py")
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "run").exists()


# ---- class 10: Ctrl-C ------------------------------------------------------------------------------------------------


def written(out: Path) -> bool:
    return (out / "run.yaml").is_file()


def training(out: Path) -> bool:
    return any((out / "checkpoints").glob("step-*"))


def saving(out: Path) -> bool:
    """A save in progress (a .tmp of the checkpoint or the weights); after the first checkpoint, any moment."""
    return any((out / "checkpoints").glob("*.tmp")) or any(out.glob(".*.tmp")) or \
        len(list((out / "checkpoints").glob("step-*"))) >= 2


@pytest.mark.parametrize("moment", [written, training, saving], ids=["after-setup", "training", "saving"])
def test_ctrl_c_is_one_line_and_status_130(tiny, tmp_path, moment):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "finetune/lora.py"), "--checkpoint_dir", str(tiny["ckpt"]), "--data",
            str(tiny["data"]), "--out_dir", str(out), *COMMON, "--max_steps", "100000", "--save_interval", "1",
            "--eval_interval", "1000000"]
    log = tmp_path / "stderr.txt"
    # A terminal's Ctrl-C: SIGINT at its default in the run. A shell script's `cmd &` starts its jobs with SIGINT
    # ignored, and a child inherits that, but not a handler; so the test handles SIGINT while it starts the run.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(log, "w") as err:  # a file, not a pipe: a slow run's output can never fill a pipe and block it
        try:
            proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            deadline = time.time() + 180
            while not moment(out) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            proc.kill()  # a run that outlives a failed test would hold the cores for the rest of the suite
    stderr = log.read_text()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == ["error: interrupted"], stderr


def test_checkpoints_are_ordered_by_step_past_six_digits(tmp_path):
    """step-1000000 is newer than step-999999, though it sorts before it as text."""
    for step in (999_999, 1_000_000, 3):
        d = train_state.checkpoints_dir(tmp_path) / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / train_state.META).write_text(json.dumps({"step": step, "run_id": "r"}))
    assert train_state.latest(tmp_path, "r").name == train_state.latest(tmp_path).name == "step-1000000"
    assert [d.name for d in train_state.own_checkpoints(tmp_path, "r")] == ["step-000003", "step-999999",
                                                                             "step-1000000"]


def test_resume_finds_no_checkpoint_in_what_a_killed_save_or_an_old_format_leaves(tmp_path):
    """A save killed before its rename (step-*.tmp) or before meta.json, and torch's distributed checkpoint format
    (a `.metadata` file): none is a checkpoint to resume from, and each says what to do in one line."""
    checkpoints = train_state.checkpoints_dir(tmp_path)
    for name in ("step-000004.tmp", "step-000002"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "state-rank0.json").write_text("{}")
    (checkpoints / "step-000004.tmp" / train_state.META).write_text(json.dumps({"step": 4, "run_id": "r"}))
    with pytest.raises(UserError, match=rf"no complete checkpoint in {checkpoints}; run without --resume to start"):
        train_state.resumable(tmp_path)
    (tmp_path / "run.yaml").write_text("run_id: r\n")
    with pytest.raises(UserError, match=r"no complete checkpoint of run r \(the run_id in run.yaml\) in .*; start "
                                        r"the run again with --overwrite true"):
        train_state.resumable(tmp_path, "r")
    (checkpoints / "step-000002" / ".metadata").write_bytes(b"a pickle")
    with pytest.raises(UserError, match=r"step-000002 is in torch's distributed checkpoint format, which is not "
                                        r"loaded because reading it unpickles"):
        train_state.resumable(tmp_path, "r")
