"""The Spike-driven Transformer family (issue 12): presets and parameter counts equal the spec,
state-dict names and shapes equal the reference's, outputs / gradients / BN statistics equal the
reference transcription's in float64, reference checkpoints load in every wrapping (and a
Spikformer checkpoint is named as such), and the engine's guarantees hold unchanged: masked
equivalence (property-based, float64), round_to, save/load, record replay, sensitivity cache,
measure."""
from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import spikeprune as sp
from spikeprune.data import load_dataset
from spikeprune.errors import SpikepruneError
from spikeprune.coupling import groups
from spikeprune.costs import count_params, layer_table, measure
from spikeprune.models import create_model, get_family, list_models, preset_summary
from spikeprune.models.sdt import SDT, PLIF, SDTConfig, load_reference_checkpoint
from spikeprune.neuron import LIF
from spikeprune.sensitivity import analyze
from spikeprune.serialization import load_model, save_model
from spikeprune.surgery import SpikepruneWarning, apply_plan, plan, prune
from spikeprune.testing.reference_sdt import MultiStepParametricLIFNode, reference_from_config
from spikeprune.testing.reference_spikformer import MultiStepLIFNode
from spikeprune.training import TrainSettings, evaluate, train
from spiking_helpers import randomise

# A copy of shared/spec/sdt-state-dict.tsv: every entry of sdt-8-512, cifar10-2-512, cifar10-2-256.
SPEC_TSV = Path(__file__).parent / "data" / "sdt-state-dict.tsv"
TSV_PRESETS = {"sdt-8-512": "sdt-8-512", "cifar10-2-512": "sdt-cifar10-2-512", "cifar10-2-256": "sdt-cifar10-2-256"}

# shared/spec/sdt.md, "Presets": exact parameter counts, with and without the dead talking_heads
SPEC_PARAMS = {
    "sdt-8-384": (16_816_536, 16_816_024),
    "sdt-6-512": (23_373_736, 23_373_352),
    "sdt-8-512": (29_689_896, 29_689_384),
    "sdt-10-512": (36_006_056, 36_005_416),
    "sdt-8-768": (66_339_144, 66_338_632),
    "sdt-cifar10-2-256": (2_567_082, 2_566_954),
    "sdt-cifar10-2-512": (10_233_546, 10_233_418),
    "sdt-cifar100-2-256": (2_590_212, 2_590_084),
    "sdt-cifar100-2-512": (10_279_716, 10_279_588),
}
SPEC_ENTRIES = {8: 352, 6: 272, 10: 432, 2: 112}  # state-dict entries by depth
MNIST = "sdt-1-64-mnist"  # the bundled SDT's preset (28x28x1); tests add a block with depth=2


def _meta(name: str, **kw) -> SDT:
    with torch.device("meta"):  # shapes only: the big ImageNet presets in no time
        return create_model(name, **kw)


# ------------------------------------------------------------------------------------------------
# Presets, parameter counts, state-dict names
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(SPEC_PARAMS))
def test_parameter_counts_equal_the_spec_table(preset):
    model = _meta(preset)
    total, without = SPEC_PARAMS[preset]
    assert sum(p.numel() for p in model.parameters()) == total
    assert total - model.dead_params() == without
    assert count_params(model) == total  # the cost table accounts for every parameter
    assert len(model.state_dict()) == SPEC_ENTRIES[model.cfg.depth]
    assert preset in list_models() and preset_summary(preset)["family"] == "sdt"


def test_plif_adds_one_leak_per_neuron_module():
    lif, plif = _meta("sdt-cifar10-2-256"), _meta("sdt-cifar10-2-256", spike_mode="plif")
    extra = sorted(set(plif.state_dict()) - set(lif.state_dict()))
    assert len(extra) == 5 + 8 * 2 + 1 and all(k.endswith(".w") for k in extra)
    assert all(plif.state_dict()[k].shape == () for k in extra)
    assert count_params(plif) == sum(p.numel() for p in plif.parameters())
    assert plif.dead_params() == lif.dead_params() + 1 + 2  # rpe_lif.w and each attn_lif.w


def _tsv_entries(which: str) -> list[tuple[str, list[int]]]:
    rows = [line.split("\t") for line in SPEC_TSV.read_text().splitlines()[1:] if line.strip()]
    return [(k, json.loads(s)) for p, k, s in rows if p == which]


@pytest.mark.parametrize("which", sorted(TSV_PRESETS))
def test_state_dict_names_and_shapes_equal_the_reference(which):
    spec = _tsv_entries(which)
    ours = [(k, list(v.shape)) for k, v in _meta(TSV_PRESETS[which]).state_dict().items()]
    assert ours == spec
    ref = reference_from_config(create_model(TSV_PRESETS[which], img_size=32).cfg) if which != "sdt-8-512" else None
    if ref is not None:  # the transcription has the same entries too
        assert [(k, list(v.shape)) for k, v in ref.state_dict().items()] == spec


def test_config_is_spelled_out_and_checked():
    cfg = create_model(MNIST, depth=2).cfg.to_dict()
    assert set(cfg["blocks"][0]) == {"heads", "attn_dim", "mlp_hidden", "mlp_residual"}
    assert cfg["blocks"][0]["mlp_residual"] is False and cfg["pool_after"] == [True, False, True, False]
    with pytest.raises(SpikepruneError, match="lacks img_size"):
        SDTConfig.from_dict({k: v for k, v in cfg.items() if k != "img_size"})
    with pytest.raises(SpikepruneError, match="unknown SDT config fields"):
        SDTConfig.from_dict({**cfg, "attn_mode": "direct_xor"})
    bad = copy.deepcopy(cfg)
    del bad["blocks"][0]["mlp_residual"]
    with pytest.raises(SpikepruneError, match="mlp_residual"):
        SDTConfig.from_dict(bad)
    with pytest.raises(SpikepruneError, match="spike_mode"):
        create_model(MNIST, depth=2, spike_mode="alif")
    with pytest.raises(SpikepruneError, match="multiple of 16"):
        create_model("sdt-8-384", img_size=200)
    # the inner residual is decided once, from the dense widths, and then only read
    assert create_model(MNIST, embed_dim=16, mlp_ratio=1.0).cfg.blocks[0]["mlp_residual"] is True
    with pytest.raises(SpikepruneError, match="must equal embed_dim"):
        SDTConfig.from_dict({**cfg, "blocks": [dict(b, mlp_residual=True) for b in cfg["blocks"]]})


# ------------------------------------------------------------------------------------------------
# Float64 equality with the reference transcription
# ------------------------------------------------------------------------------------------------
def _pair(spike_mode="lif", mlp_ratio=4.0, seed=0, T=3):
    """Our SDT and the reference with the same random weights (every layer spiking)."""
    model = create_model("sdt-cifar10-2-256", embed_dim=32, img_size=16, T=T, spike_mode=spike_mode,
                         mlp_ratio=mlp_ratio).double()
    randomise(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):  # distinct leaks (sigmoid(w) in 0.3..0.7), so a swapped neuron would show
                p.copy_(torch.rand((), generator=g, dtype=p.dtype) * 1.6 - 0.8)
    ref = reference_from_config(model.cfg).double()
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


def _spike_rates(model, x):
    rates, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (LIF, PLIF, MultiStepLIFNode, MultiStepParametricLIFNode)):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: rates.__setitem__(name, o.mean().item())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rates


X16 = torch.rand(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("spike_mode,mlp_ratio", [("lif", 4.0), ("plif", 4.0), ("lif", 1.0)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_gradients_and_bn_statistics_equal_the_reference(spike_mode, mlp_ratio, mode):
    model, ref = _pair(spike_mode, mlp_ratio)
    assert all(b["mlp_residual"] == (mlp_ratio == 1.0) for b in model.cfg.blocks)
    model.train(mode == "train"), ref.train(mode == "train")
    # every neuron that forward calls fires on these inputs (else the comparison would be vacuous)
    called = {k: v for k, v in _spike_rates(model, X16).items() if not k.endswith(("attn_lif", "rpe_lif"))}
    assert called and all(0 < r < 1 for r in called.values()), called
    model.load_state_dict(ref.state_dict())  # undo the BN statistics that pass updated
    out, (ref_out, _) = model(X16), ref(X16)
    assert torch.equal(out, ref_out)  # spikes are exact; the few real-valued sums agree bit for bit here
    out.pow(2).sum().backward()
    ref_out.pow(2).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = ref_params[name]
        if q.grad is None:  # never used by forward: talking_heads, attn_lif.w, rpe_lif.w
            assert p.grad is None and (".talking_heads." in name or name.endswith(("attn_lif.w", "rpe_lif.w"))), name
            continue
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), name
    ours, theirs = model.state_dict(), ref.state_dict()
    for k in theirs:  # running statistics (updated in train mode) and every weight
        assert torch.allclose(ours[k].double(), theirs[k].double(), rtol=1e-12, atol=1e-14), k


def test_neuron_thresholds_and_the_ge_firing_rule():
    model = create_model(MNIST, depth=2)
    for name, m in model.named_modules():
        if isinstance(m, LIF):
            half = name.endswith(("talking_heads_lif", "attn_lif"))
            assert m.v_threshold == (0.5 if half else 1.0) and m.tau == 2.0 and m.alpha == 4.0, name
    # h = x / tau at the first step: x = 2 reaches 1.0 exactly and fires (>=); x = 1 reaches 0.5
    kv = model.block[0].attn.talking_heads_lif
    x = torch.tensor([[2.0, 1.0, 0.999]]).T.unsqueeze(0).expand(1, 3, 1).contiguous()
    assert model.head_lif(x).flatten().tolist() == [1.0, 0.0, 0.0]
    assert kv(x).flatten().tolist() == [1.0, 1.0, 0.0]
    plif = PLIF(2.0, 1.0)  # sigmoid(0) = 1/2 = 1/tau: the same neuron
    assert torch.equal(plif(x), model.head_lif(x))
    # kv is a count of tokens where k and v both fire: its spike is "any token", with threshold 0.5
    counts = torch.tensor([0.0, 1.0, 3.0]).view(1, 1, 1, 3)
    assert kv(counts).flatten().tolist() == [0.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
WRAPPINGS = {
    "bare": lambda sd: sd,
    "timm-saver": lambda sd: {"epoch": 299, "arch": "sdt", "state_dict": sd, "version": 2, "metric": 72.1,
                              "args": argparse.Namespace(model="sdt", lr=1.5e-3, spike_mode="lif", drop_path=0.2)},
    "module-prefix": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "module-prefix-top-level": lambda sd: {f"module.{k}": v for k, v in sd.items()},
}


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
def test_reference_checkpoint_loads_in_every_wrapping(wrapping, tmp_path):
    model, ref = _pair()
    path = tmp_path / "ckpt.pth.tar"
    torch.save(WRAPPINGS[wrapping](ref.float().state_dict()), path)
    loaded = create_model("sdt-cifar10-2-256", embed_dim=32, img_size=16, T=3, checkpoint_path=str(path))
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_state_dict_ema_on_request(tmp_path):
    model, ref = _pair()
    ema = {k: v.float() + 1 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": ref.float().state_dict(), "state_dict_ema": ema,
                "args": argparse.Namespace(model_ema=True)}, path)
    small = dict(embed_dim=32, img_size=16, T=3)
    plain = create_model("sdt-cifar10-2-256", checkpoint_path=str(path), **small)
    assert torch.equal(plain.head.bias, ref.head.bias.float())
    averaged = load_reference_checkpoint(create_model("sdt-cifar10-2-256", **small), path, ema=True)
    assert torch.equal(averaged.head.bias, ema["head.bias"])
    torch.save({"state_dict": ref.float().state_dict()}, path)
    with pytest.raises(SpikepruneError, match="no state_dict_ema"):
        load_reference_checkpoint(create_model("sdt-cifar10-2-256", **small), path, ema=True)


def test_a_checkpoint_of_the_other_family_is_named(tmp_path):
    sdt_path, spk_path = tmp_path / "sdt.pth", tmp_path / "spikformer.pth"
    torch.save({"state_dict": create_model(MNIST, depth=2).state_dict(), "args": argparse.Namespace()}, sdt_path)
    torch.save({"state_dict": create_model("spikformer-2-128-mnist").state_dict()}, spk_path)
    with pytest.raises(SpikepruneError, match="looks like a sdt model, not a spikformer one"):
        create_model("spikformer-2-128-mnist", checkpoint_path=str(sdt_path))
    with pytest.raises(SpikepruneError, match="looks like a spikformer model, not a sdt one"):
        create_model(MNIST, depth=2, checkpoint_path=str(spk_path))
    with torch.device("meta"):
        spk_imagenet = create_model("spikformer-8-512").state_dict()
    assert not get_family("sdt").recognizes(spk_imagenet)  # Conv1d q_conv, no talking_heads
    # a checkpoint of the right family but other widths lists the mismatch
    with pytest.raises(SpikepruneError, match="shape mismatches"):
        create_model(MNIST, depth=2, embed_dim=32, checkpoint_path=str(sdt_path))


# ------------------------------------------------------------------------------------------------
# The engine's guarantees: masked equivalence, round_to, save/load, record replay
# ------------------------------------------------------------------------------------------------
@st.composite
def small_sdts(draw):
    D = draw(st.integers(2, 8))
    depth = draw(st.integers(1, 2))
    blocks = []
    for _ in range(depth):
        res = draw(st.booleans())
        blocks.append(dict(heads=draw(st.integers(1, 3)), attn_dim=draw(st.integers(1, 6)),
                           mlp_hidden=D if res else draw(st.integers(1, 10)), mlp_residual=res))
    cfg = SDTConfig(img_size=8, in_channels=draw(st.integers(1, 3)), num_classes=3, embed_dim=D, depth=depth,
                    num_heads=2, T=draw(st.integers(1, 3)), spike_mode=draw(st.sampled_from(["lif", "lif", "plif"])),
                    pool_after=draw(st.sampled_from(["0011", "1010", "1100", "0000"])),
                    stem_widths=[draw(st.integers(1, 5)) for _ in range(3)], blocks=blocks)
    return randomise(SDT(cfg).double().eval(), draw(st.integers(0, 2**16)))


def _zero_out(layer, idx):
    layer.weight[idx] = 0
    if getattr(layer, "bias", None) is not None:
        layer.bias[idx] = 0


def masked_equivalent(model: SDT, kept: dict[str, list[int]]) -> SDT:
    """The dense model with every removed channel zeroed (BN scale and shift too, so it emits 0
    and no neuron downstream fires on it), written per group by module attribute, independently
    of the group declarations the surgery uses."""
    m = copy.deepcopy(model)
    sps = m.patch_embed
    with torch.no_grad():
        for name, keep in kept.items():
            def gone(n):
                return torch.tensor(sorted(set(range(n)) - set(keep)), dtype=torch.long)

            if name.startswith("stem."):
                i = {"stem.proj_conv": 0, "stem.proj_conv1": 1, "stem.proj_conv2": 2}[name]
                conv, bn, _ = sps.stage(i)
                r = gone(conv.weight.shape[0])
                _zero_out(conv, r), _zero_out(bn, r)
                sps.stage(i + 1)[0].weight[:, r] = 0
            elif name == "residual":
                r = gone(m.cfg.embed_dim)
                conv, bn, _ = sps.stage(3)
                for layer in (conv, bn, sps.rpe_conv, sps.rpe_bn):
                    _zero_out(layer, r)
                sps.rpe_conv.weight[:, r] = 0
                for blk in m.block:
                    for nm in "qkv":
                        getattr(blk.attn, f"{nm}_conv").weight[:, r] = 0
                    _zero_out(blk.attn.proj_conv, r), _zero_out(blk.attn.proj_bn, r)
                    blk.mlp.fc1_conv.weight[:, r] = 0
                    if blk.mlp.res:  # the hidden channels are the stream's
                        _zero_out(blk.mlp.fc1_conv, r), _zero_out(blk.mlp.fc1_bn, r)
                        blk.mlp.fc2_conv.weight[:, r] = 0
                    _zero_out(blk.mlp.fc2_conv, r), _zero_out(blk.mlp.fc2_bn, r)
                m.head.weight[:, r] = 0
            elif name.endswith(".attn.qkv"):
                attn = m.block[int(name.split(".")[0][5:])].attn
                r = gone(attn.attn_dim)
                for nm in "qkv":
                    _zero_out(getattr(attn, f"{nm}_conv"), r), _zero_out(getattr(attn, f"{nm}_bn"), r)
                attn.proj_conv.weight[:, r] = 0
            elif name.endswith(".mlp.hidden"):
                mlp = m.block[int(name.split(".")[0][5:])].mlp
                r = gone(mlp.hidden)
                _zero_out(mlp.fc1_conv, r), _zero_out(mlp.fc1_bn, r)
                mlp.fc2_conv.weight[:, r] = 0
            else:
                raise AssertionError(f"test does not know group {name}")
    return m


@st.composite
def requests(draw, model):
    ratios = {}
    for g in groups(model):
        how = draw(st.sampled_from(["skip", "ratio", "ratio", "indices"]))
        if how == "ratio":
            ratios[g.name] = draw(st.floats(0.0, 0.95))
        elif how == "indices":
            ratios[g.name] = draw(st.permutations(range(g.size)))[:draw(st.integers(1, g.size))]
    return ratios


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_pruned_equals_masked_dense(data):
    model = data.draw(small_sdts())
    ratios = data.draw(requests(model))
    criterion = data.draw(st.sampled_from(["l2", "l1", "bn", "random", "taylor", "firing"]))
    round_to = data.draw(st.sampled_from([1, 1, 2, 3]))
    x = torch.randn(3, model.cfg.in_channels, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpikepruneWarning)
        p = plan(model, ratios, criterion, round_to, data=(x, torch.tensor([0, 1, 2])))
    pruned = apply_plan(model, p)
    masked = masked_equivalent(model, p.kept)
    for g in groups(pruned):
        assert g.size == len(p.kept[g.name]), g.name
    assert [b["mlp_residual"] for b in pruned.cfg.blocks] == [b["mlp_residual"] for b in model.cfg.blocks]
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked(x), rtol=0, atol=1e-10)
        pruned.train(), masked.train()  # batch statistics are per channel: they agree as well
        assert torch.allclose(pruned(x), masked(x), rtol=0, atol=1e-10)


def test_masking_changes_the_output_so_the_equivalence_is_not_vacuous():
    model = randomise(create_model(MNIST, depth=2, embed_dim=16, img_size=16).double().eval(), 3)
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    called = {k: v for k, v in _spike_rates(model, x).items() if not k.endswith(("attn_lif", "rpe_lif"))}
    assert all(r > 0 for r in called.values()), called  # every neuron forward calls fires
    for name in ["residual", "stem.proj_conv1", "block0.attn.qkv", "block1.mlp.hidden"]:
        p = plan(model, {name: 0.5})
        with torch.no_grad():
            dense, pruned = model(x), apply_plan(model, p)(x)
            assert not torch.allclose(dense, pruned), name
            assert not torch.allclose(pruned[0], pruned[1]), name  # the output depends on the input
            assert torch.allclose(pruned, masked_equivalent(model, p.kept)(x), rtol=0, atol=1e-10), name


def test_groups_declare_the_sdt_coupling():
    model = create_model(MNIST, depth=2)
    gs = {g.name: g for g in groups(model)}
    assert list(gs) == ["stem.proj_conv", "stem.proj_conv1", "stem.proj_conv2", "residual", "block0.attn.qkv",
                        "block0.mlp.hidden", "block1.attn.qkv", "block1.mlp.hidden"]
    qkv = gs["block0.attn.qkv"]
    assert qkv.heads == 1 and qkv.size == 64  # heads only reshape: any channel may go
    assert set(qkv.cuts()) == {f"block.0.attn.{n} (out)" for n in
                               ("q_conv", "q_bn", "k_conv", "k_bn", "v_conv", "v_bn")} | {"block.0.attn.proj_conv (in)"}
    # every parameter except the dead talking_heads, the stem's input and the head's classes is in a group
    covered = {f"{m.module}.{p}" for g in gs.values() for m in g.members
               for p, t in dict(model.named_modules())[m.module].named_parameters(recurse=False) if t.dim() > m.dim}
    loose = {n for n, _ in model.named_parameters()} - covered
    assert loose == {"block.0.attn.talking_heads.weight", "block.1.attn.talking_heads.weight", "head.bias"}
    # with the inner residual on, the hidden channels belong to the residual group
    res = create_model(MNIST, depth=2, embed_dim=16, mlp_ratio=1.0)
    names = [g.name for g in groups(res)]
    assert "block0.mlp.hidden" not in names
    assert "block.0.mlp.fc1_conv (out)" in {g.name: g for g in groups(res)}["residual"].cuts()


def test_any_attention_width_round_to_and_inner_residual_kept():
    model = randomise(create_model(MNIST, depth=2, embed_dim=32, T=2).double().eval(), 4)
    pruned = prune(model, {"block0.attn.qkv": 0.3, "residual": 0.3, "block1.mlp.hidden": 0.5}, round_to=8)
    b0, b1 = pruned.cfg.blocks
    assert pruned.cfg.embed_dim == 24 and b0["attn_dim"] == 24 and b1["attn_dim"] == 32  # 32 - 10 = 22 -> 24
    assert b1["mlp_hidden"] == 64 and b0["heads"] == 8  # heads stay: only the dead talking_heads has them
    odd = prune(model, {"block0.attn.qkv": [0, 3, 5, 30, 31]})  # 5 channels, not divisible by 8 heads
    assert odd.cfg.blocks[0]["attn_dim"] == 5
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(odd(x), masked_equivalent(model, {"block0.attn.qkv": [0, 3, 5, 30, 31]})(x), rtol=0,
                              atol=1e-10)
    # an MLP whose pruned hidden width happens to equal the pruned D keeps its inner residual off
    same = prune(model, {"residual": 0.5, "block0.mlp.hidden": 1 - 16 / 128})
    assert same.cfg.embed_dim == same.cfg.blocks[0]["mlp_hidden"] == 16
    assert same.cfg.blocks[0]["mlp_residual"] is False and not same.block[0].mlp.res


def test_save_load_and_record_replay(tmp_path):
    model = randomise(create_model(MNIST, depth=2, embed_dim=32, T=2, spike_mode="plif").eval(), 5)
    pruned = prune(model, {"residual": 0.25, "block*.mlp.hidden": 0.5})
    pruned = prune(pruned, {"block0.attn.qkv": 0.4, "stem.proj_conv1": [1, 2, 5]})
    save_model(pruned, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["family"] == "sdt" and doc["config"]["blocks"][0]["mlp_residual"] is False
    again = load_model(tmp_path / "m")
    assert type(again) is SDT and again.cfg == pruned.cfg
    assert again.pruning.kept_counts() == pruned.pruning.kept_counts()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), pruned.eval()(x))
    replayed = prune(model, again.pruning)
    assert list(replayed.state_dict()) == list(pruned.state_dict())
    for a, b in zip(replayed.state_dict().values(), pruned.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Sensitivity cache and measure on a briefly trained SDT
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_sdt():
    torch.manual_seed(0)
    model = create_model(MNIST, img_size=16, embed_dim=16, T=2)
    train(model, "digits", TrainSettings(3, lr=3e-3, batch_size=32, seed=0, augment=False), progress=False)
    return model.eval()


def table_top1(model, data) -> float:
    return evaluate(model, data, split="calib", batch_size=64, progress=False)["top1"]


def test_sensitivity_cached_equals_uncached(trained_sdt):
    model = trained_sdt
    calib = load_dataset("digits", "calib", img_size=16)
    assert table_top1(model, calib) > 0.3  # it learnt something, so the rows below can differ
    table = analyze(model, calib, groups="residual,stem.proj_conv1,block0.*", ratios=(0.5,), batch_size=64,
                    progress=False)
    starts = {r["group"]: r["start"] for r in table.rows}
    assert starts == {"stem.proj_conv1": "stem.1", "residual": "stem.3", "block0.attn.qkv": "block.0",
                      "block0.mlp.hidden": "block.0"}
    for row in table.rows:
        pruned = prune(model, {row["group"]: row["ratio"]}).eval()
        assert row["top1"] == table_top1(pruned, calib), row
    assert sum(table.meta["stage_macs"]) == sum(r.macs for r in layer_table(model))


def test_measure_counts_spike_inputs_after_the_first_conv(trained_sdt):
    report = measure(trained_sdt, data=load_dataset("digits", "test", img_size=16), latency=False, max_images=64)
    assert report["notes"][0].startswith("SDT: every conv after the first reads spikes")
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["patch_embed.proj_conv"]["op"] == "MAC"
    for name in ("patch_embed.proj_conv1", "patch_embed.rpe_conv", "block.0.attn.q_conv", "block.0.attn.proj_conv",
                 "block.0.mlp.fc1_conv", "block.0.mlp.fc2_conv", "head"):
        assert rows[name]["op"] == "AC" and 0 <= rows[name]["input_rate"] <= 1, name
    assert not any(n.startswith("warning") for n in report["notes"])  # every AC layer saw binary input
    assert rows["block.0.attn.talking_heads"]["macs"] == 0 and rows["block.0.attn.talking_heads"]["params"] == 64
    assert report["total"]["params"] == sum(p.numel() for p in trained_sdt.parameters())
    pruned = sp.prune(trained_sdt, {"residual": 0.5})
    assert measure(pruned, latency=False)["total"]["macs"] < report["total"]["macs"]


def test_latency_bench_quick_run(tmp_path):
    """bench/sdt_latency.py runs end to end on tiny models (so it cannot rot), same logits in both."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sdt_latency", Path(__file__).parent.parent / "bench" /
                                                  "sdt_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [c["preset"] for c in result["cases"]] == ["sdt-8-512", "sdt-cifar10-2-512"]
    assert all(c["ours_ms"] > 0 and c["reference_ms"] > 0 and c["max_abs_logit_diff"] < 1e-3 for c in result["cases"])
    assert "speed-up" in (tmp_path / "sdt-latency-quick.md").read_text()
