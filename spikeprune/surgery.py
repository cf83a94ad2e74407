"""Physical surgery: turn per-group ratios into a smaller, ordinary model.

    pruned = prune(model, {"residual": 0.25, "block*.mlp.hidden": 0.5}, importance="l2")

Three steps, each readable on its own:
  1. `plan`: match the ratio keys to groups, score the units of every group that loses some
     (importance.py), and decide the kept unit indices per group -- all on the *input* model, so
     every index refers to it ("dense") whatever else is pruned in the same call. A per-head
     channel group (qk, v) then keeps only the channels of the heads its heads group keeps.
  2. Compose: a layer slice cut by several groups keeps the intersection of what each keeps
     (q's output channels: the heads group keeps whole heads, the qk group keeps dims within
     every head). Intersection does not depend on order, so groups apply "all at once".
  3. `apply_plan`: build a fresh model of the same family from a config with the smaller widths
     (on the meta device: no time spent initialising weights that are overwritten) and load the
     sliced weights, biases and BatchNorm running statistics into it. The result is a plain
     model whose config alone describes it, so save_model / load_model just work.
     It carries `pruning`, the typed record of the kept units against the dense model
     (spikeprune.record), composed over successive calls and replayable: prune(dense, record).

Kept counts (float ratio r on a group of n units):
  removed = floor(r * n + 0.5) (round half up), kept = n - removed, never below 1: if r would
  remove every unit, one is kept (the best-scored) and a SpikepruneWarning says so. Then, when
  round_to > 1, kept is rounded *up* to a multiple of round_to (pruning a little less, never
  more), capped at n. qk and v groups apply this to the head dim (every head keeps the same
  number of dims, the best-scored within that head), so round_to=8 makes every head dim, and so
  qk_dim / v_dim, a multiple of 8. Head counts (the heads group) are not rounded: round_to is
  about channel widths. Explicit kept-index lists are taken as given.

The attention scale stays the config's fixed 0.125 whatever the head dim: that is the reference
model's behaviour and what makes a pruned model compute exactly what the dense model computes
with the removed channels zeroed (tests/test_surgery.py proves it).
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SpikepruneError
from .coupling import Group, groups as model_groups
from .hashing import model_hash
from .importance import scores
from .models import get_family
from .record import PruningRecord
from .structure import kept_channels_of


class SpikepruneWarning(UserWarning):
    """Something was adjusted rather than refused (e.g. a ratio that would empty a group)."""


@dataclass
class Plan:
    """What `prune` will do: kept unit indices per group (on the input model), and why."""
    groups: list[Group]
    kept: dict[str, list[int]]  # every group; untouched ones keep range(size)
    requested: dict[str, float | list[int]]  # group name -> what the caller asked for
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.kept.items()}

    def removed(self) -> dict[str, float]:
        """Fraction of units actually removed, for every group that lost some."""
        out = {}
        for g in self.groups:
            n = len(self.kept[g.name])
            if n < g.size:
                out[g.name] = round(1 - n / g.size, 6)
        return out


# ------------------------------------------------------------------------------------------------
# Step 1: plan
# ------------------------------------------------------------------------------------------------
def kept_count(size: int, ratio: float, round_to: int = 1) -> tuple[int, bool]:
    """Units kept out of `size` when removing `ratio` of them; (count, clamped-to-one?)."""
    kept = size - math.floor(ratio * size + 0.5)
    clamped = kept < 1
    kept = max(kept, 1)
    if round_to > 1:
        kept = min(size, math.ceil(kept / round_to) * round_to)
    return kept, clamped


def match_ratios(names: list[str], ratios: dict) -> dict[str, tuple[str, object]]:
    """Group name -> (the key that chose it, its value). Exact names win over glob patterns;
    two patterns claiming the same group is an error (which one was meant is unclear)."""
    if not isinstance(ratios, dict):
        raise SpikepruneError(f"ratios must be a dict of group name or pattern -> ratio or kept indices, "
                              f"got {type(ratios).__name__}")
    out: dict[str, tuple[str, object]] = {}
    by_pattern: dict[str, str] = {}
    for key, value in ratios.items():
        if not isinstance(key, str):
            raise SpikepruneError(f"ratio keys are group names or glob patterns (strings), got {key!r}")
        if key in names:
            continue
        hits = fnmatch.filter(names, key)
        if not hits:
            listing = ", ".join(names[:10]) + (f", ... ({len(names)} groups)" if len(names) > 10 else "")
            raise SpikepruneError(f"{key!r} matches no group of this model; groups are: {listing}. "
                                  "`spikeprune inspect MODEL` lists them all")
        for name in hits:
            if name in by_pattern:
                raise SpikepruneError(f"group {name} is matched by both {by_pattern[name]!r} and {key!r}; "
                                      "make the patterns disjoint or name the group exactly")
            by_pattern[name] = key
            out[name] = (key, value)
    for key, value in ratios.items():
        if key in names:
            out[key] = (key, value)  # an exact name overrides any pattern
    return out


def _check_ratio(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SpikepruneError(f"ratio for {key!r} must be a fraction in [0, 1) or a list of kept indices, got {value!r}")
    r = float(value)
    if not (0.0 <= r < 1.0):  # also refuses NaN
        raise SpikepruneError(f"ratio for {key!r} is {value}: a ratio is the fraction of units to remove, "
                              "in [0, 1) (1 would remove everything; give kept indices to keep specific ones)")
    return r


def _check_indices(g: Group, key: str, value, kept_heads: list[int] | None = None) -> list[int]:
    what = "head" if g.unit == "head" else "channel"
    if len(value) == 0:
        raise SpikepruneError(f"kept indices for {g.name} (from {key!r}) are empty: at least one {what} must stay")
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in value):
        raise SpikepruneError(f"kept indices for {g.name} must be integers, got {list(value)[:8]}")
    value = [int(i) for i in value]  # numpy integers too
    bad = [i for i in value if not 0 <= i < g.size]
    if bad:
        raise SpikepruneError(f"kept indices for {g.name} must lie in [0, {g.size}); out of range: {bad[:8]}")
    if len(set(value)) != len(value):
        raise SpikepruneError(f"kept indices for {g.name} repeat some {what}s: "
                              f"{sorted(i for i, n in Counter(value).items() if n > 1)[:8]}")
    kept = sorted(value)
    if g.heads > 1:
        # Every kept head keeps the same number of channels (head h owns channels h*d .. h*d+d-1);
        # heads that the heads group removes in the same call may keep none (a record replays so).
        d = g.head_dim
        heads = range(g.heads) if kept_heads is None else kept_heads
        per_head = [sum(1 for i in kept if i // d == h) for h in heads]
        if len(set(per_head)) != 1 or per_head[0] == 0:
            raise SpikepruneError(
                f"kept indices for {g.name} keep {per_head} channels in heads {list(heads)}: every kept head "
                f"must keep the same number, at least one (head h owns channels h*{d} .. h*{d}+{d - 1}), so the "
                "[heads, head_dim] reshape stays valid. Prune whole heads with the heads group")
    return kept


def _top(s: torch.Tensor, k: int) -> list[int]:
    """Indices of the k best scores, ascending; ties keep the lower index (stable order)."""
    order = torch.sort(-s.to(torch.float64), stable=True).indices[:k]
    return sorted(order.tolist())


def _select(g: Group, s: torch.Tensor, ratio: float, round_to: int, notes: list[str]) -> list[int]:
    if s.shape != (g.size,):
        raise SpikepruneError(f"importance for {g.name} has shape {tuple(s.shape)}, expected ({g.size},)")
    if g.heads > 1:  # per head: the same count in every head, chosen within the head
        d = g.head_dim
        k, clamped = kept_count(d, ratio, round_to)
        kept = [h * d + i for h in range(g.heads) for i in _top(s[h * d:(h + 1) * d], k)]
        unit, n = "dim per head", d
    else:
        k, clamped = kept_count(g.size, ratio, 1 if g.unit == "head" else round_to)
        kept = _top(s, k)
        unit, n = g.unit, g.size
    if clamped:
        msg = (f"{g.name}: ratio {ratio:g} would remove every {unit} (of {n}); kept the best-scored one. "
               f"Use a smaller ratio{' or prune the heads group' if g.heads > 1 else ''} if this is not wanted")
        warnings.warn(msg, SpikepruneWarning, stacklevel=4)
        notes.append(msg)
    elif round_to > 1 and ratio > 0 and k != kept_count(n, ratio)[0]:
        notes.append(f"{g.name}: round_to={round_to} keeps {k} of {n}{' per head' if g.heads > 1 else ''} "
                     f"instead of {kept_count(n, ratio)[0]}")
    return kept


def _scores_for(model, groups: list[Group], importance, data, score_kw) -> dict[str, torch.Tensor]:
    if not groups:
        return {}
    if isinstance(importance, str):
        return scores(model, importance, data, names=[g.name for g in groups], **score_kw)
    if isinstance(importance, dict):
        missing = [g.name for g in groups if g.name not in importance]
        if missing:
            raise SpikepruneError(f"the importance scores given have no entry for {missing[:5]}")
        return {g.name: torch.as_tensor(importance[g.name]).detach().cpu() for g in groups}
    if callable(importance):
        return {g.name: torch.as_tensor(importance(model, g)).detach().cpu() for g in groups}
    raise SpikepruneError(f"importance must be a criterion name, a dict of scores or a function, got {importance!r}")


def _is_index_list(value) -> bool:
    return isinstance(value, (list, tuple, range)) or getattr(value, "ndim", 0) == 1  # also tensors, arrays


def plan(model: nn.Module, ratios: dict, importance="l2", round_to: int = 1, data=None, **score_kw) -> Plan:
    """Decide the kept units of every group (see the module docstring for the rules)."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise SpikepruneError(f"round_to must be a positive integer, got {round_to!r}")
    gs = model_groups(model)
    by_name = {g.name: g for g in gs}
    chosen = match_ratios(list(by_name), ratios)
    kept = {g.name: list(range(g.size)) for g in gs}
    requested: dict = {}
    to_score: dict[str, float] = {}
    # heads groups first: the heads they keep decide which heads count for per-head channel groups
    for name, (key, value) in sorted(chosen.items(), key=lambda kv: by_name[kv[0]].head_group is not None):
        g = by_name[name]
        if _is_index_list(value):
            idx = value.tolist() if hasattr(value, "tolist") else list(value)
            heads = kept[g.head_group] if g.head_group in chosen and _is_index_list(chosen[g.head_group][1]) else None
            kept[name] = _check_indices(g, key, idx, heads)
            requested[name] = kept[name]
        else:
            r = _check_ratio(key, value)
            requested[name] = r
            if r > 0:
                to_score[name] = r
    notes: list[str] = []
    scored = _scores_for(model, [by_name[n] for n in to_score], importance, data, score_kw)
    for name, r in to_score.items():
        kept[name] = _select(by_name[name], scored[name], r, round_to, notes)
    return Plan(groups=gs, kept=_within_kept_heads(gs, kept), requested=requested, notes=notes)


def _within_kept_heads(gs: list[Group], kept: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per-head channel groups keep only the channels of the heads their heads group keeps, so
    every kept list says exactly which units of the group remain (and its length is the new width)."""
    out = dict(kept)
    for g in gs:
        if g.head_group is not None and len(kept[g.head_group]) < g.heads:
            heads = set(kept[g.head_group])
            out[g.name] = [i for i in kept[g.name] if i // g.head_dim in heads]
    return out


def shape_model(model: nn.Module, kept: dict[str, list[int]]) -> nn.Module:
    """A shapes-only model (meta device, no weights) with the widths `kept` gives (group -> kept
    indices, against `model`; groups not named keep everything): what memory and MAC counts of a
    candidate need, without copying a weight."""
    gs = model_groups(model)
    full = {g.name: list(range(g.size)) for g in gs}
    full.update({k: list(v) for k, v in kept.items()})
    counts = {name: len(idx) for name, idx in _within_kept_heads(gs, full).items()}
    with torch.device("meta"):
        return get_family(model).resize(model, counts)


# ------------------------------------------------------------------------------------------------
# Steps 2 and 3: compose and cut
# ------------------------------------------------------------------------------------------------
def kept_channels(p: Plan) -> dict[tuple[str, int], torch.Tensor]:
    """(module, dim) -> kept channel indices: the intersection over every group cutting it."""
    return {k: torch.tensor(v, dtype=torch.long) for k, v in kept_channels_of(p.groups, p.kept).items()}


def apply_plan(model: nn.Module, p: Plan) -> nn.Module:
    """A new model with the plan's widths and the kept slices of every weight and statistic."""
    cut = kept_channels(p)
    with torch.device("meta"):  # shapes only; every tensor is loaded below
        new = get_family(model).resize(model, p.counts())
    state = {}
    for key, t in model.state_dict().items():
        module = key.rpartition(".")[0]
        sliced = False
        for dim in range(t.dim()):  # num_batches_tracked (0-d), biases on dim 1: untouched
            idx = cut.get((module, dim))
            if idx is not None:
                t = t.index_select(dim, idx.to(t.device))
                sliced = True
        state[key] = t if sliced else t.clone()
    try:
        new.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # a group declaration that misses a layer shows up here
        raise SpikepruneError(f"internal: the group declaration for {model.family} does not cover a "
                              f"layer the widths change ({str(e).splitlines()[0]} ...)") from None
    for dense_p, new_p in zip(model.parameters(), new.parameters()):
        new_p.requires_grad_(dense_p.requires_grad)
    new.train(model.training)
    check = getattr(get_family(model), "check_pruned", None)
    if check is not None:  # a family that proves every prune (traced models: against the masked dense model)
        check(model, new, {g.name: p.kept[g.name] for g in p.groups})
    return new


def record_of(model: nn.Module) -> PruningRecord:
    """The model's pruning record; a model never pruned is its own dense model."""
    rec = getattr(model, "pruning", None)
    if isinstance(rec, PruningRecord):
        return rec
    return PruningRecord.identity(model.family, model.config_dict(), {g.name: g.size for g in model_groups(model)},
                                  getattr(model, "preset", None), dense_hash(model))


def dense_hash(model: nn.Module) -> str:
    """hashing.model_hash(model), remembered on the model until a tensor of it changes (a policy
    prunes the same dense model hundreds of times; training bumps the tensors' versions)."""
    key = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    cached = getattr(model, "_spikeprune_dense_hash", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = model_hash(model)
    model._spikeprune_dense_hash = (key, h)
    return h


def _replay_plan(model: nn.Module, record: PruningRecord, allow_other_weights: bool = False) -> dict[str, list[int]]:
    """The kept indices of a record, checked against the (dense) model it is replayed on."""
    if record.family != getattr(model, "family", None):
        raise SpikepruneError(f"the pruning record is of a {record.family} model, not of this "
                              f"{getattr(model, 'family', type(model).__name__)} model")
    sizes = {g.name: g.size for g in model_groups(model)}
    if sizes != record.dense_sizes or model.config_dict() != record.dense_config:
        raise SpikepruneError("a pruning record replays on the dense model it was made from; this model's widths "
                              "differ from the record's dense config (load the dense model, e.g. by its preset)")
    if record.dense_hash and not allow_other_weights and dense_hash(model) != record.dense_hash:
        raise SpikepruneError("this model has the record's dense widths but not the weights of the dense model the "
                              f"record was made from (sha256 {record.dense_hash[:12]}...), so the replay would not give "
                              "the same pruned model; load that dense model, or pass allow_other_weights=True to "
                              "keep the record's units of these weights anyway")
    return {g: record.kept_units(g) for g in record.kept}


def prune(model: nn.Module, ratios, importance="l2", round_to: int = 1, data=None, *,
          allow_other_weights: bool = False, **score_kw) -> nn.Module:
    """A new, physically smaller model; `model` is left untouched.

    ratios      {group name or glob pattern: fraction to remove in [0, 1), or the kept indices}
                e.g. {"residual": 0.25, "block*.mlp.hidden": 0.5, "block0.attn.heads": [0, 2]};
                or a PruningRecord (a pruned model's `.pruning`): replayed on the dense model it
                was made from, it rebuilds the same model bit for bit
    importance  a criterion name (spikeprune.importance), a dict group name -> scores, or a
                function (model, group) -> scores; lowest scores are removed first
    round_to    kept channel counts rounded up to a multiple of this (8: hardware-friendly)
    data        calibration data for the data-driven criteria (taylor, firing)
    score_kw    passed to importance.scores (batches, batch_size, seed, progress)
    allow_other_weights  replaying a record on a model whose weights are not the record's dense
                model's (its hash differs) is refused unless this is True: the units kept are
                then the record's, but the model is not the one the record describes

    The new model carries `pruning`, a PruningRecord (spikeprune.record): the kept units of every
    group against the dense model, composed over successive prune calls.
    """
    if isinstance(ratios, PruningRecord):
        new = apply_plan(model, plan(model, _replay_plan(model, ratios, allow_other_weights)))
        new.pruning = ratios.copy()  # the same record: replaying adds no step
        if allow_other_weights:
            new.pruning.dense_hash = dense_hash(model)  # what these units were taken from
    else:
        p = plan(model, ratios, importance, round_to, data, **score_kw)
        new = apply_plan(model, p)
        name = importance if isinstance(importance, str) else getattr(importance, "name", "custom")
        step = {"importance": name, "round_to": round_to,
                "requested": {k: v for k, v in p.requested.items() if not isinstance(v, list)},
                "notes": list(p.notes)}
        sizes = {g.name: g.size for g in p.groups}
        new.pruning = record_of(model).compose({g: idx for g, idx in p.kept.items() if len(idx) < sizes[g]}, step)
    new.preset = None  # no longer the preset; the dense one is in the record
    return new
