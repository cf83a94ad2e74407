"""Coupled channel groups: which slices of which layers must be removed together.

Removing output channel c of one layer means removing input channel c of every layer that reads
it, the matching BatchNorm entries, and -- through residual sums and attention products -- slices
of layers that are not even adjacent. Torch-Pruning finds these couplings by tracing; on a
spiking transformer tracing fails (the LIF time loop reads as a channel split, and q/k or v/proj
are only coupled through matmuls it cannot see through). So each model family *declares* its
groups (its Family object's `groups`, in its file under spikeprune/models/), and the surgery
(surgery.py) and importance (importance.py) code is generic over them.

A group is a set of `Member`s: a module path and the dim its channels lie on (0 = output channels
of a Conv / Linear, and every entry of a BatchNorm; 1 = input channels of a Conv / Linear). The
group's *units* are what gets kept or removed: single channels, or whole heads, where a unit
covers `unit_width` consecutive channels of a member (the head dim). Group names are the family's
(Spikformer: residual, stem.proj_conv / proj_conv1 / proj_conv2 -- named after the conv whose
outputs they cut -- and blockN.attn.qk / .v / .heads, blockN.mlp.hidden); `Group.cuts()` lists
the state-dict layers each one cuts.
"""
from __future__ import annotations

from torch import nn

from .models import get_family
from .structure import Group, Member, Probe  # noqa: F401  (re-exported: the types of this topic)

FP32_BYTES = 4


def groups(model: nn.Module) -> list[Group]:
    """The coupled groups of `model`, in forward order, with their sizes, params and memory."""
    out = get_family(model).groups(model)
    modules = dict(model.named_modules())
    for g in out:
        g.params = _dependent_params(modules, g.members)
        g.memory_bytes = g.params * FP32_BYTES
    return out


def group_map(model: nn.Module) -> dict[str, Group]:
    return {g.name: g for g in groups(model)}


def _dependent_params(modules: dict[str, nn.Module], members: list[Member]) -> int:
    """Count each parameter tensor whose shape has the group's dim once (out: weight and bias and
    BN affine; in: the weight only -- a bias has no input dim)."""
    seen: dict[str, int] = {}
    for m in members:
        for pname, p in modules[m.module].named_parameters(recurse=False):
            if p.dim() > m.dim:
                seen[f"{m.module}.{pname}"] = p.numel()
    return sum(seen.values())
