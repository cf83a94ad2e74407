"""The family and preset registry: the `Family` type, registering and looking up families and
presets. Family files import this module (not the package), so that the package can import them
without an import circle."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

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
    # The model's one-time-step twin (same weights, T=1), for a family whose eval forward acts on each
    # time step alone except in its neurons: run T times with the neurons' membranes carried, it is
    # the T-step forward (the ONNX export's time_loop="loop" writes it once, as a Loop's body)
    one_step: Callable[[nn.Module], nn.Module] | None = None

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


def unregister_family(name: str) -> None:
    """Forget family `name` and its presets (a family registered for a test or a session only)."""
    if name not in _FAMILIES:
        raise SpikepruneError(f"no model family {name!r} is registered; known families: {', '.join(families()) or 'none'}")
    del _FAMILIES[name]
    for preset in [p for p, (fam, _) in _PRESETS.items() if fam == name]:
        del _PRESETS[preset]


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


def preset(name: str) -> tuple[str, Callable]:
    """(family name, builder(**overrides)) of preset `name`."""
    if name not in _PRESETS:
        raise SpikepruneError(f"unknown model preset {name!r}; known presets: {', '.join(list_models())}")
    return _PRESETS[name]
