"""The bitshrink policy: widths and int4 / int8 weights chosen together under a budget on the
exported file's bytes, fine-tuned quantisation-aware, and a file that holds exactly those bytes."""
from __future__ import annotations

import json

import pytest

from spikeprune import cli
from spikeprune.costs import budget_bytes
from spikeprune.precision import file_weight_bytes, model_plan
from spikeprune.quantise import quantise_weights
from spikeprune.serialization import load_model

FAST = ["--data", "digits", "--policy", "bitshrink", "--batch-size", "128", "--calib-batches", "2",
        "--bit-images", "64", "--bit-ratios", "0,0.25,0.5,0.75", "--bit-candidates", "2", "--quiet"]


def test_bitshrink_meets_a_file_byte_budget_and_fine_tunes_on_the_grid(trained_tiny_path, tmp_path):
    dense = load_model(trained_tiny_path)
    budget = int(0.06 * budget_bytes(dense, "file-fp32"))  # 6% of the dense fp32 weights
    out = tmp_path / "run"
    assert cli.main(["prune", str(trained_tiny_path), *FAST, "--precision", "file-int4", "--memory-budget",
                     str(budget), "--max-acc-drop", "100", "--limit-after-finetune", "--finetune-epochs", "1",
                     "--kd", "--bit-probe-steps", "2", "--max-images", "train=128", "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    info = s["bitshrink"]
    assert info["budget_met"] and info["file_bytes"]["total"] <= budget
    # --bit-widths both (the default): shrink's walk to the budget, then the 2 smallest fitting ratios
    widths = [c["widths"] for c in info["candidates"]]
    assert widths[0] == "walk" and 2 <= len(widths) <= 3 and all(w.startswith("uniform ") for w in widths[1:])
    assert all(c["bytes"] <= budget for c in info["candidates"]) and set(info["int4_sensitivity"])
    assert info["walk"]["memory_met"] and info["walk"]["cuts"] >= 1
    assert info["chosen"] == max(info["candidates"], key=lambda c: c["calib_top1"])
    model = load_model(out / "model")
    plan = model_plan(model)
    assert plan == info["plan"] and set(plan.values()) <= {"int4", "int8"} and "int4" in plan.values()
    assert file_weight_bytes(model)["total"] <= budget == s["constraints"]["budget_bytes"]
    # fine-tuning was quantisation-aware: the saved weights are on their grid
    for name, p in plan.items():
        w = model.get_submodule(name).weight
        assert (quantise_weights(w, p) - w).abs().max() <= 1e-6 * (1 + w.abs().max())
    assert s["finetuned"]["file_bytes"]["plan"]["quantised"]
    assert "bitshrink" in (out / "report.md").read_text()


def test_bitshrink_needs_a_file_byte_budget(trained_tiny_path, tmp_path, capsys):
    assert cli.main(["prune", str(trained_tiny_path), *FAST, "--target-saving", "0.5", "-o",
                     str(tmp_path / "r")]) != 0
    assert "--precision file-int4" in capsys.readouterr().err


@pytest.mark.parametrize("widths", ["walk", "uniform"])
def test_bitshrink_widths_one_way(trained_tiny_path, tmp_path, widths):
    dense = load_model(trained_tiny_path)
    budget = int(0.06 * budget_bytes(dense, "file-fp32"))
    out = tmp_path / "run"
    assert cli.main(["prune", str(trained_tiny_path), *FAST, "--bit-widths", widths, "--precision", "file-int4",
                     "--memory-budget", str(budget), "--max-acc-drop", "100", "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    got = [c["widths"] for c in s["bitshrink"]["candidates"]]
    assert got == ["walk"] if widths == "walk" else (got and all(w.startswith("uniform ") for w in got))
    assert (s["bitshrink"]["walk"] is None) == (widths == "uniform")
    assert s["bitshrink"]["budget_met"] and file_weight_bytes(load_model(out / "model"))["total"] <= budget
    if widths == "walk":  # the walk's own report section and plot come with the run
        report = (out / "report.md").read_text()
        assert "the width walk" in report and (out / "plots" / "shrink_walk.png").exists()


@pytest.mark.parametrize("bad", [["--bit-candidates", "0"], ["--bit-ratios", "0.5,1.5"], ["--bit-widths", "random"]])
def test_bitshrink_refuses_bad_options_before_the_run(trained_tiny_path, tmp_path, bad):
    out = tmp_path / "r"
    assert cli.main(["prune", str(trained_tiny_path), *FAST, *bad, "--precision", "file-int4", "--target-saving",
                     "0.5", "-o", str(out)]) != 0
    assert not out.exists()
