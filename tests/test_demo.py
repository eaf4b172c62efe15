"""The demo's whole pipeline on a tiny model, so CI keeps `make demo` working: data prep, evaluation before,
LoRA fine-tuning, evaluation after, merge, the merged-vs-LoRA token check, the report and the comparison."""

import json

from conftest import assert_user_error, run_script


def test_demo_pipeline_end_to_end(tiny_checkpoint, tmp_path):
    """The tiny tokenizer spells the task's prompts almost byte by byte (up to ~200 tokens): the demo's cut at 128,
    made for SmolLM2's 97, would leave them no answer to learn, so the run is given the data's own 256."""
    out, data = tmp_path / "demo", tmp_path / "games"
    args = ["--checkpoint_dir", tiny_checkpoint, "--out_dir", out, "--data", data, "--max_steps", "2", "--eval_limit", "2",
            "--max_seq_length", "256"]
    proc = run_script("scripts/demo.py", *args, check=True)
    assert "exact match before" in proc.stdout and "exact match after" in proc.stdout
    assert "token for token: **yes**" in proc.stdout  # merged and LoRA answer identically
    for name in ("eval-base.json", "eval-lora.json", "report-lora.md", "lora/summary.json", "lora/loss.png",
                 "lora-merged/lit_model.pth"):
        assert (out / name).is_file(), name
    assert json.loads((out / "lora" / "summary.json").read_text())["steps"] == 2

    again = run_script("scripts/demo.py", *args, check=True)  # a re-run reuses every step's output
    assert again.stderr.count("using ") >= 3 and "finetune/lora.py" not in again.stderr
    assert "scripts/evaluate.py" not in again.stderr and "merge_lora.py" not in again.stderr

    # trained further and scored on more samples: nothing made from the older weights or sample count is reused
    further = run_script("scripts/demo.py", *args[:-6], "--max_steps", "3", "--eval_limit", "3", "--max_seq_length",
                         "256", check=True)
    assert further.stderr.count("$ python scripts/evaluate.py") == 2 and "merge_lora.py" in further.stderr
    reports = [json.loads((out / name).read_text()) for name in ("eval-base.json", "eval-lora.json")]
    assert [r["samples"] for r in reports] == [3, 3] and "token for token: **yes**" in further.stdout
    assert json.loads((out / "lora" / "summary.json").read_text())["steps"] == 3

    table = run_script("scripts/demo.py", "--method", "compare", "--out_dir", out, check=True).stdout
    assert table.splitlines()[2].startswith("| lora |") and "base (no training)" in table

    summary = out / "lora" / "summary.json"  # as a resume that had no step left to train writes it
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "tokens_per_s": None}))
    table = run_script("scripts/demo.py", "--method", "compare", "--out_dir", out, check=True).stdout
    assert table.splitlines()[2].startswith("| lora |") and table.splitlines()[2].endswith(" s | – |")


def test_compare_without_runs_is_one_line(tmp_path):
    assert_user_error(run_script("scripts/demo.py", "--method", "compare", "--out_dir", tmp_path), "no finished demo runs")
