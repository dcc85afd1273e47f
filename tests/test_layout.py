"""The shape of the code base: no import cycle among the project's modules, no long file without
a stated reason.

Import cycles count imports inside functions too: they defer the cycle to run time, where it
shows up as a half-initialized module depending on which side is imported first, and they hide
from a reader which way the dependency goes. Imports under `if TYPE_CHECKING:` are not counted
(they never run). An edge goes to the module an import names (`from a.b import c` names the
module a.b.c when there is one, else a.b); the packages above it are not counted as imported
by it, since a package's __init__ that imports its own modules is no cycle.

A .py file in shared/, services/ or trainer/ longer than MAX_LINES lines states why in its
module docstring: one of its first LONG_REASON_WITHIN lines starts with `Long file:`, followed
by the reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "services", "trainer", "ops", "bench")  # the project's import graph
SIZED = ("shared", "services", "trainer")  # where long files need a reason
MAX_LINES = 500
LONG_MARKER = "Long file:"
LONG_REASON_WITHIN = 5  # docstring lines
MIN_REASON_CHARS = 20


def _py_files(root: Path, packages) -> list[Path]:
    return sorted(p for pkg in packages if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py")
                  if "__pycache__" not in p.parts)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, packages=PACKAGES) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the (first) import}."""
    files = {module_name(root, p): p for p in _py_files(root, packages)}
    modules = set(files)

    def deepest(name: str) -> str | None:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in modules:
                return candidate
        return None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        edges: dict[str, int] = {}
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                for a in node.names:
                    sub = f"{prefix}.{a.name}" if prefix else a.name
                    targets.append(sub if sub in modules else prefix)
            for t in targets:
                hit = deepest(t) if t else None
                if hit is not None and hit != mod:
                    edges.setdefault(hit, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def describe(graph: dict[str, dict[str, int]], comp: list[str]) -> str:
    inside = set(comp)
    edges = [f"{a} -> {b} (line {line})" for a in comp for b, line in sorted(graph[a].items()) if b in inside]
    return "cycle among " + ", ".join(comp) + ":\n    " + "\n    ".join(edges)


def long_files_without_reason(root: Path, packages=SIZED) -> list[str]:
    bad = []
    for path in _py_files(root, packages):
        text = path.read_text()
        n = text.count("\n") + (not text.endswith("\n") and bool(text))
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text, str(path)), clean=True) or ""
        head = doc.splitlines()[:LONG_REASON_WITHIN]
        reasons = [line[len(LONG_MARKER):].strip() for line in head if line.startswith(LONG_MARKER)]
        if not any(len(r) >= MIN_REASON_CHARS for r in reasons):
            bad.append(f"{path.relative_to(root)} ({n} lines)")
    return bad


# ---- the checks on the project ----
def test_no_import_cycle_among_project_modules():
    graph = import_graph(ROOT)
    assert len(graph) > 50, f"expected the project's modules, found {len(graph)}"
    found = cycles(graph)
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(describe(graph, c) for c in found)


def test_long_files_state_a_reason():
    bad = long_files_without_reason(ROOT)
    assert not bad, (f"files over {MAX_LINES} lines whose module docstring does not start a line with "
                     f"{LONG_MARKER!r} and a reason within its first {LONG_REASON_WITHIN} lines: split them along "
                     "their seams, or say why not:\n  " + "\n  ".join(bad))


# ---- the checks check what they claim (a tree with the faults planted) ----
def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_a_cycle_hidden_in_a_function_and_through_relative_imports_is_found(tmp_path):
    _write(tmp_path, "pkg/__init__.py", "from pkg import a\n")  # a package importing its module: no cycle
    _write(tmp_path, "pkg/a.py", "import numpy\n\ndef f():\n    from pkg.b import g\n    return g\n")
    _write(tmp_path, "pkg/b.py", "from .sub import c\n\ndef g():\n    return c\n")
    _write(tmp_path, "pkg/sub/__init__.py", "")
    _write(tmp_path, "pkg/sub/c.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\n"
                                       "def h():\n    from .. import a\n    return a\n")
    _write(tmp_path, "pkg/lone.py", "from pkg.sub import c\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.sub.c": 1}  # `from .sub import c` names the module pkg.sub.c
    assert "pkg.b" not in graph["pkg.sub.c"]  # under TYPE_CHECKING: not counted
    assert graph["pkg.sub.c"] == {"pkg.a": 5}  # `from .. import a`, inside a function
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    _write(tmp_path, "pkg/sub/c.py", "def h():\n    return 1\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == []


def test_a_long_file_needs_the_marker_with_a_reason(tmp_path):
    body = "x = 1\n" * MAX_LINES
    _write(tmp_path, "shared/short.py", '"""Short."""\n' + "x = 1\n" * (MAX_LINES - 1))
    _write(tmp_path, "shared/plain.py", '"""A module."""\n' + body)
    _write(tmp_path, "shared/empty_reason.py", '"""A module.\nLong file: yes\n"""\n' + body)
    _write(tmp_path, "shared/late.py", '"""A module.\n\n\n\n\n\nLong file: one state machine, cut it and it is two halves.\n"""\n'
           + body)
    _write(tmp_path, "shared/reasoned.py", '"""A module.\nLong file: one state machine, cut it and it is two halves.\n"""\n'
           + body)
    _write(tmp_path, "elsewhere/big.py", body + body)
    assert long_files_without_reason(tmp_path, ("shared",)) == [
        f"shared/empty_reason.py ({MAX_LINES + 3} lines)", f"shared/late.py ({MAX_LINES + 8} lines)",
        f"shared/plain.py ({MAX_LINES + 1} lines)"]
