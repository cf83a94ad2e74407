"""Behaviour unchanged (issue 22, point 7): the fast fixed-seed policy runs of tests/policy_golden.py
give, bit for bit, what the code before the policy toolkit gave (kept widths, weights, calibration
top-1, evaluations and what each policy says). The slower cases: `python tests/policy_golden.py --check`."""
from __future__ import annotations

import json

import pytest
import torch

from policy_golden import GOLDEN, as_json, machine, run_case

RECORDED = json.loads(GOLDEN.read_text())
FAST_CASES = ["uniform-fixed", "groups", "uniform-sweep", "global-target", "shrink-mlp"]


def _decisions(result):
    """A run's result without the words of its report sections: what a policy decides and measures
    is held bit for bit; how the report phrases it changed on purpose afterwards (issue 23, point 5)."""
    if isinstance(result, dict):
        return {k: _decisions(v) for k, v in result.items() if k != "report_sections"}
    if isinstance(result, list):
        return [_decisions(v) for v in result]
    return result


@pytest.mark.parametrize("case", FAST_CASES)
def test_policy_gives_what_it_gave_before_the_toolkit(case):
    here, then = machine(), RECORDED["recorded_with"]
    if (here["cpu_capability"], here["torch"]) != (then["cpu_capability"], then["torch"]):
        pytest.skip(f"recorded on {then['cpu_capability']} with torch {then['torch']}; float sums (and so spikes) "
                    f"may differ on {here['cpu_capability']} with torch {here['torch']}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _decisions(as_json(run_case(case))) == _decisions(RECORDED["cases"][case])
    finally:
        torch.set_num_threads(threads)
