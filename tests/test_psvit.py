"""PSViT: the fine-grained selection (levels, greedy chain, exclusivity, memory stop), the back-off
keeps the accuracy limit even when the sensitivity prediction is wrong, and one real run end to end:
summary.json schema and ranges, report.md, resume, refusal of another run."""
from __future__ import annotations

import json

import pytest

from spikeprune.errors import SpikepruneError
from spikeprune.coupling import groups
from spikeprune.policy_api import PruneContext
from spikeprune.run import prune_run
from spikeprune.policies.psvit import backoff_search, exclusive_groups, group_levels, ratios_at, upgrade_chain
from spikeprune.sensitivity import SensitivityTable
from spikeprune.serialization import load_model

FAST = dict(policy="psvit", ratios=(0.3, 0.6), uniform_ratios=(0.2, 0.5), batch_size=64, latency_repeats=2,
            progress=False)


# ------------------------------------------------------------------------------------------------
# Selection logic on hand-made tables
# ------------------------------------------------------------------------------------------------
def _row(group, ratio, drop, saved, size=10):
    kept = size - round(ratio * size)
    return {"group": group, "ratio": ratio, "acc_drop": drop, "memory_saved_bytes": saved, "kept": kept,
            "removed": size - kept, "size": size, "top1": 0.9 - drop / 100}


class Table:
    def __init__(self, rows):
        self.rows = rows

    @property
    def groups(self):
        return list(dict.fromkeys(r["group"] for r in self.rows))

    def for_group(self, g):
        return sorted((r for r in self.rows if r["group"] == g), key=lambda r: r["ratio"])


def test_levels_use_the_running_maximum_and_drop_useless_ratios():
    t = Table([_row("a", 0.2, 1.0, 100), _row("a", 0.4, -0.5, 200), _row("a", 0.6, 0.8, 200),
               _row("a", 0.8, 5.0, 400), _row("a", 0.9, 2.0, 500)])
    lv = group_levels(t, max_drop=3.0)["a"]
    # 0.4 keeps the 1.0 of 0.2 (a dip is not trusted); 0.6 saves nothing more; 0.8 breaks the limit
    # alone, and so does everything after it (the envelope only grows).
    assert [(x.ratio, x.drop, x.saving) for x in lv] == [(0.0, 0.0, 0), (0.2, 1.0, 100), (0.4, 1.0, 200)]


def test_chain_takes_the_best_saving_per_point_within_the_budget():
    t = Table([_row("cheap", 0.5, 0.0, 50), _row("good", 0.5, 1.0, 1000), _row("poor", 0.5, 2.0, 100),
               _row("good", 0.9, 2.5, 1500)])
    chain = upgrade_chain(group_levels(t, 3.0), max_drop=3.0)
    assert [(c["group"], c["ratio"]) for c in chain] == [("cheap", 0.5), ("good", 0.5), ("good", 0.9)]
    assert chain[-1]["predicted_drop"] == pytest.approx(2.5) and chain[-1]["predicted_saving_bytes"] == 1550
    assert all(c["predicted_drop"] <= 3.0 for c in chain)
    assert ratios_at(chain, 2) == {"cheap": 0.5, "good": 0.5}
    # With a memory target the chain stops as soon as the predicted saving reaches it.
    short = upgrade_chain(group_levels(t, 3.0), max_drop=3.0, stop_saving=1000)
    assert [c["group"] for c in short] == ["cheap", "good"]


def test_heads_and_per_head_dims_of_one_block_are_never_both_pruned(tiny_model):
    # What the family declares (Group.head_group), read from a real model's groups.
    declared = {g.name: g.head_group for g in groups(tiny_model(depth=2)) if g.head_group}
    assert declared == {f"block{i}.attn.{k}": f"block{i}.attn.heads" for i in (0, 1) for k in ("qk", "v")}
    ex = exclusive_groups(declared)
    assert ex["block0.attn.heads"] == {"block0.attn.qk", "block0.attn.v"} and ex["block0.attn.qk"] == {"block0.attn.heads"}
    assert "block1.attn.qk" not in ex["block0.attn.heads"]  # another block's heads are independent
    t = Table([_row("block0.attn.qk", 0.5, 0.0, 100), _row("block0.attn.v", 0.5, 0.0, 90),
               _row("block0.attn.heads", 0.5, 0.0, 150)])
    chain = upgrade_chain(group_levels(t, 1.0), max_drop=1.0, conflicts=ex)
    assert [c["group"] for c in chain] == ["block0.attn.heads"]
    # Without the declaration nothing excludes anything: all three are taken.
    assert len(upgrade_chain(group_levels(t, 1.0), max_drop=1.0)) == 3


def test_backoff_search_returns_a_measured_boundary():
    calls = []

    def within(k, bad_from=5):
        calls.append(k)
        return k < bad_from

    k, tried = backoff_search(12, within)
    assert k == 4 and tried == calls and tried[0] == 12 and len(tried) <= 1 + 4
    assert backoff_search(7, lambda k: True) == (7, [7])
    assert backoff_search(0, lambda k: False) == (0, [])
    # Non-monotone: whatever is returned was measured within (or is the dense prefix 0), its successor not.
    ok = {0: True, 1: True, 2: False, 3: True, 4: False, 5: False, 6: False}
    k, tried = backoff_search(6, lambda k: ok[k])
    assert ok[k] and (k + 1 in tried or k + 1 == 6) and not ok[k + 1]


# ------------------------------------------------------------------------------------------------
# Real runs on the trained tiny model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def psvit_run(trained_tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("psvit") / "run"
    model = load_model(trained_tiny_path).eval()
    summary = prune_run(model, "digits", out, max_acc_drop=3.0, model_spec=str(trained_tiny_path), **FAST)
    return out, summary


def test_summary_schema_and_ranges(psvit_run):
    out, summary = psvit_run
    doc = json.loads((out / "summary.json").read_text())
    assert doc["policy"] == "psvit"
    keys = {"top1", "params", "memory_bytes", "macs", "sops", "energy_mj", "latency_ms"}
    for name in ("dense", "pruned"):
        m = doc[name]
        assert keys <= set(m) and 0 <= m["top1"] <= 1 and m["params"] > 0 and m["macs"] > 0
        assert {"fp32", "int8"} <= set(m["memory_bytes"]) and m["memory_bytes"]["int8"] < m["memory_bytes"]["fp32"]
        assert m["sops"] > 0 and m["energy_mj"] > 0 and m["latency_ms"] > 0
    assert doc["finetuned"] is None
    assert doc["pruned"]["params"] <= doc["dense"]["params"]
    assert 0 <= doc["memory_saved"] < 1
    assert doc["memory_saved"] == pytest.approx(1 - doc["pruned"]["memory_bytes"]["fp32"] / doc["dense"]["memory_bytes"]["fp32"])
    assert doc["constraints"]["max_acc_drop"] == 3.0 and isinstance(doc["constraints_met"], bool)
    assert doc["wall_time_s"] > 0
    # PSViT's guarantee: the chosen model was measured within the limit on the calibration split.
    ps = doc["psvit"]
    assert doc["constraint_checks"]["acc_ok"] and doc["constraints_met"]
    assert ps["measured_drop"] <= 3.0 + 1e-9
    assert doc["calib"]["dense_top1"] - doc["calib"]["pruned_top1"] <= 0.03 + 1e-9
    assert all(c["predicted_drop"] <= 3.0 + 1e-9 for c in ps["chain"])
    assert doc["forward_cost"]["sensitivity"]["ratio"] > 1
    assert doc == summary  # run() returns what it wrote


def test_run_folder_and_report(psvit_run):
    out, summary = psvit_run
    model = load_model(out / "model")
    assert sum(p.numel() for p in model.parameters()) == summary["pruned"]["params"]
    table = SensitivityTable.from_csv(out / "sensitivity.csv")
    assert len(table.rows) == len(table.groups) * 2
    for f in ("uniform_sweep.png", "sensitivity.png", "accuracy_memory.png"):
        assert (out / "plots" / f).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "**Outcome: constraints met.**" in report
    assert "## Widths per group" in report and "PSViT step 3" in report and "](plots/sensitivity.png)" in report
    assert "image-block passes" in report and "wall time" in report


def test_rerun_resumes_and_another_run_is_refused(psvit_run, trained_tiny_path):
    out, summary = psvit_run
    model = load_model(trained_tiny_path).eval()
    again = prune_run(model, "digits", out, max_acc_drop=3.0, model_spec=str(trained_tiny_path), **FAST)
    assert again["resumed"] and again["forward_cost"]["calib_evaluations_this_run"] == 0
    assert again["pruned"] == summary["pruned"] and again["pruning"] == summary["pruning"]
    assert again["wall_time_s"] == summary["wall_time_s"]  # a finished run reports its own time
    with pytest.raises(SpikepruneError, match="holds a different run.*constraints"):
        prune_run(model, "digits", out, max_acc_drop=1.0, **FAST)


def test_backoff_keeps_the_limit_when_the_prediction_is_wrong(trained_tiny, tmp_path, monkeypatch):
    """A sensitivity table that claims every group is free makes the chain select everything; the
    measured drop breaks the limit and the back-off must find a prefix within it."""
    real = PruneContext.sensitivity

    def lying(self):
        t = real(self)
        rows = [dict(r, acc_drop=0.0, top1=t.dense_top1) for r in t.rows]
        return SensitivityTable(t.dense_top1, rows, t.forward_cost, t.meta, t.warnings)

    monkeypatch.setattr(PruneContext, "sensitivity", lying)
    s = prune_run(trained_tiny, "digits", tmp_path / "run", max_acc_drop=2.0, **FAST)
    ps = s["psvit"]
    assert ps["backed_off"] and ps["selected_upgrades"] < len(ps["chain"])
    assert ps["measured"][str(len(ps["chain"]))]["acc_drop"] > 2.0  # the full selection was measured and failed
    assert s["constraint_checks"]["acc_ok"] and s["constraint_checks"]["acc_drop_calib"] <= 2.0 + 1e-9
    assert ps["prefixes_measured"][0] == len(ps["chain"]) and len(ps["prefixes_measured"]) >= 2
