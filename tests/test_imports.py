"""The shape of the library: no import cycle among the modules of vwt/ (imports inside functions
included), no module of vwt/ but cli.py imports vwt.cli, and no function in vwt/ over 60 lines."""
import ast
from pathlib import Path

import pytest

VWT = Path(__file__).resolve().parents[1] / "vwt"
MAX_LINES = 60


def _modules() -> dict:
    """Module name -> path for every module of vwt/ (a package is its __init__.py)."""
    out = {}
    for path in sorted(VWT.rglob("*.py")):
        parts = list(path.relative_to(VWT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set) -> set:
    """The vwt modules ``name`` imports anywhere in its file (module level, functions, classes).
    ``from P import x`` counts as importing P.x where that is a module, else P. The package a module
    lives in is not counted: Python imports it first, but that is not an import the module makes."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            for a in node.names:
                found.add(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert {"vwt.backends", "vwt.backends.base", "vwt.encoder", "vwt.errors"} <= set(graph)
    assert "vwt.encoder" in graph["vwt.backends.base"] and "vwt.backends" in graph["vwt.patch"]
    # a cycle hidden in a function is still found
    graph["vwt.encoder"] = graph["vwt.encoder"] | {"vwt.patch"}
    assert _cycle(graph)[0] in ("vwt.encoder", "vwt.patch", "vwt.backends", "vwt.backends.base")


def test_no_import_cycle_in_vwt():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_its_cli():
    """vwt.cli (argparse helpers for the scripts) may import the library, never the other way round."""
    graph = import_graph()
    assert "vwt.cli" in graph and "vwt.efficiency" in graph
    importers = sorted(m for m, deps in graph.items() if "vwt.cli" in deps and m != "vwt.cli")
    assert not importers, "these library modules import vwt.cli: " + ", ".join(importers)


def test_the_cli_rule_sees_a_hidden_import(tmp_path):
    """The rule reads imports anywhere in a file, as a module inside a function would hide one."""
    mod = tmp_path / "hidden.py"
    mod.write_text("def f():\n    from . import cli\n    return cli\n")
    assert "vwt.cli" in _imports("vwt.hidden", mod, set(_modules()))


def _functions():
    for path in sorted(VWT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(VWT.parent)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("limit", [MAX_LINES])
def test_no_function_in_vwt_is_over_60_lines(limit):
    long = [f"{where} ({n} lines)" for where, n in _functions() if n > limit]
    assert not long, "split these functions: " + "; ".join(long)


def _namespace_takers(path: Path) -> list:
    """Functions of ``path`` with a parameter that receives a parsed command line: named ``args`` or
    ``namespace``, or annotated argparse.Namespace; and any ``import argparse``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            for a in params:
                note = ast.unparse(a.annotation) if a.annotation is not None else ""
                if a.arg in ("args", "namespace") or "Namespace" in note:
                    found.append(f"{path.name}:{node.lineno}: {getattr(node, 'name', 'lambda')}({a.arg})")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if "argparse" in names:
                found.append(f"{path.name}:{node.lineno}: import argparse")
    return found


def test_no_library_function_takes_a_parsed_command_line():
    """The command line becomes a RunSpec once, in vwt.cli.spec_from_args; below it nothing sees argparse."""
    found = [f for path in sorted(VWT.rglob("*.py")) if path.name != "cli.py" for f in _namespace_takers(path)]
    assert not found, "take a vwt.spec.RunSpec (or the values needed) instead:\n" + "\n".join(found)


def test_the_namespace_finder_finds_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import argparse\n\ndef f(spec, args):\n    pass\n\ng = lambda namespace: 0\n")
    assert len(_namespace_takers(bad)) == 3
