"""bench/policies.py must not rot: a tiny run of the whole protocol (every policy, two limits, one
frontier target, fine-tuning, latency) on a trained 1-block model and capped `digits` splits, whose
JSON, markdown and plot must be complete and consistent, every policy run leaving its own run
folder with report.md (the benchmark runs policies through spikeprune.run, as `spikeprune prune`
does); a rerun reads the runs back; bad options fail clearly. Plus the random floor's ratios,
read from a pruning record."""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
from pathlib import Path

import itertools

import pytest
import torch

from spikeprune.stats import differ, top1_standard_error

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("uniform", "psvit", "primesvt", "global", "shrink", "random")
LIMITS = (1.0, 3.0)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_policies", ROOT / "bench" / "policies.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_args(model_path, tmp_path) -> list[str]:
    return [str(model_path), "--data", "digits", "--max-train", "64", "--max-calib", "60", "--max-test", "60",
            "--ratios", "0.5", "--uniform-ratios", "0.3,0.6", "--limits", "1,3", "--targets", "0.2",
            "--finetune-epochs", "1", "--frontier-finetune", "--latency-repeats", "2", "--latency-batches", "1,2", "--latency-warmup", "1",
            "--measure-images", "16", "--batch-size", "64", "--quiet",
            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]


def test_smoke_run_writes_complete_results_and_resumes(bench, trained_tiny_path, tmp_path):
    args = tiny_args(trained_tiny_path, tmp_path)
    assert bench.main(args) == 0
    out = tmp_path / "out"
    doc = json.loads((out / "policies.json").read_text())

    # Provenance: the exact command, the machine, the date.
    assert doc["format"] == "spikeprune-bench-policies"
    assert doc["command"] == "python bench/policies.py " + " ".join(args)
    assert datetime.datetime.fromisoformat(doc["date"]).tzinfo is not None
    m = doc["machine"]
    assert m["torch"] == torch.__version__ and m["cpu_count"] == os.cpu_count() and m["device"] == "cpu"
    assert m["platform"] and m["python"]
    assert doc["split_sizes"] == {"train": 64, "calib": 60, "test": 60}  # the caps reached every split

    dense = doc["dense"]
    assert 0 <= dense["test"]["top1"] <= 1 and dense["test"]["n"] == 60
    assert dense["memory_bytes"]["fp32"] > dense["memory_bytes"]["int8"] > 0 and dense["sops"] > 0

    # One record per policy and limit, every figure present and consistent.
    recs = {r["name"]: r for r in doc["results"]}
    assert set(recs) == {f"{p}-L{L:g}" for p in POLICIES for L in LIMITS}
    for r in recs.values():
        # Each policy ran through spikeprune.run: its own run folder, report and summary, with the
        # image caps as a setting of the run (the data layer's max_images).
        run_dir = Path(r["run_dir"])
        assert run_dir == tmp_path / "work" / r["name"] and (run_dir / "report.md").is_file()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["policy"] == ("groups" if r["policy"] == "random" else r["policy"])
        assert summary["settings"]["max_images"] == {"train": 64, "calib": 60, "test": 60}
        assert summary["calib"]["n"] == 60 and summary["pruned"]["top1"] == r["test"]["top1"]
        assert r["widths"] == summary["pruning"]["kept_counts"] and r["removed"] == summary["removed"]
        # The shared work came from the shared run, not recomputed: the sensitivity rows, the uniform sweep.
        if r["policy"] in ("psvit", "primesvt"):
            assert summary["forward_cost"]["sensitivity"]["rows_computed_this_run"] == 0
        if r["policy"] == "uniform":
            assert r["cost"]["own_calib_images"] == 0
        assert 0 <= r["memory_saved"] < 1
        assert r["memory_saved"] == pytest.approx(1 - r["memory_bytes"]["fp32"] / dense["memory_bytes"]["fp32"])
        assert 0 < r["memory_bytes"]["int8"] < r["memory_bytes"]["fp32"] <= dense["memory_bytes"]["fp32"]
        assert 0 < r["params"] <= dense["params"] and 0 < r["macs"] <= dense["macs"]
        assert 0 <= r["test"]["top1"] <= 1 and 0 <= r["finetuned"]["top1"] <= 1
        assert r["finetuned"]["train_images"] == 64
        assert r["activity"]["sops"] >= 0 and r["activity"]["energy_mj"] > 0 and r["activity"]["of"] == "finetuned"
        assert set(r["speedup"]) == {"1", "2"} and all(v > 0 for v in r["speedup"].values())
        c = r["cost"]
        assert c["search_wall_s"] >= c["own_wall_s"] > 0 and c["calib_images"] >= c["own_calib_images"]
        if r["policy"] != "random":  # a policy's own result is held to the limit on the calibration split
            assert r["acc_ok"] and r["calib_drop"] <= r["limit"] + 1e-9
        # Every test top-1 carries its standard error (60 test images).
        for key in ("test", "finetuned"):
            assert r[key]["se_points"] == pytest.approx(100 * top1_standard_error(r[key]["top1"], 60))
    assert dense["test"]["se_points"] == pytest.approx(100 * top1_standard_error(dense["test"]["top1"], 60))

    # Shared work is charged to the policies that read it, and only to them.
    used = {r["name"]: set(r["cost"]["shared"]["used"]) for r in recs.values()}
    for L in LIMITS:
        assert used[f"psvit-L{L:g}"] == {"dense_calib", "uniform_sweep", "sensitivity"}
        assert used[f"primesvt-L{L:g}"] == {"dense_calib", "sensitivity"}
        assert used[f"uniform-L{L:g}"] == {"dense_calib", "uniform_sweep"}
        assert "sensitivity" not in used[f"global-L{L:g}"]
        assert used[f"shrink-L{L:g}"] == {"dense_calib"}  # it reads no shared table
        # The random floor sits at PrimeSVT's widths exactly.
        assert recs[f"random-L{L:g}"]["widths"] == recs[f"primesvt-L{L:g}"]["widths"]
        assert recs[f"random-L{L:g}"]["memory_bytes"] == recs[f"primesvt-L{L:g}"]["memory_bytes"]
        # "Cannot be told apart": exactly the pairs whose fine-tuned test top-1 are within two standard errors.
        lines = doc["indistinguishable"][f"{L:g}"]
        for a, b in itertools.combinations([recs[f"{p}-L{L:g}"] for p in POLICIES], 2):
            close = not differ(a["finetuned"]["top1"], b["finetuned"]["top1"], 60, 60)
            named = any(line.startswith(bench.LABELS[a["policy"]] + " (") and
                        f" and {bench.LABELS[b['policy']]} (" in line for line in lines)
            assert named == close, (a["name"], b["name"], lines)
    sens = doc["shared"]["sensitivity"]["calib_images"]
    assert sens > 0 and recs["psvit-L3"]["cost"]["calib_images"] >= sens

    # Latency: every model timed in the same interleaved loop.
    for b in ("1", "2"):
        assert set(doc["latency"][b]) == {"dense"} | set(recs)
        assert all(len(v["times_ms"]) == 2 and v["median_ms"] > 0 for v in doc["latency"][b].values())

    # Frontier: each policy at the target, under the largest limit.
    assert doc["settings"]["frontier_limit"] == 3.0
    pts = {(p["policy"], p["target"]): p for p in doc["frontier"]}
    assert set(pts) == {(p, 0.2) for p in POLICIES}
    for p in pts.values():
        assert not p.get("error") and 0 <= p["memory_saved"] < 1 and 0 <= p["test_top1"] <= 1
        if p["constraints_met"]:
            assert p["memory_saved"] >= 0.2 - 1e-6
        # --frontier-finetune: each frontier model fine-tuned with the common budget, as its run says.
        summary = json.loads((Path(p["run_dir"]) / "summary.json").read_text())
        assert p["finetuned_test_top1"] == summary["finetuned"]["top1"]

    # Markdown: a table per limit with a row per policy, the frontier table, the plot, the command.
    md = (out / "policies.md").read_text()
    assert doc["command"] in md and "![accuracy against memory saved](frontier.png)" in md
    for L in LIMITS:
        _, section, following = md.split(f"Accuracy limit {L:g} points", 1)[1].split("\n\n", 3)[:3]
        rows = [ln for ln in section.splitlines() if ln.startswith("| ")]
        assert rows[0].startswith("| policy | memory saved |")
        assert [ln.split(" | ")[0][2:] for ln in rows[1:]] == ["dense"] + [bench.LABELS[p] for p in POLICIES]
        assert all(ln.count("|") == rows[0].count("|") for ln in rows)
        close = doc["indistinguishable"][f"{L:g}"]
        assert following.startswith("Within two standard errors of each other") == bool(close)
        assert all(line in following for line in close)
    assert "| target |" in md and "| 20% |" in md and "before -> after the common fine-tuning" in md
    ranked = [ln for ln in md.splitlines() if ln.startswith("- 20% saved, after fine-tuning: ")]
    met = [p for p in pts.values() if p["memory_ok"]]
    assert len(ranked) == (1 if met else 0)
    if met:
        best = max(met, key=lambda p: p["finetuned_test_top1"])
        assert ranked[0].split(": ", 1)[1].startswith(f"{bench.LABELS[best['policy']]} ")
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --update-readme writes the same tables between the README's markers, replacing what was there.
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "bench" / "README.md").read_text())
    for _ in range(2):
        bench.update_readme(readme, doc, out)
    text = readme.read_text()
    block = text.split(bench.README_START, 1)[1].split(bench.README_END, 1)[0]
    assert text.count(bench.README_START) == 1 and doc["command"] in block and "| PSViT |" in block
    assert f"]({os.path.relpath(out / 'frontier.png', tmp_path)})" in block

    # The same command again reads every run back instead of recomputing it. The shared run is made
    # to resume from its finished steps (as when a session stopped it): it still reports what the
    # steps cost when they were computed, not the free read-back.
    import shutil

    shared_run = tmp_path / "work" / "shared" / "l2"
    for done in ("summary.json", "steps/policy.json", "steps/policy_model"):
        shutil.rmtree(shared_run / done) if (shared_run / done).is_dir() else (shared_run / done).unlink()
    assert bench.main(args) == 0
    again = json.loads((out / "policies.json").read_text())
    for k, v in doc["shared"].items():  # read back at no cost, charged at their first cost
        assert {x: y for x, y in again["shared"][k].items() if x != "reused"} == v
    assert again["shared"]["sensitivity"].get("reused") and again["shared"]["sensitivity"]["calib_images"] > 0
    for r in again["results"]:
        old = recs[r["name"]]
        assert (r["memory_bytes"], r["test"], r["finetuned"], r["cost"]) == \
            (old["memory_bytes"], old["test"], old["finetuned"], old["cost"])


def test_quick_and_full_defaults(bench):
    parse = bench.build_parser().parse_args
    quick, full = bench.resolve_settings(parse(["--quick"])), bench.resolve_settings(parse([]))
    # --quick caps every split and sweeps fewer points; the full protocol takes whole splits
    assert full["caps"] == dict.fromkeys(quick["caps"]) and all(n > 0 for n in quick["caps"].values())
    assert len(quick["ratios"]) < len(full["ratios"]) and len(quick["targets"]) < len(full["targets"])
    assert quick["limits"] == full["limits"] and full["policies"] == list(POLICIES)
    # An explicit option wins over either default; random always runs after primesvt.
    s = bench.resolve_settings(parse(["--quick", "--max-calib", "100", "--policies", "random,primesvt"]))
    assert s["caps"]["calib"] == 100 and s["policies"] == ["primesvt", "random"]


@pytest.mark.parametrize("policies, message", [("random,psvit", "primesvt"), ("uniform,nosuch", "unknown policy"),
                                               ("psvit,psvit", "twice")])
def test_bad_policy_lists_fail_clearly(bench, tmp_path, capsys, policies, message):
    assert bench.main(["--policies", policies, "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench/policies.py: error:") and message in err
    assert not (tmp_path / "w").exists()


def test_floor_ratios_reproduce_stepwise_widths_from_the_record(bench, tiny_model):
    from spikeprune.surgery import prune

    dense = tiny_model(embed_dim=32, num_heads=4).eval()
    step = prune(dense, {"block0.attn.heads": 0.5})
    step = prune(step, {"block0.attn.qk": 0.25, "residual": 0.25})  # relative to the 2 heads left
    step = prune(step, {"block0.mlp.hidden": 0.3, "residual": 0.1})
    ratios = bench.floor_ratios(dense, step.pruning)
    assert set(ratios) == {"block0.attn.heads", "block0.attn.qk", "residual", "block0.mlp.hidden"}
    once = prune(dense, ratios, importance="random")
    assert once.pruning.kept_counts() == step.pruning.kept_counts()
    assert bench.floor_ratios(dense, prune(dense, {}).pruning) == {}
