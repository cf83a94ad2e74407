"""Every row of the bad-input table (bench/bad_input_cases.py, issue 10): a clear one-line error
(exit code 2 and `spikeprune: error: ...` on the command line, a SpikepruneError in Python) with the
expected words, no traceback, nothing of the user's changed or left behind, and for the rows that
say so, no forward pass before the refusal. `python bench/bad_inputs.py` prints the totals."""
from __future__ import annotations

import pytest

from bad_input_cases import CASES, World, run_case


def _param(case):
    marks = [pytest.mark.xfail(strict=False, reason=f"fixed by {case.owner}")] if case.owner else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World.build(tmp_path_factory.mktemp("bad-input-world"))


def test_table_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_is_a_clear_error(case, world, tmp_path):
    if case.needs_readonly and world.readonly is None:
        pytest.skip("no folder on this machine refuses writes")
    outcome = run_case(case, world, tmp_path / "case")
    assert outcome.ok, f"{outcome.category}: {outcome.message} {outcome.detail}"
