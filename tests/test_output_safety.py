"""Commands never write over what they did not make: a fine-tuning run, prepared data or a checkpoint given as an
output is refused in one line before anything is written, and its files stay byte for byte as they were. Bad
numbers are refused the same way. The runs are real: finetune/*.py as tests/test_train.py runs them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_main
from test_train import finetune, tiny  # noqa: F401 (fixture)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):  # noqa: F811
    """A LoRA run, a full fine-tune and a copy of the base checkpoint, each as the commands leave them."""
    root = tmp_path_factory.mktemp("runs")
    steps = ("--max_steps", "1", "--eval_interval", "1", "--save_interval", "1")
    finetune(tiny, root / "lora", *steps)
    finetune(tiny, root / "full", *steps, script="finetune/full.py")
    shutil.copytree(tiny["ckpt"], root / "other_base")
    return {**tiny, "lora": root / "lora", "full": root / "full", "other_base": root / "other_base"}


def test_writing_over_another_kind_of_directory_is_refused(runs, tmp_path):
    lora, full, other_base = runs["lora"], runs["full"], runs["other_base"]
    before = {d: snapshot(d) for d in (lora, full, other_base, runs["data"])}
    assert_user_error(run_main("scripts/merge_lora.py", "--checkpoint_dir", runs["ckpt"], "--lora_path",
                               lora / "lit_model_lora.pth", "--out_dir", full, "--verify", "false"),
                      f"--out_dir {full} holds a fine-tuning run")
    (tmp_path / "rows.json").write_text('[{"instruction": "colour 1", "input": "", "output": "red"}]')
    for destination, kind in ((lora, "a fine-tuning run"), (other_base, "a checkpoint")):
        assert_user_error(run_main("data_prep/json_data.py", "--data_file", tmp_path / "rows.json",
                                   "--destination_path", destination, "--checkpoint_dir", runs["ckpt"]),
                          f"holds {kind}")
    assert_user_error(finetune(runs, other_base, check=False), f"--out_dir {other_base} holds a checkpoint")
    assert_user_error(run_main("scripts/evaluate.py", "--checkpoint_dir", runs["ckpt"], "--data", runs["data"],
                               "--out", runs["data"] / "train.pt"), "name a .json file")
    assert_user_error(run_main("scripts/evaluate.py", "--checkpoint_dir", runs["ckpt"], "--data", runs["data"],
                               "--out", runs["data"] / "meta.json"), "inside the data directory")
    (tmp_path / "a_file").write_text("not a directory")
    for out, fragment in ((other_base / "tokenizer.json", f"is inside a checkpoint ({other_base})"),
                          (lora / "summary.json", "exists and is not an evaluation report"),
                          (tmp_path / "a_file" / "report.json", f"{tmp_path / 'a_file'} is a file, not a directory")):
        # refused before the model loads: a report written at the end would have replaced a checkpoint's
        # tokenizer or a run's summary, or crashed with a traceback after the whole evaluation
        assert_user_error(run_main("scripts/evaluate.py", "--checkpoint_dir", runs["ckpt"], "--data", runs["data"],
                                   "--out", out), f"--out {out}", fragment)
    assert_user_error(run_main("scripts/export_gguf.py", "--checkpoint_dir", runs["ckpt"], "--lora_path",
                               lora / "lit_model_lora.pth", "--out_file", full / "lit_model.pth", "--verify", "false"),
                      "is not a GGUF file")
    assert {d: snapshot(d) for d in before} == before


@pytest.mark.parametrize("script, flags, message", [
    ("scripts/serve.py", ["--port", "70000"], "--port must be between 1 and 65535"),
    ("scripts/serve.py", ["--max_batch_size", "0"], "--max_batch_size must be at least 1"),
    ("scripts/serve.py", ["--max_tokens", "-4"], "--max_tokens must be at least 1"),
    ("scripts/convert_lit_checkpoint.py", ["--output_dir", "{tmp}/hf", "--max_shard_gb", "-1"], "--max_shard_gb"),
    ("data_prep/preview.py", ["--data", "{data}", "--n", "-1"], "--n must be at least 1"),
])
def test_bad_numbers_are_refused_before_work(runs, tmp_path, script, flags, message):
    flags = [f.format(tmp=tmp_path, data=runs["data"]) for f in flags]
    checkpoint = [] if script == "data_prep/preview.py" else ["--checkpoint_dir", runs["ckpt"]]
    assert_user_error(run_main(script, *checkpoint, *flags), message)
    assert not (tmp_path / "hf").exists()


def test_a_path_of_the_wrong_kind_is_named_as_such(runs, tmp_path):
    """A directory where a file is expected (or the reverse), and files of random bytes, are named for what they
    are, with the flag that takes them; torch's advice to load with weights_only=False is never passed on."""
    lora_run, junk = runs["lora"], tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    (tmp_path / "rows.json").write_text('[{"instruction": "colour 1", "input": "", "output": "red"}]')
    shutil.copytree(runs["data"], tmp_path / "data")
    (tmp_path / "data" / "train.pt").write_bytes(junk.read_bytes())
    shutil.copytree(lora_run, tmp_path / "junk_run")
    (tmp_path / "junk_run" / "lit_model_lora.pth").write_bytes(junk.read_bytes())
    cases = [
        (("scripts/merge_lora.py", "--checkpoint_dir", runs["ckpt"], "--lora_path", tmp_path / "data", "--out_dir",
          tmp_path / "merged", "--verify", "false"), f"--lora_path {tmp_path / 'data'} is a directory"),  # no run's
        (("scripts/convert_gguf_checkpoint.py", "--gguf_path", lora_run, "--output_dir", tmp_path / "c"),
         f"{lora_run} is a directory"),
        (("generate/base.py", "--checkpoint_dir", junk, "--prompt", "hi"), f"{junk} is a file, not a directory"),
        (("data_prep/json_data.py", "--data_file", tmp_path / "rows.json", "--val_file", tmp_path / "absent.json",
          "--destination_path", tmp_path / "d", "--checkpoint_dir", runs["ckpt"]), "give --val_file"),
        (("scripts/export_peft.py", "--checkpoint_dir", runs["ckpt"], "--lora_path",
          tmp_path / "junk_run" / "lit_model_lora.pth", "--output_dir",
          tmp_path / "p", "--verify", "false"), "not a file of tensors that torch.save wrote"),
        (("data_prep/preview.py", "--data", tmp_path / "data"), "not a file of samples that torch.save wrote"),
    ]
    for args, message in cases:
        proc = run_main(*args)
        assert_user_error(proc, message)
        assert "weights_only" not in proc.stderr
    assert not any((tmp_path / name).exists() for name in ("merged", "c", "d", "p"))


def test_a_directory_of_another_kind_is_named_with_the_command_that_reads_it(runs, smollm2_gguf, tmp_path):
    """The directories the commands above wrote, each given where another kind is read: one line names what it is
    and the command that takes it, before a weight or a tokenizer is read."""
    from safetensors.torch import save_file

    lora, full, data, ckpt = runs["lora"], runs["full"], runs["data"], runs["ckpt"]
    (tmp_path / "rows.json").write_text("[]")
    peft = tmp_path / "peft"  # what scripts/export_peft.py writes, as peft's save_pretrained names it
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 4)}, peft / "adapter_model.safetensors")
    cases = [
        (("generate/base.py", "--checkpoint_dir", lora), f"--checkpoint_dir {lora} is a LoRA run trained on "
         f"{ckpt}, not a checkpoint; generate from it with generate/lora.py --lora_path {lora}"),
        (("generate/base.py", "--checkpoint_dir", lora / "lit_model_lora.pth"),  # its weights file: named as given
         f"generate from it with generate/lora.py --lora_path {lora / 'lit_model_lora.pth'}, or merge"),
        (("scripts/serve.py", "--checkpoint_dir", lora), f"--checkpoint_dir {lora} is a LoRA run trained on {ckpt}, "
         f"not a checkpoint; serve it on its base: --checkpoint_dir {ckpt} --lora NAME={lora}"),
        (("generate/base.py", "--checkpoint_dir", peft), f"--checkpoint_dir {peft} is a PEFT adapter, not a "
         "checkpoint; litft reads the run it was exported from"),
        (("finetune/lora.py", "--checkpoint_dir", data, "--data", data, "--out_dir", tmp_path / "o"),
         f"--checkpoint_dir {data} is prepared data, not a checkpoint"),
        (("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", lora, "--output_dir", tmp_path / "o"),
         f"is a LoRA run trained on {ckpt}, not a checkpoint", "scripts/merge_lora.py"),
        (("generate/chat.py", "--checkpoint_dir", smollm2_gguf), "is a GGUF file, not a checkpoint",
         f"scripts/convert_gguf_checkpoint.py --gguf_path {smollm2_gguf}"),
        (("generate/lora.py", "--lora_path", full), f"--lora_path {full} is a full fine-tune trained on {ckpt}, not a "
         f"LoRA run; generate from it with generate/full.py --finetuned_path {full}"),
        (("generate/lora.py", "--lora_path", ckpt), f"--lora_path {ckpt} is a base checkpoint, not a LoRA run; "
         f"generate from it with generate/base.py --checkpoint_dir {ckpt}"),
        (("generate/adapter.py", "--adapter_path", data), f"--adapter_path {data} is prepared data, not an adapter "
         "run"),
        (("generate/full.py", "--finetuned_path", ckpt), f"--finetuned_path {ckpt} is a base checkpoint, not a full "
         "fine-tune"),  # with --checkpoint_dir, generate/full.py serves a checkpoint (tests/test_adapter.py)
        (("finetune/lora.py", "--checkpoint_dir", ckpt, "--data", tmp_path / "rows.json", "--out_dir", tmp_path / "o"),
         "rows.json is a data file, not prepared data", "data_prep/json_data.py --data_file"),
    ]
    for args, *message in cases:
        prompt = ("--prompt", "hi") if args[0].startswith("generate/") and args[0] != "generate/chat.py" else ()
        assert_user_error(run_main(*args, *prompt), *message)
    assert not (tmp_path / "o").exists()


def test_what_a_checkpoint_may_hold_beside_it_and_paths_that_do_not_exist(runs, tmp_path):
    """A checkpoint that also holds a PEFT adapter's or prepared data's files is still a checkpoint; a mistyped
    path inside a run does not exist (it is not the run); a weights file of the wrong kind is answered with the
    directory the right flag takes."""
    from litft.kinds import check_checkpoint, kind_of

    shutil.copytree(runs["ckpt"], tmp_path / "ckpt")
    (tmp_path / "ckpt" / "adapter_config.json").write_text("{}")
    shutil.copy(runs["data"] / "train.pt", tmp_path / "ckpt")
    assert kind_of(tmp_path / "ckpt") == "checkpoint" and check_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt"
    assert kind_of(runs["lora"] / "typo") is None
    assert_user_error(run_main("generate/base.py", "--checkpoint_dir", runs["lora"] / "typo", "--prompt", "hi"),
                      f"checkpoint directory {runs['lora'] / 'typo'} does not exist")
    weights = runs["ckpt"] / "lit_model.pth"
    assert_user_error(run_main("generate/lora.py", "--lora_path", weights, "--prompt", "hi"),
                      f"--lora_path {weights} is a base checkpoint",
                      f"generate/base.py --checkpoint_dir {runs['ckpt']}")


def test_a_scratch_folder_is_removed_only_when_its_process_is_gone(tmp_path):
    """Two preparations of one data set started together (two runs' first use of --data alpaca): the second must
    not delete the first one's scratch folder while it writes; a killed run's folder goes."""
    import subprocess
    import sys

    from litft.files import SCRATCH, staged_output

    out = tmp_path / "data"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = out / f"{SCRATCH}{gone.stdout.strip()}-abc"  # its process has exited
    killed.mkdir(parents=True)
    (killed / ".train.pt.x.tmp").write_bytes(b"partial")
    with staged_output(out, marker="train.pt") as first:
        (first / "test.pt").write_text("first")
        with staged_output(out, marker="train.pt") as second:  # started while the first still writes
            (second / "train.pt").write_text("second")
        (first / "train.pt").write_text("first")
    assert not killed.exists()
    assert {p.name: p.read_text() for p in out.iterdir()} == {"test.pt": "first", "train.pt": "first"}


def test_a_failed_output_removes_the_directories_it_created_and_keeps_one_that_was_there(tmp_path):
    from litft.files import staged_output

    for out, existed in ((tmp_path / "new", False), (tmp_path / "empty", True), (tmp_path / "a" / "b" / "new", False)):
        if existed:
            out.mkdir()
        with pytest.raises(RuntimeError):
            with staged_output(out) as scratch:
                (scratch / "lit_model.pth").write_bytes(b"half")
                raise RuntimeError("a failed verification")
        if existed:
            assert list(out.iterdir()) == []  # kept, and nothing of the failed output in it
        else:
            assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # a/ and a/b/ were made for a/b/new, and went too

    with pytest.raises(RuntimeError):  # a directory it made that something else has written into meanwhile stays
        with staged_output(tmp_path / "c" / "new") as scratch:
            (tmp_path / "c" / "notes.txt").write_text("another run's")
            raise RuntimeError("a failed verification")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]


def test_files_then_the_directory_entries_that_name_them_are_synced_to_disk(tmp_path, monkeypatch):
    """POSIX makes a rename durable only once its directory is fsynced (fsync(2): syncing a file "does not
    necessarily ensure that the entry in the directory containing the file has also reached disk"). So every
    rename litft completes an output with comes after its file's fsync and before its directory's."""
    import os
    import stat

    import torch
    from lightning.fabric import Fabric

    from litft import train_state
    from litft.files import atomic_write_text, staged_output

    events = []  # ("sync", path kind, inode) and ("rename", source, destination) in order
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        st = os.fstat(fd)
        events.append(("sync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        return fsync(fd)

    def recorded_replace(src, dst):
        events.append(("rename", Path(src), Path(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)

    def check(renamed_to: Path) -> None:
        k = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == renamed_to)
        assert ("sync", "dir", renamed_to.parent.stat().st_ino) in events[k + 1:], events
        assert any(e[:2] == ("sync", "file") for e in events[:k]) or renamed_to.is_dir(), events

    atomic_write_text(tmp_path / "a.txt", "a")
    check(tmp_path / "a.txt")
    events.clear()
    with staged_output(tmp_path / "out") as scratch:
        atomic_write_text(scratch / "b.txt", "b")
    check(tmp_path / "out" / "b.txt")
    events.clear()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    final = train_state.save(Fabric(accelerator="cpu", devices=1), model, optimizer,
                             torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), train_state.State(step=1),
                             tmp_path / "run", "run-id")
    check(final)
    assert ("sync", "dir", (final / train_state.META).parent.stat().st_ino) in events  # the step's own entries
