"""shrink, our policy (spikeprune/policies/shrink.py), and the BatchNorm re-estimation it relies on."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import spikeprune.policies.shrink as shrink_module
from spikeprune import cli
from spikeprune.costs import memory_bytes
from spikeprune.errors import SpikepruneError
from spikeprune.record import PruningRecord
from spikeprune.serialization import load_model, save_model
from spikeprune.surgery import prune
from spikeprune.training import recalibrate_batchnorm

FAST = ["--data", "digits", "--latency-repeats", "1", "--quiet", "--policy", "shrink", "--recal-images", "64",
        "--check-recal-images", "128",
        "--screen-images", "128"]


# ------------------------------------------------------------------------------------------------
# BatchNorm re-estimation
# ------------------------------------------------------------------------------------------------
def test_recalibrate_batchnorm_measures_the_statistics_of_the_images_given():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.Conv2d(3, 2, 1),
                          nn.BatchNorm2d(2)).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    x = torch.randn(40, 1, 8, 8) * 3 + 1
    batches = [x[:16], (x[16:], torch.zeros(24))]  # images alone or (images, labels)
    assert recalibrate_batchnorm(model, batches) == 40
    # the cumulative average of the batches' statistics, each batch weighted alike (torch's
    # momentum=None rule): means and unbiased variances of what reaches the BatchNorm
    with torch.no_grad():
        feats = [model[0](b) for b in (x[:16], x[16:])]
    m = [f.mean((0, 2, 3)) for f in feats]
    v = [f.var((0, 2, 3), unbiased=True) for f in feats]
    assert torch.allclose(model[1].running_mean, (m[0] + m[1]) / 2, atol=1e-5)
    assert torch.allclose(model[1].running_var, (v[0] + v[1]) / 2, atol=1e-4)
    assert model[1].momentum == 0.3 and model[4].momentum == 0.1  # restored
    assert not model.training and all(not m.training for m in model.modules())
    for k, w in weights.items():  # weights untouched
        assert torch.equal(model.state_dict()[k], w), k
    with pytest.raises(SpikepruneError, match="at least one image"):
        recalibrate_batchnorm(model, [])
    # only: the other BatchNorm layers keep their statistics and normalise with them
    kept = model[1].running_mean.clone()
    recalibrate_batchnorm(model, [x * 2], only={"4"})
    assert torch.equal(model[1].running_mean, kept) and int(model[4].num_batches_tracked) == 1


def test_recalibration_recovers_accuracy_of_a_pruned_model(trained_tiny):
    """Pruning leaves stale statistics behind; re-estimating them does not hurt, and usually helps."""
    from spikeprune.data import dataset_for_model, make_loader
    from spikeprune.training import evaluate

    calib = dataset_for_model("digits", trained_tiny, "calib")
    pruned = prune(trained_tiny, {"residual": 0.5, "block0.mlp.hidden": 0.5}).eval()
    before = evaluate(pruned, calib, progress=False)
    recalibrate_batchnorm(pruned, make_loader(dataset_for_model("digits", pruned, "train"), 64))
    after = evaluate(pruned, calib, progress=False)
    assert after["loss"] < before["loss"]


# ------------------------------------------------------------------------------------------------
# The policy through the CLI
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_trained(trained_tiny_path):
    return str(trained_tiny_path)


@pytest.fixture(scope="module")
def full_run(saved_trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    assert cli.main(["prune", saved_trained, *FAST, "--max-acc-drop", "5", "-o", str(out)]) == 0
    return out


def test_shrink_end_to_end(full_run, saved_trained):
    s = json.loads((full_run / "summary.json").read_text())
    info = s["shrink"]
    cuts = info["cuts"]
    assert s["policy"] == "shrink" and len(cuts) >= 2
    L = s["constraints"]["max_acc_drop"]
    # every accepted cut is within the limit and saves memory; the last one is the model returned
    assert all(c["acc_drop"] <= L + 1e-9 for c in cuts)
    assert all(a["memory_bytes"] > b["memory_bytes"] for a, b in zip(cuts, cuts[1:]))
    assert cuts[-1]["memory_bytes"] == s["pruned"]["memory_bytes"]["fp32"]
    assert cuts[-1]["calib_top1"] == pytest.approx(s["calib"]["pruned_top1"])
    assert s["calib"]["dense_top1"] - s["calib"]["pruned_top1"] <= L / 100 + 1e-9
    assert info["stop_reason"] and info["candidates_measured"] >= len(cuts)
    # the residual is a candidate like any other group
    assert {"residual", "block0.mlp.hidden"} & {c["group"] for c in cuts}
    # the record gives the structure; the weights file carries the re-estimated BatchNorm statistics
    model = load_model(full_run / "model")
    rebuilt = prune(load_model(saved_trained), PruningRecord.from_dict(s["pruning"]))
    ours, replayed = model.state_dict(), rebuilt.state_dict()
    assert {k: v.shape for k, v in replayed.items()} == {k: v.shape for k, v in ours.items()}
    for k, v in ours.items():
        if "running_" in k or "num_batches" in k:
            continue
        assert torch.equal(v, replayed[k]), k  # the same kept units
    assert any(not torch.equal(v, replayed[k]) for k, v in ours.items() if "running_var" in k)
    report = (full_run / "report.md").read_text()
    assert "## shrink" in report and "re-estimated" in report and "plots/shrink_walk.png" in report


def test_shrink_stops_at_the_memory_budget(saved_trained, tmp_path):
    out = tmp_path / "budget"
    assert cli.main(["prune", saved_trained, *FAST, "--max-acc-drop", "50", "--target-saving", "0.2",
                     "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["constraints_met"] and s["shrink"]["stop_reason"] == "memory budget met"
    assert s["memory_saved"] >= 0.2
    # it stopped at the first cut that met the budget
    cuts = s["shrink"]["cuts"]
    assert all(c["memory_saved"] < 0.2 for c in cuts[:-1])
    # and that cut was trimmed to the bytes still needed: one unit fewer would not have met it
    last, before = cuts[-1], (cuts[-2]["memory_saved"] if len(cuts) > 1 else 0.0)
    per_unit = (last["memory_saved"] - before) / (last["size_before"] - last["size_after"])
    assert last["memory_saved"] - per_unit < 0.2


def test_shrink_halves_a_rejected_cut_until_its_smallest_then_finishes_the_group(saved_trained, tmp_path,
                                                                                  monkeypatch):
    """A cut that breaks the limit is retried with at most half its units (also when MAX_CUT, not the
    step, sized it), in whole per-head cuts; a group whose smallest cut breaks it is finished.

    Every cut is made to cost 50 points of top-1 (whether a real cut of this tiny model's q/k costs any
    depends on the CPU its weights were trained on), so the rule is tested, not the model."""
    from spikeprune.policies import shrink as shrink_policy

    check, screen = shrink_policy._Walk.check_top1, shrink_policy._Walk.screen_eval
    monkeypatch.setattr(shrink_policy._Walk, "check_top1",
                        lambda self, m: check(self, m) - (0 if m is self.ctx.model else 0.5))
    monkeypatch.setattr(shrink_policy._Walk, "screen_eval", lambda self, m: (
        lambda loss, top1: (loss, top1 - (0 if m is self.ctx.model else 0.5)))(*screen(self, m)))
    out = tmp_path / "halving"
    assert cli.main(["prune", saved_trained, *FAST, "--groups", "block0.attn.qk", "--shrink-step", "0.9",
                     "--max-acc-drop", "0", "-o", str(out)]) == 0
    info = json.loads((out / "summary.json").read_text())["shrink"]
    rejected = info["rejected"]
    assert not info["cuts"]  # limit 0, and every cut costs 50 points
    assert rejected and info["stop_reason"].startswith("every group is at its limit")
    assert rejected[0]["units"] == 12  # MAX_CUT of 24
    for a, b in zip(rejected, rejected[1:]):
        assert b["units"] <= a["units"] // 2, (a, b)  # never the same cut twice
    assert all(r["units"] % 2 == 0 for r in rejected)  # 2 heads: the same channels from each
    assert rejected[-1]["units"] == 2


def test_shrink_honours_the_groups_pattern(saved_trained, tmp_path):
    out = tmp_path / "mlp-only"
    assert cli.main(["prune", saved_trained, *FAST, "--groups", "block*.mlp.hidden", "--max-acc-drop", "50",
                     "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert {c["group"] for c in s["shrink"]["cuts"]} == {"block0.mlp.hidden"}
    # BatchNorm layers upstream of the MLP keep the dense model's statistics; the MLP's are re-estimated
    dense, pruned = load_model(saved_trained).state_dict(), load_model(out / "model").state_dict()
    assert torch.equal(pruned["patch_embed.proj_bn.running_var"], dense["patch_embed.proj_bn.running_var"])
    assert torch.equal(pruned["block.0.attn.q_bn.running_var"], dense["block.0.attn.q_bn.running_var"])
    assert not torch.equal(pruned["block.0.mlp.fc2_bn.running_var"], dense["block.0.mlp.fc2_bn.running_var"])


def test_shrink_resume_after_kill_replays_cuts(saved_trained, full_run, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    args = ["prune", saved_trained, *FAST, "--max-acc-drop", "5", "-o", str(out)]
    real = shrink_module.Cut

    class Killed(BaseException):
        pass

    made = []

    def cut_then_die(*a, **k):
        made.append(1)
        if len(made) == 2:  # the second accepted cut is never saved
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(shrink_module, "Cut", cut_then_die)
    with pytest.raises(Killed):
        cli.main(args)
    saved = json.loads((out / "steps" / f"{shrink_module.CHECKPOINT}.json").read_text())
    assert len(saved["cuts"]) == 1 and saved["cuts"][0]["kept"]
    monkeypatch.setattr(shrink_module, "Cut", real)
    assert cli.main(args) == 0
    full, resumed = (json.loads((d / "summary.json").read_text()) for d in (full_run, out))
    assert resumed["resumed"] is True
    assert resumed["shrink"]["cuts"] == full["shrink"]["cuts"]
    assert resumed["pruned"]["memory_bytes"] == full["pruned"]["memory_bytes"]
    assert resumed["calib"]["pruned_top1"] == full["calib"]["pruned_top1"]
    # the count covers both sessions: the killed one's saved candidates, then those measured again
    assert resumed["shrink"]["candidates_measured"] == full["shrink"]["candidates_measured"]


def test_shrink_holdout_confirms_the_walk_on_images_it_never_saw(saved_trained, tmp_path, monkeypatch):
    """--holdout: the walk checks on part of the calibration split; the rest confirms where it stopped,
    and the walk is cut back (bisection over its cuts) to the most cuts that hold the limit there."""
    seen: list[int] = []
    dense_bytes = memory_bytes(load_model(saved_trained))["fp32"]

    def held_drop_is_50_points_per_saved_fraction(self, model):
        seen.append(len(self.held))
        saved = 1 - memory_bytes(model)["fp32"] / dense_bytes
        return 1.0 - 0.5 * saved  # drop 50 x saved points: within a 15-point limit up to 30% saved

    real_init = shrink_module._Walk.__init__

    def init(self, *a, **k):  # the held-out images are not among those the walk checks on
        real_init(self, *a, **k)
        def images(part):
            return {tuple(part[i][0].flatten()[:64].tolist()) for i in range(len(part))}
        assert images(self.held) and not images(self.held) & images(self.check)

    monkeypatch.setattr(shrink_module._Walk, "__init__", init)
    monkeypatch.setattr(shrink_module._Walk, "held_top1", held_drop_is_50_points_per_saved_fraction)
    out = tmp_path / "held"
    assert cli.main(["prune", saved_trained, *FAST, "--max-acc-drop", "15", "--holdout", "0.5", "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    info, held = s["shrink"], s["shrink"]["held_out"]
    cuts, k = info["cuts"], held["kept_cuts"]
    n_calib = s["calib"]["n"]
    assert set(seen) == {n_calib // 2}
    assert all(c["acc_drop"] <= 15 + 1e-9 for c in cuts)  # checked on the other half
    assert cuts[-1]["memory_saved"] > 0.3, "the walk went past what the held-out images allow"
    # the largest k within 30% saved, found by bisection, and the model returned has just those cuts
    assert k == max([0] + [i + 1 for i, c in enumerate(cuts) if c["memory_saved"] <= 0.3])
    assert len(s["pruning"]["steps"]) == k
    assert s["memory_saved"] == pytest.approx(cuts[k - 1]["memory_saved"])
    assert all(ch["ok"] == (ch["k"] <= k) for ch in held["checks"]) and len(held["checks"]) < len(cuts)
    assert "cut back to its first" in info["stop_reason"]
    # the run's figures are on the whole calibration split
    assert s["constraint_checks"]["acc_drop_calib"] <= 15 + 1e-9
    assert "Held out (--holdout 0.5)" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, words", [
    (["--holdout", "1"], "--holdout"),
    (["--shrink-step", "0"], "--shrink-step"),
    (["--shrink-step", "1.5"], "--shrink-step"),
    (["--recal-images", "0"], "--recal-images"),
    (["--shrink-fresh", "0"], "--shrink-fresh"),
])
def test_shrink_refuses_bad_options_before_touching_the_run(saved_trained, tmp_path, capsys, extra, words):
    out = tmp_path / "bad"
    assert cli.main(["prune", saved_trained, *FAST, *extra, "-o", str(out)]) != 0
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_shrink_runs_on_the_sdt_family(tmp_path):
    from spikeprune.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "sdt"
    save_model(create_model("sdt-1-64-mnist", img_size=16, num_classes=10, T=1, embed_dim=16, num_heads=2).eval(),
               path)
    out = tmp_path / "run"
    assert cli.main(["prune", str(path), *FAST, "--max-acc-drop", "100", "--target-saving", "0.3",
                     "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["memory_saved"] >= 0.3 and memory_bytes(load_model(out / "model"))["fp32"] == \
        s["pruned"]["memory_bytes"]["fp32"]


def test_limit_after_finetune_probes_with_distillation(saved_trained, tmp_path):
    out = tmp_path / "after"
    assert cli.main(["prune", saved_trained, *FAST, "--max-acc-drop", "2", "--limit-after-finetune",
                     "--finetune-epochs", "1", "--kd", "--probe-steps", "4", "--walk-drop", "30",
                     "--max-images", "train=256", "-o", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    info = s["shrink"]
    assert info["limit_after_finetune"] and info["walk_drop"] == 30
    assert s["constraint_checks"]["limit_judged_on"] == "fine-tuned model"
    # the limit was judged on the fine-tuned model's calibration top-1
    drop = (s["calib"]["dense_top1"] - s["calib"]["finetuned_top1"]) * 100
    assert s["constraint_checks"]["acc_drop_calib"] == pytest.approx(drop)
    probes = info["probes"]
    assert probes, "the walk made cuts, so the choice was probed"
    chosen = [p for p in probes if p["ok"]]
    kept_cuts = len(s["pruning"]["steps"])
    # bisection: the chosen k is the largest probed k within the limit, and the next probed one failed
    assert kept_cuts == max([0] + [p["k"] for p in chosen])
    assert all(not p["ok"] for p in probes if p["k"] > kept_cuts)
    assert "Limit after fine-tuning" in (out / "report.md").read_text()


def test_limit_after_finetune_with_a_memory_target_cuts_to_it_and_lets_the_run_judge(saved_trained, tmp_path):
    """With a target, fewer cuts would miss it: the walk goes to the target whatever it costs before
    fine-tuning, no probe runs, and the run's check on the fine-tuned model decides."""
    out = tmp_path / "after-target"
    rc = cli.main(["prune", saved_trained, *FAST, "--max-acc-drop", "1", "--limit-after-finetune",
                   "--finetune-epochs", "1", "--kd", "--target-saving", "0.5", "--max-images", "train=256",
                   "-o", str(out)])
    s = json.loads((out / "summary.json").read_text())
    assert rc == (0 if s["constraints_met"] else cli.EXIT_CONSTRAINTS_NOT_MET)
    info = s["shrink"]
    assert info["walk_drop"] == 100 and info["probes"] is None
    assert info["stop_reason"] == "memory budget met" and s["memory_saved"] >= 0.5
    assert max(c["acc_drop"] for c in info["cuts"]) > 1, "the limit did not stop the walk before fine-tuning"
    checks = s["constraint_checks"]
    assert checks["limit_judged_on"] == "fine-tuned model"
    assert checks["acc_ok"] == (checks["acc_drop_calib"] <= 1 + 1e-9) and s["constraints_met"] == checks["acc_ok"]
    assert "with a memory target" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, words", [
    (["--policy", "shrink", "--limit-after-finetune"], "--finetune-epochs"),
    (["--policy", "primesvt", "--limit-after-finetune", "--finetune-epochs", "1"], "use --policy bitshrink or shrink"),
    (["--policy", "shrink", "--walk-drop", "-1"], "--walk-drop"),
])
def test_limit_after_finetune_refusals(saved_trained, tmp_path, capsys, extra, words):
    out = tmp_path / "bad"
    assert cli.main(["prune", saved_trained, "--data", "digits", "--quiet", *extra, "-o", str(out)]) != 0
    assert words in capsys.readouterr().err
    assert not out.exists()
