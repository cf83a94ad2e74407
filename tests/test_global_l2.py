"""The global ranking policy (`--policy global`): group normalisation, one ranking across groups,
what the engine removes for a cut, the memory bisection, and the policy under an accuracy limit and
under a memory target on a trained tiny model."""
from __future__ import annotations

import pytest
import torch

from spikeprune.coupling import group_map, groups
from spikeprune.importance import scores
from spikeprune.policy_api import Constraints, PruneContext
from spikeprune.policies.global_l2 import global_policy, global_ranking, normalise, smallest_cut_for
from spikeprune.run import RunSettings
from spikeprune.surgery import plan, prune


def channel_groups(model):
    return [g for g in groups(model) if g.unit == "channel"]


def test_normalise_divides_by_the_group_mean():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    assert torch.allclose(normalise(s), s / 3)
    assert normalise(s).mean().item() == pytest.approx(1.0)
    assert torch.equal(normalise(torch.zeros(3)), torch.zeros(3, dtype=torch.float64))


def test_ranking_is_one_ascending_order_that_keeps_a_channel_per_head(tiny_model):
    model = tiny_model(embed_dim=16, num_heads=2)
    gs = channel_groups(model)
    raw = scores(model, "l2", names=[g.name for g in gs])
    rank = global_ranking(gs, raw)
    norm = {g.name: normalise(raw[g.name]) for g in gs}
    values = [float(norm[g][u]) for g, u in rank.order]
    assert values == sorted(values)
    assert len({g for g, _ in rank.order}) > 1  # the groups really are interleaved in one ranking
    # Everything rankable removed: every group (every head of qk / v) keeps exactly one channel.
    full = prune(model, rank.ratios(len(rank)))
    after = group_map(full)
    for g in gs:
        assert after[g.name].size == (g.heads if g.heads > 1 else 1)
    assert len(rank) == sum(g.size - (g.heads if g.heads > 1 else 1) for g in gs)


def test_a_cut_removes_the_ranked_channels_of_each_group(tiny_model):
    model = tiny_model(embed_dim=16, num_heads=2)
    gs = channel_groups(model)
    raw = scores(model, "l2", names=[g.name for g in gs])
    rank = global_ranking(gs, raw)
    n = len(rank) // 3
    taken: dict[str, set] = {}
    for g, u in rank.order[:n]:
        taken.setdefault(g, set()).add(u)
    kept = plan(model, rank.ratios(n), importance=raw).kept
    for g in gs:
        if g.heads == 1:  # per-head groups take the same count from every head instead (docstring)
            assert set(range(g.size)) - set(kept[g.name]) == taken.get(g.name, set())


def test_smallest_cut_for_a_falling_memory():
    mem = [100, 90, 90, 70, 60, 40]
    assert smallest_cut_for(lambda n: mem[n], 5, 90) == 1
    assert smallest_cut_for(lambda n: mem[n], 5, 65) == 4
    assert smallest_cut_for(lambda n: mem[n], 5, 100) == 0
    assert smallest_cut_for(lambda n: mem[n], 5, 39) is None


def context(model, tmp_path, **constraints):
    settings = RunSettings(data="digits", output=tmp_path, policy="global", constraints=Constraints(**constraints),
                           progress=False, uniform_ratios=(0.1, 0.2, 0.3, 0.5))
    return PruneContext(model, settings)


def test_policy_within_the_accuracy_limit(trained_tiny, tmp_path):
    ctx = context(trained_tiny, tmp_path / "a", max_acc_drop=3)
    res = global_policy(ctx)
    info = res.info["global"]
    assert ctx.within_limit(ctx.calib_top1(res.model))
    assert res.info["calib_top1"] == pytest.approx(ctx.calib_top1(res.model))
    assert info["removed_channels"] == sum(info["removed_per_group"].values())
    assert group_map(res.model)["residual"].size == trained_tiny.cfg.embed_dim - info["removed_per_group"].get("residual", 0)
    # What was pruned is the model's record, against the dense model.
    assert res.model.pruning.kept_counts() == {g.name: g.size for g in groups(res.model)}
    # The trace holds every measured cut; a rerun resumes it without another calibration pass.
    passes = ctx.evaluations
    again = context(trained_tiny, tmp_path / "a", max_acc_drop=3)
    assert global_policy(again).info["global"]["measured"] == info["measured"] and again.evaluations == 0
    assert passes >= len(info["measured"])


def test_policy_meets_a_memory_target_with_the_smallest_cut(trained_tiny, tmp_path):
    ctx = context(trained_tiny, tmp_path / "t", max_acc_drop=100, target_saving=0.2)
    res = global_policy(ctx)
    info = res.info["global"]
    assert info["memory_met"] and info["reason"] == "smallest cut meeting the memory budget"
    assert ctx.memory(res.model) <= ctx.budget_bytes
    # One channel fewer would not fit the budget.
    gs = channel_groups(trained_tiny)
    rank = global_ranking(gs, scores(trained_tiny, "l2", names=[g.name for g in gs]))
    n = info["removed_channels"]
    assert ctx.memory(ctx.prune(rank.ratios(n - 1))) > ctx.budget_bytes
