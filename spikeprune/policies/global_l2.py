"""Global ranking (`--policy global`): every channel of every channel group ranked together by
normalised magnitude, the lowest removed first -- what Torch-Pruning's global pruner does
(`GroupMagnitudeImportance(p=2, normalizer="mean")` with `global_pruning=True`), as a baseline
for the per-group policies.

Scores. Each channel group -- stem stages, residual, and per block qk, v and MLP hidden -- is scored
by the run's criterion (importance.py; default l2: the L2 norm of each channel over all the
coupled layers it touches). The heads groups are left out: they remove the same weights as qk and
v, a head at a time. A raw score does not compare across groups (a residual channel spans every
block, a hidden unit two layers), so each group's scores are divided by the group's mean score,
Torch-Pruning's "mean" normaliser: 0.5 then means "half as important as the average channel of
its own group", whatever the group. All channels form one ranking, lowest first (ties: the higher
index first, as the engine breaks them).

Cutting the ranking. The first n channels give each group a count n_g, and the group loses the
fraction n_g / size. The engine removes a group's lowest-scored channels, which are exactly the
ones the ranking took (the normaliser does not change the order inside a group), except:
  - qk / v keep equal widths in every head, so the engine takes the same fraction from each head
    (the ranking's choice within the group is approximated there);
  - with round_to > 1 the engine keeps a little more (kept counts rounded up).
The best channel of each group (of each head, for qk / v) never enters the ranking: every group
keeps at least one.

Choosing n.
  Memory target (--target-saving / --memory-budget): the smallest n whose model fits the budget
  (memory only falls as n grows: bisection on shapes alone, no data). If its calibration top-1 is
  within --max-acc-drop it is the result -- no more accuracy spent than the target needs.
  Otherwise the target is out of reach within the limit: the search below runs on the cuts smaller
  than it and returns the best model within the limit (constraints_met is then false).
  Accuracy limit: the ranking is cut at the fractions of the sweep grid (--uniform-ratios, as a
  fraction of all rankable channels), measured in increasing order until one breaks the limit;
  then REFINE_STEPS bisection steps between the last cut within the limit and the first over it.
  Accuracy need not fall monotonically with n; stopping at the first failure is the greedy reading,
  and every model returned was measured within the limit (n = 0, the dense model, always is).

Resume: every measured cut is checkpointed (RUN/steps/global_search.json).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..coupling import groups as model_groups
from ..costs import memory_bytes
from ..models import get_family
from ..policy_api import PolicyResult, PruneContext, bisect, register_policy
from ..report import markdown_table
from ..surgery import plan

REFINE_STEPS = 3
CHECKPOINT = "global_search"


@dataclass
class Ranking:
    """The global order of the removable channels: `order[i]` = (group, unit index), lowest first."""
    sizes: dict[str, int]
    order: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.order)

    def counts(self, n: int) -> dict[str, int]:
        """Channels each group loses when the first n of the ranking go."""
        out: dict[str, int] = {}
        for g, _ in self.order[:n]:
            out[g] = out.get(g, 0) + 1
        return out

    def ratios(self, n: int) -> dict[str, float]:
        """spikeprune.prune ratios for the first n channels of the ranking."""
        return {g: c / self.sizes[g] for g, c in self.counts(n).items()}


def normalise(s: torch.Tensor) -> torch.Tensor:
    """Torch-Pruning's "mean" group normaliser: scores divided by the group's mean score."""
    s = s.to(torch.float64)
    m = s.mean()
    return s / m if m > 0 else s


def global_ranking(groups, scores: dict[str, torch.Tensor]) -> Ranking:
    """One ranking over the channels of `groups` (Group objects) from their raw scores."""
    entries = []  # (normalised score, group position, -unit index, group, unit)
    for gi, g in enumerate(groups):
        s = normalise(torch.as_tensor(scores[g.name]))
        heads = g.heads if g.heads > 1 else 1
        d = g.size // heads
        keep = set()  # the best unit of each head (of the group, when it has no heads) stays
        for h in range(heads):
            part = s[h * d:(h + 1) * d]
            # The engine's tie-break: among equal scores the lower index is kept.
            keep.add(h * d + int(torch.sort(-part, stable=True).indices[0]))
        for u in range(g.size):
            if u not in keep:
                entries.append((float(s[u]), gi, -u, g.name, u))
    entries.sort(key=lambda e: e[:3])
    return Ranking({g.name: g.size for g in groups}, [(e[3], e[4]) for e in entries])


def _memory_at(ctx: PruneContext, scores: dict, ratios: dict) -> int:
    """Memory at the run's precision of the model `ratios` would give: planned kept counts and a
    shapes-only model on the meta device, no weights copied."""
    counts = plan(ctx.model, ratios, importance=scores, round_to=ctx.round_to).counts()
    with torch.device("meta"):
        shapes = get_family(ctx.model).resize(ctx.model, counts)
    return int(memory_bytes(shapes)[ctx.constraints.precision])


def smallest_cut_for(mem_at, n_max: int, budget: int) -> int | None:
    """The smallest n in [0, n_max] with mem_at(n) <= budget (mem_at falls as n grows), or None."""
    if mem_at(n_max) > budget:
        return None
    # over the budget at lo = -1 (nothing removed is over by assumption), within it at hi = n_max
    return bisect(-1, n_max, lambda n: mem_at(n) > budget)[1]


def largest_within_limit(grid: list[int], cap: int, n_max: int, within) -> int:
    """The largest cut within the accuracy limit below `cap`: the grid's cuts in increasing order
    until one breaks the limit (or the cap, known to break it when below n_max), then REFINE_STEPS
    bisection steps between the last within and the first over."""
    lo, hi = 0, None
    for n in (n for n in grid if n < cap):
        if not within(n):
            hi = n
            break
        lo = n
    if hi is None and cap < n_max:
        hi = cap  # measured over the limit (the budget cut)
    return lo if hi is None else bisect(lo, hi, within, steps=REFINE_STEPS)[0]


class _Cuts:
    """The cuts of the ranking measured on the calibration split, kept in a resumable step."""

    def __init__(self, ctx: PruneContext, rank: Ranking, key: dict):
        self.ctx, self.rank, self.n_max = ctx, rank, len(rank)
        self.step = ctx.resumable(CHECKPOINT, key, {"measured": {}})
        self.measured: dict[str, dict] = self.step.state["measured"]
        self.models: dict[int, object] = {}

    def within(self, n: int) -> bool:
        """Whether the first n channels of the ranking removed keep the model within the limit."""
        ctx, k, N = self.ctx, str(n), self.n_max
        if k not in self.measured:
            model = ctx.prune(self.rank.ratios(n))
            top1 = ctx.calib_top1(model)
            self.measured[k] = {"n": n, "fraction": n / N, "top1": top1, "acc_drop": round(ctx.acc_drop(top1), 6),
                                "memory_bytes": ctx.memory(model),
                                "memory_saved": 1 - ctx.memory(model) / ctx.dense_memory}
            self.models[n] = model
            self.step.save()
            ctx.log(f"global: {n} of {N} channels ({n / N:.1%}) removed: calib top-1 {top1:.2%} (drop "
                    f"{self.measured[k]['acc_drop']:.2f}), memory saved {self.measured[k]['memory_saved']:.2%}")
        return ctx.within_limit(self.measured[k]["top1"])

    def choose(self, grid: list[int], raw: dict) -> tuple[int, str, int | None]:
        """(channels removed, why, the cut that meets the memory budget or None) (module docstring)."""
        ctx, budget, cap = self.ctx, self.ctx.budget_bytes, self.n_max
        n_budget = None
        if budget is not None:
            n_budget = smallest_cut_for(lambda n: _memory_at(ctx, raw, self.rank.ratios(n)), self.n_max, budget)
            if n_budget is None:
                ctx.log(f"global: even removing every rankable channel leaves the model over the {budget:,}-byte budget")
            elif self.within(n_budget):
                return n_budget, "smallest cut meeting the memory budget", n_budget
            else:
                cap = n_budget  # over the limit: search the smaller cuts
        reason = "largest cut within the accuracy limit" + (
            " (the memory budget is out of reach within it)" if budget is not None else "")
        return largest_within_limit(grid, cap, self.n_max, self.within), reason, n_budget


@register_policy("global", help="global ranking: all channels of all groups ranked together by group-normalised "
                                "magnitude (Torch-Pruning's global pruner), lowest removed first")
def global_policy(ctx: PruneContext) -> PolicyResult:
    limit = ctx.constraints.max_acc_drop
    gs = [g for g in model_groups(ctx.model) if g.unit == "channel"]  # every channel group; whole heads excluded
    raw = ctx.dense_scores()  # the same scores ctx.prune ranks by, so the ranking and the cuts agree
    rank = global_ranking(gs, raw)
    N = len(rank)
    budget = ctx.budget_bytes
    grid = sorted({round(f * N) for f in ctx.uniform_ratios} - {0})
    key = {"N": N, "importance": ctx.importance, "round_to": ctx.round_to, "limit": limit, "budget": budget,
           "precision": ctx.constraints.precision, "grid": grid}
    cuts = _Cuts(ctx, rank, key)
    chosen, reason, n_budget = cuts.choose(grid, raw)
    measured = cuts.measured

    model = cuts.models.get(chosen) or ctx.prune(rank.ratios(chosen))
    top1 = measured[str(chosen)]["top1"] if chosen else ctx.dense_calib_top1
    mem = ctx.memory(model)
    met = budget is None or mem <= budget
    ctx.log(f"global: {reason}: {chosen} of {N} channels removed, memory saved {1 - mem / ctx.dense_memory:.2%}")
    trace = sorted(measured.values(), key=lambda r: r["n"])
    counts = rank.counts(chosen)
    info = {
        "calib_top1": top1,
        "global": {
            "criterion": ctx.importance, "normaliser": "mean (each group's scores divided by their mean)",
            "groups": [g.name for g in gs], "rankable_channels": N, "removed_channels": chosen,
            "removed_fraction": chosen / N if N else 0.0, "removed_per_group": counts,
            "reason": reason, "budget_bytes": budget, "budget_cut": n_budget, "memory_met": met,
            "grid": grid, "refine_steps": REFINE_STEPS, "measured": trace,
        },
        "tradeoff": {"global ranking cuts": [[r["memory_saved"], r["top1"]] for r in trace]},
        "report_sections": [("Global ranking", _section(gs, counts, trace, chosen, N, reason, limit))],
    }
    return PolicyResult(model, info)


def _section(gs, counts, trace, chosen, N, reason, limit) -> str:
    text = (f"All {N} rankable channels of {len(gs)} channel groups ranked together by their group-normalised "
            f"score (score / group mean); the lowest {chosen} removed ({reason}).\n\n")
    text += markdown_table([{"group": g.name, "size": g.size, "removed": counts.get(g.name, 0)} for g in gs], [
        ("group", "group", str), ("size", "size", str), ("removed", "removed", str)])
    if trace:
        text += "\n\nCuts measured (calibration split):\n\n" + markdown_table(trace, [
            ("channels removed", "n", str), ("fraction", "fraction", lambda x: f"{x:.1%}"),
            ("calib top-1", "top1", lambda x: f"{x:.2%}"),
            ("drop (points)", "acc_drop", lambda x: f"{x:.2f}" + (" (over)" if x > limit + 1e-9 else "")),
            ("memory saved", "memory_saved", lambda x: f"{x:.2%}")])
    return text


__all__ = ["Ranking", "normalise", "global_ranking", "smallest_cut_for", "global_policy"]
