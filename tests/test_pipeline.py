"""The prune command and the run folder: bad input refused before any work, fixed-ratio policies,
the uniform search, a run interrupted after its policy resumes without redoing it, fine-tuning with
distillation, and the folder-ownership rules. (More of the run layer: tests/test_run.py.)"""
from __future__ import annotations

import json
import re

import pytest
import torch

import spikeprune.run as run_module
from spikeprune.cli import main
from spikeprune.errors import SpikepruneError
from spikeprune.policy_api import DEFAULT_MAX_ACC_DROP, Constraints, PolicyResult, register_policy, unregister_policy
from spikeprune.run import prune_run
from spikeprune.serialization import load_model, save_model

QUICK = ["--data", "digits", "--batch-size", "64", "--latency-repeats", "2", "--quiet"]


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    path = tmp_path / "model"
    save_model(tiny_model().eval(), path)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--max-acc-drop", "-1"], "non-negative"),
    (["--ratios", "0.2,1.0"], "outside \\[0, 1\\)"),
    (["--uniform-ratios", "-0.1"], "outside \\[0, 1\\)"),
    (["--target-saving", "1.5"], "strictly between 0 and 1"),
    (["--memory-budget", "8M"], "ambiguous"),
    (["--kd"], "--finetune-epochs"),
    (["--finetune-epochs", "-2"], "0 or more"),
    (["--policy", "psvit", "--uniform", "0.3"], "belongs to the uniform policy"),
    (["--uniform", "1.5"], "in \\[0, 1\\)|outside \\[0, 1\\)"),
    (["--round-to", "0"], "--round-to must be a whole number >= 1"),
    (["--ratio", "nosuch.group=0.5"], "'nosuch.group' matches no group"),
    (["--ratio", "residual"], "PATTERN=R"),
    (["--uniform", "0.2", "--skip", "nosuch"], "--skip 'nosuch' matches no channel group"),
    (["--groups", "nosuch*"], "--groups 'nosuch\\*' matches no group"),
    (["--finetune-epochs", "1", "--finetune-lr", "0"], "--finetune-lr must be a finite number > 0"),
    (["--finetune-epochs", "1", "--kd", "--kd-weight", "2"], "--kd-weight must be a finite number in \\[0, 1\\]"),
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["--max-images", "calib=0"], "--max-images calib must be a positive whole number"),
    (["--max-images", "val=10"], "SPLIT one of train, calib, test"),
    (["--target-saving", "0.5", "--memory-budget", "1kB"], "contradict"),
])
def test_bad_input_is_refused_before_any_work(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(["prune", str(model_dir), *QUICK, "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spikeprune: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()  # refused before the run folder was made


def test_constraints_validation():
    c = Constraints(None, 0.25, "1kB", "int8")
    assert c.max_acc_drop == DEFAULT_MAX_ACC_DROP and c.memory_budget == 1000 and not c.resolved
    assert Constraints(target_saving=0.25).resolve(1000, 10).budget_bytes == 750
    assert Constraints(memory_budget="1kB").resolve(2000, 10).budget_bytes == 1000
    with pytest.raises(SpikepruneError, match="contradict"):  # 1000 B against 1500 B: refused, never the smaller
        c.resolve(2000, 10)
    with pytest.raises(SpikepruneError, match="precision"):
        Constraints(precision="fp8")


def test_fixed_uniform_via_cli_and_folder_rules(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "mine").mkdir(parents=True)
    args = ["prune", str(model_dir), *QUICK, "--uniform", "0.25", "-o", str(out)]
    assert main(args) == 2 and "not a spikeprune run folder" in capsys.readouterr().err
    assert (out / "mine").is_dir()  # nothing of the user's was touched
    assert main(args + ["--force"]) == 0
    printed = capsys.readouterr().out
    assert "policy uniform" in printed and "pruned" in printed
    s = json.loads((out / "summary.json").read_text())
    # The engine issue's keys: sizes, MACs, ratios applied, top-1 on calib and test.
    assert s["policy"] == "uniform" and s["uniform_ratio"] == 0.25
    assert set(s["removed"]) >= {"residual", "block0.mlp.hidden"} and "block0.attn.heads" not in s["removed"]
    assert s["removed"] == s["pruning"]["removed"]
    assert s["pruned"]["params"] < s["dense"]["params"] and s["pruned"]["macs"] < s["dense"]["macs"]
    assert {"fp32", "fp16", "int8"} <= set(s["pruned"]["memory_bytes"])
    assert 0 <= s["top1"]["calib"] <= 1 and 0 <= s["top1"]["test"] <= 1 and s["top1"]["test"] == s["pruned"]["top1"]
    assert s["removed"]["residual"] == pytest.approx(0.25)
    assert load_model(out / "model").cfg.embed_dim == 12
    # Another command into the same folder is a different run: refused, then replaced with --force.
    other = ["prune", str(model_dir), *QUICK, "--ratio", "block0.mlp.hidden=0.5", "-o", str(out)]
    assert main(other) == 2 and "holds a different run" in capsys.readouterr().err
    assert main(other + ["--force"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["policy"] == "groups" and s["removed"] == {"block0.mlp.hidden": 0.5}
    assert load_model(out / "model").pruning.kept_counts()["block0.mlp.hidden"] == s["pruning"]["kept_counts"][
        "block0.mlp.hidden"] == 32


def test_uniform_search_takes_the_largest_ratio_within_the_limit(trained_tiny, tmp_path):
    s = prune_run(trained_tiny, "digits", tmp_path / "run", policy="uniform", max_acc_drop=25.0,
                  uniform_ratios=(0.05, 0.1, 0.3), batch_size=64, latency_repeats=2, progress=False)
    rows = s["uniform_sweep"]
    ok = [r["ratio"] for r in rows if r["acc_drop"] <= 25.0]
    assert s["uniform_ratio"] == (max(ok) if ok else 0.0)
    assert s["constraint_checks"]["acc_ok"]
    assert (tmp_path / "run" / "plots" / "uniform_sweep.png").is_file()


def test_interrupted_run_resumes_without_redoing_the_policy(tiny_model, tmp_path, monkeypatch):
    calls = []

    @register_policy("test-counting")
    def counting(ctx):
        calls.append(1)
        return PolicyResult(ctx.prune({"block0.mlp.hidden": 0.5}), {"note_from_policy": 7})

    real = run_module.measure_model

    def crash_on_pruned(ctx, model, name):
        if name == "pruned":
            raise KeyboardInterrupt
        return real(ctx, model, name)

    model = tiny_model().eval()
    kw = dict(policy="test-counting", batch_size=64, latency_repeats=2, progress=False)
    monkeypatch.setattr(run_module, "measure_model", crash_on_pruned)
    try:
        with pytest.raises(KeyboardInterrupt):
            prune_run(model, "digits", tmp_path / "run", **kw)
        assert not (tmp_path / "run" / "summary.json").exists() and len(calls) == 1
        monkeypatch.setattr(run_module, "measure_model", real)
        s = prune_run(model, "digits", tmp_path / "run", **kw)
    finally:
        unregister_policy("test-counting")
    assert len(calls) == 1 and s["resumed"] and s["note_from_policy"] == 7
    assert s["pruned"]["params"] < s["dense"]["params"]
    assert s["removed"] == {"block0.mlp.hidden": 0.5}


def test_finetune_with_distillation(tiny_model, tmp_path):
    model = tiny_model().eval()
    s = prune_run(model, "digits", tmp_path / "run", policy="groups", options={"ratio": ["block0.mlp.hidden=0.5"]},
                  finetune_epochs=1, kd=True, kd_temperature=2.0, batch_size=64, latency_repeats=2, progress=False)
    ft = s["finetuned"]
    assert ft is not None and 0 <= ft["top1"] <= 1 and ft["params"] == s["pruned"]["params"]
    assert s["finetune"]["kd"] and s["finetune"]["kd_temperature"] == 2.0 and len(s["finetune_history"]) == 1
    final = load_model(tmp_path / "run" / "model")
    tuned = load_model(tmp_path / "run" / "steps" / "finetuned_model")
    untuned = load_model(tmp_path / "run" / "steps" / "policy_model")
    w = "block.0.mlp.fc1_linear.weight"
    assert torch.equal(final.state_dict()[w], tuned.state_dict()[w])
    assert final.pruning == untuned.pruning and final.pruning.removed_fractions() == {"block0.mlp.hidden": 0.5}
    assert not torch.equal(final.state_dict()[w], untuned.state_dict()[w])
    assert "fine-tuned" in (tmp_path / "run" / "report.md").read_text()
