"""The trained models that ship with spikeprune (spikeprune/assets/NAME/, saved model folders):

    spikformer-2-128-mnist   Spikformer, D=128, depth 2, 4 heads, T=4, trained on mnist5k (the default)
    sdt-1-64-mnist           Spike-driven Transformer, D=64, depth 1, 8 heads, T=2, trained on mnist5k
    spikformer-2-128-fmnist  Spikformer, D=128, depth 2, 4 heads, T=2, trained on Fashion-MNIST (90.46% test)
    sdt-2-128-fmnist         Spike-driven Transformer, D=128, depth 2, 8 heads, T=2, trained on Fashion-MNIST (88.54% test)

The README gives the exact `spikeprune train` command that made each one and its measured figures.
"""
from __future__ import annotations

from pathlib import Path

from .errors import SpikepruneError
from .serialization import is_saved_model, load_model

ASSETS = Path(__file__).parent / "assets"
BUNDLED_NAME = "spikformer-2-128-mnist"  # what `bundled` alone means
BUNDLED_DIR = ASSETS / BUNDLED_NAME


def bundled_names() -> list[str]:
    """The names of the shipped models."""
    return sorted(p.name for p in ASSETS.iterdir() if is_saved_model(p)) if ASSETS.is_dir() else []


def bundled_model(name: str = BUNDLED_NAME):
    """A shipped trained model (eval mode, on CPU); the default is the mnist5k Spikformer."""
    folder = ASSETS / name
    if name not in bundled_names():
        if name == BUNDLED_NAME or (folder.parent == ASSETS and folder.exists()):
            raise SpikepruneError(f"the bundled model is missing from {folder}; reinstall spikeprune "
                                  "or retrain it with the command in the README")
        raise SpikepruneError(f"no bundled model {name!r}; the shipped ones are: {', '.join(bundled_names())}")
    return load_model(folder).eval()
