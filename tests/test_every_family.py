"""What every registered family and every registered preset must do, parametrised over the
registry itself (as timm's tests run over `list_models()`): a new family or preset is tested the
moment it is registered, with no test to copy. Presets are built on the meta device (shapes only),
so the 224x224 ImageNet presets cost nothing; per family, its smallest preset runs for real."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from spikeprune.coupling import groups
from spikeprune.costs import count_params, layer_table
from spikeprune.models import build_from_config, create_model, families, get_family, list_models, preset_summary
from spikeprune.serialization import load_model, save_model
from spikeprune.surgery import prune
from spikeprune.tracing_spec import FAMILY as TRACED_FAMILY


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return create_model(name)


def _smallest_preset(family: str) -> str:
    own = [p for p in list_models() if preset_summary(p)["family"] == family]
    assert own, f"family {family} has no preset"
    return min(own, key=lambda p: preset_summary(p)["params"])


def _real(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(_smallest_preset(family)).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # BN shifts up, so that the neurons fire and a cut changes the output
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.bias.data = 0.3 + torch.rand(m.num_features, generator=g)
    return model


def _images(model: nn.Module, n: int = 2) -> torch.Tensor:
    c = model.cfg
    return torch.rand(n, c.in_channels, c.img_size, c.img_size, generator=torch.Generator().manual_seed(1))


# Families with presets; the traced family has none: its models are the users' own modules, made
# prunable by spikeprune.trace (tests/test_tracing.py runs them through the same steps).
PRESET_FAMILIES = sorted({preset_summary(p)["family"] for p in list_models()})


def test_the_registry_is_not_empty():
    assert len(PRESET_FAMILIES) >= 2 and len(list_models()) >= len(PRESET_FAMILIES)
    assert set(families()) - set(PRESET_FAMILIES) == {TRACED_FAMILY}


@pytest.mark.parametrize("preset", list_models())
def test_preset_builds_and_describes_itself(preset):
    model = _meta(preset)
    summary = preset_summary(preset)
    assert model.preset == preset and model.family == summary["family"] == get_family(model).name
    assert summary["params"] == sum(p.numel() for p in model.parameters()) > 0
    cfg = model.cfg
    assert cfg.img_size > 0 and cfg.in_channels > 0 and cfg.num_classes > 1 and cfg.T >= 1


@pytest.mark.parametrize("preset", list_models())
def test_preset_config_round_trips_as_plain_data(preset):
    model = _meta(preset)
    with torch.device("meta"):
        again = build_from_config(model.config_dict())
    assert again.config_dict() == model.config_dict()
    assert [(k, v.shape) for k, v in again.state_dict().items()] == [(k, v.shape) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("preset", list_models())
def test_preset_cost_table_counts_every_parameter(preset):
    model = _meta(preset)
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert all(row.macs >= 0 and row.params >= 0 for row in layer_table(model))


@pytest.mark.parametrize("preset", list_models())
def test_preset_groups_cut_slices_of_their_width(preset):
    model = _meta(preset)
    modules = dict(model.named_modules())
    gs = groups(model)
    assert gs and len({g.name for g in gs}) == len(gs)
    for g in gs:
        assert g.size >= 1 and g.params > 0, g.name
        for m in g.members:
            assert modules[m.module].weight.shape[m.dim] == g.size * m.unit_width, (g.name, m)


@pytest.mark.parametrize("family", PRESET_FAMILIES)
def test_family_forward_gives_finite_logits(family):
    model = _real(family)
    with torch.no_grad():
        out = model(_images(model))
    assert out.shape == (2, model.cfg.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", PRESET_FAMILIES)
def test_family_prunes_every_group_saves_and_replays(family, tmp_path):
    """Each group cut alone (a third of its units, at least one) gives a smaller model that runs; all of
    them cut at once saves, loads and replays from its record bit for bit."""
    model = _real(family)
    x = _images(model)
    before = count_params(model)
    ratios = {}
    for g in groups(model):
        ratio = max(1, g.size // 3) / g.size if g.size > 1 else 0.0
        if ratio == 0.0:
            continue
        small = prune(model, {g.name: ratio})
        assert count_params(small) < before, g.name
        with torch.no_grad():
            assert small(x).shape == (2, model.cfg.num_classes), g.name
        ratios[g.name] = ratio
    assert ratios, "no group could be cut"
    small = prune(model, ratios)
    save_model(small, tmp_path / "small")
    loaded = load_model(tmp_path / "small").eval()
    replayed = prune(model, small.pruning)
    for a, b, c in zip(small.state_dict().values(), loaded.state_dict().values(), replayed.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    with torch.no_grad():
        assert torch.equal(small.eval()(x), loaded(x))
