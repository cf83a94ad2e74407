"""Shared pytest fixtures. Keep this small: tiny models and helpers that several test files use."""
import sys
from pathlib import Path

import pytest
import torch

from spikeprune.models import create_model

# The bad-input table lives with the benchmark that totals it (bench/bad_input_cases.py), so that bench
# code never imports tests/; the tests read it from there. Appended: bench's script names come last.
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

# One intra-op thread per test process: `make test` runs pytest -n 2 on 2 cores, and extra threads
# only fight each other (tiny models gain nothing from them).
torch.set_num_threads(1)

# Small enough that a training epoch on `digits` takes about a second on one core.
TINY = dict(embed_dim=16, num_heads=2, T=2)


@pytest.fixture
def tiny_model():
    """Factory: a seeded 1-block Spikformer for 16x16 grey digits (D=16, T=2 unless overridden)."""

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return create_model("spikformer-1-32-digits", **{**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def trained_tiny_path(request, tmp_path_factory):
    """A saved 1-block Spikformer (D=24, 2 heads, T=2) trained 4 epochs on `digits` (~80% calib top-1):
    policies need a model whose accuracy can drop. Trained once (~10 s) and kept in pytest's cache
    folder, shared by the xdist workers under a file lock."""
    import fcntl

    from spikeprune.serialization import is_saved_model, save_model
    from spikeprune.training import TrainSettings, train

    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("spikeprune-trained-tiny-v1") if cache is not None else tmp_path_factory.mktemp("trained")
    path = root / "model"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_saved_model(path):
            torch.manual_seed(0)
            model = create_model("spikformer-1-32-digits", embed_dim=24, num_heads=2, T=2)
            train(model, "digits", TrainSettings(4, lr=1e-2, batch_size=32, warmup_epochs=0.3, augment=False,
                                                 label_smoothing=0.0, weight_decay=0.0), progress=False)
            save_model(model.eval(), path)
    return path


@pytest.fixture
def trained_tiny(trained_tiny_path):
    """A fresh copy of the trained tiny model (eval mode), safe to modify."""
    from spikeprune.serialization import load_model

    return load_model(trained_tiny_path).eval()
