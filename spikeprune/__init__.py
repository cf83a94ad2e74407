"""spikeprune: structured pruning for Spiking Vision Transformers.

Public API:
    create_model, list_models                 -- presets by name, reference checkpoints
    save_model, load_model                    -- safetensors + JSON widths (+ the pruning record)
    bundled_model                             -- the shipped models (Spikformer and SDT, trained on mnist5k)
    load_dataset                              -- mnist5k, digits, cifar10:DIR, ..., imagefolder:DIR
    train, evaluate, finetune, measure        -- training, accuracy, size / MACs / SOPs / energy / latency
    TrainSettings                             -- how train() trains (the recipe), one checked object
    groups, prune, PruningRecord              -- coupled channel groups, physical surgery, what was pruned
    trace                                     -- the groups of any spiking module, found by recording a forward
    load_user_model                           -- a user's module from `my_model.py:build` (+ checkpoint), traced
    prune_run, RunSettings, Constraints       -- a whole policy run into a run folder (`spikeprune prune`)
    export                                    -- ONNX (fp32 / fp16 / int8 weights), BatchNorm folded, checked
    Family, register_family                   -- add a model family (see ARCHITECTURE.md)
    register_policy, register_importance      -- add a pruning policy / an importance criterion
    FinetuneSettings                          -- a run's fine-tuning as one checked object

The functions live in modules named for their topic (training, costs, coupling, deploy), so no
package attribute hides a module.
"""
__version__ = "0.3.0"  # the one version source: pyproject.toml reads it (dynamic)

from .errors import SpikepruneError
from .models import Family, create_model, list_models, register_family
from .serialization import load_model, save_model
from .bundled import bundled_model
from .data import load_dataset
from .training import TrainSettings, evaluate, finetune, train
from .costs import measure
from .coupling import groups
from .tracing import trace
from .builders import load_user_model  # also registers how traced models save and load
from .record import PruningRecord
from .surgery import prune
from .importance import register_importance
from .policy_api import Constraints, register_policy
from .validation import FinetuneSettings
from .run import RunSettings, prune_run
from .deploy import export

__all__ = ["Constraints", "Family", "FinetuneSettings", "PruningRecord", "RunSettings", "SpikepruneError", "TrainSettings",
           "bundled_model", "create_model", "evaluate", "export", "finetune", "groups", "list_models", "load_dataset",
           "load_model", "load_user_model", "measure", "prune", "prune_run", "register_family", "register_importance", "register_policy",
           "save_model", "trace", "train"]
