"""The documentation builds into a site with `mkdocs build --strict` (a broken link, anchor or API
reference fails it), and the README stays a five-minute read with the sections a newcomer needs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs", reason="the `test` extra installs MkDocs (pyproject.toml)")


def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(root / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy_docs(dst: Path) -> Path:
    """What the site is made of, copied (the package linked), so a test can break a page."""
    dst.mkdir()
    for name in ("README.md", "ARCHITECTURE.md", "mkdocs.yml"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "docs", dst / "docs")
    (dst / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "README.md", dst / "bench" / "README.md")
    shutil.copytree(ROOT / "bench" / "results", dst / "bench" / "results")
    (dst / "spikeprune").symlink_to(ROOT / "spikeprune")
    return dst


def test_the_site_builds_strictly_with_the_api_reference(tmp_path):
    done = _build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "docs" / "api.html").read_text()
    # the reference is generated from the docstrings: a function's own docstring text is on the page
    assert "def create_model" not in api and "Build a preset by name" in api
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "bench" / "results" / "policies.html").is_file()


@pytest.mark.parametrize("breakage, words", [
    ("[a page that is not there](nowhere.md)", "nowhere.md"),
    ("[an anchor that is not there](policies.md#no-such-section)", "no-such-section"),
    ("::: spikeprune.no_such_module", "no_such_module"),
])
def test_a_broken_link_or_reference_fails_the_build(tmp_path, breakage, words):
    root = _copy_docs(tmp_path / "repo")
    page = root / "docs" / "index.md"
    page.write_text(page.read_text() + "\n\n" + breakage + "\n")
    done = _build(root, tmp_path / "site")
    assert done.returncode != 0 and words in done.stderr + done.stdout


def test_the_readme_is_a_five_minute_read():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 15_000, f"README.md has {len(text):,} characters; keep it under 15,000 (details go to docs/)"
    headings = re.findall(r"^## (.+)$", text, re.M)
    for needed in ("Install", "Quick start", "Concepts", "Policies", "Models and data", "Results at a glance",
                   "Export", "Several processes", "Extending", "Documentation", "References"):
        assert needed in headings, f"README.md lacks a '## {needed}' section"
    assert re.search(r"^pip install .*torch", text, re.M), "README.md needs a pip install line with the torch pin"


def test_every_relative_link_of_the_markdown_resolves():
    """The same check as the site's, on the repository itself, for the pages the site does not take
    (it takes README, ARCHITECTURE, docs/ and bench/): a link to a file that does not exist fails."""
    broken = []
    pages = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
