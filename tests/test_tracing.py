"""spikeprune.trace on modules written for these tests: groups found by recording a forward, pruned
in place, every prune proven against the masked dense model; and equal to what the families declare.

The two models here have shapes neither family has: a hierarchical transformer (two stages of
different widths joined by a stride-2 patch-merging conv, Conv1d attention on [T, B, C, N] with
the head split by reshape + permute, a learnable position embedding, a neuron with a learnable
leak) and a single-step model (a Python loop over T calls every layer once per step, the neurons
keep their membrane between calls, heads by view on channel-last tokens).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import spikeprune as sp
from spikeprune.errors import SpikepruneError
from spikeprune.models import create_model, get_family
from spikeprune.structure import Group, Member
from spikeprune.surrogate import heaviside_sigmoid
from spikeprune.tracing import register_channelwise
from spikeprune.tracing_spec import TRACE_ATTR


# ------------------------------------------------------------------------------------------------
# Models written for the test
# ------------------------------------------------------------------------------------------------
class MultiStepLIF(nn.Module):
    """Multi-step LIF over dim 0 (T), hard reset to 0 (SpikingJelly's pattern in a few lines)."""

    def __init__(self, tau=2.0, v_threshold=1.0):
        super().__init__()
        self.tau, self.v_threshold = tau, v_threshold

    def forward(self, x):
        v = torch.zeros_like(x[0])
        out = []
        for t in range(x.shape[0]):
            v = v + (x[t] - v) / self.tau
            s = heaviside_sigmoid(v - self.v_threshold)
            v = v * (1 - s)
            out.append(s)
        return torch.stack(out)


class LeakyLIF(MultiStepLIF):
    """A parametric LIF: one learnable leak (a scalar parameter, as SpikingJelly's PLIF)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        v = torch.zeros_like(x[0])
        out = []
        for t in range(x.shape[0]):
            v = v + (x[t] - v) * self.w.sigmoid()
            s = heaviside_sigmoid(v - self.v_threshold)
            v = v * (1 - s)
            out.append(s)
        return torch.stack(out)


class SingleStepLIF(nn.Module):
    """One time step per call; the membrane is state kept between calls until reset()."""

    def __init__(self, tau=2.0, v_threshold=1.0):
        super().__init__()
        self.tau, self.v_threshold, self.v = tau, v_threshold, 0.0

    def forward(self, x):
        v = self.v + (x - self.v) / self.tau
        s = heaviside_sigmoid(v - self.v_threshold)
        self.v = v * (1 - s)
        return s

    def reset(self):
        self.v = 0.0


class ConvAttention(nn.Module):
    """Reference-Spikformer-style attention on [T, B, C, N]: Conv1d q/k/v over T*B, heads split by
    reshape + permute, q @ k^T @ v with a fixed scale."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale = heads, 0.125
        for n in ("q", "k", "v"):
            setattr(self, f"{n}_conv", nn.Conv1d(dim, dim, 1, bias=False))
            setattr(self, f"{n}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{n}_lif", MultiStepLIF())
        self.attn_lif = MultiStepLIF(v_threshold=0.5)
        self.proj_conv = nn.Conv1d(dim, dim, 1)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = MultiStepLIF()

    def branch(self, n, x):
        T, B, C, N = x.shape
        y = getattr(self, f"{n}_bn")(getattr(self, f"{n}_conv")(x.flatten(0, 1)))
        y = getattr(self, f"{n}_lif")(y.reshape(T, B, -1, N))
        width = y.shape[2]
        return y.transpose(-1, -2).reshape(T, B, N, self.num_heads, width // self.num_heads).permute(0, 1, 3, 2, 4)

    def forward(self, x):
        T, B, C, N = x.shape
        q, k, v = self.branch("q", x), self.branch("k", x), self.branch("v", x)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        y = (attn @ v).transpose(3, 4).reshape(T, B, -1, N)
        y = self.attn_lif(y).flatten(0, 1)
        return self.proj_lif(self.proj_bn(self.proj_conv(y)).reshape(T, B, C, N))


class ConvMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.bn1, self.lif1 = nn.Conv1d(dim, hidden, 1), nn.BatchNorm1d(hidden), LeakyLIF()
        self.fc2, self.bn2, self.lif2 = nn.Conv1d(hidden, dim, 1), nn.BatchNorm1d(dim), MultiStepLIF()

    def forward(self, x):
        T, B, C, N = x.shape
        y = self.lif1(self.bn1(self.fc1(x.flatten(0, 1))).reshape(T, B, -1, N))
        return self.lif2(self.bn2(self.fc2(y.flatten(0, 1))).reshape(T, B, C, N))


class Stage(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.attn, self.mlp = ConvAttention(dim, heads), ConvMLP(dim, hidden)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class PatchMerge(nn.Module):
    """Between stages: tokens back to a grid, a stride-2 conv to a wider channel set, tokens again."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv, self.bn, self.lif = nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), MultiStepLIF()

    def forward(self, x):
        T, B, C, N = x.shape
        side = int(N ** 0.5)
        y = self.bn(self.conv(x.reshape(T * B, C, side, side)))
        return self.lif(y.reshape(T, B, *y.shape[1:])).flatten(3)


class HierarchicalSNN(nn.Module):
    def __init__(self, T=2, dims=(8, 16), heads=(2, 2), classes=5, in_ch=1):
        super().__init__()
        self.T = T
        self.stem, self.stem_bn, self.stem_lif = nn.Conv2d(in_ch, dims[0], 3, 1, 1, bias=False), \
            nn.BatchNorm2d(dims[0]), MultiStepLIF()
        self.pos = nn.Parameter(torch.randn(1, 1, dims[0], 1))
        self.stage1 = Stage(dims[0], heads[0], 2 * dims[0])
        self.merge = PatchMerge(dims[0], dims[1])
        self.stage2 = Stage(dims[1], heads[1], 2 * dims[1])
        self.head = nn.Linear(dims[1], classes)

    def forward(self, img):
        x = self.stem_bn(self.stem(img)).unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        x = self.stem_lif(x).flatten(3) + self.pos  # [T, B, C, N]
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(x.mean(3).mean(0))


class LoopSNN(nn.Module):
    """Single-step neurons in a Python loop over T; Linear layers on channel-last tokens."""

    def __init__(self, T=2, dim=12, heads=3, hidden=24, classes=10, in_ch=1, patch=4, literal_heads=False,
                 merge_to_input_width=False, head_dim_attr=False):
        super().__init__()
        self.T, self.heads, self.literal_heads, self.merge_to_input_width = T, heads, literal_heads, merge_to_input_width
        self.head_dim = dim // heads if head_dim_attr else -1  # one stored head dim for q, k and v
        self.patch, self.patch_lif = nn.Conv2d(in_ch, dim, patch, patch), SingleStepLIF()
        self.qkv = nn.ModuleDict({n: nn.Linear(dim, dim) for n in "qkv"})
        self.lifs = nn.ModuleDict({n: SingleStepLIF() for n in "qkv"})
        self.out, self.out_lif = nn.Linear(dim, dim), SingleStepLIF()
        self.fc1, self.fc1_lif = nn.Linear(dim, hidden), SingleStepLIF()
        self.fc2, self.fc2_lif = nn.Linear(hidden, dim), SingleStepLIF()
        self.head = nn.Linear(dim, classes)

    def step(self, img):
        x = self.patch_lif(self.patch(img)).flatten(2).transpose(1, 2)  # [B, N, D]
        B, N, D = x.shape
        heads = 3 if self.literal_heads else self.heads  # a literal: nothing tells the pruner
        q, k, v = (self.lifs[n](self.qkv[n](x)).view(B, N, heads, self.head_dim).transpose(1, 2) for n in "qkv")
        y = (q @ k.transpose(-2, -1)) @ v * 0.25
        y = y.transpose(1, 2).reshape(B, N, D if self.merge_to_input_width else -1)  # D: the block input's width
        x = x + self.out_lif(self.out(y))
        x = x + self.fc2_lif(self.fc2(self.fc1_lif(self.fc1(x))))
        return self.head(x.mean(1))

    def forward(self, img):
        return torch.stack([self.step(img) for _ in range(self.T)]).mean(0)


def _members(g):
    return frozenset((m.module, m.dim, m.unit_width) for m in g.members)


def _shape_key(groups):
    return sorted((sorted(_members(g)), g.unit, g.size, g.heads) for g in groups)


def _hierarchical(seed=0):
    torch.manual_seed(seed)
    return HierarchicalSNN().eval(), torch.rand(2, 1, 8, 8) * 3


# ------------------------------------------------------------------------------------------------
# Equal to what the families declare
# ------------------------------------------------------------------------------------------------
def _tiny_preset(name):
    """A preset at tiny widths (and at most 32 px), seeded, in eval mode, with an example batch."""
    with torch.device("meta"):
        fam = get_family(create_model(name))
    fields = {f.name for f in dataclasses.fields(fam.config_class)}
    overrides = {k: v for k, v in dict(embed_dim=16, num_heads=2, depth=2, T=2).items() if k in fields}
    with torch.device("meta"):
        if create_model(name).cfg.img_size > 32:
            overrides["img_size"] = 32
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()
    return model, torch.rand(2, model.cfg.in_channels, model.cfg.img_size, model.cfg.img_size)


@pytest.mark.parametrize("name", sp.list_models())
def test_traced_groups_equal_the_declared_ones_for_every_preset(name):
    model, x = _tiny_preset(name)
    t = sp.trace(model, x, verify=False)
    assert _shape_key(t.groups) == _shape_key(sp.groups(model))
    assert getattr(model, "family") == get_family(model).name != "traced"  # a family model keeps its family
    assert TRACE_ATTR not in model.__dict__


@pytest.mark.parametrize("name", ["spikformer-1-32-digits", "sdt-1-64-mnist"])
def test_every_declared_group_also_passes_the_traced_proof(name):
    model, x = _tiny_preset(name)
    t = sp.trace(model, x)  # each group pruned alone by half, proven against the masked dense model
    assert t.unprunable == [("head", "the model's output")]
    assert _shape_key(t.groups) == _shape_key(sp.groups(model))


# ------------------------------------------------------------------------------------------------
# Discovery on shapes neither family has
# ------------------------------------------------------------------------------------------------
def test_hierarchical_model_groups():
    model, x = _hierarchical()
    t = sp.trace(model, x)
    by_kind = {}
    for g in t.groups:
        by_kind.setdefault(g.kind, []).append(g)
    assert sorted(by_kind) == ["heads", "hidden", "qk", "residual", "v"]
    res0, res1 = sorted(by_kind["residual"], key=lambda g: g.size)
    # stage 1's stream: the stem writes it, the position embedding (dim 2) is added to it, every
    # block reads and writes it, and the patch-merging conv reads it
    assert {("stem", 0), ("stem_bn", 0), ("", 2), ("stage1.attn.q_conv", 1), ("stage1.attn.proj_conv", 0),
            ("stage1.mlp.fc2", 0), ("merge.conv", 1)} <= {(m.module, m.dim) for m in res0.members}
    # stage 2's stream starts at the merging conv's outputs and ends at the head's inputs
    assert {("merge.conv", 0), ("merge.bn", 0), ("stage2.mlp.bn2", 0), ("head", 1)} <= \
        {(m.module, m.dim) for m in res1.members}
    assert (res0.size, res1.size) == (8, 16)
    heads = {g.name: g for g in by_kind["heads"]}
    assert sorted(heads) == ["stage1.attn.heads", "stage2.attn.heads"]
    qk1 = next(g for g in by_kind["qk"] if g.name.startswith("stage1"))
    assert _members(qk1) == {("stage1.attn.q_conv", 0, 1), ("stage1.attn.q_bn", 0, 1), ("stage1.attn.k_conv", 0, 1),
                             ("stage1.attn.k_bn", 0, 1)}
    assert (qk1.heads, qk1.head_group) == (2, "stage1.attn.heads")
    assert ("stage1.attn.proj_conv", 1, 4) in _members(heads["stage1.attn.heads"])
    assert t.unprunable == [("head", "the model's output")]
    assert model.family == "traced" and sp.groups(model)[0].name == t.groups[0].name
    assert model.spikeprune_trace.unprunable == t.unprunable  # kept on the model for inspection
    # the spike-aware criterion reads each group at the neurons that carry exactly its channels
    assert all(g.probes for g in t.groups)
    assert [(p.module, p.channel_dim) for p in qk1.probes] == [("stage1.attn.q_lif", -2), ("stage1.attn.k_lif", -2)]
    assert qk1.probe_reduce == "prod"
    pruned = sp.prune(model, {"stage1.*": 0.5}, importance="firing", data=torch.rand(8, 1, 8, 8) * 3)
    assert pruned.stage1.mlp.fc1.out_channels == 8


def test_single_step_loop_model_groups():
    torch.manual_seed(0)
    model = LoopSNN()
    t = sp.trace(model, torch.rand(3, 1, 16, 16) * 3)
    kinds = sorted(g.kind for g in t.groups)
    assert kinds == ["heads", "hidden", "qk", "residual", "v"]
    res = next(g for g in t.groups if g.kind == "residual")
    assert _members(res) == {("patch", 0, 1), ("qkv.q", 1, 1), ("qkv.k", 1, 1), ("qkv.v", 1, 1), ("out", 0, 1),
                             ("fc1", 1, 1), ("fc2", 0, 1), ("head", 1, 1)}
    assert model.cfg.T == 2  # read from the model's own `T`


# ------------------------------------------------------------------------------------------------
# Pruned in place, proven
# ------------------------------------------------------------------------------------------------
def test_pruning_a_traced_model_replaces_its_layers_and_attributes():
    model, x = _hierarchical()
    dense_out = model(x)
    sp.trace(model, x)
    ratios = {g.name: 0.5 for g in sp.groups(model)}
    pruned = sp.prune(model, ratios)  # proven inside: a mismatch would raise
    assert type(pruned) is HierarchicalSNN and pruned.family == "traced"
    assert pruned.stage1.attn.num_heads == 1 and model.stage1.attn.num_heads == 2  # the forward's head count
    assert pruned.stage2.attn.q_conv.weight.shape == (4, 8, 1)  # 1 head of 4 dims, reading 8 channels
    assert isinstance(pruned.stage2.attn.q_conv, nn.Conv1d) and pruned.stage2.attn.q_conv.out_channels == 4
    assert pruned.pos.shape == (1, 1, 4, 1) and pruned.stem_bn.num_features == 4
    assert torch.equal(model(x), dense_out)  # the input model is untouched
    assert pruned(x).shape == dense_out.shape
    n = sum(p.numel() for p in pruned.parameters())
    assert n < 0.4 * sum(p.numel() for p in model.parameters())
    assert sp.measure(pruned, latency=False)["total"]["params"] == n
    assert sp.measure(model, latency=False)["total"]["params"] == sum(p.numel() for p in model.parameters())
    # the record replays on the dense model bit for bit, and a second prune composes
    again = sp.prune(model, pruned.pruning)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), pruned.state_dict().values()))
    twice = sp.prune(pruned, {"residual1": 0.5})
    assert twice.pruning.kept_counts()["residual1"] == 4


def test_single_step_model_prunes_heads_and_channels():
    torch.manual_seed(0)
    model = LoopSNN()
    x = torch.rand(3, 1, 16, 16) * 3
    sp.trace(model, x)
    heads = next(g.name for g in sp.groups(model) if g.kind == "heads")
    assert heads == "heads"  # its layers share no module prefix
    pruned = sp.prune(model, {heads: [0, 2], "fc1": 0.5})
    assert pruned.heads == 2 and pruned.qkv["q"].out_features == 8 and pruned.fc1.out_features == 12
    assert pruned(x).shape == (3, 10)


def test_a_width_read_from_another_tensor_ties_the_two_dims():
    torch.manual_seed(0)
    model = LoopSNN(merge_to_input_width=True)
    x = torch.rand(3, 1, 16, 16) * 3
    t = sp.trace(model, x)
    # the head merge reshapes v's heads to the residual's width D: v and the stream are cut together
    tied = next(g for g in t.groups if ("qkv.v", 0, 1) in _members(g))
    assert ("out", 0, 1) in _members(tied) and ("patch", 0, 1) in _members(tied) and tied.heads == 3
    assert "v" not in {g.kind for g in t.groups} and not t.unprunable[1:]
    pruned = sp.prune(model, {tied.name: 0.5})
    assert pruned.out.weight.shape == (6, 6) and pruned(x).shape == (3, 10)


def test_a_stored_head_dim_follows_the_heads_but_ties_qk_to_v():
    torch.manual_seed(0)
    model = LoopSNN(head_dim_attr=True)
    x = torch.rand(3, 1, 16, 16) * 3
    t = sp.trace(model, x)
    reasons = dict(t.unprunable)
    # q, k and v are viewed with one stored head_dim: their head dims cannot be cut apart
    assert "head_dim is read as two different widths" in reasons["qkv.q"]
    assert "head_dim is read as two different widths" in reasons["qkv.v"]
    assert {g.kind for g in t.groups} == {"residual", "heads", "hidden"}
    pruned = sp.prune(model, {"heads": [1]})
    assert (pruned.heads, pruned.head_dim) == (1, 4) and pruned(x).shape == (3, 10)


def test_a_wrong_group_is_refused_by_the_proof_and_the_model_is_left_as_it_was():
    model, x = _hierarchical()
    sp.trace(model, x)
    spec = model.__dict__[TRACE_ATTR]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a group that forgets the layer reading its channels, as a buggy tracer would: forward breaks
    hidden = next(g for g in spec.groups if g.name == "stage1.mlp.fc1")
    hidden.members = [m for m in hidden.members if m.module != "stage1.mlp.fc2"]
    fc2_in = spec.member_leaves.pop(("stage1.mlp.fc2", 1))
    with pytest.raises(SpikepruneError, match="pruning group stage1.mlp.fc1 breaks the model's forward"):
        sp.prune(model, {hidden.name: 0.5})
    # the reader as a group of its own: widths fit, but nothing ties its kept channels to fc1's
    spec.groups.append(Group("wrong", "hidden", "channel", hidden.size, [Member("stage1.mlp.fc2", 1)]))
    spec.group_leaf["wrong"] = fc2_in[0] + 10_000
    spec.leaf_sizes[fc2_in[0] + 10_000] = hidden.size
    spec.member_leaves[("stage1.mlp.fc2", 1)] = (fc2_in[0] + 10_000,)
    with pytest.raises(SpikepruneError, match="pruning groups stage1.mlp.fc1, wrong is not equivalent to masking it"):
        sp.prune(model, {hidden.name: list(range(8)), "wrong": list(range(8, 16))})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------
# What the tracer refuses, and why
# ------------------------------------------------------------------------------------------------
def test_a_literal_head_count_makes_the_heads_unprunable_with_the_reason():
    torch.manual_seed(0)
    model = LoopSNN(literal_heads=True)
    t = sp.trace(model, torch.rand(3, 1, 16, 16) * 3)
    assert "heads" not in {g.kind for g in t.groups}
    reasons = dict(t.unprunable)
    assert "breaks the model's forward" in reasons["qkv.q"] and "pruning groups heads," in reasons["qkv.q"]
    assert {"qk", "v", "hidden", "residual"} <= {g.kind for g in t.groups}  # the rest still prunes
    assert all(g.head_group is None for g in t.groups)


class NormedBlock(nn.Module):
    """A LayerNorm over the channels and a cumulative sum over them: neither may be pruned."""

    def __init__(self):
        super().__init__()
        self.fc0, self.norm, self.lif0 = nn.Linear(4, 8), nn.LayerNorm(8), MultiStepLIF()
        self.fc1, self.lif1 = nn.Linear(8, 6), MultiStepLIF()
        self.fc2, self.lif2 = nn.Linear(6, 6), MultiStepLIF()
        self.fc3, self.lif3 = nn.Linear(6, 5), MultiStepLIF()
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x [B, 4]
        x = x.unsqueeze(0).expand(2, *x.shape)
        x = self.lif0(self.norm(self.fc0(x)))
        y = self.lif1(self.fc1(x)).cumsum(-1)
        y = self.lif2(self.fc2(y))
        return self.head(self.lif3(self.fc3(y))).mean(0)


def test_layernorm_and_unknown_ops_taint_the_channels_they_read():
    model = NormedBlock()
    t = sp.trace(model, torch.rand(3, 4) * 4)
    reasons = {}
    for module, why in t.unprunable:
        reasons[module] = reasons.get(module, "") + why + "; "
    assert "LayerNorm" in reasons["fc0"] and "LayerNorm" in reasons["norm"] and "input" in reasons["fc0"]
    assert "cumsum" in reasons["fc1"] and "not follow" in reasons["fc1"]
    # fc2's outputs and fc3's only meet neurons and the next layer: nothing doubtful touches them
    assert [g.name for g in t.groups] == ["fc2", "fc3"]


class Spiky(nn.Module):
    """A spiking unit the tracer cannot see through (a cumulative op inside) and that has no
    v_threshold: unknown until registered as channel-wise."""

    def forward(self, x):
        return (x.cumsum(0) > 1).to(x.dtype)


def test_register_channelwise_lets_the_tracer_see_through_a_custom_neuron():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.s1, self.fc2 = nn.Linear(4, 8), Spiky(), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(self.s1(self.fc1(x.unsqueeze(0).expand(2, *x.shape)))).mean(0)

    x = torch.rand(3, 4)
    assert sp.trace(Net(), x).groups == []
    register_channelwise(Spiky)
    t = sp.trace(Net(), x)
    assert [(g.name, g.size) for g in t.groups] == [("fc1", 8)]
    with pytest.raises(SpikepruneError, match="nn.Module subclass"):
        register_channelwise(int)


def test_trace_refuses_bad_input():
    with pytest.raises(SpikepruneError, match="nn.Module"):
        sp.trace("model", torch.rand(1, 1))
    with pytest.raises(SpikepruneError, match="example input"):
        sp.trace(LoopSNN(), None)
    with pytest.raises(SpikepruneError, match="forward fails on the example input"):
        sp.trace(LoopSNN(), torch.rand(2, 3, 16, 16))


# ------------------------------------------------------------------------------------------------
# The pipeline on a traced model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,limits", [("uniform", {"target_saving": 0.3}), ("primesvt", {"max_acc_drop": 5.0})])
def test_a_traced_model_runs_through_prune_run(tmp_path, policy, limits):
    torch.manual_seed(0)
    model = LoopSNN()
    sp.trace(model, torch.rand(4, 1, 16, 16))
    sp.train(model, "digits", 1, lr=1e-2, batch_size=32, progress=False)
    summary = sp.prune_run(model, "digits", tmp_path / "run", policy=policy, progress=False, **limits)
    assert summary["pruned"]["params"] < summary["dense"]["params"]
    assert summary["pruned"]["memory_bytes"]["fp32"] <= 0.7 * summary["dense"]["memory_bytes"]["fp32"] + 1
    assert summary["pruned"]["sops"] is not None
    reloaded = sp.load_model(tmp_path / "run" / "model")  # in the process that traced the dense model
    assert reloaded.family == "traced" and reloaded.pruning.pruned


def test_a_traced_model_reloads_only_where_its_structure_is_known(tmp_path, monkeypatch):
    from spikeprune import tracing_spec

    torch.manual_seed(0)
    model = LoopSNN()
    sp.trace(model, torch.rand(2, 1, 16, 16))
    pruned = sp.prune(model, {"fc1": 0.5})
    sp.save_model(pruned, tmp_path / "m")
    again = sp.load_model(tmp_path / "m")
    assert type(again) is LoopSNN and again.fc1.out_features == 12
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), pruned.state_dict().values()))
    monkeypatch.setattr(tracing_spec, "_TEMPLATES", {})  # as in a new process
    with pytest.raises(SpikepruneError, match="trace the dense model again in this process"):
        sp.load_model(tmp_path / "m")


def test_a_pruned_traced_model_exports_to_onnx_and_agrees(tmp_path):
    """Issue 24 point 4: a traced model whose neurons are plain PyTorch exports like a family model;
    ONNX Runtime then gives the pruned model's classes."""
    pytest.importorskip("onnxruntime")
    model, x = _hierarchical()
    sp.trace(model, x)
    small = sp.prune(model, {g.name: 0.5 for g in sp.groups(model) if g.unit == "channel"})
    report = sp.export(small, tmp_path / "traced.onnx", input="normalised", progress=False)
    assert (tmp_path / "traced.onnx").stat().st_size > 0
    check = report["check"]
    assert check["images"] > 0 and check["class_agreement"] == 1.0 and check["class_disagreements"] == 0
