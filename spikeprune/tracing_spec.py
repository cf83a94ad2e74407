"""What a trace found, and how a traced model is resized and proven (the "traced" family's engine).

`spikeprune.trace(model, example_input)` (spikeprune/tracing.py) records one forward and works out
which layer slices must be cut together. What it found is stored on the model as plain data, a
`TraceSpec`, and the model's `family` becomes "traced", so every part of spikeprune that asks a
model's family (groups, prune, sensitivity, the policies, measure, the record) reads it through
the family spikeprune/models/traced.py registers, whose functions live here:

    groups(model)       the groups the trace found (and verified by pruning each one alone)
    resize(model, n)    a copy of the user's own module, every member layer replaced by a smaller
                        one of its class, and the attributes its forward read as widths (a stored
                        num_heads, head_dim, dim) set to the new widths; on the meta device when
                        asked (the caller loads the sliced weights)
    layer_table(cfg)    params, memory and MACs per weight layer, from the shapes the trace saw
    check_pruned        every prune of a traced model is proven: the pruned model and the dense
                        model with the removed slices zeroed ("masked") run the example input in
                        float64, neuron state reset before and after; any difference is an error

A traced model is the user's class, so nothing here can rebuild it from a config alone: `build`
works in the process that traced it (the dense model's structure is kept, on the meta device, under
the trace's key); anywhere else it says so.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SpikepruneError
from .structure import Group, Layer, Member, kept_channels_of

FAMILY = "traced"
TRACE_ATTR = "spikeprune_trace"  # the TraceSpec on a traced model
RESET_FLAG = "spikeprune_resets_state"  # the traced model resets its neurons before each forward
# Absolute tolerance of the float64 proof: pruned and masked models sum the same non-zero terms in
# another order (and the masked one adds exact zeros), so they agree to a few ulps, far below this.
PROOF_ATOL = 1e-6

_CHANNELWISE: list[type] = []


def register_channelwise(cls: type) -> type:
    """Mark a module class as channel-wise: the tracer treats its calls as one element-wise op
    (output dims = input dims), as it treats spiking neurons. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SpikepruneError(f"register_channelwise takes an nn.Module subclass, got {cls!r}")
    if cls not in _CHANNELWISE:
        _CHANNELWISE.append(cls)
    return cls


def is_channelwise(module: nn.Module) -> bool:
    """A registered channel-wise class, or a spiking neuron: a module with a firing threshold
    (`v_threshold`, as SpikingJelly's neurons and ours have) whose parameters are scalars."""
    if isinstance(module, tuple(_CHANNELWISE)):
        return True
    return hasattr(module, "v_threshold") and all(p.numel() == 1 for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# What a trace found, as plain data
# ------------------------------------------------------------------------------------------------
@dataclass
class Binding:
    """A module attribute the forward read as a width (e.g. a view's head count): its new value is
    the product of the current sizes of `leaves`."""
    module: str
    attr: str
    leaves: tuple[int, ...]


@dataclass
class CostRow:
    """One row of the cost table: a weight layer, a norm layer, another parameter, or a weightless
    product. `shape` is the dense parameter shape (() for a product); macs = const * prod(sizes of
    `factors`), so both follow the widths."""
    name: str
    type: str
    shape: tuple[int, ...]
    bias: bool
    input: str
    factors: tuple[int, ...] = ()
    const: float = 0.0
    rate_from: tuple[str, ...] = ()


@dataclass
class TracedConfig:
    """The config of a traced model: what measure / data checks read, and every group's size."""
    model: str  # the user's class, "module.QualName"
    key: str  # the trace's key (in-process rebuilding)
    in_channels: int
    img_size: int
    num_classes: int
    T: int
    sizes: dict[str, int]
    layers: list = field(default_factory=list, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {"model": self.model, "key": self.key, "in_channels": self.in_channels, "img_size": self.img_size,
                "num_classes": self.num_classes, "T": self.T, "sizes": dict(self.sizes)}

    @classmethod
    def from_dict(cls, d: dict) -> "TracedConfig":
        try:
            cfg = cls(**{k: d[k] for k in ("model", "key", "in_channels", "img_size", "num_classes", "T", "sizes")})
        except (KeyError, TypeError) as e:
            raise SpikepruneError(f"a traced model's config is damaged ({e})") from None
        entry = _TEMPLATES.get(cfg.key)
        if entry is not None:
            cfg.layers = cost_table(entry[1], _leaf_sizes(entry[1], cfg.sizes))
        return cfg


@dataclass
class TraceSpec:
    """Everything the tracer found that pruning needs (no reference to the model itself)."""
    key: str
    groups: list[Group]
    leaf_sizes: dict[int, int]  # every leaf (an atom of a tensor dim) in the groups, at the dense widths
    group_leaf: dict[str, int]  # group -> the leaf whose units it removes (heads: H; qk: d; channel: C)
    member_leaves: dict[tuple[str, int], tuple[int, ...]]  # (module, dim) -> its leaves (row-major)
    bindings: list[Binding]
    rows: list[CostRow]
    example_input: torch.Tensor
    config: TracedConfig
    dense_sizes: dict[str, int]
    unprunable: list = field(default_factory=list)  # (layer, reason): what no group may cut, and why


def _leaf_sizes(spec: TraceSpec, counts: dict[str, int]) -> dict[int, int]:
    """Each leaf's size when the groups have `counts` units (per-head groups: channels in kept heads)."""
    sizes = dict(spec.leaf_sizes)
    by_name = {g.name: g for g in spec.groups}
    for g in spec.groups:
        n = counts.get(g.name, g.size)
        if g.heads > 1:
            heads = counts.get(g.head_group, g.heads) if g.head_group else g.heads
            if n % heads:
                raise SpikepruneError(f"{g.name}: {n} channels do not split into {heads} equal heads")
            n //= heads
        sizes[spec.group_leaf[g.name]] = n
    del by_name
    return sizes


def cost_table(spec: TraceSpec, sizes: dict[int, int]) -> list[Layer]:
    """The layer table at leaf sizes `sizes`: parameter shapes follow the member leaves, MACs the
    leaves of the traced products. A "Parameter" row is a tensor of a module that is no weight
    layer (a position embedding, a neuron's leak): counted, no MACs."""
    rows = []
    for r in spec.rows:
        shape = tuple(math.prod(sizes[leaf] for leaf in spec.member_leaves[(r.name, d)])
                      if (r.name, d) in spec.member_leaves else n for d, n in enumerate(r.shape))
        macs = int(round(r.const * math.prod(sizes.get(f, spec.leaf_sizes.get(f, 1)) for f in r.factors)))
        rows.append(Layer(name=r.name, type=r.type, weight_shape=shape, bias=r.bias, bn=None, bn_features=0,
                          input=r.input, macs=macs, rate_from=r.rate_from))
    return rows


# ------------------------------------------------------------------------------------------------
# The family's functions
# ------------------------------------------------------------------------------------------------
def spec_of(model: nn.Module) -> TraceSpec:
    spec = model.__dict__.get(TRACE_ATTR)
    if not isinstance(spec, TraceSpec):
        raise SpikepruneError(f"this {type(model).__name__} was not traced: call spikeprune.trace(model, example_input)")
    return spec


def traced_groups(model: nn.Module) -> list[Group]:
    return copy.deepcopy(spec_of(model).groups)


class _ConfigDict:
    """model.config_dict() of a traced model (an object, not a closure, so deepcopy keeps it plain)."""

    def __init__(self, config: TracedConfig):
        self.config = config

    def __call__(self) -> dict:
        return {"family": FAMILY, "config": self.config.to_dict()}


def attach(model: nn.Module, spec: TraceSpec, check: bool = True) -> nn.Module:
    """Make `model` a traced-family model described by `spec` (its attributes, not its class).
    check=False: also over a class's own `family` / `cfg` (pruned copies made to prove a group)."""
    for name in ("family", "cfg", "config_dict") if check else ():
        own = getattr(type(model), name, None)
        if own is not None and not isinstance(model.__dict__.get(name), (str, TracedConfig, _ConfigDict)):
            raise SpikepruneError(f"{type(model).__name__} defines `{name}` itself, which spikeprune sets on a traced "
                                  "model; rename it in your class to prune the model by tracing")
    model.__dict__[TRACE_ATTR] = spec
    if not model.__dict__.get(RESET_FLAG):
        # one forward = one input sequence, as everywhere in spikeprune: stateful neurons start from
        # rest (SpikingJelly's users call functional.reset_net after each batch for the same reason)
        model.register_forward_pre_hook(reset_before_forward)
        model.__dict__[RESET_FLAG] = True
    model.__dict__["family"] = FAMILY
    model.__dict__["cfg"] = spec.config
    model.__dict__["config_dict"] = _ConfigDict(spec.config)
    return model


def structure_copy(model: nn.Module, meta: bool) -> nn.Module:
    """A deep copy of `model`; with meta=True every state-dict tensor becomes an empty meta tensor
    (nothing copied: the caller loads weights), other tensors (neuron state) are copied."""
    memo: dict[int, object] = {}
    spec = model.__dict__.get(TRACE_ATTR)
    if isinstance(spec, TraceSpec):
        memo[id(spec)] = spec  # plain data, replaced by the caller; its example input is shared
    if meta:
        for mod in model.modules():
            for name, t in itertools.chain(mod._parameters.items(), mod._buffers.items()):
                if t is None or name in mod._non_persistent_buffers_set:
                    continue
                empty = torch.empty_like(t, device="meta")
                memo[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _new_layer(old: nn.Module, widths: dict[int, int]) -> nn.Module | None:
    """A layer of `old`'s class with dim sizes `widths` (0: out / features, 1: in), on the current
    default device; None for a class without a known constructor (its tensors are swapped instead)."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if type(old) in conv:
        out_c, in_c = widths.get(0, old.out_channels), widths.get(1, old.in_channels)
        groups = old.groups
        if groups > 1:  # depthwise (checked by the tracer): groups follow the channels
            groups = in_c = out_c
        return type(old)(in_c, out_c, old.kernel_size, old.stride, old.padding, old.dilation, groups,
                         old.bias is not None, old.padding_mode)
    if type(old) is nn.Linear:
        return nn.Linear(widths.get(1, old.in_features), widths.get(0, old.out_features), old.bias is not None)
    if type(old) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return type(old)(widths.get(0, old.num_features), old.eps, old.momentum, old.affine, old.track_running_stats)
    if type(old) is nn.LayerNorm and len(old.normalized_shape) == 1:
        return nn.LayerNorm(widths.get(0, old.normalized_shape[0]), old.eps, old.elementwise_affine,
                            old.bias is not None if old.elementwise_affine else True)
    return None


def _set_widths(layer: nn.Module, widths: dict[int, int]) -> None:
    """The width attributes of a subclass of a known layer (e.g. SpikingJelly's multi-step
    layer.Conv2d) whose tensors were swapped in place."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        depthwise = layer.groups > 1 and layer.groups == layer.out_channels
        layer.out_channels = widths.get(0, layer.out_channels)
        layer.in_channels = widths.get(1, layer.in_channels)
        if depthwise:
            layer.groups = layer.in_channels = layer.out_channels
    elif isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = widths.get(0, layer.out_features), widths.get(1, layer.in_features)
    elif isinstance(layer, nn.modules.batchnorm._NormBase):
        layer.num_features = widths.get(0, layer.num_features)
    elif isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) == 1:
        layer.normalized_shape = (widths.get(0, layer.normalized_shape[0]),)


def resize_with_spec(model: nn.Module, spec: TraceSpec, counts: dict[str, int]) -> nn.Module:
    """A copy of `model` with the group sizes `counts`: smaller layers, updated width attributes.
    Its tensors are empty (meta) when the default device is meta, else fresh (uninitialised) ones."""
    meta = torch.empty(0).device.type == "meta"
    sizes = _leaf_sizes(spec, counts)
    new = structure_copy(model, meta=True)
    modules = dict(new.named_modules())
    widths: dict[str, dict[int, int]] = {}
    for (mod, dim), leaves in spec.member_leaves.items():
        widths.setdefault(mod, {})[dim] = math.prod(sizes[leaf] for leaf in leaves)
    with torch.device("meta"):
        for mod, w in widths.items():
            old = modules[mod]
            layer = _new_layer(old, w)
            if layer is not None:
                _keep_training_state(old, layer)
                parent, _, child = mod.rpartition(".")
                setattr(modules[parent] if parent else new, child, layer)
                modules[mod] = layer
                continue
            _resize_tensors(old, w)  # any other module: swap its tensors
            _set_widths(old, w)
    for (mod, attr), v in _binding_values(spec, sizes).items():
        setattr(modules[mod], attr, v)
    new_counts = {g.name: counts.get(g.name, g.size) for g in spec.groups}
    attach(new, _resized_spec(spec, new_counts, sizes), check=False)
    if not meta:
        new = new.to_empty(device=spec.example_input.device)
    return new


def _keep_training_state(old: nn.Module, layer: nn.Module) -> None:
    """The new layer trains (or not) as the old one did, and a frozen weight or bias stays frozen."""
    layer.train(old.training)
    for name in ("weight", "bias"):
        if getattr(old, name, None) is not None and isinstance(getattr(old, name), nn.Parameter):
            getattr(layer, name).requires_grad_(getattr(old, name).requires_grad)


def _resize_tensors(module: nn.Module, widths: dict[int, int]) -> None:
    """Give each parameter and buffer of `module` its new shape (empty tensors of the same kind)."""
    for store in (module._parameters, module._buffers):
        for name, t in store.items():
            if t is None:
                continue
            shape = [widths.get(d, s) for d, s in enumerate(t.shape)]
            empty = torch.empty(shape, dtype=t.dtype)
            store[name] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty


def _binding_values(spec: TraceSpec, sizes: dict[int, int]) -> dict[tuple[str, str], int]:
    """(module, attribute) -> the width the forward reads there, at the new leaf sizes."""
    values: dict[tuple[str, str], int] = {}
    for b in spec.bindings:
        v = math.prod(sizes[leaf] for leaf in b.leaves)
        if values.setdefault((b.module, b.attr), v) != v:
            raise SpikepruneError(f"{b.module or 'the model'}.{b.attr} is read as two different widths by the forward; "
                                  "these widths cannot be pruned apart")
    return values


def _resized_spec(spec: TraceSpec, counts: dict[str, int], sizes: dict[int, int]) -> TraceSpec:
    groups = []
    for g in spec.groups:
        g = copy.deepcopy(g)
        g.size = counts[g.name]
        if g.head_group:
            g.heads = counts[g.head_group]
        if g.unit == "head":
            g.members = [Member(m.module, m.dim, math.prod(sizes[leaf] for leaf in spec.member_leaves[(m.module, m.dim)])
                                // g.size) for m in g.members]
        g.params = g.memory_bytes = 0
        groups.append(g)
    cfg = copy.copy(spec.config)
    cfg.sizes = dict(counts)
    cfg.layers = cost_table(spec, sizes)
    return TraceSpec(spec.key, groups, dict(sizes), dict(spec.group_leaf), dict(spec.member_leaves),
                     list(spec.bindings), list(spec.rows), spec.example_input, cfg, dict(spec.dense_sizes),
                     list(spec.unprunable))


def traced_resize(model: nn.Module, counts: dict[str, int]) -> nn.Module:
    return resize_with_spec(model, spec_of(model), counts)


def traced_layer_table(cfg: TracedConfig) -> list[Layer]:
    return list(cfg.layers)


# ------------------------------------------------------------------------------------------------
# Slicing and the proof
# ------------------------------------------------------------------------------------------------
def kept_channels(spec: TraceSpec, kept: dict[str, list[int]]) -> dict[tuple[str, int], torch.Tensor]:
    """(module, dim) -> kept channel indices: the intersection over every group that cuts it."""
    return {k: torch.tensor(v, dtype=torch.long) for k, v in kept_channels_of(spec.groups, kept).items()}


def sliced_state(model: nn.Module, cut: dict[tuple[str, int], torch.Tensor]) -> dict:
    state = {}
    for key, t in model.state_dict().items():
        module = key.rpartition(".")[0]
        for dim in range(t.dim()):
            idx = cut.get((module, dim))
            if idx is not None:
                t = t.index_select(dim, idx.to(t.device))
        state[key] = t
    return state


def reset_state(model: nn.Module) -> None:
    """Reset every stateful module (SpikingJelly's functional.reset_net does the same)."""
    for m in model.modules():
        if m is not model and callable(getattr(m, "reset", None)):
            m.reset()


def reset_before_forward(model: nn.Module, args) -> None:
    reset_state(model)


def _run64(model: nn.Module, x: torch.Tensor):
    reset_state(model)
    try:
        with torch.no_grad():
            return model(x.to(torch.float64))
    finally:
        reset_state(model)


def _as_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _as_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _as_tensors(o)]
    return []


def _pass_through(module, args, out):
    return args[0]


def _outputs(model: nn.Module, example: torch.Tensor, neurons_fire: bool) -> list[torch.Tensor]:
    """The model's output tensors on `example` in float64; with neurons_fire=False every spiking
    neuron (channel-wise module) passes its input through, so no channel is silent."""
    hooks = [] if neurons_fire else [m.register_forward_hook(_pass_through) for m in model.modules()
                                     if m is not model and is_channelwise(m)]
    try:
        return _as_tensors(_run64(model, example))
    finally:
        for h in hooks:
            h.remove()


def prove(dense: nn.Module, pruned: nn.Module, cut: dict[tuple[str, int], torch.Tensor], example: torch.Tensor,
          what: str) -> None:
    """Raise unless `pruned` computes on `example` what `dense` computes with the removed slices
    zeroed, in float64, eval mode, neuron state reset before and after. Checked twice: as the model
    runs, and with every neuron passing its input through, so that channels which never fire on
    the example cannot hide a wrong cut (a removed channel is zero either way, so both must hold)."""
    masked = structure_copy(dense, meta=False).double().eval()
    for key, t in masked.state_dict(keep_vars=True).items():
        module = key.rpartition(".")[0]
        with torch.no_grad():
            for dim in range(t.dim()):
                idx = cut.get((module, dim))
                if idx is not None:
                    drop = torch.ones(t.shape[dim], dtype=torch.bool)
                    drop[idx] = False
                    t.index_fill_(dim, drop.nonzero().flatten().to(t.device), 0.0)
    candidate = structure_copy(pruned, meta=False).double().eval()
    for fire in (True, False):
        try:
            want, got = _outputs(masked, example, fire), _outputs(candidate, example, fire)
        except Exception as e:  # noqa: BLE001 -- any failure of the user's forward is the verdict
            raise SpikepruneError(f"pruning {what} breaks the model's forward: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from None
        if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
            raise SpikepruneError(f"pruning {what} changes the shape of the model's output "
                                  f"({[list(t.shape) for t in want]} -> {[list(t.shape) for t in got]})")
        for a, b in zip(want, got):
            if not a.numel():
                continue
            diff = (a - b).abs().max().item()
            if not diff <= PROOF_ATOL * max(1.0, a.abs().max().item()):
                how = "" if fire else " with its neurons passing their input through (no channel silent)"
                raise SpikepruneError(f"pruning {what} is not equivalent to masking it: on the example input{how} the "
                                      f"pruned model's output differs from the masked dense model's by up to {diff:.3g}")


def check_pruned(dense: nn.Module, pruned: nn.Module, kept: dict[str, list[int]]) -> None:
    """The family hook surgery calls after every prune: prove it, naming the groups that were cut."""
    spec = spec_of(dense)
    cut = kept_channels(spec, kept)
    names = [g.name for g in spec.groups if g.name in kept and len(kept[g.name]) < g.size]
    if names:
        prove(dense, pruned, cut, spec.example_input, "group" + ("s " if len(names) > 1 else " ") + ", ".join(names))


def prune_units(model: nn.Module, spec: TraceSpec, kept: dict[str, list[int]]) -> nn.Module:
    """A pruned copy keeping the units `kept` (group -> indices; per-head groups: channels in kept
    heads), weights sliced, proven; what the tracer's own check and the tests use."""
    kept = dict(kept)
    for g in spec.groups:  # per-head groups keep only the channels of the kept heads (as surgery does)
        if g.head_group in kept:
            heads = set(kept[g.head_group])
            kept[g.name] = [i for i in kept.get(g.name, range(g.size)) if i // g.head_dim in heads]
    cut = kept_channels(spec, kept)
    counts = {g.name: len(kept.get(g.name, range(g.size))) for g in spec.groups}
    with torch.device("meta"):
        new = resize_with_spec(model, spec, counts)
    new.load_state_dict(sliced_state(model, cut), strict=True, assign=True)
    new.train(model.training)
    names = [g.name for g in spec.groups if counts[g.name] < g.size]
    prove(model, new, cut, spec.example_input, "group" + ("s " if len(names) > 1 else " ") + ", ".join(names))
    return new


# ------------------------------------------------------------------------------------------------
# In-process rebuilding and registration
# ------------------------------------------------------------------------------------------------
_TEMPLATES: dict[str, tuple[nn.Module, TraceSpec]] = {}  # trace key -> (dense structure on meta, spec)


def remember(model: nn.Module, spec: TraceSpec) -> None:
    template = structure_copy(model, meta=True)
    attach(template, spec, check=False)
    _TEMPLATES[spec.key] = (template, spec)


def traced_build(cfg: TracedConfig) -> nn.Module:
    entry = _TEMPLATES.get(cfg.key)
    if entry is None:
        raise SpikepruneError(f"a traced {cfg.model} is rebuilt from the code that built it: trace the dense model "
                              "again in this process (spikeprune.trace), then load or replay the pruning record")
    template, spec = entry
    with torch.device("meta"):
        new = resize_with_spec(template, spec, dict(cfg.sizes))
    return new.to_empty(device="cpu")
