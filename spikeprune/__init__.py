"""spikeprune: structured pruning for Spiking Vision Transformers.

Public API:
    create_model, list_models                 -- presets by name, reference checkpoints
    save_model, load_model                    -- safetensors + JSON widths
    bundled_model                             -- the shipped Spikformer trained on mnist5k
    load_dataset                              -- mnist5k, digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR
    train, evaluate, finetune, measure        -- training, accuracy, size / MACs / SOPs / energy / latency
    groups, prune                             -- coupled channel groups and physical surgery

The functions `train`, `measure` and `groups` share their names with the modules that define
them; the package binds the functions. For the modules use importlib.import_module("spikeprune.X").
"""
__version__ = "0.1.0"

from .errors import SpikepruneError
from .models import create_model, list_models
from .serialization import load_model, save_model
from .bundled import bundled_model
from .data import load_dataset
from .train import evaluate, finetune, train
from .measure import measure
from .groups import groups
from .surgery import prune

__all__ = ["SpikepruneError", "bundled_model", "create_model", "evaluate", "finetune", "groups", "list_models",
           "load_dataset", "load_model", "measure", "prune", "save_model", "train"]
