"""The "traced" family: any module whose coupled groups `spikeprune.trace` found.

A traced model is the user's own module; `spikeprune.trace` stores what it found on it (a
TraceSpec) and sets its `family` to "traced". This family reads that spec: its groups, a resize
that swaps in smaller layers of the user's classes, a cost table from the traced shapes, and the
proof surgery runs after every prune (spikeprune/tracing_spec.py holds them, below the registry).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..tracing_spec import (FAMILY, TracedConfig, check_pruned, traced_build, traced_groups, traced_layer_table,
                            traced_resize)
from . import Family, register_family


@dataclass(frozen=True)
class TracedFamily(Family):
    """The Family of traced models, with the proof surgery runs after every prune."""
    check_pruned: object = None


register_family(TracedFamily(
    name=FAMILY, model_class=traced_build, config_class=TracedConfig, groups=traced_groups, resize=traced_resize,
    layer_table=traced_layer_table, checkpoint_filter=lambda state, model: state, check_pruned=check_pruned,
    describe=lambda cfg: f"{cfg.model}, traced",
    cost_notes=("traced model: MACs per weight layer and attention product from the shapes the trace saw; "
                "BatchNorm / LayerNorm / neuron parameters are counted as parameters with no MACs",)))
