"""The plain data a model family declares about itself, read by the engine.

These types sit below everything else (models declare them, groups / surgery / importance /
measure / sensitivity read them), so a family file imports only this module and the registry.

    Member, Probe, Group   coupled channel groups: which layer slices are removed together
                           (spikeprune.coupling explains them; surgery cuts them)
    Layer                  one row of a family's cost table: a weight layer (or a weightless
                           product such as attention) with its shape and MACs (spikeprune.costs)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod


@dataclass(frozen=True)
class Member:
    """One layer slice a group cuts: `module` (dotted path, as in the state dict) along `dim`
    (0 = output channels of a Conv / Linear and every entry of a BatchNorm; 1 = input channels).

    `unit_width` is how many consecutive channels of this member one unit of the group covers:
    1 for channel groups, the head dim for a heads group (it may differ between q/k and v/proj).
    """
    module: str
    dim: int
    unit_width: int = 1


@dataclass(frozen=True)
class Probe:
    """Where the spike-aware criterion reads a group's activity on calibration data.

    The mean |activation| per channel of `module`'s input or output (`side`), channels on
    `channel_dim`, times the L2 norm of each channel's input column in the `weights` layers that
    read it (none: the rate alone). One unit covers `unit_width` channels (summed).
    """
    module: str
    side: str  # "input" or "output"
    channel_dim: int
    weights: tuple[str, ...] = ()
    unit_width: int = 1


@dataclass
class Group:
    """A set of layer slices kept or removed together.

    name        e.g. "residual", "block0.attn.qk", "stem.proj_conv1"
    kind        residual | stem | qk | v | heads | hidden (policies read it, e.g. uniform pruning
                takes the channel kinds); a new family may use its own kinds
    unit        "channel" or "head"
    size        current number of units (channels, or heads for a heads group)
    members     the layer slices it cuts (see Member)
    heads       for per-head channel groups (qk, v): the channels form `heads` equal consecutive
                slices and every head keeps the same number (a [heads, d] reshape needs it); 1 else
    head_group  the name of the group whose units are this group's heads (qk, v -> the heads
                group): when both are cut in one call, only channels of the kept heads remain
    probes      where the spike-aware criterion reads activity; probe_reduce "sum" adds the
                probes' (normalised) scores, "prod" multiplies them (qk: a channel silent in q *or*
                k adds nothing to q k^T, so the product is what is zero)
    params      parameters whose size depends on this group (each tensor counted once)
    memory_bytes  their fp32 bytes
    """
    name: str
    kind: str
    unit: str
    size: int
    members: list[Member]
    heads: int = 1
    head_group: str | None = None
    probes: list[Probe] = field(default_factory=list)
    probe_reduce: str = "sum"
    params: int = 0
    memory_bytes: int = 0

    @property
    def layers(self) -> list[str]:
        """Names of the modules this group touches, in declaration order, each once."""
        return list(dict.fromkeys(m.module for m in self.members))

    @property
    def head_dim(self) -> int:
        """Channels per head for per-head groups (size // heads)."""
        return self.size // self.heads

    def cuts(self) -> list[str]:
        """What the group cuts, in state-dict words: 'block.0.mlp.fc1_linear (out)', ..."""
        return [f"{m.module} ({'out' if m.dim == 0 else 'in'})" for m in self.members]

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "unit": self.unit, "size": self.size,
                "params": self.params, "memory_bytes": self.memory_bytes, "layers": self.layers,
                "cuts": self.cuts()}


@dataclass
class Layer:
    """One row of a family's cost table (spikeprune.costs states the counting rules).

    name         state-dict module path, e.g. "block.0.attn.q_conv"; weightless products get a
                 name of their own (e.g. "block.0.attn.matmul")
    type         Conv2d, Conv1d, Linear, SpikeMatmul, ...
    weight_shape () for weightless products
    bias         whether the layer has a bias
    bn           the BatchNorm whose affine parameters count with this layer (None: none)
    bn_features  its width
    input        what the layer reads: "image" (the same real image at every time step: charged
                 once), "spikes" (SOPs), "real" (MACs), or "unused" (built and loaded, never called
                 by forward: parameters counted, no MACs)
    macs         per image, all T steps
    rate_from    for weightless spike products: the modules whose output firing rates, averaged,
                 give the product's input rate (e.g. the q and k LIFs); weight layers read the
                 rate of their own input
    """
    name: str
    type: str
    weight_shape: tuple
    bias: bool
    bn: str | None
    bn_features: int
    input: str
    macs: int
    rate_from: tuple[str, ...] = ()

    @property
    def weights(self) -> int:
        return prod(self.weight_shape) if self.weight_shape else 0

    @property
    def params(self) -> int:
        return self.weights + (self.weight_shape[0] if self.bias else 0) + 2 * self.bn_features

    def memory_bytes(self) -> dict:
        p, w = self.params, self.weights
        return {"fp32": 4 * p, "fp16": 2 * p, "int8": w + 4 * (p - w)}


def kept_channels_of(groups: list[Group], kept: dict[str, list[int]]) -> dict[tuple[str, int], list[int]]:
    """(module, dim) -> the channel indices kept along that dim, sorted: the intersection over every
    group that cuts it (a group absent from `kept`, or kept whole, cuts nothing). A unit of a group
    covers `unit_width` consecutive channels of each member."""
    out: dict[tuple[str, int], set] = {}
    for g in groups:
        units = kept.get(g.name)
        if units is None or len(units) == g.size:
            continue
        for m in g.members:
            w = m.unit_width
            chans = {u * w + j for u in units for j in range(w)}
            key = (m.module, m.dim)
            out[key] = out[key] & chans if key in out else chans
    return {k: sorted(v) for k, v in out.items()}
