"""Importance criteria: shapes, the documented formulas on hand-set weights, the spike-aware
criterion's zero for silent channels, determinism, and the errors for missing data."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from spikeprune.errors import SpikepruneError
from spikeprune.groups import groups
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
