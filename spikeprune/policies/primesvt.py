"""PrimeSVT: automated, memory-aware, prioritized compression under accuracy and memory limits.

The seed paper gives only the outline (sort layers by size, find the robust ones, compress them
one after another, largest first, with L2-ranked channel filters, until the memory target is met
within the accuracy limit). The numbers it leaves open are defined here, and the run report
repeats them:

1. Ranking. The prunable groups (spikeprune.coupling: the coupled channel sets that play the
   papers' "layers") are sorted by `memory_bytes`, the fp32 bytes of every parameter whose size
   depends on the group, largest first (ties by name, so the order is reproducible).

2. Robust targets. With L the accuracy limit (`--max-acc-drop`, points of top-1), a group is
   robust when, pruned alone in the sensitivity analysis (shared with PSViT; decisions use the
   calibration split), its accuracy drop stays at or below

        threshold = L / ROBUST_DIVISOR        (ROBUST_DIVISOR = 2, so 1.5 points for L = 3)

   at every tested ratio up to ROBUST_MAX_RATIO = 0.5 (if the grid holds no ratio that small, at
   its smallest ratio). Why half of L: the single-group drops of several groups roughly add up
   in the cumulative model, and a group that eats more than half the budget already at moderate
   ratios leaves too little for the others. Why "up to 0.5": robustness is about moderate
   pruning; how far a robust group really goes is measured in step 3, not predicted here.
   (L = 0 gives threshold 0: robust only if the group loses nothing at all.)

3. Prioritized sequential compression. Robust groups are visited largest first. For each, the
   largest ratio that keeps the *measured* calibration top-1 of the cumulative model (every
   earlier step applied) within L of the dense model is kept:
   - candidates are the sensitivity grid's ratios whose single-group drop is at most L (a ratio
     that alone breaks the limit is not worth a calibration pass), tried from the largest down;
     the first that passes wins, since trying them all would cost a pass each;
   - then REFINE_STEPS bisection steps between the winner and the next larger grid ratio (which
     failed or was screened out) push the ratio further (two steps: a quarter of a grid step);
   - when a memory target exists and this group can reach it alone, the smallest ratio that
     reaches it is tried first ("just enough"): if it passes, it is taken and the run stops with
     the most accuracy left, rather than overshooting the target with a larger ratio.
   Ratios are fractions of the group's current width, removed by the engine's importance
   criterion (L2 by default, `--importance` for any other). A ratio that removes nothing (too
   small for a narrow group) or that the engine refuses counts as infeasible; ratios that round
   to the same width share one calibration pass.

4. Stop. As soon as the model's memory at `--precision` is within the budget, the run stops
   (constraints met). If every robust group has been visited and the budget is still not met,
   the best model found (the last one, which is within the accuracy limit) is returned with
   constraints_met false and the shortfall: bytes over the budget, and that as a fraction of the
   dense model's memory (the same unit as --target-saving). With no memory target, every robust
   group is compressed as far as the accuracy limit allows.

Constraints: --max-acc-drop L (default DEFAULT_MAX_ACC_DROP = 3 points), --target-saving s in
(0, 1) (budget = dense * (1 - s)) or --memory-budget B (bytes, units per spikeprune.units), both
at --precision fp32|fp16|int8. They are the run's one Constraints object (spikeprune.policy_api),
checked and resolved into one budget in bytes before the run starts, with the same rules for every
policy: a negative L, s outside (0, 1), a budget at or above the dense size, a budget below the
smallest model the groups allow (every group at its minimum width), or s and B naming budgets more
than 0.5% of the dense size apart are errors with the numbers (when they agree, the tighter one is
used). Memory is spikeprune.costs.memory_bytes at the chosen precision.

What was pruned is the model's PruningRecord: every accepted step is one prune call, and the
calls compose, so the record of the final model is against the dense model.

Resume: after each visited group (accepted or skipped) the accepted steps (group, ratio, kept
unit indices) and the visited groups are checkpointed atomically (RUN/steps/primesvt_progress.json);
a rerun replays the accepted steps from their kept indices -- exact whatever the importance
criterion, no search and no calibration pass -- and goes on from the next group.

Options (`spikeprune prune --policy primesvt`, the default policy): --robust-divisor K,
--robust-max-ratio R, --refine-steps N override the three constants above. The policy's
summary.json keys: "order" (groups in the order compressed), "steps" (per step: group, ratio,
requested_ratio, calib_top1, acc_drop, memory_bytes, memory_saved, reason, evaluations,
size_before, size_after), "shortfall" (null, or bytes / fraction / budget_bytes / memory_bytes),
"primesvt" (the settings, the ranking with each group's robustness verdict, skipped groups, cost);
plots/primesvt_trajectory.png is embedded in report.md with a PrimeSVT section.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..errors import SpikepruneError
from ..coupling import group_map
from ..coupling import groups as model_groups
from ..policy_api import (Constraints, Option, PolicyResult, PruneContext, ResumableStep, TrajectoryPoint, bisect,
                          plot_trajectory as plot_steps, register_policy)
from ..units import format_bytes

ROBUST_DIVISOR = 2.0
ROBUST_MAX_RATIO = 0.5
REFINE_STEPS = 2
_EPS = 1e-9


# ------------------------------------------------------------------------------------------------
# Ranking and robustness
# ------------------------------------------------------------------------------------------------
def rank_groups(groups: Iterable[Any]) -> list[Any]:
    """Groups by `memory_bytes` (fp32 bytes of the parameters that depend on them), largest first."""
    return sorted(groups, key=lambda g: (-int(g.memory_bytes), g.name))


def robust_threshold(max_acc_drop: float, divisor: float = ROBUST_DIVISOR) -> float:
    """The largest single-group drop (points) a robust group may show; see the module docstring."""
    if divisor <= 0:
        raise SpikepruneError(f"--robust-divisor must be positive (threshold = max-acc-drop / K), got {divisor:g}")
    return max_acc_drop / divisor


@dataclass
class Robustness:
    """Why a group is, or is not, a pruning target."""

    group: str
    robust: bool
    checked: list[tuple[float, float]]  # (ratio, single-group drop in points) that decided it
    worst_drop: float | None
    reason: str


def select_robust(table: Any, ranked: Sequence[str], threshold: float,
                  max_ratio: float = ROBUST_MAX_RATIO) -> list[Robustness]:
    """Judge every group of `ranked` (names, largest first) on the sensitivity table's rows.

    The ratios that count are every tested ratio <= max_ratio, or the smallest tested ratio when
    the grid has none that small. Returned in the order of `ranked`.
    """
    out = []
    for name in ranked:
        rows = sorted(((float(r["ratio"]), float(r["acc_drop"])) for r in table.for_group(name)), key=lambda x: x[0])
        if not rows:
            out.append(Robustness(name, False, [], None, "not in the sensitivity table"))
            continue
        checked = [x for x in rows if x[0] <= max_ratio + _EPS] or rows[:1]
        worst_ratio, worst = max(checked, key=lambda x: (x[1], -x[0]))
        upto = f"{checked[-1][0]:g}"
        if worst <= threshold + _EPS:
            why = f"drop <= {threshold:.2f} points at every tested ratio up to {upto} (worst {worst:.2f})"
        else:
            # Two facts: where the group first breaks the threshold, and how bad it gets.
            bad, bad_drop = next((r, d) for r, d in checked if d > threshold + _EPS)
            why = f"fails from ratio {bad:g} (drop {bad_drop:.2f} > {threshold:.2f})"
            if (worst_ratio, worst) != (bad, bad_drop):
                why += f"; worst drop {worst:.2f} at {worst_ratio:g}"
        out.append(Robustness(name, worst <= threshold + _EPS, checked, worst, why))
    return out


# ------------------------------------------------------------------------------------------------
# The sequential loop (pure: the pruning, memory and accuracy come in as callables)
# ------------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A robust group to visit, with its sensitivity grid: ratio -> single-group drop (points)."""

    group: str
    predicted: dict[float, float]


@dataclass
class Step:
    """One accepted compression: the cumulative model after it, as summary.json lists it."""

    group: str
    ratio: float  # fraction of the group's width at that moment that was removed (after rounding)
    requested_ratio: float  # the ratio the search asked the engine for
    calib_top1: float  # cumulative model, calibration split, fraction
    acc_drop: float  # points against the dense model
    memory_bytes: int  # cumulative model at the run's precision
    memory_saved: float  # fraction of the dense model's memory
    reason: str  # "largest feasible ratio" or "smallest ratio meeting the memory budget"
    evaluations: int  # calibration passes this group's search cost
    kept: list | None = None  # kept indices, when the engine reports them (for an exact replay)
    size_before: int | None = None
    size_after: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Progress:
    """Where the walk stands: what a checkpoint stores and a resumed run starts from."""

    model: Any
    steps: list[Step] = field(default_factory=list)
    visited: list[str] = field(default_factory=list)  # every group decided, accepted or skipped
    skipped: list[dict] = field(default_factory=list)  # {"group", "reason"}


@dataclass
class Outcome:
    model: Any
    steps: list[Step]
    skipped: list[dict]
    memory_bytes: int
    calib_top1: float
    met: bool  # the memory budget is met (True when there is none)
    stop_reason: str
    shortfall_bytes: int  # bytes over the budget (0 when met)
    shortfall_frac: float  # the same, as a fraction of the dense memory
    evaluations: int  # calibration passes spent by the search in this process
    surgeries: int


@dataclass
class _Trial:
    ratio: float
    model: Any
    memory_bytes: int
    top1: float | None = None
    kept: list | None = None


class _Search:
    """Searches one group's ratio on the current model; counts the calibration passes it spends."""

    def __init__(self, loop: "SequentialCompression", model: Any, target: Target, mem_now: int):
        self.loop, self.model, self.target, self.mem_now = loop, model, target, mem_now
        self.evaluations = 0
        self.grid = sorted(target.predicted)
        self.seen: dict = {}  # width (kept indices, or bytes) -> top-1: ratios that round alike cost one pass

    def prune(self, ratio: float) -> _Trial | None:
        """The model with `ratio` of the group removed; None when the engine refuses or nothing goes."""
        loop = self.loop
        loop.surgeries += 1
        try:
            pruned = loop.prune_fn(self.model, self.target.group, ratio)
        except SpikepruneError as e:  # e.g. a ratio that would empty the group: not a candidate
            loop.log(f"  {self.target.group} @ {ratio:.3f}: refused by the engine ({e})")
            return None
        model, kept = pruned if isinstance(pruned, tuple) else (pruned, None)
        mem = int(loop.memory_fn(model))
        if mem >= self.mem_now:  # the ratio rounds to zero channels for this group
            return None
        return _Trial(ratio, model, mem, kept=kept)

    def measure(self, t: _Trial) -> bool:
        """Measure the cumulative model's calibration top-1; True when it is within the limit."""
        key = tuple(t.kept) if t.kept is not None else t.memory_bytes
        again = key in self.seen
        if not again:
            self.evaluations += 1
            self.seen[key] = float(self.loop.accuracy_fn(t.model))
        t.top1 = self.seen[key]
        drop = self.loop.drop(t.top1)
        ok = drop <= self.loop.max_acc_drop + _EPS
        self.loop.log(f"  {self.target.group} @ {t.ratio:.3f}: memory {format_bytes(t.memory_bytes)}, "
                      f"calib top-1 {t.top1:.2%} (drop {drop:.2f}) -> {'ok' if ok else 'over the limit'}"
                      + (" (same width as a ratio already measured)" if again else ""))
        return ok

    def evaluate(self, ratio: float) -> tuple[_Trial | None, bool]:
        """(trial, feasible) for pruning `ratio` of the group; (None, False) when nothing goes."""
        t = self.prune(ratio)
        return (None, False) if t is None else (t, self.measure(t))

    def ratio_for_budget(self, budget: int) -> float | None:
        """The smallest ratio (to bisect_tol) whose memory is within `budget`, if the grid's top reaches it.

        Memory only shrinks as the ratio grows, so bisection on surgery + byte counting (no data
        pass) finds it.
        """
        hi = self.grid[-1]
        t = self.prune(hi)
        if t is None or t.memory_bytes > budget:
            return None

        def over(ratio: float) -> bool:
            t = self.prune(ratio)
            return t is None or t.memory_bytes > budget
        return bisect(0.0, hi, over, tol=self.loop.bisect_tol)[1]

    def run(self, budget: int | None) -> tuple[_Trial | None, str]:
        fail_above = None
        if budget is not None:
            need = self.ratio_for_budget(budget)
            if need is not None:
                t, ok = self.evaluate(need)
                if ok:
                    return t, "smallest ratio meeting the memory budget"
                fail_above = need
        best, fail_above, tried = self.largest_grid_ratio(fail_above)
        if best is None:
            return None, ("no tested ratio keeps the cumulative model within the accuracy limit"
                          if tried else "every grid ratio alone breaks the accuracy limit")
        return self.refine(best, fail_above), "largest feasible ratio"

    def largest_grid_ratio(self, fail_above: float | None) -> tuple[_Trial | None, float | None, bool]:
        """The largest grid ratio below `fail_above` whose single-group drop is within the limit and
        which keeps the cumulative model within it, tried from the largest down: (its trial or None,
        the smallest ratio known to fail, whether any ratio was a candidate)."""
        L = self.loop.max_acc_drop
        candidates = [r for r in reversed(self.grid) if self.target.predicted[r] <= L + _EPS
                      and (fail_above is None or r < fail_above)]
        for r in candidates:
            t, ok = self.evaluate(r)
            if t is None:
                continue  # nothing removed or refused at this ratio; a smaller one may still work
            if ok:
                return t, fail_above, True
            fail_above = r
        return None, fail_above, bool(candidates)

    def refine(self, best: _Trial, fail_above: float | None) -> _Trial:
        """Bisection between the winner and the next larger ratio known (or predicted) to fail; a
        grid top that passed is not extrapolated beyond."""
        bounds = ([fail_above] if fail_above is not None else []) + [r for r in self.grid if r > best.ratio + _EPS][:1]
        if not bounds:
            return best

        def ok(ratio: float) -> bool:
            nonlocal best
            t = self.prune(ratio)
            if t is None:
                return False
            if t.memory_bytes >= best.memory_bytes:
                return True  # rounds to the same width as the winner: no pass needed, look further up
            if self.measure(t):
                best = t
                return True
            return False
        bisect(float(best.ratio), float(min(bounds)), ok, steps=self.loop.refine)
        return best


class SequentialCompression:
    """PrimeSVT's walk over the robust groups, largest first (module docstring, items 3 and 4).

    prune_fn(model, group, ratio) -> new model, or (new model, kept indices); raises SpikepruneError
        when the engine refuses the ratio.
    memory_fn(model) -> bytes at the run's precision (cheap: no data).
    accuracy_fn(model) -> calibration top-1 as a fraction.
    size_fn(model, group) -> the group's current width (optional, for the summary).
    on_step(progress) is called after every group is decided (accepted or skipped): the
        checkpoint hook. A resumed run passes the Progress it restored as `start`.
    """

    def __init__(self, *, prune_fn: Callable, memory_fn: Callable, accuracy_fn: Callable,
                 dense_top1: float, dense_bytes: int, max_acc_drop: float, budget_bytes: int | None = None,
                 refine: int = REFINE_STEPS, bisect_tol: float = 1e-3, size_fn: Callable | None = None,
                 on_step: Callable | None = None, log: Callable = print):
        if refine < 0:
            raise SpikepruneError(f"refine steps must be >= 0, got {refine}")
        self.prune_fn, self.memory_fn, self.accuracy_fn, self.size_fn = prune_fn, memory_fn, accuracy_fn, size_fn
        self.dense_top1, self.dense_bytes = float(dense_top1), int(dense_bytes)
        self.max_acc_drop, self.budget = float(max_acc_drop), budget_bytes
        self.refine, self.bisect_tol = int(refine), float(bisect_tol)
        self.on_step, self.log = on_step, log
        self.surgeries = 0

    def drop(self, top1: float) -> float:
        return (self.dense_top1 - top1) * 100.0

    def met(self, mem: int) -> bool:
        return self.budget is None or mem <= self.budget

    def run(self, model: Any, targets: Sequence[Target], start: Progress | None = None) -> Outcome:
        prog = start or Progress(model)
        evaluations = 0
        mem = int(self.memory_fn(prog.model))
        top1 = prog.steps[-1].calib_top1 if prog.steps else self.dense_top1
        stop_reason = "every robust group visited"
        for target in targets:
            if self.budget is not None and mem <= self.budget:
                break
            if target.group in prog.visited:
                continue  # decided before a restart
            self.log(f"PrimeSVT: {target.group} (memory now {format_bytes(mem)})")
            size_before = self.size_fn(prog.model, target.group) if self.size_fn else None
            search = _Search(self, prog.model, target, mem)
            best, reason = search.run(self.budget)
            evaluations += search.evaluations
            if best is None:
                prog.skipped.append({"group": target.group, "reason": reason})
                self.log(f"  skipped: {reason}")
            else:
                prog.model, mem, top1 = best.model, best.memory_bytes, best.top1
                size_after = self.size_fn(prog.model, target.group) if self.size_fn else None
                actual = 1 - size_after / size_before if size_before else best.ratio
                step = Step(target.group, round(actual, 6), round(best.ratio, 6), top1, round(self.drop(top1), 4),
                            mem, 1 - mem / self.dense_bytes, reason, search.evaluations, best.kept, size_before,
                            size_after)
                prog.steps.append(step)
                self.log(f"  accepted: {step.ratio:.1%} of {target.group} removed ({reason}); memory {format_bytes(mem)} "
                         f"({step.memory_saved:.2%} saved), calib top-1 {top1:.2%}")
            prog.visited.append(target.group)
            if self.on_step:
                self.on_step(prog)
        if self.budget is not None and mem <= self.budget:
            stop_reason = "memory budget met"
        short = 0 if self.met(mem) else mem - self.budget
        return Outcome(prog.model, prog.steps, prog.skipped, mem, top1, self.met(mem), stop_reason,
                       short, short / self.dense_bytes, evaluations, self.surgeries)


# ------------------------------------------------------------------------------------------------
# The policy on a real model, inside a run (spikeprune prune --policy primesvt)
# ------------------------------------------------------------------------------------------------
CHECKPOINT = "primesvt_progress"  # RUN/steps/primesvt_progress.json


class _Pruner:
    """The loop's prune_fn on a real model: (model, group, ratio) -> (pruned model, kept indices).

    Scores are computed once per (model, group): every candidate ratio of one search ranks the
    same units, and taylor / firing scores cost a data pass. The kept indices are returned so a
    resumed run replays a step exactly, whatever the criterion.
    """

    def __init__(self, ctx: PruneContext):
        self.ctx = ctx
        self._model, self._group, self._scores = None, None, None

    def __call__(self, model, group: str, ratio: float):
        if self._model is not model or self._group != group:  # holds a reference: no id reuse
            self._model, self._group, self._scores = model, group, self.ctx.unit_scores(model, group)
        return self.ctx.cut(model, group, ratio, self._scores)


def _group_size(model, group: str) -> int:
    return group_map(model)[group].size


def _save_progress(step: ResumableStep, prog: Progress) -> None:
    """Checkpoint after each visited group (atomic JSON): what a killed run resumes from."""
    step.state.update(steps=[s.to_dict() for s in prog.steps], visited=list(prog.visited), skipped=list(prog.skipped))
    step.save()


def _restore(ctx: PruneContext, step: ResumableStep) -> Progress | None:
    """Replay the accepted steps of an interrupted run (exact: kept indices), or None."""
    if not step.resumed:
        return None
    steps = [Step(**s) for s in step.state["steps"]]
    model = ctx.replay(steps, lambda m, s: ctx.keep(m, s.group, s.kept), "PrimeSVT")
    if model is None:
        return None
    ctx.log(f"PrimeSVT: resumed after {len(step.state['visited'])} visited groups ({len(steps)} steps replayed)")
    return Progress(model, steps, list(step.state["visited"]), list(step.state["skipped"]))


def plot_trajectory(path, dense_bytes: int, dense_top1: float, steps: Sequence[Step], max_acc_drop: float,
                    budget_bytes: int | None, precision: str) -> None:
    """Memory against calibration top-1 after each step, numbered and labelled with its group."""
    plot_steps(path, [TrajectoryPoint(s.memory_bytes, s.calib_top1, f"{s.group} (-{s.ratio:.0%})") for s in steps],
               dense_bytes=dense_bytes, dense_top1=dense_top1, max_acc_drop=max_acc_drop, budget_bytes=budget_bytes,
               precision=precision, title="PrimeSVT compression trajectory (largest robust groups first)")


def _report_section(cons: Constraints, divisor: float, max_ratio: float, refine: int, threshold: float,
                    ranked: list, judged: list[Robustness], out: Outcome, dense_top1: float) -> str:
    """Markdown for report.md: the definitions used, the ranking, the steps, the outcome."""
    by = {j.group: j for j in judged}
    L = cons.max_acc_drop
    lines = [
        f"Limit {L:g} points of calibration top-1; memory counted at **{cons.precision}** "
        f"(dense {format_bytes(cons.dense_bytes)}; {format_bytes(cons.min_bytes)} if every group kept only its "
        "minimum width, the floor no pruning goes below); "
        + (f"budget {format_bytes(cons.budget_bytes)} ({cons.budget_bytes:,} bytes, a saving of "
           f"{cons.saving:.2%})." if cons.budget_bytes is not None else "no memory target: every robust group "
           "is compressed as far as the limit allows."),
        "",
        f"**Robust** means: pruned alone (sensitivity analysis, calibration split), the group loses at most "
        f"{threshold:.2f} points (= limit / {divisor:g}) at every tested ratio up to {max_ratio:g}. Robust groups "
        f"are compressed one after another, largest first; each gets the largest grid ratio (then {refine} bisection "
        "steps toward the next one) that keeps the *measured* calibration top-1 of the cumulative model within the "
        "limit, and the step that can reach the memory budget takes the smallest ratio that does.",
        "",
        "| rank | group | params | fp32 memory | robust | worst drop (points) | why |", "|---|---|---|---|---|---|---|"]
    for i, g in enumerate(ranked, 1):
        j = by[g.name]
        worst = "-" if j.worst_drop is None else f"{j.worst_drop:.2f}"
        lines.append(f"| {i} | {g.name} | {g.params:,} | {format_bytes(g.memory_bytes)} | {'yes' if j.robust else 'no'} "
                     f"| {worst} | {j.reason} |")
    lines += ["", "Compression steps (calibration split, cumulative model; width: the group's width before and after "
              "this step, after the steps above it; passes: the calibration passes, i.e. evaluations of a candidate "
              "model on the calibration split, this step's search spent):", ""]
    if out.steps:
        lines += ["| step | group | width | removed | calib top-1 | drop (points) | memory | saved | passes | why |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for i, s in enumerate(out.steps, 1):
            lines.append(f"| {i} | {s.group} | {s.size_before} -> {s.size_after} | {s.ratio:.1%} | {s.calib_top1:.2%} "
                         f"| {s.acc_drop:.2f} | {format_bytes(s.memory_bytes)} | {s.memory_saved:.2%} | {s.evaluations} "
                         f"| {s.reason} |")
    else:
        lines.append("No step was accepted: the model is returned unpruned.")
    for sk in out.skipped:
        lines.append(f"- skipped {sk['group']}: {sk['reason']}")
    lines.append("")
    if out.met and cons.budget_bytes is not None:
        lines.append(f"**Memory budget met** after {len(out.steps)} step(s): {format_bytes(out.memory_bytes)} "
                     f"<= {format_bytes(cons.budget_bytes)}.")
    elif not out.met:
        lines.append(f"**Memory budget not met.** Every robust group was compressed as far as the accuracy limit "
                     f"allows; the best feasible model needs {format_bytes(out.memory_bytes)}, "
                     f"**{out.shortfall_bytes:,} bytes ({format_bytes(out.shortfall_bytes)}) over the budget**, i.e. "
                     f"{out.shortfall_frac:.2%} of the dense model short of the {cons.saving:.2%} saving asked "
                     f"({1 - out.memory_bytes / cons.dense_bytes:.2%} reached). To get there: allow a larger "
                     "--max-acc-drop, count memory at a lower --precision, or fine-tune and prune again.")
    else:
        lines.append(f"No memory target: {1 - out.memory_bytes / cons.dense_bytes:.2%} saved within the limit.")
    lines.append(f"Search cost in this session: {out.evaluations} calibration passes and {out.surgeries} surgeries "
                 "(the passes column counts each accepted step's search, whichever session ran it; the groups tried "
                 "and not compressed cost passes too).")
    return "\n".join(lines)


OPTIONS = (
    Option("robust_divisor", float, ROBUST_DIVISOR, "a group is robust when its single-group drop stays <= "
           "max-acc-drop / K", valid=lambda k: k > 0, must="positive (threshold = max-acc-drop / K)", metavar="K"),
    Option("robust_max_ratio", float, ROBUST_MAX_RATIO, "robustness is judged on every tested ratio up to R",
           valid=lambda r: 0 < r < 1, must="a pruning ratio in (0, 1)", metavar="R"),
    Option("refine_steps", int, REFINE_STEPS, "bisection steps between grid ratios per group",
           valid=lambda n: n >= 0, must="0 or more"),
)


@register_policy("primesvt", options=OPTIONS,
                 help="PrimeSVT: compress the robust groups one after another, largest first, until the memory "
                      "target is met within the accuracy limit (the default policy)")
def primesvt(ctx: PruneContext) -> PolicyResult:
    """PrimeSVT (module docstring): rank, pick robust groups, compress them in order, stop at the target."""
    divisor, max_ratio, refine = (ctx.option(o.name) for o in OPTIONS)
    cons = ctx.constraints  # resolved against the dense model before the run started (policy_api)
    threshold = robust_threshold(cons.max_acc_drop, divisor)
    table = ctx.sensitivity()
    analysed = set(table.groups)
    ranked = [g for g in rank_groups(model_groups(ctx.model)) if g.name in analysed]
    judged = select_robust(table, [g.name for g in ranked], threshold, max_ratio)
    targets = [Target(j.group, {float(r["ratio"]): float(r["acc_drop"]) for r in table.for_group(j.group)})
               for j in judged if j.robust]
    ctx.log(f"PrimeSVT: {len(targets)} robust groups of {len(ranked)} (drop <= {threshold:.2f} points up to ratio "
            f"{max_ratio:g}), largest first: {', '.join(t.group for t in targets) or 'none'}")
    if not targets:
        ctx.log("PrimeSVT: no robust group: the model stays dense. A larger --max-acc-drop widens the choice")

    key = {"targets": [t.group for t in targets], "max_acc_drop": cons.max_acc_drop, "budget": cons.budget_bytes,
           "precision": cons.precision, "refine": refine, "importance": ctx.importance, "round_to": ctx.round_to}
    progress = ctx.resumable(CHECKPOINT, key, {"steps": [], "visited": [], "skipped": []})
    start = _restore(ctx, progress)
    loop = SequentialCompression(
        prune_fn=_Pruner(ctx), memory_fn=ctx.memory, accuracy_fn=ctx.calib_top1, dense_top1=ctx.dense_calib_top1,
        dense_bytes=cons.dense_bytes, max_acc_drop=cons.max_acc_drop, budget_bytes=cons.budget_bytes,
        refine=refine, size_fn=_group_size, on_step=lambda prog: _save_progress(progress, prog), log=ctx.log)
    out = loop.run(ctx.model, targets, start)  # each step is a prune call: out.model.pruning composes them
    if not out.met:
        ctx.log(f"PrimeSVT: memory budget not met: {out.shortfall_bytes:,} bytes ({out.shortfall_frac:.2%} of the "
                f"dense model) over {format_bytes(cons.budget_bytes)} with every robust group at its limit")

    steps = [{k: v for k, v in s.to_dict().items() if k != "kept"} for s in out.steps]
    dense_top1 = ctx.dense_calib_top1
    info = {
        "order": [s.group for s in out.steps],
        "steps": steps,
        "shortfall": None if out.met else {"bytes": out.shortfall_bytes, "fraction": out.shortfall_frac,
                                           "budget_bytes": cons.budget_bytes, "memory_bytes": out.memory_bytes},
        "primesvt": {
            "precision": cons.precision, "dense_bytes": cons.dense_bytes, "min_bytes": cons.min_bytes,
            "budget_bytes": cons.budget_bytes, "target_saving": cons.saving,
            "robust_threshold": threshold, "robust_divisor": divisor, "robust_max_ratio": max_ratio,
            "refine_steps": refine, "memory_met": out.met, "stop_reason": out.stop_reason,
            "ranking": [{"group": g.name, "params": g.params, "memory_bytes": g.memory_bytes,
                         "robust": j.robust, "worst_drop": j.worst_drop, "reason": j.reason}
                        for g, j in zip(ranked, judged)],
            "skipped": out.skipped, "evaluations": out.evaluations, "surgeries": out.surgeries,
        },
        "calib_top1": out.calib_top1,
        "tradeoff": {"PrimeSVT steps": [[0.0, dense_top1]] + [[s.memory_saved, s.calib_top1] for s in out.steps]},
        "plots": [("primesvt_trajectory.png",
                   lambda path: plot_trajectory(path, cons.dense_bytes, dense_top1, out.steps, cons.max_acc_drop,
                                                cons.budget_bytes, cons.precision),
                   "PrimeSVT: memory against calibration top-1 after each step, in the order the groups were compressed")],
        "report_sections": [("PrimeSVT", _report_section(cons, divisor, max_ratio, refine, threshold, ranked, judged,
                                                         out, dense_top1))],
    }
    return PolicyResult(out.model, info)
