"""The layering rules of ARCHITECTURE.md, checked on the source: no import cycles, no module
outside models/ that names a family, function-local imports only where a comment says why."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "spikeprune"
# The reference-code transcriptions are test support for one family's equivalence proofs.
FAMILY_AWARE = {"models", "testing"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        parts = parts if is_pkg else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    names = [base] + [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if n.startswith("spikeprune")]


def _imports(module: str, path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            out += [(n, node.lineno) for n in _resolve(module, is_pkg, node)]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("spikeprune")]
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: sorted({n for n, _ in _imports(m, p, top_level_only=False) if n in mods and n != m})
             for m, p in mods.items()}
    # a package's __init__ importing its own submodules (registration) is not a cycle of layers
    for m in graph:
        graph[m] = [n for n in graph[m] if not n.startswith(m + ".")]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_only_models_name_a_family():
    mods = _modules()
    family_modules = {m for m in mods if m.startswith("spikeprune.models.")}
    offenders = []
    for m, p in mods.items():
        if m.split(".")[1:2] and m.split(".")[1] in FAMILY_AWARE:
            continue
        hits = {n for n, _ in _imports(m, p, top_level_only=False)} & family_modules
        offenders += [f"{m} imports {n}" for n in sorted(hits)]
        offenders += [f"{m}:{i}: tests a family class" for i, line in enumerate(p.read_text().splitlines(), 1)
                      if "isinstance" in line and "Spikformer" in line]
    assert not offenders, offenders


def test_function_local_imports_say_why():
    """A function-local import is allowed for an optional heavy dependency (or to break a true
    upward call), and then a comment on its line or the line above says so."""
    bare = []
    for m, p in _modules().items():
        lines = p.read_text().splitlines()
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                line, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "#" not in line and not above.strip().startswith("#"):
                    bare.append(f"{m}:{node.lineno}: {line.strip()}")
    assert not bare, "function-local imports without a reason:\n" + "\n".join(bare)
