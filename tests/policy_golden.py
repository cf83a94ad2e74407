"""Fixed-seed runs of every built-in policy on the bundled mnist5k model with tiny image caps:
what each one keeps, the weights it returns, its calibration top-1 and what it says (summary info).

tests/data/policy_golden.json holds them as the code before the policy toolkit gave them (on the
machine it names: float sums, and so spikes, may differ on another CPU kind or thread count).
    python tests/policy_golden.py OUT.json [CASE ...]     record (every case, or those named)
    python tests/policy_golden.py --check [CASE ...]      compare with tests/data/policy_golden.json
tests/test_policy_golden.py checks the fast cases in the suite (issue 22, point 7: behaviour unchanged).
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from spikeprune.bundled import bundled_model
from spikeprune.hashing import model_hash
from spikeprune.policy_api import Constraints, PruneContext, get_policy
from spikeprune.run import RunSettings
from spikeprune.surgery import record_of

GOLDEN = Path(__file__).parent / "data" / "policy_golden.json"
CAPS = {"calib": 120, "train": 256, "test": 64}
SHRINK = {"recal_images": 48, "check_recal_images": 96, "screen_images": 64}
# name -> (policy, RunSettings fields, constraints)
CASES = {
    "uniform-fixed": ("uniform", {"options": {"uniform": 0.3}}, {}),
    "uniform-sweep": ("uniform", {"uniform_ratios": (0.2, 0.5, 0.8)}, {"max_acc_drop": 4}),
    "groups": ("groups", {"options": {"ratio": ["residual=0.25", "block*.mlp.hidden=0.5"]}}, {}),
    "psvit": ("psvit", {"uniform_ratios": (0.3, 0.6), "ratios": (0.3, 0.6)}, {"max_acc_drop": 4}),
    "psvit-target": ("psvit", {"uniform_ratios": (0.3, 0.6), "ratios": (0.3, 0.6)},
                     {"max_acc_drop": 4, "target_saving": 0.2}),
    "primesvt": ("primesvt", {"ratios": (0.3, 0.6)}, {"max_acc_drop": 4}),
    "primesvt-target": ("primesvt", {"ratios": (0.3, 0.6), "options": {"refine_steps": 1}},
                        {"max_acc_drop": 4, "target_saving": 0.15}),
    "global": ("global", {"uniform_ratios": (0.2, 0.5)}, {"max_acc_drop": 4}),
    "global-target": ("global", {"uniform_ratios": (0.2, 0.5)}, {"max_acc_drop": 4, "target_saving": 0.3}),
    "shrink": ("shrink", {"options": {**SHRINK, "shrink_step": 0.2}}, {"max_acc_drop": 3}),
    "shrink-target": ("shrink", {"options": {**SHRINK, "shrink_step": 0.2}}, {"max_acc_drop": 6, "target_saving": 0.25}),
    "shrink-mlp": ("shrink", {"options": {**SHRINK, "shrink_step": 0.1}, "groups": "block*.mlp.hidden"},
                   {"max_acc_drop": 5, "target_saving": 0.1}),
    "shrink-holdout": ("shrink", {"options": {**SHRINK, "shrink_step": 0.2, "holdout": 0.5}},
                       {"max_acc_drop": 3, "target_saving": 0.3}),
    "shrink-after": ("shrink", {"options": {**SHRINK, "shrink_step": 0.25, "probe_steps": 2, "walk_drop": 3},
                                "finetune_epochs": 1, "limit_after_finetune": True, "finetune_batch_size": 32},
                     {"max_acc_drop": 1}),
}


def _clean(x):
    """JSON of what a policy said, without the drawing functions."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items() if k != "plots"}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def run_case(name: str, model=None) -> dict:
    policy, fields, limits = CASES[name]
    torch.manual_seed(0)
    model = (model or bundled_model()).eval()
    with tempfile.TemporaryDirectory() as out:
        s = RunSettings(data="mnist5k", output=out, policy=policy, constraints=Constraints(**limits),
                        max_images=CAPS, progress=False, **fields)
        ctx = PruneContext(model, s)
        spec = get_policy(policy)
        if spec.check:
            spec.check(s.options, model)
        result = spec.fn(ctx)
        pruned = result.model
        return {"kept": record_of(pruned).kept_counts(), "weights": model_hash(pruned),
                "calib_top1": result.info.get("calib_top1"), "evaluations": ctx.evaluations,
                "images_evaluated": ctx.images_evaluated, "info": _clean(result.info)}


def machine() -> dict:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "threads": 1}


def as_json(x):
    """What the golden file holds for a result (JSON's own types: tuples become lists)."""
    return json.loads(json.dumps(x, sort_keys=True))


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    model = bundled_model()
    if argv and argv[0] == "--check":
        golden = json.loads(GOLDEN.read_text())["cases"]
        bad = [n for n in (argv[1:] or golden) if as_json(run_case(n, model)) != golden[n]]
        print("differ: " + ", ".join(bad) if bad else "every case as recorded")
        return 1 if bad else 0
    out = {n: run_case(n, model) for n in (argv[1:] or CASES)}
    Path(argv[0]).write_text(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
