"""The services every policy uses (spikeprune.policy_api): declared options, the resumable step,
cut-one-group, the bisection searches, the sharded counted evaluation, the trajectory plot."""
from __future__ import annotations

import json

import pytest
import torch

from spikeprune import cli
from spikeprune.coupling import group_map
from spikeprune.errors import SpikepruneError
from spikeprune.policy_api import (Constraints, Option, PolicyResult, PruneContext, TrajectoryPoint, bisect,
                                   get_policy, largest_within, plot_trajectory, register_policy, unregister_policy)
from spikeprune.run import RunSettings
from spikeprune.serialization import save_model


# ------------------------------------------------------------------------------------------------
# Searches
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, limit", [(0, 0), (10, 10), (10, 0), (10, 3), (17, 16), (1, 0), (100, 37)])
def test_largest_within_finds_the_boundary_in_log_steps(n, limit):
    asked = []

    def within(k):
        asked.append(k)
        return k <= limit

    assert largest_within(n, within) == limit
    assert 0 not in asked and len(asked) <= 1 + max(1, n).bit_length()


def test_bisect_integers_floats_and_a_step_budget():
    assert bisect(-1, 50, lambda n: n * 3 < 100) == (33, 34)  # the last true, the first false
    lo, hi = bisect(0.0, 1.0, lambda r: r < 0.3, tol=1e-3)
    assert lo < 0.3 <= hi and hi - lo <= 1e-3
    seen = []
    assert bisect(0, 64, lambda n: seen.append(n) or True, steps=2) == (48, 64) and seen == [32, 48]
    assert bisect(5, 6, lambda n: pytest.fail("nothing between 5 and 6")) == (5, 6)


# ------------------------------------------------------------------------------------------------
# Declared options
# ------------------------------------------------------------------------------------------------
def test_option_converts_defaults_and_refuses_with_the_flag():
    o = Option("probe_steps", int, 7, "steps", valid=lambda n: n >= 1, must="a whole number >= 1")
    assert o.flag == "--probe-steps" and o.value(None) == 7 and o.value("3") == 3 and o.value(4.0) == 4
    for bad in ("x", 0, 2.5):
        with pytest.raises(SpikepruneError, match="--probe-steps must be"):
            o.value(bad)
    f = Option("frac", float, None, valid=lambda x: 0 < x < 1, must="in (0, 1)")
    assert f.value(None) is None and f.value("0.25") == 0.25
    for bad in (float("nan"), 1.0, "inf"):
        with pytest.raises(SpikepruneError, match="--frac must be in"):
            f.value(bad)
    many = Option("skip", str, many=True)
    assert many.value(None) == [] and many.value(["a", "b"]) == ["a", "b"]


@pytest.fixture
def knob_policy():
    """A throw-away policy with one declared option; it records what it read."""
    seen = {}

    @register_policy("test-knob", options=[Option("knob", float, 0.5, "a knob", valid=lambda x: 0 <= x <= 1,
                                                  must="in [0, 1]")])
    def knob(ctx):
        seen["knob"] = ctx.option("knob")
        return PolicyResult(ctx.prune({}))
    yield seen
    unregister_policy("test-knob")


def test_declared_options_reach_the_command_and_are_checked_before_the_run_folder(knob_policy, tiny_model, tmp_path,
                                                                                  capsys):
    model = tmp_path / "m"
    save_model(tiny_model().eval(), model)
    common = ["prune", str(model), "--data", "digits", "--policy", "test-knob", "--max-images", "calib=40",
              "--max-images", "test=40", "--latency-repeats", "1", "--measure-images", "8", "--quiet"]
    assert cli.main([*common, "--knob", "2", "-o", str(tmp_path / "bad")]) != 0
    assert "--knob must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert cli.main([*common, "--knob", "0.25", "-o", str(tmp_path / "ok")]) == 0
    assert knob_policy["knob"] == 0.25
    assert get_policy("test-knob").values({}) == {"knob": 0.5}


# ------------------------------------------------------------------------------------------------
# The context's services on a real model
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def ctx(trained_tiny, tmp_path):
    s = RunSettings(data="digits", output=tmp_path / "run", policy="uniform", constraints=Constraints(max_acc_drop=3),
                    max_images={"calib": 50, "train": 40}, progress=False)
    return PruneContext(trained_tiny, s)


def test_resumable_step_comes_back_only_under_its_key(ctx):
    step = ctx.resumable("thing", {"a": 1}, {"rows": []})
    assert not step.resumed and step.state == {"key": {"a": 1}, "rows": []}
    step.state["rows"].append(3)
    step.save()
    again = ctx.resumable("thing", {"a": 1}, {"rows": []})
    assert again.resumed and again.state["rows"] == [3]
    other = ctx.resumable("thing", {"a": 2}, {"rows": []})
    assert not other.resumed and other.state["rows"] == []
    assert "thing: the saved progress belongs to other settings" in (ctx.run_dir / "log.txt").read_text()
    by_field = ctx.resumable("thing", [1, 2], {"rows": []}, key_field="skip")
    assert by_field.state == {"skip": [1, 2], "rows": []}


def test_cut_one_group_and_replay_it_from_the_kept_units(ctx):
    pruned, kept = ctx.cut(ctx.model, "block0.mlp.hidden", 0.5)
    size = group_map(ctx.model)["block0.mlp.hidden"].size
    assert len(kept) == size // 2 and group_map(pruned)["block0.mlp.hidden"].size == size // 2
    s = ctx.dense_scores()["block0.mlp.hidden"]
    assert set(kept) == set(torch.argsort(s, descending=True, stable=True)[:size // 2].tolist())  # the best kept
    again = ctx.keep(ctx.model, "block0.mlp.hidden", kept).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in pruned.state_dict().items())

    class Saved:
        group, memory_bytes = "block0.mlp.hidden", ctx.memory(pruned)
    again = ctx.replay([Saved], lambda m, st: ctx.keep(m, st.group, kept), "test")
    assert ctx.memory(again) == Saved.memory_bytes
    Saved.memory_bytes += 1  # a replay that does not give the saved size starts afresh
    assert ctx.replay([Saved], lambda m, st: ctx.keep(m, st.group, kept), "test") is None


def test_evaluate_counts_its_images_on_a_sample_of_the_split(ctx):
    part = ctx.sample("calib", 20, seed=1)
    assert len(part) == 20 and list(part.indices) == sorted(part.indices)
    assert len(ctx.sample("calib", 10_000, seed=1)) == len(ctx.calib)
    r = ctx.evaluate(ctx.model, part)
    assert r["n"] == 20 and 0 <= r["top1"] <= 1 and r["loss"] > 0
    whole = ctx.calib_top1(ctx.model)
    assert (ctx.evaluations, ctx.images_evaluated) == (2, 20 + len(ctx.calib)) and 0 <= whole <= 1
    batches = ctx.batches(part, 8)
    assert [len(y) for _, y in batches] == [8, 8, 4] and torch.equal(batches[0][0][0], part[0][0])


def test_one_trajectory_plot_for_every_policy(tmp_path):
    points = [TrajectoryPoint(900_000 - 30_000 * i, 0.9 - 0.002 * i, f"group{i}") for i in range(25)]
    plot_trajectory(tmp_path / "t.png", points, dense_bytes=1_000_000, dense_top1=0.9, max_acc_drop=3,
                    budget_bytes=400_000, precision="fp32", title="a walk")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_primesvt_and_shrink_read_no_fine_tuning_field_of_the_run_settings():
    """Fine-tuning reaches a policy as one object (ctx.finetuning), never as fields copied from the
    run settings."""
    import inspect

    import spikeprune.policies as policies

    for module in (policies.shrink, policies.primesvt, policies.psvit, policies.uniform, policies.global_l2):
        assert "ctx.settings" not in inspect.getsource(module), module.__name__


def test_policy_toolkit_summary_is_json(ctx):
    """The resumable state is plain JSON (what RUN/steps/NAME.json holds)."""
    step = ctx.resumable("j", {"k": (1, 2)}, {"m": {"1": 0.5}})
    step.save()
    assert json.loads((ctx.run_dir / "steps" / "j.json").read_text()) == {"key": {"k": [1, 2]}, "m": {"1": 0.5}}
