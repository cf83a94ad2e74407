"""Group declarations: every Spikformer layer slice belongs where the architecture says it does."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import spikeprune
from spikeprune.errors import SpikepruneError
from spikeprune.coupling import groups
from spikeprune.models import create_model
from spikeprune.models.spikformer import Spikformer, SpikformerConfig

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def tiny(layout: str) -> Spikformer:
    img = 16 if layout == "cifar" else 32
    blocks = [dict(heads=2, qk_dim=6, v_dim=4, mlp_hidden=10), dict(heads=1, qk_dim=3, v_dim=5, mlp_hidden=7)]
    return Spikformer(SpikformerConfig(layout=layout, img_size=img, in_channels=3, num_classes=5, embed_dim=8,
                                       depth=2, num_heads=2, T=2, stem_widths=[2, 3, 5], blocks=blocks))


@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
def test_names_and_sizes_follow_the_config(layout):
    model = tiny(layout)
    gs = {g.name: g for g in groups(model)}
    expected = ["stem.proj_conv", "stem.proj_conv1", "stem.proj_conv2", "residual"]
    for i in range(2):
        expected += [f"block{i}.attn.qk", f"block{i}.attn.v", f"block{i}.attn.heads", f"block{i}.mlp.hidden"]
    assert list(gs) == expected
    assert [gs[n].size for n in ("stem.proj_conv", "stem.proj_conv1", "stem.proj_conv2")] == [2, 3, 5]
    # a stem group is named after the conv whose output channels it cuts
    assert gs["stem.proj_conv1"].cuts()[0] == "patch_embed.proj_conv1 (out)"
    assert gs["residual"].size == 8
    assert (gs["block0.attn.qk"].size, gs["block0.attn.qk"].heads, gs["block0.attn.qk"].head_dim) == (6, 2, 3)
    assert (gs["block1.attn.v"].size, gs["block1.attn.heads"].size) == (5, 1)
    assert gs["block0.mlp.hidden"].size == 10 and gs["block0.attn.heads"].unit == "head"


@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
def test_every_member_slice_has_the_group_width(layout):
    model = tiny(layout)
    modules = dict(model.named_modules())
    for g in groups(model):
        for m in g.members:
            mod = modules[m.module]
            width = mod.weight.shape[m.dim]
            assert width == g.size * m.unit_width, (g.name, m)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                assert m.dim == 0


@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
def test_each_layer_dim_belongs_to_exactly_one_channel_group(layout):
    """Every Conv / Linear output dim (but the class count) and input dim (but the image channels)
    is cut by exactly one channel group, and every BatchNorm by the group of its layer: nothing is
    missed and nothing claimed twice. Heads groups overlap qk / v by design and are left out."""
    model = tiny(layout)
    claimed: dict[tuple[str, int], list[str]] = {}
    for g in groups(model):
        if g.kind == "heads":
            continue
        for m in g.members:
            claimed.setdefault((m.module, m.dim), []).append(g.name)
    for name, mod in model.named_modules():
        if isinstance(mod, WEIGHTED):
            out_owner = claimed.get((name, 0), [])
            in_owner = claimed.get((name, 1), [])
            assert len(out_owner) == (0 if name == "head" else 1), (name, out_owner)
            assert len(in_owner) == (0 if name == "patch_embed.proj_conv" else 1), (name, in_owner)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            assert len(claimed.get((name, 0), [])) == 1, name


def test_residual_touches_every_writer_and_reader():
    model = tiny("cifar")
    res = {g.name: g for g in groups(model)}["residual"]
    members = {(m.module, m.dim) for m in res.members}
    for must in [("patch_embed.proj_conv3", 0), ("patch_embed.proj_bn3", 0), ("patch_embed.rpe_conv", 0),
                 ("patch_embed.rpe_conv", 1), ("patch_embed.rpe_bn", 0), ("head", 1)]:
        assert must in members
    for i in range(2):
        for mod, dim in [("attn.q_linear", 1), ("attn.k_linear", 1), ("attn.v_linear", 1), ("attn.proj_linear", 0),
                         ("attn.proj_bn", 0), ("mlp.fc1_linear", 1), ("mlp.fc2_linear", 0), ("mlp.fc2_bn", 0)]:
            assert (f"block.{i}.{mod}", dim) in members


def test_params_and_memory_count_each_dependent_tensor_once():
    model = tiny("imagenet")
    gs = {g.name: g for g in groups(model)}
    mlp = model.block[0].mlp
    hidden = (mlp.fc1_conv.weight.numel() + mlp.fc1_conv.bias.numel() + 2 * mlp.fc1_bn.num_features
              + mlp.fc2_conv.weight.numel())  # fc2's bias has no hidden dim
    assert gs["block0.mlp.hidden"].params == hidden
    assert gs["block0.mlp.hidden"].memory_bytes == 4 * hidden
    # rpe_conv is cut on both dims but counted once; the head's bias is not counted
    rpe = model.patch_embed.rpe_conv.weight.numel()
    res_layers = [model.patch_embed.proj_conv3.weight, model.patch_embed.proj_bn3.weight, model.patch_embed.proj_bn3.bias,
                  model.patch_embed.rpe_bn.weight, model.patch_embed.rpe_bn.bias, model.head.weight]
    for blk in model.block:
        a, m = blk.attn, blk.mlp
        res_layers += [a.q_conv.weight, a.k_conv.weight, a.v_conv.weight, a.proj_conv.weight, a.proj_conv.bias,
                       a.proj_bn.weight, a.proj_bn.bias, m.fc1_conv.weight, m.fc2_conv.weight, m.fc2_conv.bias,
                       m.fc2_bn.weight, m.fc2_bn.bias]
    assert gs["residual"].params == rpe + sum(p.numel() for p in res_layers)
    # heads cut exactly the tensors qk and v cut
    assert gs["block0.attn.heads"].params == gs["block0.attn.qk"].params + gs["block0.attn.v"].params
    assert gs["residual"].summary()["layers"][0] == "patch_embed.proj_conv3"


def test_public_api_lists_groups_of_a_preset():
    gs = spikeprune.groups(create_model("spikformer-8-512"))
    assert len(gs) == 4 + 8 * 4
    by = {g.name: g for g in gs}
    assert by["residual"].size == 512 and by["block7.mlp.hidden"].size == 2048 and by["block3.attn.heads"].size == 8
    assert all(g.params > 0 and g.memory_bytes == 4 * g.params for g in gs)


def test_unknown_family_is_a_clear_error():
    class Net(nn.Module):
        family = "resnet"

    with pytest.raises(SpikepruneError, match="no model family 'resnet' is registered"):
        groups(Net())
    with pytest.raises(SpikepruneError, match="known families: .*spikformer"):
        groups(nn.Linear(2, 2))
