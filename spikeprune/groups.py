"""Coupled channel groups: which slices of which layers must be removed together.

Removing output channel c of one layer means removing input channel c of every layer that reads
it, the matching BatchNorm entries, and -- through residual sums and attention products -- slices
of layers that are not even adjacent. Torch-Pruning finds these couplings by tracing; on a
Spikformer tracing fails (the LIF time loop reads as a channel split, and q/k or v/proj are only
coupled through matmuls it cannot see through). So each model family *declares* its groups here,
explicitly, and the surgery (surgery.py) and importance (importance.py) code is generic over them.

A group is a set of `Member`s: a module path and the dim its channels lie on (0 = output channels
of a Conv / Linear, and every entry of a BatchNorm; 1 = input channels of a Conv / Linear). The
group's *units* are what gets kept or removed: single channels, or whole heads, where a unit
covers `unit_width` consecutive channels of a member (the head dim).

Adding a family: `@register_groups("family")` on a function model -> list[Group], and
`@register_resizer("family")` on a function (model, kept: dict[group name, kept unit count]) ->
a fresh model with those widths. Nothing else in the engine names a layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .errors import SpikepruneError

FP32_BYTES = 4


@dataclass(frozen=True)
class Member:
    """One layer slice a group cuts: `module` (dotted path) along `dim` (0 out / 1 in).

    `unit_width` is how many consecutive channels of this member one unit of the group covers:
    1 for channel groups, the head dim for the heads group (it differs between q/k and v/proj).
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

    name     e.g. "residual", "block0.attn.qk", "stem.stage1"
    kind     residual | stem | qk | v | heads | hidden
    unit     "channel" or "head"
    size     current number of units (channels, or heads for the heads group)
    members  the layer slices it cuts (see Member)
    heads    for per-head channel groups (qk, v): the channels form `heads` equal consecutive
             slices and every head must keep the same number (the [heads, d] reshape needs it);
             1 for every other group
    probes   where the spike-aware criterion reads activity; probe_reduce "sum" adds the probes'
             (normalised) scores, "prod" multiplies them (qk: a channel silent in q *or* k adds
             nothing to q k^T, so the product is what is zero)
    params   parameters whose size depends on this group (each tensor counted once)
    memory_bytes  their fp32 bytes
    """
    name: str
    kind: str
    unit: str
    size: int
    members: list[Member]
    heads: int = 1
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
        """Channels per head for qk / v groups (size // heads)."""
        return self.size // self.heads

    def summary(self) -> dict:
        return {"name": self.name, "kind": self.kind, "unit": self.unit, "size": self.size,
                "params": self.params, "memory_bytes": self.memory_bytes, "layers": self.layers}


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
_DECLARATIONS: dict[str, Callable] = {}
_RESIZERS: dict[str, Callable] = {}


def register_groups(family: str):
    """Decorator: `fn(model) -> list[Group]` declares the groups of every model of `family`."""
    def deco(fn):
        _DECLARATIONS[family] = fn
        return fn
    return deco


def register_resizer(family: str):
    """Decorator: `fn(model, kept: dict[group name, int]) -> new model` builds an (uninitialised
    is fine) model of `family` whose group sizes are `kept`; surgery copies the weights in."""
    def deco(fn):
        _RESIZERS[family] = fn
        return fn
    return deco


def _family(model: nn.Module) -> str:
    family = getattr(model, "family", None)
    if family not in _DECLARATIONS or family not in _RESIZERS:
        known = ", ".join(sorted(_DECLARATIONS)) or "none"
        raise SpikepruneError(
            f"no pruning-group declaration for model family {family!r} ({type(model).__name__}); "
            f"declared families: {known}. Declare its groups with spikeprune.groups.register_groups "
            "and register_resizer (see spikeprune/groups.py for the Spikformer example)")
    return family


def groups(model: nn.Module) -> list[Group]:
    """The coupled groups of `model`, in forward order, with their sizes, params and memory."""
    out = _DECLARATIONS[_family(model)](model)
    modules = dict(model.named_modules())
    for g in out:
        g.params = _dependent_params(modules, g.members)
        g.memory_bytes = g.params * FP32_BYTES
    return out


def resizer(model: nn.Module) -> Callable:
    return _RESIZERS[_family(model)]


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


# ------------------------------------------------------------------------------------------------
# Spikformer (both layouts: only the q/k/v/proj/fc1/fc2 module suffix differs, _conv or _linear)
# ------------------------------------------------------------------------------------------------
def _stem_names(i: int) -> tuple[str, str, str]:
    sfx = "" if i == 0 else str(i)
    return f"patch_embed.proj_conv{sfx}", f"patch_embed.proj_bn{sfx}", f"patch_embed.proj_lif{sfx}"


@register_groups("spikformer")
def spikformer_groups(model) -> list[Group]:
    cfg = model.cfg
    out: list[Group] = []

    # Stem stages 1..3: conv i-1 output + its BN, conv i input. (Stage 4 is the residual width.)
    for i in (1, 2, 3):
        conv, bn, _ = _stem_names(i - 1)
        nxt, _, _ = _stem_names(i)
        out.append(Group(
            name=f"stem.stage{i}", kind="stem", unit="channel", size=cfg.stem_widths[i - 1],
            members=[Member(conv, 0), Member(bn, 0), Member(nxt, 1)],
            probes=[Probe(nxt, "input", 1, (nxt,))]))  # conv input = LIF spikes after pooling

    # Residual: every writer of the stream (stem stage 4, rpe, each proj and fc2, with their BNs)
    # on its output channels, every reader (rpe, q, k, v, fc1, head) on its input channels.
    conv3, bn3, _ = _stem_names(3)
    res = [Member(conv3, 0), Member(bn3, 0),
           Member("patch_embed.rpe_conv", 1), Member("patch_embed.rpe_conv", 0), Member("patch_embed.rpe_bn", 0)]
    probes = [Probe("patch_embed.rpe_conv", "input", 1, ("patch_embed.rpe_conv",))]
    for i, blk in enumerate(model.block):
        a, m = f"block.{i}.attn", f"block.{i}.mlp"
        ak, mk = blk.attn.kind, blk.mlp.kind
        res += [Member(f"{a}.q_{ak}", 1), Member(f"{a}.k_{ak}", 1), Member(f"{a}.v_{ak}", 1),
                Member(f"{a}.proj_{ak}", 0), Member(f"{a}.proj_bn", 0),
                Member(f"{m}.fc1_{mk}", 1), Member(f"{m}.fc2_{mk}", 0), Member(f"{m}.fc2_bn", 0)]
        probes += [Probe(a, "input", -1, (f"{a}.q_{ak}", f"{a}.k_{ak}", f"{a}.v_{ak}")),
                   Probe(m, "input", -1, (f"{m}.fc1_{mk}",))]
    res.append(Member("head", 1))
    probes.append(Probe("head", "input", -1, ("head",)))
    out.append(Group(name="residual", kind="residual", unit="channel", size=cfg.embed_dim,
                     members=res, probes=probes))

    for i, blk in enumerate(model.block):
        a, m = f"block.{i}.attn", f"block.{i}.mlp"
        ak, mk = blk.attn.kind, blk.mlp.kind
        H, qk, v = blk.attn.heads, blk.attn.qk_dim, blk.attn.v_dim
        dqk, dv = qk // H, v // H
        q_, k_, v_, proj = f"{a}.q_{ak}", f"{a}.k_{ak}", f"{a}.v_{ak}", f"{a}.proj_{ak}"
        out.append(Group(
            name=f"block{i}.attn.qk", kind="qk", unit="channel", size=qk, heads=H,
            members=[Member(q_, 0), Member(f"{a}.q_bn", 0), Member(k_, 0), Member(f"{a}.k_bn", 0)],
            probes=[Probe(f"{a}.q_lif", "output", -1), Probe(f"{a}.k_lif", "output", -1)],
            probe_reduce="prod"))
        # v channel c only ever reaches attention-output channel c (attention mixes tokens, not
        # channels), so what proj reads on column c is attn_lif's channel c.
        out.append(Group(
            name=f"block{i}.attn.v", kind="v", unit="channel", size=v, heads=H,
            members=[Member(v_, 0), Member(f"{a}.v_bn", 0), Member(proj, 1)],
            probes=[Probe(f"{a}.attn_lif", "output", -1, (proj,))]))
        out.append(Group(
            name=f"block{i}.attn.heads", kind="heads", unit="head", size=H,
            members=[Member(q_, 0, dqk), Member(f"{a}.q_bn", 0, dqk), Member(k_, 0, dqk),
                     Member(f"{a}.k_bn", 0, dqk), Member(v_, 0, dv), Member(f"{a}.v_bn", 0, dv),
                     Member(proj, 1, dv)],
            probes=[Probe(f"{a}.attn_lif", "output", -1, (proj,), dv)]))
        out.append(Group(
            name=f"block{i}.mlp.hidden", kind="hidden", unit="channel", size=blk.mlp.hidden,
            members=[Member(f"{m}.fc1_{mk}", 0), Member(f"{m}.fc1_bn", 0), Member(f"{m}.fc2_{mk}", 1)],
            probes=[Probe(f"{m}.fc1_lif", "output", -1, (f"{m}.fc2_{mk}",))]))
    return out


@register_resizer("spikformer")
def spikformer_resize(model, kept: dict[str, int]):
    """A Spikformer with the kept widths. qk / v counts are over the dense model's heads (equal per
    head), so the new head dim is count // dense heads and the new width is that times kept heads."""
    from .models.spikformer import Spikformer, SpikformerConfig

    cfg = model.cfg.to_dict()
    cfg["embed_dim"] = kept["residual"]
    cfg["stem_widths"] = [kept[f"stem.stage{i}"] for i in (1, 2, 3)]
    for i, b in enumerate(cfg["blocks"]):
        H, H2 = b["heads"], kept[f"block{i}.attn.heads"]
        b.update(heads=H2, qk_dim=H2 * (kept[f"block{i}.attn.qk"] // H),
                 v_dim=H2 * (kept[f"block{i}.attn.v"] // H), mlp_hidden=kept[f"block{i}.mlp.hidden"])
    return Spikformer(SpikformerConfig.from_dict(cfg))


def dense_widths(model) -> dict:
    """The widths of the model this one was pruned from (itself if it was never pruned).

    `prune` records them on the pruned model (`model.pruning["dense_widths"]`) and the prune
    command saves that record in config.json's `extra`, so `inspect` can show both side by side.
    """
    rec = getattr(model, "pruning", None) or {}
    if rec.get("dense_widths"):
        return rec["dense_widths"]
    return widths_of(model)


def widths_of(model) -> dict:
    cfg = model.cfg
    return {"embed_dim": cfg.embed_dim, "stem_widths": list(cfg.stem_widths),
            "blocks": [dict(b) for b in cfg.blocks]}

