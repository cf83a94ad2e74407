"""Pruning policies: how `spikeprune prune` chooses what to prune.

Importing this package registers the built-in policies with spikeprune.policy_api.register_policy
(the policy API lives in policy_api.py, the run around a policy in run/):

  uniform   the same ratio for every channel group: `--uniform R`, or, without it, the largest
            ratio of the uniform sweep whose calibration drop stays within --max-acc-drop
  groups    explicit ratios per group or glob pattern: `--ratio 'block*.mlp.hidden=0.5'`
  psvit     PSViT: uniform sweep, per-group sensitivity, fine-grained selection with back-off
  primesvt  PrimeSVT: robust groups compressed largest first under accuracy and memory limits
  shrink    ours: one small cut at a time, every group's next cut measured after re-estimating
            BatchNorm, the cheapest per byte taken, until the accuracy limit or the memory budget
  bitshrink ours: widths (shrink's walk or uniform) and per-layer int4 / int8 weights together under a budget on the
            exported file's bytes
  global    all channels ranked together by group-normalised magnitude (Torch-Pruning's global
            pruner; module global_l2)
"""
from ..policy_api import PolicyResult, PruneContext, register_policy  # noqa: F401  (re-exported for policy authors)
from . import bitshrink, global_l2, primesvt, psvit, shrink, uniform  # noqa: F401  (registering is what importing them does)

BUILTIN = ("uniform", "psvit", "primesvt", "global_l2", "shrink", "bitshrink")
