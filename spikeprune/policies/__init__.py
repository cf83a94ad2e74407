"""Pruning policies: how `spikeprune prune` chooses the per-group ratios.

Importing this package registers the built-in policies with spikeprune.pipeline.register_policy
(the registry and the run folder live in pipeline.py):

  uniform   the same ratio for every channel group: `--uniform R`, or, without it, the largest
            ratio of the uniform sweep whose calibration drop stays within --max-acc-drop
  groups    explicit ratios per group or glob pattern: `--ratio 'block*.mlp.hidden=0.5'`
  psvit     PSViT: uniform sweep, per-group sensitivity, fine-grained selection with back-off
  primesvt  PrimeSVT: robust groups compressed largest first under accuracy and memory limits
  global    every channel ranked together by normalised magnitude (Torch-Pruning's global pruner)
  global    all channels ranked together by group-normalised magnitude (Torch-Pruning's global
            pruner; module global_l2)

`register_cli` adds the one `spikeprune prune` command (pipeline.register_prune_cli).
"""
from importlib import import_module

from ..pipeline import PolicyResult, PruneContext, register_policy  # noqa: F401  (re-exported for policy authors)

BUILTIN = ("uniform", "psvit", "primesvt", "global_l2")

for _name in BUILTIN:
    try:
        import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # a policy not present in this build
        if _e.name != f"{__name__}.{_name}":
            raise


def register_cli(sub) -> None:
    from ..pipeline import register_prune_cli

    register_prune_cli(sub)
