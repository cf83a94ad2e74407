"""Model registry: presets by name (timm-style), and the builders that turn a saved config back
into a model. One file per architecture family; each registers its presets on import."""
from __future__ import annotations

from typing import Callable

from ..errors import SpikepruneError

_PRESETS: dict[str, tuple[str, Callable]] = {}  # name -> (family, builder(**overrides))


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
    try:
        model = _PRESETS[name][1](**overrides)
    except TypeError as e:  # an override that is not a config field
        raise SpikepruneError(f"bad override for {name}: {e}") from None
    model.preset = name
    if checkpoint_path is not None:
        from ..serialization import load_checkpoint_into

        load_checkpoint_into(model, checkpoint_path)
    return model


def build_from_config(config: dict):
    """Rebuild a model from the plain-data description `model.config_dict()` returns."""
    family = config.get("family")
    if family == "spikformer":
        from .spikformer import build_from_config as build

        return build(config["config"])
    raise SpikepruneError(f"unknown model family {family!r} in config; known: spikformer")


from . import spikformer  # noqa: E402,F401  (registers the presets)
