"""Model families and presets (timm-style registry).

A *family* (Spikformer, ...) is one `Family` object, registered by one file under models/ (or by
user code: nothing here names a family). It gives the rest of spikeprune everything it needs:

    build(config dict) -> model        the architecture from plain data (every per-layer width)
    checkpoint_filter(state, model)    maps a foreign (reference-code) checkpoint onto our names
    groups(model) -> [Group]           the coupled channel groups (spikeprune.coupling)
    resize(model, kept counts)         a model of the same family with other group sizes (surgery)
    stages(model) / run_stage(model, i, x) / first_stage(model, group)
                                       the forward cut into stages, so the sensitivity analysis can
                                       cache the input of a stage and start a candidate there
    layer_table(config) -> [Layer]     per-layer params / MACs / which inputs are spikes (measure),
    cost_notes                         and what measure's report says about the family's counting
    describe(config) -> str            one line for `spikeprune models`
    recognizes(state dict) -> bool     does a foreign checkpoint look like this family's (so that a
                                       checkpoint given with the wrong preset is named, not listed)

A family's model has `family` (the name), `cfg` (with at least img_size, in_channels,
num_classes and T), `config_dict()` -> {"family": name, "config": {...}}, and forward(images
[B, C, H, W]) -> logits [B, classes].

A preset is a name bound to a family and a builder: `register_model(name, family)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..checkpoint_io import check_finite, read_checkpoint
from ..errors import SpikepruneError


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type
    config_class: type  # has to_dict() and a from_dict(d) classmethod that refuses unknown / missing fields
    groups: Callable[[nn.Module], list]
    resize: Callable[[nn.Module, dict], nn.Module]
    layer_table: Callable[[Any], list]
    checkpoint_filter: Callable[[dict, nn.Module], dict]
    stages: Callable[[nn.Module], list[str]] | None = None
    run_stage: Callable[[nn.Module, int, Any], Any] | None = None
    first_stage: Callable[[nn.Module, str], int] | None = None
    describe: Callable[[Any], str] | None = None
    cost_notes: tuple[str, ...] = ()  # what measure's report should say about this family's counting
    recognizes: Callable[[dict], bool] | None = None  # does a raw checkpoint state dict look like this family's?

    def build(self, config: dict) -> nn.Module:
        """A model from the plain-data config (the "config" part of config_dict())."""
        return self.model_class(self.config_class.from_dict(config))

    @property
    def staged(self) -> bool:
        return self.stages is not None and self.run_stage is not None and self.first_stage is not None


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, tuple[str, Callable]] = {}  # name -> (family, builder(**overrides))


def register_family(family: Family) -> Family:
    """Make `family` known to every part of spikeprune (re-registering a name replaces it)."""
    if not isinstance(family, Family):
        raise SpikepruneError(f"register_family takes a spikeprune.models.Family, got {type(family).__name__}")
    _FAMILIES[family.name] = family
    return family


def families() -> list[str]:
    return sorted(_FAMILIES)


def get_family(obj) -> Family:
    """The Family of a model, a family name, a config_dict() ({"family": ..., ...}) or a config object."""
    if isinstance(obj, str):
        name = obj
    elif isinstance(obj, dict):
        name = obj.get("family")
    elif isinstance(obj, nn.Module):
        name = getattr(obj, "family", None)
    else:
        name = next((f.name for f in _FAMILIES.values() if isinstance(obj, f.config_class)), None)
    if name not in _FAMILIES:
        what = repr(name) if name is not None else f"for a {type(obj).__name__}"
        raise SpikepruneError(f"no model family {what} is registered; known families: {', '.join(families()) or 'none'}. "
                              "A model spikeprune can prune comes from create_model / load_model, or from a family "
                              "registered with spikeprune.models.register_family")
    return _FAMILIES[name]


def recognize_family(state: dict, exclude: str | None = None) -> str | None:
    """The first registered family (other than `exclude`) whose `recognizes` accepts a checkpoint."""
    for fam in _FAMILIES.values():
        if fam.name != exclude and fam.recognizes is not None and fam.recognizes(state):
            return fam.name
    return None


def register_model(name: str, family: str):
    def deco(fn: Callable) -> Callable:
        _PRESETS[name] = (family, fn)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_PRESETS)


def create_model(name: str, checkpoint_path: str | None = None, **overrides):
    """Build a preset by name; `overrides` set any config field; `checkpoint_path` loads weights
    (ours, or a reference training checkpoint)."""
    if name not in _PRESETS:
        raise SpikepruneError(f"unknown model preset {name!r}; known presets: {', '.join(list_models())}")
    _check_overrides(name, get_family(_PRESETS[name][0]).config_class, overrides)
    try:
        model = _PRESETS[name][1](**overrides)
    except TypeError as e:  # an override that is not a config field
        raise SpikepruneError(f"bad override for {name}: {e}") from None
    model.preset = name
    if checkpoint_path is not None:
        load_checkpoint_into(model, checkpoint_path)
    return model


def _check_overrides(preset: str, config_class: type, overrides: dict) -> None:
    """Each override names a config field and has that field's type (a number where a number is
    meant), so a typo is an error naming the field, not a failure deep inside the model."""
    known = {f.name: f for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else {}
    for key, value in overrides.items():
        if known and key not in known:
            raise SpikepruneError(f"bad override for {preset}: {key!r} is not a config field; fields: "
                                  f"{', '.join(known)}")
        default = known[key].default if key in known else None
        kind = type(default) if isinstance(default, (bool, int, float, str)) else None
        ok = kind is None or isinstance(value, kind) or (kind is float and isinstance(value, int)
                                                         and not isinstance(value, bool))
        if not ok or (kind is int and isinstance(value, bool)):
            raise SpikepruneError(f"bad override for {preset}: {key} must be {kind.__name__}, got {value!r}")


def load_checkpoint_into(model: nn.Module, path) -> nn.Module:
    """Load a checkpoint (ours or the reference code's) into `model`, checking every key and shape.
    A checkpoint of another family is named as such rather than listed as hundreds of missing keys."""
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise SpikepruneError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    family = get_family(model)
    try:
        state = family.checkpoint_filter(state, model)
    except SpikepruneError:
        other = recognize_family(state, exclude=family.name)
        if other is not None:
            raise SpikepruneError(f"checkpoint {path} looks like a {other} model, not a {family.name} one: give a "
                                  f"{other} preset (`spikeprune models` lists them)") from None
        raise
    check_finite(state, f"checkpoint {path}")
    model.load_state_dict(state, strict=True)
    return model


def preset_summary(name: str) -> dict:
    """Family, parameter count and a one-line description of a preset (for `spikeprune models`)."""
    with torch.device("meta"):  # shapes only: listing every preset must not initialise their weights
        model = create_model(name)
    fam = get_family(model)
    return {"name": name, "family": fam.name, "params": sum(p.numel() for p in model.parameters()),
            "description": fam.describe(model.cfg) if fam.describe else ""}


def build_from_config(config: dict):
    """Rebuild a model from the plain-data description `model.config_dict()` returns."""
    if not isinstance(config, dict) or "config" not in config or not isinstance(config["config"], dict):
        raise SpikepruneError("a model config needs {'family': NAME, 'config': {...}}; this one has no 'config' "
                              "object (was config.json written by spikeprune?)")
    return get_family(config).build(config["config"])


from . import spikformer  # noqa: E402,F401  (registers the Spikformer family and its presets)
from . import sdt  # noqa: E402,F401  (registers the Spike-driven Transformer family and its presets)
from . import traced  # noqa: E402,F401  (registers the family of models spikeprune.trace analysed)
