"""The trained model that ships with spikeprune: a Spikformer (D=128, depth 2, 4 heads, T=4) trained
on the bundled mnist5k digits. The README gives the exact `spikeprune train` command that made it
and its measured figures."""
from __future__ import annotations

from pathlib import Path

from .errors import SpikepruneError

BUNDLED_NAME = "spikformer-2-128-mnist"
BUNDLED_DIR = Path(__file__).parent / "assets" / BUNDLED_NAME


def bundled_model():
    """The shipped trained Spikformer for mnist5k (eval mode, on CPU)."""
    from .serialization import is_saved_model, load_model

    if not is_saved_model(BUNDLED_DIR):
        raise SpikepruneError(f"the bundled model is missing from {BUNDLED_DIR}; reinstall spikeprune "
                              "or retrain it with the command in the README")
    return load_model(BUNDLED_DIR).eval()
