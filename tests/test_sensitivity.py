"""Sensitivity analysis: the cached run computes exactly what a full forward computes, the CSV resumes
after a kill to the same table, another run's file is refused, seeds reproduce, bad input is refused."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from spikeprune.cli import main
from spikeprune.data import dataset_for_model, make_loader
from spikeprune.errors import SpikepruneError
from spikeprune.ratios import parse_ratios
from spikeprune.sensitivity import DenseCache, Packed, SensitivityTable, analyze, run_from, stage_names, start_stage
from spikeprune.stats import calib_resolution, resolution_warning
from spikeprune.serialization import save_model
from spikeprune.surgery import SpikepruneWarning, prune
from spikeprune.training import evaluate

BS = 64


def _calib(model):
    return dataset_for_model("digits", model, "calib")


def test_staged_forward_equals_model_forward(tiny_model):
    model = tiny_model(depth=2).eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(run_from(model, 0, x), model(x))
    assert stage_names(model) == ["stem.0", "stem.1", "stem.2", "stem.3", "block.0", "block.1", "head"]
    assert start_stage("stem.proj_conv", model) == 0 and start_stage("stem.proj_conv2", model) == 2
    assert start_stage("residual", model) == 3 and start_stage("block1.attn.qk", model) == 5


def test_cached_inputs_give_bit_identical_logits(tiny_model):
    """Every group's candidate, run from its cached stage input, gives the logits of model(images)."""
    torch.manual_seed(1)
    model = tiny_model(depth=2).eval()
    ds = _calib(model)
    loader = make_loader(ds, BS)
    cache = DenseCache(model, loader, points={2, 3, 4, 5}, progress=False)
    assert cache.points == {0, 2, 3, 4, 5}
    # Stem inputs are spikes (bits); the residual stream holds spike sums (bits or uint8): never floats.
    assert cache.batches[0].inputs[3].kind == "bits" and cache.batches[0].inputs[5].kind in ("bits", "uint8")
    images = [x for x, _ in loader]
    for group in ["stem.proj_conv1", "stem.proj_conv2", "residual", "block0.attn.v", "block1.mlp.hidden", "block1.attn.heads"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpikepruneWarning)
            pruned = prune(model, {group: 0.5}).eval()
        p = cache.best_point(start_stage(group, model))
        with torch.no_grad():
            for b, x in zip(cache.batches, images):
                assert torch.equal(run_from(pruned, p, b.inputs[p].unpack()), pruned(x)), group


def test_cached_accuracy_equals_evaluate(trained_tiny):
    """The table's top-1 of every candidate equals evaluate() of the pruned model, exactly."""
    model = trained_tiny
    ds = _calib(model)
    table = analyze(model, ds, ratios=(0.3, 0.6), batch_size=BS, progress=False, log=lambda m: None)
    assert table.dense_top1 == evaluate(model, ds, "calib", batch_size=BS, progress=False)["top1"]
    assert table.dense_top1 > 0.5  # a trained model: drops are measurable
    assert any(r["acc_drop"] > 1 for r in table.rows)
    for r in table.rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpikepruneWarning)
            pruned = prune(model, {r["group"]: r["ratio"]})
        assert r["top1"] == evaluate(pruned, ds, "calib", batch_size=BS, progress=False)["top1"], r
        assert r["acc_drop"] == pytest.approx((table.dense_top1 - r["top1"]) * 100)
        assert r["kept"] + r["removed"] == r["size"] and r["memory_saved_bytes"] >= 0
        assert 0 <= r["memory_saved_frac"] < 1
    fc = table.forward_cost
    assert fc["candidates"] == len(table.rows) == 8 * 2
    assert fc["spent"] < fc["full_recompute"] and fc["ratio"] == pytest.approx(fc["full_recompute"] / fc["spent"])
    # Block groups start at their block: cheaper than a full forward; stem.proj_conv starts at the image.
    rows = {(r["group"], r["ratio"]): r for r in table.rows}
    assert rows[("block0.mlp.hidden", 0.6)]["cost"] < rows[("block0.mlp.hidden", 0.6)]["full_cost"]
    assert rows[("stem.proj_conv", 0.6)]["start"] == "stem.0"


def test_resume_after_kill_gives_the_same_table(trained_tiny, tmp_path):
    model = trained_tiny
    ds = _calib(model)
    kw = dict(groups="block0.*,residual", ratios=(0.3, 0.6), batch_size=BS, progress=False, log=lambda m: None)
    whole = analyze(model, ds, output=tmp_path / "whole.csv", **kw)

    class Killed(Exception):
        pass

    seen = []

    def kill_after_three(row):
        seen.append(row)
        if len(seen) == 3:
            raise Killed

    part = tmp_path / "part.csv"
    with pytest.raises(Killed):
        analyze(model, ds, output=part, on_row=kill_after_three, **kw)
    assert len(SensitivityTable.from_csv(part).rows) == 3
    with open(part, "a") as f:  # a kill in the middle of writing a row leaves a torn line
        f.write("block0.attn.v,0.6,1")
    computed = []
    resumed = analyze(model, ds, output=part, on_row=computed.append, **kw)
    assert len(computed) == len(whole.rows) - 3
    assert resumed.rows == whole.rows
    assert part.read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert resumed.forward_cost["rows_reused"] == 3
    # A finished table is read back without computing anything.
    again = analyze(model, ds, output=part, on_row=computed.append, **kw)
    assert again.rows == whole.rows and len(computed) == len(whole.rows) - 3
    assert SensitivityTable.from_csv(part).rows == whole.rows


def test_another_runs_table_is_refused_unless_forced(tiny_model, tmp_path):
    model = tiny_model().eval()
    ds = _calib(model)
    out = tmp_path / "s.csv"
    kw = dict(groups="block0.mlp.hidden", batch_size=BS, progress=False, log=lambda m: None)
    analyze(model, ds, ratios=(0.5,), output=out, **kw)
    with pytest.raises(SpikepruneError, match="different run.*ratios"):
        analyze(model, ds, ratios=(0.3,), output=out, **kw)
    with pytest.raises(SpikepruneError, match="different run.*importance"):
        analyze(model, ds, ratios=(0.5,), importance="l1", output=out, **kw)
    other = tiny_model(seed=1).eval()
    with pytest.raises(SpikepruneError, match="model weights differ"):
        analyze(other, ds, ratios=(0.5,), output=out, **kw)
    t = analyze(model, ds, ratios=(0.3,), output=out, force=True, **kw)
    assert [r["ratio"] for r in SensitivityTable.from_csv(out).rows] == [0.3] == [r["ratio"] for r in t.rows]
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n1,2\n")
    with pytest.raises(SpikepruneError, match="not a spikeprune sensitivity table"):
        analyze(model, ds, ratios=(0.5,), output=junk, **kw)


def test_deterministic_for_a_seed(tiny_model):
    model = tiny_model(depth=2).eval()
    ds = _calib(model)
    kw = dict(groups="block1.*", ratios=(0.5,), importance="random", batch_size=BS, progress=False, log=lambda m: None)
    a, b = analyze(model, ds, seed=3, **kw), analyze(model, ds, seed=3, **kw)
    assert a.rows == b.rows and a.meta["fingerprint"] == b.meta["fingerprint"]
    assert analyze(model, ds, seed=4, **kw).meta["fingerprint"] != a.meta["fingerprint"]


def test_same_kept_count_is_not_recomputed(tiny_model):
    # Two heads: 0.1 removes none (cost 0, dense accuracy), 0.5 and 0.7 both keep one head (one run).
    model = tiny_model().eval()
    t = analyze(model, _calib(model), groups="block0.attn.heads", ratios=(0.1, 0.5, 0.7), batch_size=BS,
                progress=False, log=lambda m: None)
    r01, r05, r07 = t.rows
    assert r01["removed"] == 0 and r01["cost"] == 0 and r01["top1"] == t.dense_top1
    assert r05["kept"] == r07["kept"] == 1 and r05["cost"] > 0 and r07["cost"] == 0 and r05["top1"] == r07["top1"]


@pytest.mark.parametrize("bad", ["", "0.1,1.0", "-0.1", "abc", "nan", [1.5]])
def test_bad_ratio_grids(bad):
    with pytest.raises(SpikepruneError):
        parse_ratios(bad)


def test_ratio_grid_is_sorted_and_unique():
    assert parse_ratios("0.5, 0.1,0.5") == (0.1, 0.5)


def test_calibration_resolution_warning_has_the_numbers():
    r = calib_resolution(500, 0.97)
    assert r["ok"] and r["se_points"] == pytest.approx(100 * (0.97 * 0.03 / 500) ** 0.5)
    w = resolution_warning(180, 0.83)
    assert w is not None and "180 images" in w and "2.80 points" in w and "1,411 images" in w
    assert resolution_warning(50, 1.0) is not None  # below 100 images one image is more than a point


def test_packed_is_lossless():
    spikes = (torch.rand(3, 4, 5) > 0.5).float()
    sums = torch.randint(0, 7, (2, 3, 4)).float()
    halves = torch.tensor([0.5, -1.25, 3.0])
    reals = torch.randn(4)
    for x, kind in [(spikes, "bits"), (sums, "uint8"), (halves, "fp16"), (reals, "raw")]:
        p = Packed(x)
        assert p.kind == kind and torch.equal(p.unpack(), x)
    assert Packed(spikes).nbytes < spikes.numel()


def test_cli(tiny_model, tmp_path, capsys):
    model_dir = tmp_path / "m"
    save_model(tiny_model().eval(), model_dir)
    out = tmp_path / "s.csv"
    base = ["sensitivity", str(model_dir), "--data", "digits", "-o", str(out)]
    assert main(base + ["--groups", "block0.mlp.hidden", "--ratios", "0.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["group"] for r in doc["rows"]] == ["block0.mlp.hidden"] and out.is_file()
    assert main(base + ["--ratios", "0.5,1.2"]) == 2
    assert "outside [0, 1)" in capsys.readouterr().err
    assert main(base + ["--groups", "nope*"]) == 2
    assert "matches no group" in capsys.readouterr().err
