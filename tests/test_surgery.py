"""Surgery: a pruned model computes exactly what the dense model computes with the removed
channels zeroed (the masked equivalent), on random small configs, groups and ratios; pruning
nothing changes nothing; pruned models train, save, load in a fresh process; bad input is refused."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from spikeprune.errors import SpikepruneError
from spikeprune.coupling import groups
from spikeprune.models import create_model
from spikeprune.models.spikformer import Spikformer, SpikformerConfig
from spikeprune.serialization import load_model, save_model
from spikeprune.ratios import uniform_ratio_map as uniform_ratios
from spikeprune.record import PruningRecord
from spikeprune.surgery import SpikepruneWarning, apply_plan, kept_count, plan, prune
from spiking_helpers import randomise

CRITERIA = ["l2", "l1", "bn", "random", "taylor", "firing"]


@st.composite
def small_models(draw):
    layout = draw(st.sampled_from(["cifar", "imagenet"]))
    heads = draw(st.integers(1, 3))
    depth = draw(st.integers(1, 2))
    blocks = [dict(heads=heads, qk_dim=heads * draw(st.integers(1, 3)), v_dim=heads * draw(st.integers(1, 3)),
                   mlp_hidden=draw(st.integers(1, 10))) for _ in range(depth)]
    cfg = SpikformerConfig(
        layout=layout, img_size=8 if layout == "cifar" else 32, in_channels=draw(st.integers(1, 3)),
        num_classes=3, embed_dim=draw(st.integers(2, 8)), depth=depth, num_heads=heads,
        T=draw(st.integers(1, 3)), attn_v_threshold=draw(st.sampled_from([0.05, 0.1, 0.2])), stem_widths=[draw(st.integers(1, 5)) for _ in range(3)], blocks=blocks)
    model = randomise(Spikformer(cfg).double().eval(), draw(st.integers(0, 2**16)))
    return model


def _zero_out(layer, idx):
    """Removed output channels: weights, bias and (for a BN) scale and shift all zero, so the BN
    emits exactly 0 there, the LIF after it never fires, and nothing downstream sees the channel."""
    layer.weight[idx] = 0
    if getattr(layer, "bias", None) is not None:
        layer.bias[idx] = 0


def masked_equivalent(model: Spikformer, kept: dict[str, list[int]]) -> Spikformer:
    """The dense model with every removed channel zeroed, written out per group kind by module
    attribute (independently of the group declarations the surgery uses)."""
    import copy

    m = copy.deepcopy(model)
    sps = m.patch_embed
    with torch.no_grad():
        for name, keep in kept.items():
            gone = lambda n: torch.tensor(sorted(set(range(n)) - set(keep)), dtype=torch.long)  # noqa: E731
            if name.startswith("stem."):
                i = {"stem.proj_conv": 1, "stem.proj_conv1": 2, "stem.proj_conv2": 3}[name]
                conv, bn, _ = sps.stage(i - 1)
                r = gone(conv.weight.shape[0])
                _zero_out(conv, r), _zero_out(bn, r)
                sps.stage(i)[0].weight[:, r] = 0
            elif name == "residual":
                r = gone(m.cfg.embed_dim)
                conv, bn, _ = sps.stage(3)
                _zero_out(conv, r), _zero_out(bn, r), _zero_out(sps.rpe_conv, r), _zero_out(sps.rpe_bn, r)
                sps.rpe_conv.weight[:, r] = 0
                for blk in m.block:
                    for nm in "qkv":
                        blk.attn.layer(nm).weight[:, r] = 0
                    _zero_out(blk.attn.layer("proj"), r), _zero_out(blk.attn.proj_bn, r)
                    blk.mlp.layer("fc1").weight[:, r] = 0
                    _zero_out(blk.mlp.layer("fc2"), r), _zero_out(blk.mlp.fc2_bn, r)
                m.head.weight[:, r] = 0
            else:
                b, part = int(name.split(".")[0][5:]), name.split(".", 1)[1]
                attn, mlp = m.block[b].attn, m.block[b].mlp
                if part == "attn.qk":
                    r = gone(attn.qk_dim)
                    for nm in "qk":
                        _zero_out(attn.layer(nm), r), _zero_out(getattr(attn, f"{nm}_bn"), r)
                elif part == "attn.v":
                    r = gone(attn.v_dim)
                    _zero_out(attn.layer("v"), r), _zero_out(attn.v_bn, r)
                    attn.layer("proj").weight[:, r] = 0
                elif part == "attn.heads":
                    dqk, dv = attn.qk_dim // attn.heads, attn.v_dim // attn.heads
                    heads = sorted(set(range(attn.heads)) - set(keep))
                    rqk = torch.tensor([h * dqk + j for h in heads for j in range(dqk)], dtype=torch.long)
                    rv = torch.tensor([h * dv + j for h in heads for j in range(dv)], dtype=torch.long)
                    for nm in "qk":
                        _zero_out(attn.layer(nm), rqk), _zero_out(getattr(attn, f"{nm}_bn"), rqk)
                    _zero_out(attn.layer("v"), rv), _zero_out(attn.v_bn, rv)
                    attn.layer("proj").weight[:, rv] = 0
                elif part == "mlp.hidden":
                    r = gone(mlp.hidden)
                    _zero_out(mlp.layer("fc1"), r), _zero_out(mlp.fc1_bn, r)
                    mlp.layer("fc2").weight[:, r] = 0
                else:
                    raise AssertionError(f"test does not know group {name}")
    return m


@st.composite
def requests(draw, model):
    """Random ratios or explicit kept lists for a random subset of the model's groups."""
    ratios = {}
    for g in groups(model):
        how = draw(st.sampled_from(["skip", "ratio", "ratio", "indices"]))
        if how == "ratio":
            ratios[g.name] = draw(st.floats(0.0, 0.95))
        elif how == "indices":
            if g.heads > 1:  # the same count in every head
                d = g.head_dim
                k = draw(st.integers(1, d))
                ratios[g.name] = [h * d + j for h in range(g.heads)
                                  for j in draw(st.permutations(range(d)))[:k]]
            else:
                k = draw(st.integers(1, g.size))
                ratios[g.name] = draw(st.permutations(range(g.size)))[:k]
    return ratios


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_pruned_equals_masked_dense(data):
    model = data.draw(small_models())
    ratios = data.draw(requests(model))
    criterion = data.draw(st.sampled_from(CRITERIA))
    round_to = data.draw(st.sampled_from([1, 1, 2, 3]))
    x = torch.randn(3, model.cfg.in_channels, model.cfg.img_size, model.cfg.img_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpikepruneWarning)
        p = plan(model, ratios, criterion, round_to, data=(x, y))
    pruned = apply_plan(model, p)
    masked = masked_equivalent(model, p.kept)
    dense = groups_by_name(model)
    for g in groups(pruned):  # the new widths are the kept counts; qk / v keep channels of kept heads only
        assert g.size == len(p.kept[g.name]), g.name
        if g.kind in ("qk", "v"):
            heads = set(p.kept[dense[g.name].head_group])
            assert {i // dense[g.name].head_dim for i in p.kept[g.name]} <= heads, g.name
    with torch.no_grad():
        out_p, out_m = pruned(x), masked(x)
        assert torch.allclose(out_p, out_m, rtol=0, atol=1e-10), (out_p - out_m).abs().max()
        # Training mode too: BatchNorm batch statistics are per channel, so they agree as well.
        pruned.train(), masked.train()
        assert torch.allclose(pruned(x), masked(x), rtol=0, atol=1e-10)


def groups_by_name(model):
    return {g.name: g for g in groups(model)}


def test_masking_changes_the_output_so_the_equivalence_is_not_vacuous():
    # A lower attention threshold than the reference's 0.5: on 16 tokens of an untrained model
    # attn_lif would hardly fire, and the v / heads groups would not matter.
    model = randomise(create_model("spikformer-1-32-digits", attn_v_threshold=0.1).double().eval(), 3)
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lifs = [m for m in model.modules() if hasattr(m, "record_rate")]
    for m in lifs:
        m.record_rate = True
    with torch.no_grad():
        model(x)
    assert all(m.last_rate > 0 for m in lifs)  # every LIF layer fires
    for m in lifs:
        m.record_rate = False
    for name in ["residual", "block0.mlp.hidden", "block0.attn.qk", "block0.attn.v", "block0.attn.heads",
                 "stem.proj_conv1"]:
        p = plan(model, {name: 0.5})
        with torch.no_grad():
            dense, pruned = model(x), apply_plan(model, p)(x)
        assert not torch.allclose(dense, pruned), name
        assert not torch.allclose(pruned[0], pruned[1]), name  # the output depends on the input
        assert torch.allclose(pruned, masked_equivalent(model, p.kept)(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
def test_residual_qk_and_heads_compose(layout):
    img = 8 if layout == "cifar" else 32
    cfg = SpikformerConfig(layout=layout, img_size=img, in_channels=2, num_classes=4, embed_dim=12, depth=2,
                           num_heads=3, T=2, attn_v_threshold=0.1)
    model = randomise(Spikformer(cfg).double().eval(), 0)
    ratios = {"residual": 0.5, "block*.attn.qk": 0.5, "block0.attn.heads": [0, 2], "block1.attn.v": [0, 5, 9]}
    pruned = prune(model, ratios)
    b0, b1 = pruned.cfg.blocks
    assert pruned.cfg.embed_dim == 6
    assert b0 == dict(heads=2, qk_dim=4, v_dim=8, mlp_hidden=48)  # 2 heads x 2 of 4 qk dims
    assert b1 == dict(heads=3, qk_dim=6, v_dim=3, mlp_hidden=48)
    assert pruned.cfg.in_channels == 2 and pruned.cfg.num_classes == 4  # never pruned
    assert pruned.patch_embed.proj_conv.weight.shape[1] == 2 and pruned.head.weight.shape[0] == 4
    x = torch.randn(2, 2, img, img, dtype=torch.float64)
    p = plan(model, ratios)
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked_equivalent(model, p.kept)(x), rtol=0, atol=1e-10)


def test_pruning_nothing_returns_an_equal_model_and_leaves_the_input_alone():
    model = randomise(create_model("spikformer-1-32-digits").eval(), 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 16, 16)
    for ratios in ({}, {"*": 0.0}):
        same = prune(model, ratios)
        assert same.cfg == model.cfg
        sd = same.state_dict()
        assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in sd)
        with torch.no_grad():
            assert torch.equal(same(x), model(x))
    pruned = prune(model, {"*": 0.5})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.cfg.embed_dim == 32
    # the new model shares no storage with the input
    pruned.head.bias.data.add_(1.0)
    assert torch.equal(model.head.bias, before["head.bias"])


def test_pruned_model_trains():
    torch.manual_seed(0)
    model = randomise(create_model("spikformer-1-32-digits"), 2)
    pruned = prune(model, {"residual": 0.25, "block0.mlp.hidden": 0.5, "block0.attn.qk": 0.5, "stem.*": 0.5}).train()
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    loss = F.cross_entropy(pruned(x), y)
    loss.backward()
    for name, prm in pruned.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0, name
    opt = torch.optim.SGD(pruned.parameters(), lr=0.05)
    opt.step()
    with torch.no_grad():
        after = F.cross_entropy(pruned(x), y)
    assert after < loss.detach()


def test_kept_count_rounding():
    assert kept_count(10, 0.3) == (7, False)
    assert kept_count(10, 0.25) == (7, False)  # 2.5 removed rounds half up to 3
    assert kept_count(10, 0.99) == (1, True)  # would remove all: one stays
    assert kept_count(100, 0.3, 8) == (72, False)  # 70 rounded up to a multiple of 8
    assert kept_count(6, 0.5, 8) == (6, False)  # capped at the size
    assert kept_count(16, 0.0, 8) == (16, False)


def test_round_to_applies_per_head_and_to_channel_groups():
    model = create_model("spikformer-1-32-digits", embed_dim=64, num_heads=2)  # head dim 32
    pruned = prune(model, {"residual": 0.3, "block0.attn.qk": 0.3, "block0.attn.v": 0.6, "block0.mlp.hidden": 0.1},
                   round_to=8)
    b = pruned.cfg.blocks[0]
    assert pruned.cfg.embed_dim == 48  # 64 - 19 = 45 -> 48
    assert b["qk_dim"] == 2 * 24 and b["v_dim"] == 2 * 16  # per head: 32 - 10 = 22 -> 24; 32 - 19 = 13 -> 16
    assert b["mlp_hidden"] == 232  # 256 - 26 = 230 -> 232
    assert any("round_to=8" in n for n in pruned.pruning.notes)


def test_ratio_that_would_empty_a_group_keeps_one_and_warns():
    model = create_model("spikformer-1-32-digits")
    with pytest.warns(SpikepruneWarning, match="would remove every head"):
        pruned = prune(model, {"block0.attn.heads": 0.9})
    assert pruned.cfg.blocks[0]["heads"] == 1
    assert any("kept the best-scored one" in n for n in pruned.pruning.notes)
    with pytest.warns(SpikepruneWarning, match="dim per head"):
        pruned = prune(model, {"block0.attn.qk": 0.99})
    assert pruned.cfg.blocks[0]["qk_dim"] == 2


@pytest.mark.parametrize("ratios, match", [
    ({"residual": 1.0}, r"in \[0, 1\)"),
    ({"residual": -0.1}, r"in \[0, 1\)"),
    ({"residual": float("nan")}, r"in \[0, 1\)"),
    ({"residual": "half"}, "fraction"),
    ({"residual": True}, "fraction"),
    ({"resid": 0.3}, "matches no group"),
    ({"block9.*": 0.3}, "matches no group"),
    ({"block*.mlp.*": 0.3, "*.hidden": 0.2}, "matched by both"),
    ({"residual": []}, "empty"),
    ({"residual": [0, 32]}, "out of range"),
    ({"residual": [1, 1, 2]}, "repeat"),
    ({"residual": [0.5, 1]}, "integers"),
    ({"block0.attn.qk": [0, 1, 16]}, "same number"),
    ({"block0.attn.heads": [2]}, "out of range"),
    ("residual", "dict"),
])
def test_bad_ratios_are_refused(ratios, match):
    model = create_model("spikformer-1-32-digits")
    with pytest.raises(SpikepruneError, match=match):
        prune(model, ratios)


def test_exact_name_overrides_a_pattern():
    model = create_model("spikformer-2-128-mnist")
    pruned = prune(model, {"block*.mlp.hidden": 0.5, "block1.mlp.hidden": 0.25})
    assert [b["mlp_hidden"] for b in pruned.cfg.blocks] == [256, 384]


def test_bad_round_to_and_unknown_criterion():
    model = create_model("spikformer-1-32-digits")
    with pytest.raises(SpikepruneError, match="round_to"):
        prune(model, {"residual": 0.5}, round_to=0)
    with pytest.raises(SpikepruneError, match="unknown importance"):
        prune(model, {"residual": 0.5}, importance="l3")
    with pytest.raises(SpikepruneError, match="needs calibration data"):
        prune(model, {"residual": 0.5}, importance="taylor")


def test_family_without_declaration_is_refused():
    class Other(torch.nn.Module):
        family = "vgg"

    with pytest.raises(SpikepruneError, match="no model family 'vgg' is registered"):
        prune(Other(), {"*": 0.5})


def test_uniform_covers_channel_groups_not_heads():
    model = create_model("spikformer-2-128-mnist")
    ratios = uniform_ratios(model, 0.3)
    assert "residual" in ratios and "block1.attn.qk" in ratios and "stem.proj_conv" in ratios
    assert not any(n.endswith(".heads") for n in ratios)
    assert "residual" not in uniform_ratios(model, 0.3, skip=["residual"])
    with pytest.raises(SpikepruneError, match="matches no channel group"):
        uniform_ratios(model, 0.3, skip=["nothing*"])


def test_saved_pruned_model_loads_in_a_fresh_process(tmp_path):
    model = randomise(create_model("spikformer-1-32-digits").eval(), 4)
    pruned = prune(model, {"residual": 0.3, "block0.attn.heads": [1], "block0.mlp.hidden": 0.6, "stem.proj_conv2": 0.5})
    save_model(pruned, tmp_path / "m")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.save(x, tmp_path / "x.pt")
    code = ("import json, torch, sys; from spikeprune import load_model; "
            f"m = load_model({str(tmp_path / 'm')!r}).eval(); x = torch.load({str(tmp_path / 'x.pt')!r}); "
            "print(json.dumps({'cfg': m.cfg.to_dict(), 'out': m(x).tolist()}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout)
    assert got["cfg"] == pruned.cfg.to_dict()
    with torch.no_grad():
        assert torch.allclose(torch.tensor(got["out"]), pruned(x), atol=1e-6)
    again = load_model(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), pruned.state_dict().values()))


def test_inspect_shows_pruned_widths_beside_the_dense_ones(tmp_path, capsys):
    from spikeprune.cli import main
    from spikeprune.costs import count_macs, count_params, memory_bytes

    dense = create_model("spikformer-1-32-digits")
    pruned = prune(dense, {"residual": 0.5, "block0.mlp.hidden": 0.25, "block0.attn.heads": [1]})
    save_model(pruned, tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dense_known"] and r["dense_preset"] == "spikformer-1-32-digits"
    g = {x["name"]: x for x in r["groups"]}
    assert (g["residual"]["size"], g["residual"]["dense_size"]) == (16, 32)
    assert (g["block0.attn.heads"]["size"], g["block0.attn.heads"]["dense_size"]) == (1, 2)
    layers = {x["name"]: x for x in r["layers"]}
    assert (layers["block.0.mlp.fc1_linear"]["in"], layers["block.0.mlp.fc1_linear"]["out"]) == (16, 96)
    assert (layers["block.0.mlp.fc1_linear"]["dense_in"], layers["block.0.mlp.fc1_linear"]["dense_out"]) == (32, 128)
    assert r["total"]["params"] == count_params(pruned) and r["dense_total"]["params"] == count_params(dense)
    assert r["total"]["macs"] == count_macs(pruned) and r["dense_total"]["macs"] == count_macs(dense)
    assert r["total"]["memory_bytes"]["int8"] == memory_bytes(pruned)["int8"]
    assert main(["inspect", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "pruned from spikformer-1-32-digits" in text and "16 x 96" in text and "32 x 128" in text
    # a model with no pruning record is shown against itself, and the report says so
    assert main(["inspect", "spikformer-1-32-digits"]) == 0
    assert "no pruning record" in capsys.readouterr().out


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_record_composes_over_calls_and_replays_bit_for_bit(tmp_path):
    """Three successive prune calls (heads, then qk within the kept heads, then residual and
    hidden): the record maps every kept unit back to the dense model, and replaying it on the dense
    model rebuilds the same model, also after a save / load round trip."""
    dense = randomise(create_model("spikformer-1-32-digits").eval(), 11)
    a = prune(dense, {"block0.attn.heads": [1]})
    b = prune(a, {"block0.attn.qk": 0.5, "stem.proj_conv1": [0, 2, 5]})
    c = prune(b, {"residual": 0.25, "block0.mlp.hidden": 0.5}, importance="l1")
    rec = c.pruning
    assert isinstance(rec, PruningRecord) and len(rec.steps) == 3
    d = dense.cfg.blocks[0]["qk_dim"] // 2  # head dim of the dense model
    # the heads group keeps dense head 1; qk keeps half of head 1's channels, as dense indices
    assert rec.kept_units("block0.attn.heads") == [1]
    qk = rec.kept_units("block0.attn.qk")
    assert len(qk) == d // 2 and all(d <= i < 2 * d for i in qk)
    assert rec.kept_units("stem.proj_conv1") == [0, 2, 5]
    assert rec.kept_counts() == {g.name: g.size for g in groups(c)}
    assert rec.removed_fractions()["residual"] == 0.25
    replayed = prune(dense, rec)
    assert _same_weights(replayed, c) and replayed.cfg.to_dict() == c.cfg.to_dict()
    assert replayed.pruning.to_dict() == rec.to_dict()
    save_model(c, tmp_path / "c")
    loaded = load_model(tmp_path / "c")
    assert loaded.pruning.to_dict() == rec.to_dict()
    assert _same_weights(prune(dense, loaded.pruning), c)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(replayed(x), c(x))


def test_replaying_a_record_needs_its_dense_model():
    dense = create_model("spikformer-1-32-digits")
    small = prune(dense, {"residual": 0.5})
    with pytest.raises(SpikepruneError, match="replays on the dense model"):
        prune(small, small.pruning)
    with pytest.raises(SpikepruneError, match="format"):
        PruningRecord.from_dict({"family": "spikformer"})
    bad = small.pruning.to_dict()
    bad["kept"]["residual"] = [3, 1]
    with pytest.raises(SpikepruneError, match="damaged"):
        PruningRecord.from_dict(bad)
