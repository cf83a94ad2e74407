"""Importance criteria: shapes, the documented formulas on hand-set weights, the spike-aware
criterion's zero for silent channels, determinism, and the errors for missing data."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from spikeprune.errors import SpikepruneError
from spikeprune.coupling import groups
from spikeprune.importance import CRITERIA, score, scores
from spikeprune.models import create_model
from spiking_helpers import randomise


@pytest.fixture(scope="module")
def model():
    # An untrained default model barely spikes past the stem (every gradient there is zero);
    # randomised BatchNorms give every layer activity, as in a trained model.
    return randomise(create_model("spikformer-1-32-digits", T=2, attn_v_threshold=0.1).eval(), 0)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_scores_every_group(model, batch, criterion):
    out = scores(model, criterion, data=batch)
    gs = groups(model)
    assert list(out) == [g.name for g in gs]
    for g in gs:
        s = out[g.name]
        assert s.shape == (g.size,) and s.dtype == torch.float64 and torch.isfinite(s).all() and (s >= 0).all()
        if criterion not in ("random", "firing"):  # weights are random: every unit has some magnitude
            assert (s > 0).all(), (criterion, g.name)


def test_l2_is_the_normalised_group_norm(model):
    """hidden group = fc1 rows + fc2 columns: sqrt(r1 / mean(r1) + r2 / mean(r2)), r = squared norms."""
    mlp = model.block[0].mlp
    r1 = (mlp.fc1_linear.weight.double() ** 2).sum(1)
    r2 = (mlp.fc2_linear.weight.double() ** 2).sum(0)
    expected = (r1 / r1.mean() + r2 / r2.mean()).sqrt()
    assert torch.allclose(score(model, "block0.mlp.hidden", "l2"), expected)
    r1, r2 = mlp.fc1_linear.weight.double().abs().sum(1), mlp.fc2_linear.weight.double().abs().sum(0)
    assert torch.allclose(score(model, "block0.mlp.hidden", "l1"), r1 / r1.mean() + r2 / r2.mean())
    g = mlp.fc1_bn.weight.double().abs()
    assert torch.allclose(score(model, "block0.mlp.hidden", "bn"), g / g.mean())


def test_scaling_one_member_does_not_change_the_ranking():
    """Each member is divided by its own mean, so a layer with large weights does not dominate."""
    model = create_model("spikformer-1-32-digits").eval()
    before = score(model, "residual", "l2")
    with torch.no_grad():
        model.patch_embed.rpe_conv.weight.mul_(1000.0)
    assert torch.allclose(score(model, "residual", "l2"), before)


def test_heads_sum_their_channels(model):
    a = model.block[0].attn
    d = a.qk_dim // a.heads
    qk = score(model, "block0.attn.heads", "bn")
    gq, gk, gv = (getattr(a, f"{n}_bn").weight.double().abs() for n in "qkv")
    dv = a.v_dim // a.heads
    per_head = lambda g, w: g.view(-1, w).sum(1)  # noqa: E731
    expected = sum(per_head(g, w) / per_head(g, w).mean() for g, w in [(gq, d), (gk, d), (gv, dv)])
    assert torch.allclose(qk, expected)


def test_a_zeroed_channel_scores_lowest(model):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        m.block[0].mlp.fc1_linear.weight[5] = 0
        m.block[0].mlp.fc2_linear.weight[:, 5] = 0
    for crit in ("l2", "l1"):
        s = score(m, "block0.mlp.hidden", crit)
        assert s[5] == 0 and s.argmin() == 5


def test_firing_is_zero_for_a_channel_that_never_fires(batch):
    model = randomise(create_model("spikformer-1-32-digits", T=2).eval(), 1)
    with torch.no_grad():
        model.block[0].mlp.fc1_bn.weight[3] = 0.0
        model.block[0].mlp.fc1_bn.bias[3] = -5.0  # BN output -5: the LIF never fires
        model.block[0].attn.q_bn.weight[1] = 0.0
        model.block[0].attn.q_bn.bias[1] = -5.0  # q channel 1 silent; k channel 1 may fire
        model.block[0].attn.k_bn.bias[1] = 5.0
        model.block[0].attn.k_bn.weight[1] = 0.0  # k channel 1 always fires
        model.block[0].mlp.fc1_bn.bias[4] = 5.0
        model.block[0].mlp.fc1_bn.weight[4] = 0.0  # hidden channels 4 and 6 always fire
        model.block[0].mlp.fc1_bn.bias[6] = 5.0
        model.block[0].mlp.fc1_bn.weight[6] = 0.0
    hidden = score(model, "block0.mlp.hidden", "firing", data=batch[0])
    assert hidden[3] == 0 and hidden[4] > 0
    fc2 = model.block[0].mlp.fc2_linear.weight.double()
    # rate 1 for both, so their scores stand as the norms of the fc2 columns that read them
    assert torch.isclose(hidden[4] / hidden[6], fc2[:, 4].norm() / fc2[:, 6].norm())
    qk = score(model, "block0.attn.qk", "firing", data=batch[0])
    assert qk[1] == 0  # silent in q: the product is zero whatever k does
    assert (score(model, "block0.attn.qk", "firing", data=batch) == qk).all()  # labels are not needed


def test_taylor_of_a_channel_with_zero_parameters_is_zero(batch):
    model = randomise(create_model("spikformer-1-32-digits", T=2).eval(), 2)
    with torch.no_grad():
        mlp = model.block[0].mlp
        for t in (mlp.fc1_linear.weight[2], mlp.fc1_linear.bias[2:3], mlp.fc1_bn.weight[2:3], mlp.fc1_bn.bias[2:3],
                  mlp.fc2_linear.weight[:, 2]):
            t.zero_()
    s = score(model, "block0.mlp.hidden", "taylor", data=batch)
    assert s[2] == 0 and (s > 0).sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the model's own grads are left alone


def test_data_forms_agree(model, batch):
    x, y = batch
    as_tensors = score(model, "block0.mlp.hidden", "taylor", data=(x, y), batch_size=4, batches=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    assert torch.allclose(score(model, "block0.mlp.hidden", "taylor", data=loader, batches=2), as_tensors)
    assert torch.allclose(score(model, "block0.mlp.hidden", "taylor", data=TensorDataset(x, y), batch_size=4, batches=2),
                          as_tensors)


def test_random_is_seeded(model):
    a = score(model, "block0.mlp.hidden", "random", seed=1)
    assert torch.equal(a, score(model, "block0.mlp.hidden", "random", seed=1))
    assert not torch.equal(a, score(model, "block0.mlp.hidden", "random", seed=2))
    assert not torch.equal(score(model, "block0.attn.qk", "random"), score(model, "block0.attn.v", "random"))


def test_errors(model, batch):
    with pytest.raises(SpikepruneError, match="unknown importance criterion 'l3'"):
        score(model, "residual", "l3")
    with pytest.raises(SpikepruneError, match="unknown group"):
        score(model, "block5.mlp.hidden", "l2")
    for crit in ("taylor", "firing"):
        with pytest.raises(SpikepruneError, match=f"the '{crit}' criterion needs calibration data"):
            score(model, "residual", crit)
    with pytest.raises(SpikepruneError, match="no labels"):
        score(model, "residual", "taylor", data=batch[0])
    with pytest.raises(SpikepruneError, match="empty"):
        score(model, "residual", "firing", data=batch[0][:0])
    with pytest.raises(SpikepruneError, match="cannot read calibration data"):
        score(model, "residual", "firing", data=42)


# ------------------------------------------------------------------------------------------------
# The registry: criteria are objects looked up by name; a user registers one without editing the package
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def registered():
    """Register criteria for one test and remove them afterwards (the registry is process-wide)."""
    from spikeprune import importance

    added = []

    def add(name, obj, **kw):
        importance.register_importance(name, **kw)(obj)
        added.append(name)
        return importance.get(name)

    yield add
    for name in added:
        importance.unregister_importance(name)


def _fc1_row_sums(model, group, options):
    """Score every MLP hidden unit by the sum of its fc1 row (deterministic and easy to check), every
    other unit 1."""
    fc1 = next((m.module for m in group.members if m.module.endswith("fc1_linear") and m.dim == 0), None)
    return torch.ones(group.size) if fc1 is None else dict(model.named_modules())[fc1].weight.detach().sum(1)


def test_builtins_are_registered_objects():
    from spikeprune import importance

    assert importance.names()[:6] == ("l2", "l1", "bn", "taylor", "random", "firing")
    assert set(importance.data_names()) >= {"taylor", "firing"}
    for name in importance.names():
        crit = importance.get(name)
        assert isinstance(crit, importance.Importance) and crit.name == name and crit.description
        assert crit.needs_data == (name in ("taylor", "firing"))
    assert importance.get(importance.get("l2")) is importance.get("l2")  # an object passes through


def test_user_function_criterion_through_scores_and_prune(model, registered):
    from spikeprune import importance
    from spikeprune.surgery import prune

    registered("fc1_sum", _fc1_row_sums)
    assert "fc1_sum" in importance.names() and "fc1_sum" in CRITERIA  # the derived view follows
    rows = model.block[0].mlp.fc1_linear.weight.detach().sum(1).double()
    got = scores(model, "fc1_sum", names=["block0.mlp.hidden"])["block0.mlp.hidden"]
    assert got.dtype == torch.float64 and torch.equal(got, rows)

    small = prune(model, {"block0.mlp.hidden": 0.5}, importance="fc1_sum")
    keep = rows.argsort(descending=True)[: small.block[0].mlp.fc1_linear.out_features].sort().values
    assert torch.equal(small.block[0].mlp.fc1_linear.weight, model.block[0].mlp.fc1_linear.weight[keep])


def test_user_class_criterion_with_data_scores_all_groups_in_one_pass(model, batch, registered):
    from spikeprune.importance import Importance

    class CountingPasses(Importance):
        needs_data = True
        passes = 0

        def score_groups(self, model, groups, options):
            n = sum(1 for _ in options.batches_of(model))
            type(self).passes += 1
            return {g.name: torch.full((g.size,), float(n)) for g in groups}

    crit = registered("passes", CountingPasses, description="counts data passes")
    out = scores(model, "passes", data=batch, batch_size=4, batches=2)
    assert CountingPasses.passes == 1 and set(out) == {g.name for g in groups(model)}
    assert all(torch.equal(s, torch.full_like(s, 2.0)) for s in out.values())
    with pytest.raises(SpikepruneError, match="the 'passes' criterion needs calibration data"):
        scores(model, "passes")
    with pytest.raises(SpikepruneError, match="needs calibration data"):
        crit(model, groups(model)[0])  # a direct call without data fails as clearly


def test_registry_errors(model, registered):
    from spikeprune import importance

    with pytest.raises(SpikepruneError) as e:
        importance.get("l3")
    assert "unknown importance criterion 'l3'" in str(e.value)
    assert all(n in str(e.value) for n in ("l2", "l1", "bn", "taylor", "random", "firing"))
    with pytest.raises(SpikepruneError, match="registered: l2, l1"):
        scores(model, "l3")
    with pytest.raises(SpikepruneError, match="registered already"):
        importance.register_importance("l2")(_fc1_row_sums)
    with pytest.raises(SpikepruneError, match="is a word"):
        importance.register_importance("two words")
    with pytest.raises(SpikepruneError, match="needs an Importance subclass"):
        importance.register_importance("notcallable")(42)
    with pytest.raises(SpikepruneError, match="unknown importance criterion"):
        importance.unregister_importance("never-registered")

    registered("short", lambda m, g, o: torch.ones(g.size - 1))
    with pytest.raises(SpikepruneError, match=r"returned scores of shape \(\d+,\) for group residual"):
        scores(model, "short", names=["residual"])
    registered("nan", lambda m, g, o: torch.full((g.size,), float("nan")))
    with pytest.raises(SpikepruneError, match="non-finite"):
        scores(model, "nan", names=["residual"])


def test_user_criterion_by_name_in_the_cli_and_the_run_context(model, registered, tmp_path):
    """The command line and a run's context take a registered criterion by name, like a built-in."""
    from spikeprune.cli import build_parser, settings_from_args
    from spikeprune.policy_api import PruneContext

    registered("fc1_sum", _fc1_row_sums)
    args = build_parser().parse_args(["prune", "--data", "digits", "--policy", "uniform", "--uniform", "0.5",
                                      "--importance", "fc1_sum", "-o", str(tmp_path / "run")])
    settings = settings_from_args(args)
    assert settings.importance == "fc1_sum"
    ctx = PruneContext(model, settings)
    small = ctx.prune({"block0.mlp.hidden": 0.5})
    rows = model.block[0].mlp.fc1_linear.weight.detach().sum(1).double()
    keep = rows.argsort(descending=True)[: small.block[0].mlp.fc1_linear.out_features].sort().values
    assert torch.equal(small.block[0].mlp.fc1_linear.weight, model.block[0].mlp.fc1_linear.weight[keep])
    with pytest.raises(SystemExit):  # argparse refuses an unregistered name, listing the registered ones
        build_parser().parse_args(["prune", "--importance", "nosuch", "-o", str(tmp_path / "r2")])
