"""MkDocs hooks for spikeprune's site: the pages are taken from where they lie in the repository
(README.md as the home page, ARCHITECTURE.md, docs/*.md, bench/README.md, and everything under
bench/results/), with their repository paths, so a relative link written for the repository
browser is the same link on the site and `mkdocs build --strict` checks it. The navigation lists
the README, ARCHITECTURE.md, every page of docs/ (the contents page first, the API reference last)
and bench/README.md; a page added to docs/ appears in it without editing mkdocs.yml."""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
TOP_PAGES = ["README.md", "ARCHITECTURE.md"]
RESULTS = "bench/results"


def _doc_pages() -> list[str]:
    pages = [p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")]
    return sorted(pages, key=lambda p: (p != "docs/index.md", p == "docs/api.md", p))


def _site_files() -> list[str]:
    results = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / RESULTS).rglob("*") if p.is_file())
    return TOP_PAGES + _doc_pages() + ["bench/README.md"] + results


def on_config(config, **kwargs):
    config["nav"] = [{"Home": "README.md"}, {"Architecture": "ARCHITECTURE.md"}, *_doc_pages(),
                     {"Benchmark scripts": "bench/README.md"}]
    return config


def on_files(files: Files, config) -> Files:
    site = Files([File(path, str(ROOT), config["site_dir"], config["use_directory_urls"]) for path in _site_files()])
    for f in files:  # what plugins and the theme added (search index, theme assets), not the docs folder itself
        if not f.src_path.endswith(".md") and not f.src_path.endswith(".py") and f.src_uri not in {g.src_uri for g in site}:
            if f.abs_src_path is None or not Path(f.abs_src_path).is_relative_to(ROOT / "docs"):
                site.append(f)
    return site
