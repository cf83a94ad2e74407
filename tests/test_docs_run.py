"""The README and the docs run as written: every ```python block and every command of every ```bash
block of README.md, ARCHITECTURE.md, docs/*.md and bench/README.md is executed here, in order, page
by page, in a fresh folder, with every data split capped to a few images (the one liberty taken: a
figure printed here is not the figure the page quotes). A block that cannot run here (a long
benchmark, torchrun across machines, a package install) says so on its first lines with

    # docs-test: skip (the reason)

and is counted and listed (test_skipped_blocks_are_few_and_say_why). A command the harness does not
know how to run, without that marker, fails: so does a block whose command fails."""
from __future__ import annotations

import contextlib
import io
import warnings
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import spikeprune
from spikeprune import data, importance, policy_api
from spikeprune.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SKIP = re.compile(r"^\s*#\s*docs-test:\s*skip\b(.*)$", re.M)


class DocsNotRun(UserWarning):
    """The code blocks of the docs that carry a skip marker."""


IMAGE_CAP = 16  # images per split for everything a block loads


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        m = SKIP.search(self.code)
        return None if m is None else m.group(1).strip().strip("()").strip()


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        lang = m.group(1).lower()
        if lang in ("python", "py", "bash", "sh", "shell"):
            out.append(Block(page, text[:m.start()].count("\n") + 1, "python" if lang in ("python", "py") else "bash",
                             m.group(2)))
    return out


EXITS = re.compile(r"#\s*exits\s+(\d+)\s*$")  # a command the page says ends with this exit code


def commands(code: str) -> list[tuple[list[str], int]]:
    """The commands of a shell block with the exit code each should end with (0, or what a trailing
    `# exits N` says): continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.splitlines():
        if argv := shlex.split(line, comments=True):
            m = EXITS.search(line)
            out.append((argv, int(m.group(1)) if m else 0))
    return out


def run_command(argv: list[str], where: str, expected: int = 0) -> None:
    if argv[0] == "spikeprune":
        args = argv[1:]
    elif argv[:3] in (["python", "-m", "spikeprune"], ["python3", "-m", "spikeprune"]):
        args = argv[3:]
    else:
        raise AssertionError(f"{where}: the docs test cannot run `{' '.join(argv)}`; mark the block with "
                             "`# docs-test: skip (reason)` or write a command it runs")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(args)
        except SystemExit as e:  # argparse
            code = e.code
    assert code == expected, f"{where}: `{' '.join(argv)}` exited {code}, not {expected}:\n{err.getvalue()[-2000:]}"


@pytest.fixture
def capped_data(monkeypatch):
    """Every split every block loads, capped to IMAGE_CAP images (the stratified subset load_dataset takes)."""
    load = data.load_dataset

    def capped(spec, split="test", img_size=None, augment=False, max_images=None):
        return load(spec, split, img_size=img_size, augment=augment,
                    max_images=IMAGE_CAP if max_images is None else min(max_images, IMAGE_CAP))

    monkeypatch.setattr(data, "load_dataset", capped)
    monkeypatch.setattr(spikeprune, "load_dataset", capped)


@pytest.fixture
def registries():
    """Policies and criteria a page registers (ARCHITECTURE.md's examples) are removed after it."""
    before_p, before_i = set(policy_api.policies()), set(importance.names())
    yield
    for name in set(policy_api.policies()) - before_p:
        policy_api.unregister_policy(name)
    for name in set(importance.names()) - before_i:
        importance.unregister_importance(name)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs_as_written(page, tmp_path, monkeypatch, capped_data, registries):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in blocks(page):
        if block.skip_reason is not None:
            continue
        if block.lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102  (the page's own code)
        else:
            for argv, expected in commands(block.code):
                run_command(argv, block.where, expected)
        ran += 1
    if not ran and not any(b.skip_reason is not None for b in blocks(page)):
        pytest.skip(f"{page.name} has no code block")


def test_skipped_blocks_say_why_and_are_listed():
    """Every skip marker gives its reason; the skipped blocks are listed in the run's warnings
    summary, so what the suite does not run is in plain sight."""
    skipped = [b for p in PAGES for b in blocks(p) if b.skip_reason is not None]
    no_reason = [b.where for b in skipped if not b.skip_reason]
    assert not no_reason, f"a skip marker needs its reason, `# docs-test: skip (why)`: {no_reason}"
    total = sum(len(blocks(p)) for p in PAGES)
    listing = "\n".join(f"  {b.where}: {b.skip_reason}" for b in skipped)
    warnings.warn(f"{len(skipped)} of {total} code blocks of the docs are not run by the suite:\n{listing}",
                  DocsNotRun, stacklevel=1)


def test_the_harness_fails_a_failing_block(tmp_path, monkeypatch):
    """A command that fails, an unknown command and a Python error each fail the page."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="exited 2"):
        run_command(["spikeprune", "evaluate", "no-such-model", "--data", "digits"], "x.md:1")
    with pytest.raises(AssertionError, match="cannot run `make demo`"):
        run_command(["make", "demo"], "x.md:1")
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nraise ValueError('boom')\n```\n\n```bash\n# docs-test: skip (slow)\nmake demo\n```\n")
    found = blocks(page)
    assert [b.lang for b in found] == ["python", "bash"] and found[1].skip_reason == "slow" and found[0].skip_reason is None
    with pytest.raises(ValueError, match="boom"):
        exec(compile(found[0].code, "page.md:3", "exec"), {})
    assert commands("spikeprune prune a \\\n   --data b  # why\n\n# only a comment\nspikeprune models  # exits 3\n") == [
        (["spikeprune", "prune", "a", "--data", "b"], 0), (["spikeprune", "models"], 3)]
    with pytest.raises(AssertionError, match="exited 0, not 3"):
        run_command(["spikeprune", "models", "--quiet"], "x.md:1", expected=3)
