"""A model family defined only here, registered without editing the package, goes through the
whole engine: groups -> prune (masked equivalence in float64) -> sensitivity (cached == uncached)
-> measure -> save / load -> replay of its pruning record -> a PrimeSVT run.

The family is a one-block spiking MLP-mixer, a shape Spikformer does not have: a strided patch
conv, token mixing across the patches (a hidden width of its own), channel mixing, a membrane-free
residual of spike sums, and a linear head.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, fields

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spikeprune as sp
from spikeprune.data import load_dataset
from spikeprune.errors import SpikepruneError
from spikeprune.coupling import groups
from spikeprune.costs import count_macs, count_params, measure
from spikeprune.models import Family, families, get_family, register_family, unregister_family
from spikeprune.neuron import LIF
from spikeprune.sensitivity import analyze
from spikeprune.serialization import load_model, save_model
from spikeprune.structure import Group, Layer, Member, Probe
from spikeprune.surgery import prune
from spikeprune.training import TrainSettings, evaluate, train


# ------------------------------------------------------------------------------------------------
# The family: config, model, groups, resizer, stages, cost table
# ------------------------------------------------------------------------------------------------
@dataclass
class MixerConfig:
    img_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    T: int = 2
    patch: int = 2
    embed_dim: int = 16
    token_hidden: int = 12
    channel_hidden: int = 24

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MixerConfig":
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing or set(d) - {f.name for f in fields(cls)}:
            raise SpikepruneError(f"bad mixer config: missing {missing}")
        return cls(**d)


def _bn(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    return bn(x.reshape(-1, x.shape[-1])).view(x.shape)


class SpikingMixer(nn.Module):
    family = "test-mixer"

    def __init__(self, cfg: MixerConfig):
        super().__init__()
        self.cfg = cfg
        D, N = cfg.embed_dim, cfg.tokens
        self.embed = nn.Conv2d(cfg.in_channels, D, cfg.patch, cfg.patch, bias=False)
        self.embed_bn = nn.BatchNorm2d(D)
        self.embed_lif = LIF()
        # token mixing has no bias and no BatchNorm, so a channel that is all zero stays zero
        self.token_fc1 = nn.Linear(N, cfg.token_hidden, bias=False)
        self.token_lif1 = LIF()
        self.token_fc2 = nn.Linear(cfg.token_hidden, N, bias=False)
        self.token_lif2 = LIF()
        self.channel_fc1 = nn.Linear(D, cfg.channel_hidden)
        self.channel_bn1 = nn.BatchNorm1d(cfg.channel_hidden)
        self.channel_lif1 = LIF()
        self.channel_fc2 = nn.Linear(cfg.channel_hidden, D)
        self.channel_bn2 = nn.BatchNorm1d(D)
        self.channel_lif2 = LIF()
        self.head = nn.Linear(D, cfg.num_classes)

    def stage_embed(self, images):  # [B, C, H, W] -> tokens [T, B, N, D] of spikes
        x = self.embed_bn(self.embed(images))
        x = self.embed_lif(x.unsqueeze(0).expand(self.cfg.T, *x.shape).contiguous())
        return x.flatten(3).transpose(2, 3)

    def stage_block(self, x):
        t = self.token_lif2(self.token_fc2(self.token_lif1(self.token_fc1(x.transpose(2, 3))))).transpose(2, 3)
        x = x + t
        c = self.channel_lif1(_bn(self.channel_bn1, self.channel_fc1(x)))
        return x + self.channel_lif2(_bn(self.channel_bn2, self.channel_fc2(c)))

    def stage_head(self, x):
        return self.head(x.mean(2).mean(0))

    def forward(self, images):
        return self.stage_head(self.stage_block(self.stage_embed(images)))

    def config_dict(self) -> dict:
        return {"family": self.family, "config": self.cfg.to_dict()}


def mixer_groups(model: SpikingMixer) -> list[Group]:
    return [
        Group("residual", "residual", "channel", model.cfg.embed_dim,
              [Member("embed", 0), Member("embed_bn", 0), Member("channel_fc1", 1), Member("channel_fc2", 0),
               Member("channel_bn2", 0), Member("head", 1)],
              probes=[Probe("head", "input", -1, ("head",))]),
        Group("mix.token_hidden", "hidden", "channel", model.cfg.token_hidden,
              [Member("token_fc1", 0), Member("token_fc2", 1)],
              probes=[Probe("token_lif1", "output", -1, ("token_fc2",))]),
        Group("mix.channel_hidden", "hidden", "channel", model.cfg.channel_hidden,
              [Member("channel_fc1", 0), Member("channel_bn1", 0), Member("channel_fc2", 1)],
              probes=[Probe("channel_lif1", "output", -1, ("channel_fc2",))]),
    ]


def mixer_resize(model: SpikingMixer, kept: dict) -> SpikingMixer:
    return SpikingMixer(MixerConfig(**{**model.cfg.to_dict(), "embed_dim": kept["residual"],
                                       "token_hidden": kept["mix.token_hidden"],
                                       "channel_hidden": kept["mix.channel_hidden"]}))


STAGES = ("embed", "block", "head")


def mixer_run_stage(model, s, x):
    return getattr(model, f"stage_{STAGES[s]}")(x)


def mixer_first_stage(model, group: str) -> int:
    return 0 if group == "residual" else 1


def mixer_layer_table(cfg: MixerConfig) -> list[Layer]:
    D, N, T, side = cfg.embed_dim, cfg.tokens, cfg.T, cfg.img_size // cfg.patch
    Ht, Hc = cfg.token_hidden, cfg.channel_hidden
    return [
        Layer("embed", "Conv2d", (D, cfg.in_channels, cfg.patch, cfg.patch), False, "embed_bn", D, "image",
              D * cfg.in_channels * cfg.patch ** 2 * side * side * T),
        Layer("token_fc1", "Linear", (Ht, N), False, None, 0, "spikes", Ht * N * D * T),
        Layer("token_fc2", "Linear", (N, Ht), False, None, 0, "spikes", N * Ht * D * T),
        Layer("channel_fc1", "Linear", (Hc, D), True, "channel_bn1", Hc, "real", Hc * D * N * T),
        Layer("channel_fc2", "Linear", (D, Hc), True, "channel_bn2", D, "spikes", D * Hc * N * T),
        Layer("head", "Linear", (cfg.num_classes, D), True, None, 0, "real", cfg.num_classes * D),
    ]


def mixer_checkpoint_filter(state: dict, model) -> dict:
    return {k: v for k, v in state.items() if k in model.state_dict()}


MIXER = Family(
    name="test-mixer", model_class=SpikingMixer, config_class=MixerConfig, groups=mixer_groups,
    resize=mixer_resize, layer_table=mixer_layer_table, checkpoint_filter=mixer_checkpoint_filter,
    stages=lambda model: list(STAGES), run_stage=mixer_run_stage, first_stage=mixer_first_stage,
    describe=lambda cfg: f"mixer D={cfg.embed_dim}", cost_notes=("test mixer: token mixing reads spikes",))


@pytest.fixture(scope="module")
def trained_mixer():
    """The family registered (from this file only) and a mixer trained briefly on the 8x8 digits;
    unregistered after this file's tests, so no other test sees a family that exists only here."""
    register_family(MIXER)
    try:
        torch.manual_seed(0)
        model = SpikingMixer(MixerConfig())
        train(model, "digits", TrainSettings(3, lr=5e-3, batch_size=64, seed=0, augment=False), progress=False)
        yield model.eval()
    finally:
        unregister_family(MIXER.name)


def masked(model: SpikingMixer, kept: dict[str, list[int]]) -> SpikingMixer:
    """The dense model with every removed unit zeroed, written per layer by hand (independently
    of the group declaration the surgery uses)."""
    m = copy.deepcopy(model).double()
    gone = {name: sorted(set(range(g.size)) - set(kept[name])) for name, g in ((g.name, g) for g in groups(model))}
    with torch.no_grad():
        r = gone["residual"]
        for layer in (m.embed, m.channel_fc2):
            layer.weight[r] = 0
        m.channel_fc2.bias[r] = 0
        for bn in (m.embed_bn, m.channel_bn2):
            bn.weight[r], bn.bias[r] = 0, 0
        m.channel_fc1.weight[:, r] = 0
        m.head.weight[:, r] = 0
        t = gone["mix.token_hidden"]
        m.token_fc1.weight[t] = 0
        m.token_fc2.weight[:, t] = 0
        c = gone["mix.channel_hidden"]
        m.channel_fc1.weight[c], m.channel_fc1.bias[c] = 0, 0
        m.channel_bn1.weight[c], m.channel_bn1.bias[c] = 0, 0
        m.channel_fc2.weight[:, c] = 0
    return m


def test_groups_and_masked_equivalence_in_float64(trained_mixer):
    model = trained_mixer
    assert get_family(model) is MIXER
    gs = {g.name: g for g in groups(model)}
    assert list(gs) == ["residual", "mix.token_hidden", "mix.channel_hidden"]
    assert gs["residual"].params == 16 * 4 + 2 * 16 + 16 * 24 + 16 * 24 + 16 + 2 * 16 + 10 * 16
    x = load_dataset("digits", "calib", img_size=8)[0][0].unsqueeze(0)
    x = torch.cat([x, torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))]).double()
    for ratios in ({"residual": 0.25}, {"mix.token_hidden": 0.5}, {"mix.channel_hidden": 0.6},
                   {"residual": 0.5, "mix.token_hidden": [0, 3, 7], "mix.channel_hidden": 0.3}):
        pruned = prune(model, ratios).double().eval()
        assert count_params(pruned) < count_params(model)
        kept = {g: pruned.pruning.kept_units(g) for g in gs}
        with torch.no_grad():
            out, ref = pruned(x), masked(model, kept).eval()(x)
        assert torch.allclose(out, ref, rtol=0, atol=1e-10), ratios


def test_sensitivity_cached_equals_uncached(trained_mixer):
    model = trained_mixer
    calib = load_dataset("digits", "calib", img_size=8)
    table = analyze(model, calib, ratios=(0.25, 0.5), batch_size=64, progress=False)
    assert table.meta["stage_names"] == list(STAGES)
    starts = {(r["group"], r["ratio"]): r["start"] for r in table.rows}
    assert starts[("residual", 0.25)] == "embed" and starts[("mix.channel_hidden", 0.5)] == "block"
    for row in table.rows:
        pruned = prune(model, {row["group"]: row["ratio"]}).eval()
        uncached = evaluate(pruned, calib, split="calib", batch_size=64, progress=False)["top1"]
        assert row["top1"] == uncached, row
    # the stage MAC shares come from the family's cost table: embed, block, head
    macs = table.meta["stage_macs"]
    assert sum(macs) == count_macs(model) and macs[0] == mixer_layer_table(model.cfg)[0].macs


def test_measure_save_load_and_replay(trained_mixer, tmp_path):
    model = trained_mixer
    report = measure(model, data=load_dataset("digits", "test", img_size=8), latency=False, max_images=64)
    assert report["notes"][0] == "test mixer: token mixing reads spikes"
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["token_fc1"]["sops"] is not None and 0 <= rows["token_fc1"]["input_rate"] <= 1
    assert report["total"]["params"] == sum(p.numel() for p in model.parameters())
    pruned = prune(model, {"residual": 0.25, "mix.channel_hidden": 0.5})
    pruned = prune(pruned, {"mix.token_hidden": 0.5})
    save_model(pruned, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["family"] == "test-mixer"
    again = load_model(tmp_path / "m")
    assert type(again) is SpikingMixer and again.cfg == pruned.cfg
    replayed = prune(model, again.pruning)
    for a, b in zip(replayed.state_dict().values(), pruned.state_dict().values()):
        assert torch.equal(a, b)


def test_a_primesvt_run(trained_mixer, tmp_path):
    summary = sp.prune_run(trained_mixer, "digits", tmp_path / "run", policy="primesvt", max_acc_drop=5.0,
                           ratios=(0.25, 0.5), progress=False, latency_repeats=1, measure_images=32)
    assert (tmp_path / "run" / "report.md").is_file()
    loaded = load_model(tmp_path / "run" / "model")
    assert type(loaded) is SpikingMixer
    assert summary["constraints_met"]
    assert summary["pruned"]["params"] == count_params(loaded) <= summary["dense"]["params"]
    assert summary["pruning"]["kept_counts"] == {g.name: g.size for g in groups(loaded)}
    assert summary["memory_saved"] > 0 and summary["pruning"]["kept"]  # it found something to prune


def test_unregistering_forgets_the_family():
    """After unregister_family the name is unknown again (what the fixture above relies on)."""
    other = dataclasses.replace(MIXER, name="test-mixer-gone")
    register_family(other)
    assert "test-mixer-gone" in families()
    unregister_family("test-mixer-gone")
    assert "test-mixer-gone" not in families()
    with pytest.raises(SpikepruneError, match="no model family 'test-mixer-gone'"):
        get_family("test-mixer-gone")
    with pytest.raises(SpikepruneError, match="no model family 'test-mixer-gone'"):
        unregister_family("test-mixer-gone")
