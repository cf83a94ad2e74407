"""Every benchmark table in README.md and docs/ is what bench/update_docs.py writes from the stored
results in bench/results/, between its markers: a table edited by hand, or results changed without
rewriting the docs, fails here."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def update_docs():
    spec = importlib.util.spec_from_file_location("bench_update_docs", ROOT / "bench" / "update_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tables_equal_what_the_script_writes(update_docs):
    stale = [str(p.relative_to(ROOT)) for p in update_docs.DOCS if update_docs.rewrite(p.read_text()) != p.read_text()]
    assert not stale, f"tables differ from bench/results in {stale}: run python bench/update_docs.py"
    assert update_docs.main(["--check"]) == 0


def test_every_table_is_used_once_and_filled(update_docs):
    used = []
    for page in update_docs.DOCS:
        for m in update_docs.MARKER.finditer(page.read_text()):
            used.append(m.group(2))
            assert m.group(3).count("\n|") >= 2, f"{page.name}: table {m.group(2)} is empty"
    assert sorted(used) == sorted(update_docs.TABLES), used


def test_a_hand_edit_is_caught(update_docs):
    text = (ROOT / "README.md").read_text()
    m = re.search(r"\| 98\.60% \|", text)
    assert m, "the at-a-glance table shows the dense mnist5k top-1"
    edited = text[:m.start()] + "| 99.60% |" + text[m.end():]
    assert update_docs.rewrite(edited) == text  # the script puts the stored figure back
    assert update_docs.rewrite(edited) != edited


def test_tables_come_from_the_stored_results(update_docs):
    """A figure in the rendered table is the stored JSON's, formatted (not a copy kept in the script)."""
    import json

    doc = json.loads((ROOT / "bench" / "results" / "fmnist" / "policies.json").read_text())
    shrink = next(r for r in doc["results"] if r["policy"] == "shrink" and r["limit"] == 1.0)
    doc_table = update_docs.TABLES["policies-fmnist"]()
    assert f"{100 * shrink['memory_saved']:.2f}%" in doc_table and f"{shrink['cost']['calib_images']:,}" in doc_table


def test_bench_readme_results_equal_what_the_benchmark_writes(update_docs):
    """bench/README.md's "Current results" are written by `bench/policies.py --update-readme` between
    its own markers: they equal what the benchmark writes from its stored policies.json."""
    import json
    import os

    bench = update_docs.bench_policies
    doc = json.loads((ROOT / "bench" / "results" / "policies.json").read_text())
    plot = os.path.relpath(ROOT / "bench" / "results" / "frontier.png", ROOT / "bench")
    text = (ROOT / "bench" / "README.md").read_text()
    block = text.split(bench.README_START, 1)[1].split(bench.README_END, 1)[0]
    assert block == "\n" + bench.write_markdown(doc, plot, heading="###")
