"""Mutation check: does the test suite notice when litft is wrong?

A *mutant* is litft/ with one small change of the kind a bug makes:

    operator     + ↔ -   * ↔ /   // → /   % → //   ** → *   & ↔ |   and ↔ or   (also in +=, *=, ...)
    comparison   < ↔ <=   > ↔ >=   == ↔ !=   is ↔ is not   in ↔ not in
    constant     int n → n + 1   float x → x + 1   True ↔ False
    negation     -x → x   not x → x   ~x → x

Each mutant of a seeded sample runs against the test files that cover its module (TESTS below), one file at a
time, the module's own first, until a test fails. A failing test *kills* the mutant; a mutant that every test
passes *survives*: a gap in the tests, or a change that makes no observable difference (an *equivalent* mutant).
The score is killed / run.

    python bench/mutation.py                          # 45 mutants, seed 0 (what bench/RESULTS.md reports)
    python bench/mutation.py --sample 10 --modules generate,lora --seed 3
    python bench/mutation.py --list                   # how many mutants each module has, nothing run

Everything happens in a temporary copy of the repository at a commit (HEAD unless --rev says otherwise; git
archive), never in the working tree, which others edit and commit while this runs. The copy goes when the run
ends, Ctrl-C included. Before a test file first meets a mutant, it runs once unmutated: its time sets the
mutant's timeout (3 ×; a mutant that hangs is killed), and a test that already fails there is deselected, so it
cannot "kill" anything. Slow (multi-process) tests are left out.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The test files that cover each module, the module's own first. A module not listed is not mutated.
TESTS = {
    "adapter": ["test_adapter.py"],
    "adapter_v2": ["test_adapter.py", "test_qwen2.py"],
    "base_checkpoint": ["test_default_commands.py", "test_run_lifecycle.py"],
    "batch_generate": ["test_batch_generate.py", "test_serve.py"],
    "chat_template": ["test_chat_formats.py", "test_prompts.py"],
    "checkpoint": ["test_checkpoint_errors.py", "test_merge_export.py", "test_convert_hf.py"],
    "cli": ["test_recipes.py", "test_generate.py", "test_default_commands.py"],
    "config": ["test_config.py", "test_convert_hf.py", "test_qwen2.py"],
    "conversation": ["test_chat.py"],
    "convert_hf": ["test_convert_hf.py", "test_qwen2.py"],
    "data": ["test_data.py", "test_train.py"],
    "engine": ["test_serve.py", "test_batch_generate.py"],
    "evaluate": ["test_evaluate.py"],
    "fast/__init__": ["test_lora.py", "test_convert_hf.py", "test_train.py"],
    "fast/chunked_loss": ["test_loss.py", "test_lora.py", "test_convert_hf.py"],
    "fast/cpu_decoding": ["test_generate.py"],
    "fast/fused_lora": ["test_lora.py", "test_lora_dropout.py"],
    "fast/lora_dropout": ["test_lora_dropout.py"],
    "files": ["test_checkpoint_errors.py", "test_run_lifecycle.py"],
    "generate": ["test_generate.py"],
    "generate_cli": ["test_generate.py", "test_chat_formats.py"],
    "gguf": ["test_gguf.py", "test_tokenizer.py"],
    "gguf_export": ["test_export_gguf.py"],
    "gguf_format": ["test_export_gguf.py", "test_gguf.py"],
    "gguf_vocab": ["test_export_gguf.py"],
    "hf_prompting": ["test_verify.py", "test_merge_export.py", "test_convert_hf.py"],
    "kv_cache": ["test_generate.py", "test_batch_generate.py"],
    "kinds": ["test_output_safety.py", "test_data.py"],
    "load_finetuned": ["test_adapter.py", "test_lora.py", "test_new_tokens.py", "test_qlora.py", "test_generate.py"],
    "lora": ["test_lora.py", "test_merge_export.py", "test_qwen2.py"],
    "loss": ["test_loss.py", "test_accumulation.py", "test_packing.py", "test_lora.py", "test_convert_hf.py"],
    "memory": ["test_memory.py"],
    "model": ["test_convert_hf.py", "test_generate.py", "test_rope.py", "test_qwen2.py"],
    "multi_lora": ["test_batch_generate.py", "test_serve.py"],
    "named_data": ["test_data.py", "test_default_commands.py"],
    "new_rows": ["test_lora.py", "test_new_tokens.py", "test_merge_export.py"],
    "new_tokens": ["test_new_tokens.py", "test_merge_export.py"],
    "nf4": ["test_nf4.py", "test_qlora.py"],
    "openai_api": ["test_serve.py"],
    "packing": ["test_packing.py"],
    "prepare": ["test_data.py", "test_data_errors.py"],
    "preview": ["test_preview.py"],
    "prompts": ["test_prompts.py", "test_chat_formats.py"],
    "qlora": ["test_qlora.py", "test_nf4.py"],
    "readers": ["test_verify.py"],
    "rope": ["test_rope.py"],
    "run_dir": ["test_run_lifecycle.py"],
    "schedule": ["test_schedule.py"],
    "scoring": ["test_evaluate.py"],
    "stop_strings": ["test_chat.py", "test_serve.py"],
    "tokenizer": ["test_tokenizer.py", "test_chat_formats.py"],
    "train": ["test_train.py", "test_run_lifecycle.py"],
    "train_args": ["test_schedule.py", "test_run_lifecycle.py"],
    "train_data": ["test_train.py", "test_data_errors.py"],
    "train_setup": ["test_run_lifecycle.py", "test_train.py", "test_memory.py"],
    "train_state": ["test_run_lifecycle.py", "test_train.py"],
    "verify": ["test_verify.py"],
}

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
COMPARES = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
            ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BOOLOPS = {ast.And: ast.Or, ast.Or: ast.And}
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
          ast.BitAnd: "&", ast.BitOr: "|", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
          ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.And: "and",
          ast.Or: "or", ast.USub: "-", ast.Not: "not ", ast.Invert: "~"}


@dataclass(frozen=True)
class Mutant:
    module: str  # "generate" for litft/generate.py, "fast/fused_lora" for litft/fast/fused_lora.py
    index: int  # the node's position in ast.walk order of the module
    line: int
    change: str  # e.g. "/ -> *"


# ---- finding and applying mutants --------------------------------------------------------------------------


def skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes not worth mutating: docstrings, type annotations, f-strings (messages, not behaviour)."""
    skip = set()

    def drop(node):
        skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                drop(first)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            drop(node.returns)
        if isinstance(node, ast.arg) and node.annotation:
            drop(node.annotation)
        if isinstance(node, ast.AnnAssign):
            drop(node.annotation)
        if isinstance(node, ast.JoinedStr):
            drop(node)
    return skip


def mutation(node: ast.AST) -> tuple[ast.AST, str] | None:
    """The one mutated copy of `node` this tool makes, with a description; None for a node it leaves alone."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOPS:
        new = type(node.op)
        return _replace(node, op=BINOPS[new]()), f"{SYMBOL[new]} -> {SYMBOL[BINOPS[new]]}"
    if isinstance(node, ast.Compare) and type(node.ops[0]) in COMPARES:
        old = type(node.ops[0])
        return _replace(node, ops=[COMPARES[old](), *node.ops[1:]]), f"{SYMBOL[old]} -> {SYMBOL[COMPARES[old]]}"
    if isinstance(node, ast.BoolOp):
        old = type(node.op)
        return _replace(node, op=BOOLOPS[old]()), f"{SYMBOL[old]} -> {SYMBOL[BOOLOPS[old]]}"
    if isinstance(node, ast.UnaryOp) and type(node.op) in (ast.USub, ast.Not, ast.Invert):
        return node.operand, f"{SYMBOL[type(node.op)]}x -> x"
    if isinstance(node, ast.Constant) and type(node.value) in (bool, int, float):
        old = node.value
        new = (not old) if isinstance(old, bool) else old + 1
        return ast.Constant(new), f"{old!r} -> {new!r}"
    return None


def _replace(node: ast.AST, **fields) -> ast.AST:
    new = type(node)(**{**{f: getattr(node, f) for f in node._fields}, **fields})
    return ast.copy_location(new, node)


def candidates(source: str) -> list[tuple[int, ast.AST, str]]:
    """(index in ast.walk order, node, change) for every mutable node of a module."""
    tree = ast.parse(source)
    skip = skipped_nodes(tree)
    out = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) not in skip and (m := mutation(node)) is not None:
            out.append((index, node, m[1]))
    return out


def mutate(source: str, index: int) -> str:
    """`source` with the node at `index` (ast.walk order) replaced by its mutation, the rest byte for byte."""
    node = next(n for i, n in enumerate(ast.walk(ast.parse(source))) if i == index)
    new, _ = mutation(node)
    text = ast.unparse(new)
    if not isinstance(node, ast.stmt):
        text = f"({text})"  # keep the precedence of what surrounds it
    data = source.encode()  # ast positions are UTF-8 byte offsets within a line
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    begin = starts[node.lineno - 1] + node.col_offset
    end = starts[node.end_lineno - 1] + node.end_col_offset
    mutated = (data[:begin] + text.encode() + data[end:]).decode()
    if ast.dump(ast.parse(mutated)) == ast.dump(ast.parse(source)):
        raise ValueError(f"mutant {index} changes nothing")
    return mutated


def all_mutants(tree: Path) -> list[Mutant]:
    out = []
    for module in sorted(TESTS):
        if not (tree / "litft" / f"{module}.py").is_file():
            continue  # a module this commit does not have yet
        source = (tree / "litft" / f"{module}.py").read_text()
        out += [Mutant(module, i, node.lineno, change) for i, node, change in candidates(source)]
    return out


# ---- running the tests ---------------------------------------------------------------------------------------


@dataclass
class Baseline:
    seconds: float
    deselect: list[str]  # tests that fail without any mutant


def pytest(tree: Path, files: list[str], extra: list[str], timeout: float) -> tuple[str, float, str]:
    """Run pytest on those of `files` the copy has: ("passed" | "failed" | "timeout", seconds, output)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-m", "not slow",
           *(f"tests/{f}" for f in files if (tree / "tests" / f).is_file()), *extra]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # a mutant must never be read back from a stale .pyc
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # pytest and every script it started
            proc.communicate()
            return "timeout", time.perf_counter() - start, ""
        except BaseException:
            os.killpg(proc.pid, 9)
            raise
    return ("passed" if proc.returncode == 0 else "failed"), time.perf_counter() - start, out


def baseline(tree: Path, file: str) -> Baseline:
    status, seconds, out = pytest(tree, [file], [], timeout=3600)
    failing = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    if status != "passed":
        print(f"  baseline {file}: {len(failing)} failing without a mutant, deselected: {failing}")
        if not failing:
            raise SystemExit(f"{file} does not run without a mutant:\n{out[-3000:]}")
    print(f"  baseline {file}: {seconds:.0f} s", flush=True)
    return Baseline(seconds, failing)


def run_mutant(tree: Path, mutant: Mutant, baselines: dict[str, Baseline], min_timeout: float) -> tuple[str, float]:
    """Run the module's test files one by one, its own first, until one fails: ("killed by FILE" | "survived", s)."""
    path = tree / "litft" / f"{mutant.module}.py"
    original = path.read_text()
    path.write_text(mutate(original, mutant.index))
    total = 0.0
    try:
        for file in TESTS[mutant.module]:
            if not (tree / "tests" / file).is_file():
                continue
            if file not in baselines:
                path.write_text(original)  # the baseline runs unmutated
                baselines[file] = baseline(tree, file)
                path.write_text(mutate(original, mutant.index))
            base = baselines[file]
            extra = ["-x", *(f"--deselect={t}" for t in base.deselect)]
            status, seconds, _ = pytest(tree, [file], extra, timeout=max(min_timeout, 3 * base.seconds))
            total += seconds
            if status != "passed":
                return f"killed by {file}" + (" (timeout)" if status == "timeout" else ""), total
        return "survived", total
    finally:
        path.write_text(original)


def copy_of_repository(rev: str, into: Path) -> str:
    """git archive of `rev` into `into`; the offline model files (git-ignored) are linked, not copied."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    offline = ROOT / "checkpoints" / "offline"
    if offline.is_dir():
        (into / "checkpoints").mkdir(exist_ok=True)
        (into / "checkpoints" / "offline").symlink_to(offline)
    return commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=45, help="how many mutants to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--modules", default="", help="comma-separated litft modules to mutate (default: all)")
    parser.add_argument("--rev", default="HEAD", help="the commit to test")
    parser.add_argument("--min_timeout", type=float, default=120, help="seconds; a mutant gets max(this, 3 × baseline)")
    parser.add_argument("--list", action="store_true", help="count the mutants of each module and stop")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="litft-mutation-") as tmp:
        tree = Path(tmp)
        commit = copy_of_repository(args.rev, tree)
        mutants = all_mutants(tree)
        if args.modules:
            mutants = [m for m in mutants if m.module in args.modules.split(",")]
        if args.list:
            for module in sorted({m.module for m in mutants}):
                print(f"{module:16} {sum(m.module == module for m in mutants):4}")
            print(f"{'total':16} {len(mutants):4}")
            return
        sample = sorted(random.Random(args.seed).sample(mutants, min(args.sample, len(mutants))),
                        key=lambda m: (m.module, m.line))
        print(f"commit {commit[:12]}: {len(sample)} of {len(mutants)} mutants (seed {args.seed})", flush=True)

        baselines, results = {}, []
        try:
            for i, mutant in enumerate(sample, 1):
                outcome, seconds = run_mutant(tree, mutant, baselines, args.min_timeout)
                results.append((mutant, outcome))
                print(f"[{i:3}/{len(sample)}] litft/{mutant.module}.py:{mutant.line:<4} {mutant.change:14} {outcome} "
                      f"({seconds:.0f} s)", flush=True)
        except KeyboardInterrupt:
            print(f"\ninterrupted: the score below counts the {len(results)} mutants that finished")
        report(tree, results)


def report(tree: Path, results: list[tuple[Mutant, str]]) -> None:
    if not results:
        return
    killed = sum(outcome.startswith("killed") for _, outcome in results)
    print(f"\nscore: {killed}/{len(results)} killed ({100 * killed / len(results):.0f} %)")
    for m, outcome in results:
        if outcome == "survived":
            line = (tree / "litft" / f"{m.module}.py").read_text().splitlines()[m.line - 1].strip()
            print(f"survived: litft/{m.module}.py:{m.line} {m.change}\n    {line}")

if __name__ == "__main__":
    main()
