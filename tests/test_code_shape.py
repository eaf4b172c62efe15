"""The shape of litft's code, read from its source with Python's own parser (ast): litft's modules import one
another without a cycle and at the top of the module only, the method files stay short enough to read in one
sitting, and no function runs past 50 lines."""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

PACKAGE = ROOT / "litft"
LIMITS = {"model.py": 250, "lora.py": 200, "adapter.py": 200, "adapter_v2.py": 200}


def modules() -> dict[str, ast.Module]:
    """litft's modules by dotted name (litft.fast for litft/fast/__init__.py), parsed."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def litft_imports(node: ast.AST, known: set[str]) -> set[str]:
    """The litft modules an import statement names (`from litft import fast` names litft.fast)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "litft":
        submodules = {f"{node.module}.{a.name}" for a in node.names} & known
        return submodules or ({node.module} & known)
    return set()


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def import_graph() -> dict[str, set[str]]:
    """Module -> the litft modules it imports when it runs (imports under `if TYPE_CHECKING:` never run)."""
    parsed = modules()
    graph = {}
    for name, tree in parsed.items():
        skipped = {id(n) for block in ast.walk(tree) if is_type_checking(block) for n in ast.walk(block)}
        graph[name] = {m for node in ast.walk(tree) if id(node) not in skipped
                       for m in litft_imports(node, set(parsed)) if m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_litft_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "litft.lora" in graph["litft.fast.fused_lora"]
    assert find_cycle(graph) is None


def test_no_litft_import_hides_inside_a_function():
    parsed = modules()
    hidden = [f"{name}.{fn.name}" for name, tree in parsed.items() for fn in ast.walk(tree)
              if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) if litft_imports(node, set(parsed))]
    assert hidden == []


@pytest.mark.parametrize("file,limit", LIMITS.items())
def test_method_files_are_short(file, limit):
    lines = len((PACKAGE / file).read_text().splitlines())
    assert lines <= limit, f"litft/{file} has {lines} lines (at most {limit})"


def test_no_function_runs_past_50_lines():
    long = [f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for directory in ("litft", "finetune", "generate", "scripts")
            for path in sorted((ROOT / directory).rglob("*.py"))
            for fn in ast.walk(ast.parse(path.read_text()))
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.end_lineno - fn.lineno + 1 > 50]
    assert long == []
