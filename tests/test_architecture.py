"""The layering rules of ARCHITECTURE.md, checked on the source. The layer table is read from
ARCHITECTURE.md itself, so the document and the check cannot drift apart:

- every module of the package sits in exactly one layer of the table;
- every import (function-local ones and a package importing its own submodules included) goes to
  the module's own layer or a lower one, and the imports form no circle;
- no module outside models/ names a family;
- a function-local import says why, with one of a short fixed list of reasons;
- no function is above cyclomatic complexity 20 (radon) unless a `# Whole:` comment at its top says
  why it is better whole.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "spikeprune"
# The reference-code transcriptions are test support for one family's equivalence proofs.
FAMILY_AWARE = {"models", "testing"}
# The only reasons a module may import inside a function; the comment on the import (or the line
# above it) must contain one of them.
LOCAL_IMPORT_REASONS = ("optional dependency", "lazy heavy import")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _import_targets(module: str, is_pkg: bool, node: ast.AST) -> list[str]:
    """The spikeprune modules an import statement loads. `from X import a` loads X, or only X.a when
    `a` is a submodule (`from . import distributed` does not import the package above)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "spikeprune"]
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        parts = parts if is_pkg else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    if base.split(".")[0] != "spikeprune":
        return []
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    plain = [a for a in node.names if f"{base}.{a.name}" not in MODULES]
    return subs + ([base] if plain or not subs else [])


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out += [(n, node.lineno) for n in _import_targets(module, is_pkg, node) if n != module]
    return out


def _layer_table() -> list[tuple[str, list[str]]]:
    """(layer name, module prefixes) from the table under `## Layers` in ARCHITECTURE.md, top
    layer first. A prefix `x` stands for module spikeprune.x and, unless listed on its own, every
    module under it; `__init__` is the package itself."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not line.lstrip().startswith("|") or set(cells[0]) <= set("-: "):
            continue
        names = re.findall(r"`([\w.]+)`", cells[1])
        if names:
            layers.append((cells[0], names))
    return layers


LAYERS = _layer_table()


def _prefix_layers() -> dict[str, int]:
    """Module prefix -> layer rank (0 is the bottom layer)."""
    ranks = {}
    for i, (_, names) in enumerate(reversed(LAYERS)):
        for n in names:
            full = "spikeprune" if n == "__init__" else f"spikeprune.{n}"
            assert full not in ranks, f"{n} is listed in two layers of ARCHITECTURE.md"
            ranks[full] = i
    return ranks


def _layer_of(module: str, ranks: dict[str, int]) -> int | None:
    parts = module.split(".")
    for k in range(len(parts), 1, -1):
        if ".".join(parts[:k]) in ranks:
            return ranks[".".join(parts[:k])]
    return ranks.get(module)


def test_the_layer_table_is_read():
    assert len(LAYERS) >= 5 and any("__init__" in names for _, names in LAYERS)


def test_every_module_is_in_one_layer():
    ranks = _prefix_layers()
    missing = sorted(m for m in MODULES if _layer_of(m, ranks) is None)
    assert not missing, ("modules in no layer of ARCHITECTURE.md (add them to its `## Layers` table): "
                         + ", ".join(missing))
    stale = sorted(p for p in ranks if p not in MODULES)
    assert not stale, "ARCHITECTURE.md lists modules that do not exist: " + ", ".join(stale)


def test_imports_go_down_the_layers():
    ranks = _prefix_layers()
    names = [name for name, _ in reversed(LAYERS)]
    upward = []
    for m, p in MODULES.items():
        for target, line in _imports(m, p):
            if target not in MODULES:
                continue
            if _layer_of(target, ranks) > _layer_of(m, ranks):
                upward.append(f"{p.relative_to(ROOT)}:{line}: {m} ({names[_layer_of(m, ranks)]}) imports "
                              f"{target} ({names[_layer_of(target, ranks)]})")
    assert not upward, "imports going up the layers of ARCHITECTURE.md:\n" + "\n".join(upward)


def _cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    """Package -> submodule edges count: a package that imports a submodule which imports the
    package back is a circle."""
    graph = {m: sorted({n for n, _ in _imports(m, p) if n in MODULES}) for m, p in MODULES.items()}
    found = _cycle(graph)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_checks_see_what_they_must():
    """The checks above, on hand-made cases: a submodule that imports its package back is a cycle,
    `from . import sub` is an edge to the submodule only, and a prefix covers the modules under it."""
    assert _cycle({"p": ["p.a"], "p.a": ["p"]}) == ["p", "p.a", "p"]
    assert _cycle({"p": ["p.a"], "p.a": ["q"], "q": []}) is None
    node = ast.parse("from . import distributed, errors").body[0]
    assert _import_targets("spikeprune.cli", False, node) == ["spikeprune.distributed", "spikeprune.errors"]
    node = ast.parse("from .models import get_family").body[0]
    assert _import_targets("spikeprune.costs", False, node) == ["spikeprune.models"]
    node = ast.parse("from ..checkpoint_io import read_checkpoint").body[0]
    assert _import_targets("spikeprune.models.sdt", False, node) == ["spikeprune.checkpoint_io"]
    ranks = _prefix_layers()
    assert _layer_of("spikeprune.models.sdt", ranks) == _layer_of("spikeprune.models", ranks)
    assert _layer_of("spikeprune.cli", ranks) > _layer_of("spikeprune.run", ranks) > _layer_of("spikeprune.errors", ranks)


def test_only_models_name_a_family():
    family_modules = {m for m in MODULES if m.startswith("spikeprune.models.")} - {
        "spikeprune.models.registry", "spikeprune.models.common"}
    offenders = []
    for m, p in MODULES.items():
        if m.split(".")[1:2] and m.split(".")[1] in FAMILY_AWARE:
            continue
        hits = {n for n, _ in _imports(m, p)} & family_modules
        offenders += [f"{m} imports {n}" for n in sorted(hits)]
        offenders += [f"{m}:{i}: tests a family class" for i, line in enumerate(p.read_text().splitlines(), 1)
                      if "isinstance" in line and "Spikformer" in line]
    assert not offenders, offenders


def _local_imports_without_reason(source: str) -> list[tuple[int, str]]:
    lines = source.splitlines()
    tree = ast.parse(source)
    top = {id(n) for n in tree.body}
    bare = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            line = lines[node.lineno - 1]
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            comment = (line.split("#", 1)[1] if "#" in line else "") + (above if above.startswith("#") else "")
            if not any(reason in comment.lower() for reason in LOCAL_IMPORT_REASONS):
                bare.append((node.lineno, line.strip()))
    return bare


def test_function_local_imports_say_why():
    """A function-local import is allowed for an optional dependency or a lazy heavy import, and
    then its comment (on its line or the line above) says which."""
    bare = [f"{m}:{n}: {line}" for m, p in MODULES.items() for n, line in _local_imports_without_reason(p.read_text())]
    assert not bare, (f"function-local imports without one of the reasons {LOCAL_IMPORT_REASONS}:\n" + "\n".join(bare))


@pytest.mark.parametrize("source, bare", [
    ("def f():\n    import onnx  # optional dependency: the export extra\n", []),
    ("def f():\n    # lazy heavy import: matplotlib costs a second\n    import matplotlib\n", []),
    ("def f():\n    import json  # why not\n", [2]),
    ("def f():\n    from .models import x  # serialization sits above models\n", [2]),
    ("import json\n", []),
])
def test_local_import_reasons_are_a_fixed_list(source, bare):
    assert [n for n, _ in _local_imports_without_reason(source)] == bare


def test_bench_code_does_not_import_tests():
    """bench/ is run from a checkout by people who may not have tests/; it imports spikeprune and its
    own modules, never a test module, and does not put tests/ on its path."""
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        source = path.read_text()
        if '"tests"' in source or "'tests'" in source or "/ \"tests\"" in source:
            offenders.append(f"{path.name}: puts tests/ on its path")
        for node in ast.walk(ast.parse(source)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name}:{node.lineno}: imports {n}" for n in names
                          if n.split(".")[0] in test_modules or n.split(".")[0] == "tests"]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------
# Functions one can hold in one's head
# ------------------------------------------------------------------------------------------------
MAX_COMPLEXITY = 20  # radon's cyclomatic complexity; above it a function says why it is better whole
WHOLE = "# Whole:"


def _functions(blocks):
    """Every function radon found (methods and closures included), with its class for the name."""
    for b in blocks:
        if hasattr(b, "methods"):  # a class: radon lists its methods on their own as well, but not an inner class's
            for inner in getattr(b, "inner_classes", []):
                yield from _functions(inner.methods)
                yield from _functions(inner.inner_classes)
            continue
        yield b
        yield from _functions(b.closures)


def _complex_without_reason(source: str) -> list[tuple[str, int, int]]:
    """(name, line, complexity) of each function above MAX_COMPLEXITY whose opening -- the lines from
    its `def` to its first statement after the docstring -- holds no `# Whole:` comment."""
    from radon.complexity import cc_visit

    lines = source.splitlines()
    defs = {(n.lineno, n.name): n for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    found = []
    for f in _functions(cc_visit(source)):
        if f.complexity <= MAX_COMPLEXITY:
            continue
        node = defs[(f.lineno, f.name)]
        body = node.body
        has_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                   and isinstance(body[0].value.value, str))
        first = body[1] if has_doc and len(body) > 1 else body[0]
        opening = lines[node.lineno - 1:first.lineno - 1]
        if not any(line.strip().startswith(WHOLE) for line in opening):
            found.append((f.fullname, f.lineno, f.complexity))
    return found


def test_complex_functions_say_why_they_are_whole():
    """No function above cyclomatic complexity 20 (radon) unless its opening lines carry a comment
    `# Whole: ...` saying why it reads better whole than split."""
    offenders = [f"{p.relative_to(ROOT)}:{line}: {name} has complexity {cc} (> {MAX_COMPLEXITY}): split it, or say "
                 f"why it is better whole in a `{WHOLE}` comment at its top"
                 for p in sorted(MODULES.values()) for name, line, cc in _complex_without_reason(p.read_text())]
    assert not offenders, "\n".join(offenders)


def _branchy(name: str, branches: int, comment: str = "", doc: bool = True, indent: str = "") -> str:
    body = [f'{indent}    """A docstring."""'] if doc else []
    body += [f"{indent}    {comment}"] if comment else []
    body += [f"{indent}    if x == {i}:\n{indent}        return {i}" for i in range(branches)]
    return f"{indent}def {name}(x):\n" + "\n".join(body) + f"\n{indent}    return -1\n"


@pytest.mark.parametrize("source, found", [
    (_branchy("f", 19), []),  # 19 branches: complexity 20, allowed
    (_branchy("f", 20), ["f"]),  # 21
    (_branchy("f", 19) + _branchy("g", 25, doc=False), ["g"]),
    (_branchy("f", 20, "# Whole: one case per opcode, read top to bottom"), []),
    (_branchy("f", 20, "# Whole: the table", doc=False), []),
    (_branchy("f", 20, "# whole, because"), ["f"]),
    ("class C:\n" + _branchy("m", 22, indent="    "), ["C.m"]),
    ("def outer():\n" + _branchy("inner", 22, indent="    ") + "    return inner\n", ["inner"]),
])
def test_the_complexity_check_sees_what_it_must(source, found):
    assert [name for name, _, _ in _complex_without_reason(source)] == found
