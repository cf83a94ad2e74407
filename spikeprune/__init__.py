"""spikeprune: structured pruning for Spiking Vision Transformers.

Public API (imported lazily so `import spikeprune` stays fast):
    create_model, list_models                 -- presets by name, reference checkpoints
    save_model, load_model                    -- safetensors + JSON widths
    bundled_model                             -- the shipped Spikformer trained on mnist5k
    load_dataset                              -- mnist5k, digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR
    train, evaluate, finetune, measure        -- training, accuracy, size / MACs / SOPs / energy / latency
    groups, prune                             -- coupled channel groups and physical surgery
"""
from importlib import import_module

__version__ = "0.1.0"

_API = {
    "create_model": "spikeprune.models",
    "list_models": "spikeprune.models",
    "save_model": "spikeprune.serialization",
    "load_model": "spikeprune.serialization",
    "bundled_model": "spikeprune.bundled",
    "load_dataset": "spikeprune.data",
    "train": "spikeprune.train",
    "evaluate": "spikeprune.train",
    "finetune": "spikeprune.train",
    "measure": "spikeprune.measure",
    "groups": "spikeprune.groups",
    "prune": "spikeprune.surgery",
    "SpikepruneError": "spikeprune.errors",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'spikeprune' has no attribute {name!r}")
