"""Importance criteria: one score per unit (channel or head) of a coupled group; low scores go first.

A criterion is a registered object, looked up by name wherever a name is accepted (spikeprune.prune
/ surgery.prune importance="NAME", importance.scores, PruneContext, `--importance NAME`):

    importance.names()          the registered names, in registration order
    importance.get(name)        the Importance object (unknown name: SpikepruneError listing them)
    @register_importance(name, needs_data=False)
                                registers a subclass of Importance, an instance, or a plain function
                                fn(model, group, options) -> scores [group.size]; nothing in the
                                package needs editing. unregister_importance(name) removes one.

An Importance has `name`, `needs_data` (True: calibration data is required, and the run passes
its calibration split) and `needs_labels`, and is called per group, `crit(model, group, options)
-> scores`; `crit.score_groups(model, groups, options) -> {name: scores}` scores many groups at
once (criteria that read data override it so that one data pass serves every group). `options`
is a ScoreOptions: data, batches, batch_size, seed, progress, and `options.batches_of(model)`, the
calibration batches on the model's device in any accepted data form. Example:

    from spikeprune import importance

    @importance.register_importance("l2_bn")
    def l2_bn(model, group, options):
        # weight norm times BatchNorm scale: a unit must be both large and amplified to survive
        return importance.get("l2")(model, group, options) * importance.get("bn")(model, group, options)

    spikeprune.prune(model, {"block*.mlp.hidden": 0.5}, importance="l2_bn")

Built-in criteria:
  l2      the seeds' criterion: L2 norm of the group's filter weights (Conv / Linear slices --
          output filters *and* the input columns that read them; BatchNorm is left to `bn`).
  l1      the same with absolute sums.
  bn      |gamma| of the group's BatchNorm entries (network-slimming style).
  taylor  first-order Taylor: sum over the group's parameter slices of |w * dL/dw|, with the
          gradient of the cross-entropy averaged over a few calibration batches (needs data).
  random  seeded uniform scores: a floor for comparisons.
  firing  ours, spike-aware (needs data): how much signal a unit actually sends downstream,
          mean |activation| of the unit on calibration data times the L2 norm of the weight
          columns that read it. A channel that never fires scores exactly 0, whatever its
          weights, because it contributes nothing downstream. Where nothing reads a unit
          through weights (q and k meet in the attention product) the rates of q and k are
          multiplied: silent in either means no contribution.

How a group combines its members (every built-in criterion but random): each member slice (or
probe) gives a raw score per unit; each member's scores are divided by their own mean, so a big
layer (rpe_conv, D*D*9) does not drown a small one (the head), and every coupled layer gets an
equal say; the normalised scores are summed over members. For l2 the raw score is the squared norm
and the sum is square-rooted at the end: the group score is a normalised group L2 norm, as in
Torch-Pruning's GroupMagnitudeImportance. A member whose scores are all zero adds zeros.
For the `heads` group one unit covers head_dim channels of each member; their scores are summed.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data import dataset_for_model, make_loader
from .errors import SpikepruneError
from .coupling import Group, Member, groups as model_groups

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


# ------------------------------------------------------------------------------------------------
# The criterion type and the registry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreOptions:
    """How a scoring call reads data: `data` (None, or any form calibration_batches accepts),
    up to `batches` batches of `batch_size`, the `seed` of random criteria, progress bars."""
    data: Any = None
    batches: int = 4
    batch_size: int = 32
    seed: int = 0
    progress: bool = False

    def batches_of(self, model: nn.Module, need_labels: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The calibration batches (images, labels or None) on `model`'s device and dtype."""
        return calibration_batches(model, self.data, self.batches, self.batch_size, need_labels)


class Importance:
    """A criterion: subclass it and override `__call__` (one group) or `score_groups` (many at once).

    Scores are a 1-D tensor of group.size non-negative numbers, float64 on the CPU by convention
    (scores() converts whatever comes back); the lowest-scored units are removed first."""
    name: str = ""
    needs_data: bool = False  # calibration data is required (scores() refuses to run without it)
    needs_labels: bool = False  # the data must carry labels (a bare tensor of images is refused)
    description: str = ""

    def __call__(self, model: nn.Module, group: Group, options: ScoreOptions | None = None) -> torch.Tensor:
        if type(self).score_groups is Importance.score_groups:
            raise NotImplementedError(f"{type(self).__name__} defines neither __call__ nor score_groups")
        return self.score_groups(model, [group], _usable(self, options))[group.name]

    def score_groups(self, model: nn.Module, groups: list[Group], options: ScoreOptions) -> dict[str, torch.Tensor]:
        return {g.name: self(model, g, options) for g in groups}

    def __repr__(self) -> str:
        return f"<importance {self.name!r}{' (needs data)' if self.needs_data else ''}>"


class FunctionImportance(Importance):
    """A plain function fn(model, group, options) -> scores, registered as a criterion."""

    def __init__(self, name: str, fn: Callable, needs_data: bool, needs_labels: bool, description: str):
        self.name, self.fn, self.needs_data, self.needs_labels = name, fn, needs_data, needs_labels
        self.description = description

    def __call__(self, model, group, options=None):
        return self.fn(model, group, _usable(self, options))


def _usable(crit: Importance, options: ScoreOptions | None) -> ScoreOptions:
    """`options`, or the defaults; a criterion that needs data and got none fails clearly here
    (a direct call such as surgery.prune(model, ratios, importance=crit) passes no data)."""
    options = options or ScoreOptions()
    if crit.needs_data and options.data is None:
        raise SpikepruneError(f"the {crit.name or type(crit).__name__!r} criterion needs calibration data: call "
                              "importance.scores(model, criterion, data=...) or pass its name with data=")
    return options


_REGISTRY: dict[str, Importance] = {}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def register_importance(name: str, needs_data: bool | None = None, needs_labels: bool | None = None,
                        description: str = "", replace: bool = False):
    """Decorator registering a criterion under `name` (see the module docstring).

    Accepts an Importance subclass (instantiated with no arguments), an Importance instance, or a
    function fn(model, group, options) -> scores. needs_data / needs_labels override the object's
    own (a function defaults to False). The decorated object is returned unchanged. A name taken
    already is refused unless replace=True."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpikepruneError(f"an importance criterion name is a word (letters, digits, _ . -, starting with a "
                              f"letter), got {name!r}")

    def deco(obj):
        if isinstance(obj, type) and issubclass(obj, Importance):
            crit = obj()
        elif isinstance(obj, Importance):
            crit = obj
        elif callable(obj):
            doc = description or (obj.__doc__ or "").strip().split("\n")[0]
            crit = FunctionImportance(name, obj, bool(needs_data), bool(needs_labels), doc)
        else:
            raise SpikepruneError(f"register_importance({name!r}) needs an Importance subclass or instance, or a "
                                  f"function (model, group, options) -> scores; got {obj!r}")
        if name in _REGISTRY and not replace:
            raise SpikepruneError(f"importance criterion {name!r} is registered already; pass replace=True to "
                                  "replace it, or choose another name")
        crit.name = name
        if needs_data is not None:
            crit.needs_data = bool(needs_data)
        if needs_labels is not None:
            crit.needs_labels = bool(needs_labels)
        if description:
            crit.description = description
        _REGISTRY[name] = crit
        return obj
    return deco


def unregister_importance(name: str) -> None:
    """Remove a registered criterion (tests, or a plug-in replacing a built-in under a new name)."""
    get(name)  # an unknown name fails with the list of registered ones
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered criterion names, built-in ones first, in registration order."""
    return tuple(_REGISTRY)


def data_names() -> tuple[str, ...]:
    """The registered criteria that need calibration data."""
    return tuple(n for n, c in _REGISTRY.items() if c.needs_data)


def get(criterion: str | Importance) -> Importance:
    """The registered criterion `criterion` (an Importance passes through unchanged)."""
    if isinstance(criterion, Importance):
        return criterion
    try:
        return _REGISTRY[criterion]
    except (KeyError, TypeError):
        raise SpikepruneError(f"unknown importance criterion {criterion!r}; registered: {', '.join(_REGISTRY)} "
                              "(spikeprune.importance.register_importance adds one)") from None


def needs_data(criterion: str | Importance) -> bool:
    """Does `criterion` need calibration data? (An unknown name fails with the registered names.)"""
    return get(criterion).needs_data


class _LiveNames(Sequence):
    """A read-only view of registered names that follows later registrations, so code that tests
    `name in CRITERIA` or passes `choices=CRITERIA` to argparse sees user criteria too."""

    def __init__(self, only_data: bool = False):
        self._only_data = only_data

    def _now(self) -> tuple[str, ...]:
        return data_names() if self._only_data else names()

    def __getitem__(self, i):
        return self._now()[i]

    def __len__(self) -> int:
        return len(self._now())

    def __contains__(self, x) -> bool:
        return x in self._now()

    def __iter__(self):
        return iter(self._now())

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list, _LiveNames)) else NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._now())


# Derived views kept for the modules that import them; new code calls names() / needs_data(name).
CRITERIA: Sequence[str] = _LiveNames()
DATA_CRITERIA: Sequence[str] = _LiveNames(only_data=True)


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------
def score(model: nn.Module, group_name: str, criterion: str | Importance = "l2", data=None, **kw) -> torch.Tensor:
    """Scores [group.size] (float64, CPU) of one group's units; see `scores` for the arguments."""
    return scores(model, criterion, data, names=[group_name], **kw)[group_name]


def scores(model: nn.Module, criterion: str | Importance = "l2", data=None, names: Iterable[str] | None = None,
           batches: int = 4, batch_size: int = 32, seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Scores of every group (or of `names`) under `criterion`, one data pass for all of them.

    criterion: a registered name or an Importance object.
    data: calibration data for criteria that need it (taylor, firing) -- a dataset spec string (its
    "calib" split is used), a Dataset, a DataLoader (or any iterable of (images, labels) batches),
    an (images, labels) pair of tensors, or (firing only) a tensor of images. `batches` batches of
    `batch_size` are read.
    """
    crit = get(criterion)
    label = crit.name or type(crit).__name__
    all_groups = {g.name: g for g in model_groups(model)}
    names = list(all_groups) if names is None else list(names)
    unknown = [n for n in names if n not in all_groups]
    if unknown:
        raise SpikepruneError(f"unknown group(s) {unknown}; this model has: {_short_list(all_groups)}")
    chosen = [all_groups[n] for n in names]
    if crit.needs_data and data is None:
        plain = ", ".join(n for n, c in _REGISTRY.items() if not c.needs_data)
        raise SpikepruneError(
            f"the {label!r} criterion needs calibration data: pass data= (a dataset spec such as "
            f"'mnist5k', a Dataset or a DataLoader), or --data on the command line; or use {plain}")
    if crit.needs_labels and isinstance(data, torch.Tensor):
        raise SpikepruneError(f"a tensor of images has no labels; {label} needs (images, labels) or a dataset")
    if not chosen:
        return {}
    options = ScoreOptions(data, batches, batch_size, seed, progress)
    out = crit.score_groups(model, chosen, options)
    return {g.name: _checked(label, g, out.get(g.name)) for g in chosen}


def _checked(name: str, g: Group, s) -> torch.Tensor:
    """A criterion's scores for `g` as a float64 CPU vector of g.size, or a clear error."""
    if s is None:
        raise SpikepruneError(f"importance criterion {name!r} returned no scores for group {g.name}")
    s = torch.as_tensor(s).detach().to("cpu", torch.float64)
    if s.shape != (g.size,):
        raise SpikepruneError(f"importance criterion {name!r} returned scores of shape {tuple(s.shape)} for group "
                              f"{g.name}, which has {g.size} {g.unit}s: one score per unit is needed")
    if not torch.isfinite(s).all():
        raise SpikepruneError(f"importance criterion {name!r} returned non-finite scores for group {g.name}")
    return s


def _short_list(groups: dict) -> str:
    names = list(groups)
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


# ------------------------------------------------------------------------------------------------
# Weight-based criteria (l2, l1, bn, taylor)
# ------------------------------------------------------------------------------------------------
def _per_channel(t: torch.Tensor, dim: int, how: str) -> torch.Tensor:
    """Reduce every slice of `t` along `dim` to one number: squared L2 norm or L1 norm.

    Reduced in the tensor's own dtype (no float64 copy of a 2.4M-weight layer: that made scoring
    spikformer-8-512 take seconds), then returned as float64 for the group arithmetic."""
    others = [d for d in range(t.dim()) if d != dim]
    t = t.detach()
    if not others:
        r = t.abs() if how == "abs" else t * t
    else:
        r = torch.linalg.vector_norm(t, ord=1 if how == "abs" else 2, dim=others)
        r = r if how == "abs" else r * r
    return r.to(torch.float64).cpu()


def _to_units(r: torch.Tensor, g: Group, m: Member) -> torch.Tensor:
    """Channel scores of a member -> unit scores (a head covers unit_width channels)."""
    return r.view(g.size, m.unit_width).sum(1) if m.unit_width > 1 else r


def _member_raw(m: Member, module: nn.Module, criterion: str, grads: dict | None) -> torch.Tensor | None:
    if criterion in ("l2", "l1"):
        if not isinstance(module, _WEIGHTED):
            return None
        return _per_channel(module.weight, m.dim, "sq" if criterion == "l2" else "abs")
    if criterion == "bn":
        return module.weight.detach().abs().to(torch.float64) if isinstance(module, _BN) and module.affine else None
    # taylor: every parameter slice of the member, |w * g| summed per channel
    total = None
    for pname, p in module.named_parameters(recurse=False):
        if p.dim() <= m.dim:
            continue  # a bias has no input dim
        g = grads.get(p)
        if g is None:
            continue
        r = _per_channel(p.detach() * g, m.dim, "abs")
        total = r if total is None else total + r
    return total


def _normalised_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros_like(parts[0])
    for r in parts:
        mean = r.mean()
        out += r / mean if mean > 0 else r
    return out


def _magnitude(g: Group, modules: dict, criterion: str, grads: dict | None) -> torch.Tensor:
    parts = []
    for m in g.members:
        r = _member_raw(m, modules[m.module], criterion, grads)
        if r is not None:
            parts.append(_to_units(r, g, m))
    if not parts:
        raise SpikepruneError(f"criterion {criterion!r} finds nothing to score in group {g.name} "
                              f"(layers {g.layers}); pick another criterion")
    s = _normalised_sum(parts)
    return s.sqrt() if criterion == "l2" else s


def _random(g: Group, seed: int) -> torch.Tensor:
    # The group name joins the seed so that groups of equal size do not get equal rankings.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(g.name.encode()))
    return torch.rand(g.size, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Calibration data
# ------------------------------------------------------------------------------------------------
def calibration_batches(model: nn.Module, data, batches: int, batch_size: int,
                        need_labels: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield up to `batches` (images, labels) on the model's device and dtype, from any data form."""
    p = next(model.parameters())
    if isinstance(data, torch.Tensor):
        if need_labels:
            raise SpikepruneError("a tensor of images has no labels; taylor needs (images, labels) or a dataset")
        source = ((data[i:i + batch_size], None) for i in range(0, len(data), batch_size))
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        source = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    else:
        if isinstance(data, str):
            data = dataset_for_model(data, model, "calib")
        if isinstance(data, Dataset):
            data = make_loader(data, batch_size, shuffle=False)
        if not isinstance(data, (DataLoader, Iterable)):
            raise SpikepruneError(f"cannot read calibration data from a {type(data).__name__}; pass a dataset "
                                  "spec, a Dataset, a DataLoader or (images, labels) tensors")
        source = ((b[0], b[1]) if isinstance(b, (tuple, list)) else (b, None) for b in data)
    n = 0
    for images, labels in source:  # (names unlike x / y above: the generators read those lazily)
        if n >= batches:
            break
        yield images.to(p.device, p.dtype), (None if labels is None else torch.as_tensor(labels).to(p.device))
        n += 1
    if n == 0:
        raise SpikepruneError("the calibration data is empty")


def _progress(it, total: int, desc: str, on: bool):
    if not on:
        return it
    return tqdm(it, total=total, desc=desc, leave=False)


def _taylor_grads(model, chosen, data, batches, batch_size, progress) -> dict:
    """Mean gradient of the cross-entropy over the calibration batches, for the groups' params.

    Uses autograd.grad, so the model's own .grad fields are left alone; eval mode, so the
    BatchNorm running statistics are not updated either."""
    modules = dict(model.named_modules())
    params = list({id(p): p for g in chosen for m in g.members
                   for p in modules[m.module].parameters(recurse=False) if p.requires_grad}.values())
    if not params:
        raise SpikepruneError("taylor needs parameters with requires_grad=True in the groups scored")
    was_training = model.training
    model.eval()
    total = [torch.zeros_like(p) for p in params]
    n = 0
    try:
        for x, y in _progress(calibration_batches(model, data, batches, batch_size, True), batches, "taylor", progress):
            if y is None:
                raise SpikepruneError("taylor needs labelled calibration data (images, labels)")
            loss = F.cross_entropy(model(x), y)
            for acc, gr in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if gr is not None:
                    acc += gr
            n += 1
    finally:
        model.train(was_training)
    return {p: t / n for p, t in zip(params, total)}


def _mean_activations(model, chosen, data, batches, batch_size, progress) -> dict:
    """Mean |activation| per channel at every probe of the chosen groups, over calibration data."""
    modules = dict(model.named_modules())
    sites = {(p.module, p.side, p.channel_dim) for g in chosen for p in g.probes}
    sums: dict = {}
    counts: dict = {}

    def record(key, t):
        t = t.detach().abs().to(torch.float64).movedim(key[2], -1)
        c = t.shape[-1]
        s = t.reshape(-1, c).sum(0)
        sums[key] = sums[key] + s if key in sums else s
        counts[key] = counts.get(key, 0) + t.numel() // c

    handles = []
    for key in sites:
        mod = modules[key[0]]
        if key[1] == "input":
            handles.append(mod.register_forward_pre_hook(lambda _m, args, key=key: record(key, args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda _m, _a, out, key=key: record(key, out)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in _progress(calibration_batches(model, data, batches, batch_size, False), batches, "firing", progress):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: (sums[k] / counts[k]).cpu() for k in sums}


def _column_norms(module: nn.Module) -> torch.Tensor:
    """L2 norm of each input column of a Conv / Linear weight (over outputs and kernel)."""
    w = module.weight.detach().to(torch.float64)
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).cpu()


def _firing(g: Group, modules: dict, acts: dict) -> torch.Tensor:
    parts = []
    for p in g.probes:
        r = acts[(p.module, p.side, p.channel_dim)].clone()
        if p.weights:
            r *= torch.stack([_column_norms(modules[w]) ** 2 for w in p.weights]).sum(0).sqrt()
        parts.append(r.view(-1, p.unit_width).sum(1) if p.unit_width > 1 else r)
    if g.probe_reduce == "prod":
        out = parts[0]
        for r in parts[1:]:
            out = out * r
        return out
    return _normalised_sum(parts)


# ------------------------------------------------------------------------------------------------
# The built-in criteria, registered like any other
# ------------------------------------------------------------------------------------------------
class _Magnitude(Importance):
    """l2 / l1 / bn: weights only, one group at a time."""
    kind = ""

    def __call__(self, model, group, options=None):
        return _magnitude(group, dict(model.named_modules()), self.kind, None)

    def score_groups(self, model, groups, options):
        modules = dict(model.named_modules())  # once for every group
        return {g.name: _magnitude(g, modules, self.kind, None) for g in groups}


@register_importance("l2", description="normalised group L2 norm of the filter weights (the seeds' criterion)")
class L2Importance(_Magnitude):
    kind = "l2"


@register_importance("l1", description="normalised group L1 norm of the filter weights")
class L1Importance(_Magnitude):
    kind = "l1"


@register_importance("bn", description="|gamma| of the group's BatchNorm entries (network slimming)")
class BNImportance(_Magnitude):
    kind = "bn"


@register_importance("taylor", needs_data=True, needs_labels=True,
                     description="first-order Taylor |w * dL/dw| over calibration batches")
class TaylorImportance(Importance):
    def score_groups(self, model, groups, options):
        grads = _taylor_grads(model, groups, options.data, options.batches, options.batch_size, options.progress)
        modules = dict(model.named_modules())
        return {g.name: _magnitude(g, modules, "taylor", grads) for g in groups}


@register_importance("random", description="seeded uniform scores: a floor for comparisons")
class RandomImportance(Importance):
    def __call__(self, model, group, options=None):
        return _random(group, (options or ScoreOptions()).seed)


@register_importance("firing", needs_data=True,
                     description="spike-aware: mean |activation| on calibration data x the norm of the weights reading it")
class FiringImportance(Importance):
    def score_groups(self, model, groups, options):
        acts = _mean_activations(model, groups, options.data, options.batches, options.batch_size, options.progress)
        modules = dict(model.named_modules())
        return {g.name: _firing(g, modules, acts) for g in groups}


__all__ = ["Importance", "ScoreOptions", "register_importance", "unregister_importance", "names", "data_names", "get",
           "needs_data", "score", "scores", "calibration_batches", "CRITERIA", "DATA_CRITERIA"]
