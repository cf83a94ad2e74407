"""shrink: our policy. Small cuts, one at a time, each chosen by measuring every group's next cut
after re-estimating BatchNorm, until the accuracy limit or the memory budget stops it.

Why not the seed papers' way. PSViT and PrimeSVT decide from a table measured once on the dense
model, with each group pruned alone and its stale BatchNorm statistics kept. Both choices
understate what a group can give: a cut changes the statistics of every later layer, and a table
measured on the dense model says nothing about the model after ten other cuts. Both leave the
residual width alone when it looks costly in that table, yet it holds most of the memory.

The walk (every decision on the calibration split, BatchNorm statistics from training images):

1. Candidates. Every group of the model (residual, stem, attention, heads, MLP) has a next cut:
   the fewest units that save STEP of the current model's memory (a cut of equal bytes, so that
   groups are compared like with like), at most MAX_CUT of the group's current width and at least
   one unit (one channel per head for per-head groups, one head for a heads group); the units are
   chosen by the run's importance criterion (L2 by default) on the current model.
2. Measure after re-estimating BatchNorm. A candidate is the current model with that cut, whose
   BatchNorm running statistics are re-estimated on RECAL_IMAGES training images
   (spikeprune.training.recalibrate_batchnorm); its cost is the rise of the cross-entropy on
   SCREEN_IMAGES calibration images (a smooth measure: top-1 on a few hundred images moves in whole
   images), per byte it saves at the run's precision.
3. Take the cheapest cut per byte. Re-measuring every group after every step would cost a pass per
   group per step; the cost of a cut changes slowly, so each step re-measures only the FRESH
   groups whose last measured cost is lowest, and every REFRESH steps all of them ("lazy greedy").
4. Check the limit. The chosen cut's BatchNorm statistics are re-estimated again on
   CHECK_RECAL_IMAGES training images (fewer leave them noisy enough to cost accuracy by
   themselves), and its top-1 on the whole calibration split must stay within --max-acc-drop of
   the dense model's. A cut that breaks the limit is undone and that group's cuts are halved from
   then on (in bytes, and its next cut has at most half the units of the undone one); a group
   whose smallest cut breaks the limit is finished. When the screening images are the
   whole calibration split, candidates they already put over the limit are set aside unchecked.
5. Stop when the memory budget is met (constraints met; the cut that meets it is trimmed to the
   bytes still needed, so that a target is met, not overshot by up to a whole cut), when every
   group is finished (its smallest cut breaks the limit, or saves less than MIN_GAIN of the dense
   memory), or after MAX_STEPS steps. With no memory target the walk goes as far as the limit allows.

Limit after fine-tuning (`--limit-after-finetune`, with the run's `--finetune-epochs`): what users
deploy is the fine-tuned model, and fine-tuning wins back much of what pruning loses. The walk then
goes on to --walk-drop points (default 4 x the limit + 4) before fine-tuning; a probe replays the
first k cuts and distils PROBE_STEPS steps from the dense model (the run's fine-tuning learning
rate, batch size and distillation settings); the largest k whose calibration drop after the probe
is within the limit is found by bisection over k (about log2 of the number of cuts probes) and
handed to the run, whose fine-tuning and check follow (the run judges the limit on the fine-tuned
model). Probes are not checkpointed: a resumed run replays the walk and probes again. With a memory
target as well, the target says how far to cut: the walk goes to it (no limit before fine-tuning
unless --walk-drop), no probe runs (fewer cuts would miss the target), and the run's fine-tuning and
check judge the limit on that model.

The final model carries the re-estimated BatchNorm statistics (they are buffers in its weights
file; its pruning record gives the kept units). Options: --shrink-step, --shrink-fresh,
--shrink-refresh, --recal-images, --check-recal-images, --screen-images, --walk-drop, --probe-steps.

Resume: the accepted steps (group and kept unit indices) and each group's step size are
checkpointed after every step (RUN/steps/shrink_progress.json); a rerun replays them, exactly,
without a search, and goes on.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import asdict, dataclass, field

import torch

from ..coupling import group_map
from ..errors import SpikepruneError
from ..policy_api import (Option, PolicyResult, PruneContext, TrajectoryPoint, largest_within, minimum_kept,
                          plot_trajectory, register_policy)
from ..training import finetune, recalibrate_batchnorm
from ..units import format_bytes

STEP = 0.08  # of the current model's memory, per cut
MAX_CUT = 0.5  # of a group's current width, per cut
FRESH = 3  # groups re-measured per step
REFRESH = 4  # every REFRESH steps, all groups are re-measured
RECAL_IMAGES = 256
CHECK_RECAL_IMAGES = 1024
SCREEN_IMAGES = 512
MAX_STEPS = 200
PROBE_STEPS = 100  # distillation steps per probe with --limit-after-finetune
MIN_GAIN = 0.0025  # of the dense memory: a group whose next cut saves less is finished
CHECKPOINT = "shrink_progress"  # RUN/steps/shrink_progress.json
_EPS = 1e-9


@dataclass
class Cut:
    """One accepted cut, as summary.json and the report list it."""

    group: str
    size_before: int
    size_after: int
    memory_bytes: int  # the model after the cut, at the run's precision
    memory_saved: float  # fraction of the dense memory
    screen_loss: float  # cross-entropy on the screening images, after re-estimating BatchNorm
    calib_top1: float
    acc_drop: float  # points against the dense model
    cost_per_mb: float  # rise of the screening loss per MB (10^6 bytes) saved: what ranked it
    measured: int  # candidates measured to choose it
    kept: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    # PrimeSVT's trajectory plot reads these names
    @property
    def ratio(self) -> float:
        return 1 - self.size_after / self.size_before if self.size_before else 0.0


@dataclass
class _Candidate:
    group: str
    model: object
    kept: list
    memory_bytes: int
    loss: float
    top1: float  # on the screening images
    priority: float  # loss rise per byte saved


class _Walk:
    """The measuring machinery of one run: candidate cuts, BatchNorm re-estimation, screening."""

    def __init__(self, ctx: PruneContext, step: float, recal_images: int, screen_images: int, check_recal_images: int,
                 holdout: float = 0.0):
        self.ctx, self.step = ctx, step
        bs = min(ctx.batch_size, 128)
        # BatchNorm is re-estimated many times on the same training images: read them once
        self.recal = ctx.batches(ctx.sample("train", recal_images, ctx.seed), bs)
        self.recal_check = ctx.batches(ctx.sample("train", check_recal_images, ctx.seed + 2), bs)
        calib = ctx.calib
        # --holdout: the walk checks its cuts on one part of the calibration split and never sees the
        # other, which then confirms where it stopped (a walk checked ~100 times against the same images
        # keeps the cuts that happen to pass on them, and loses more on new images than the limit says).
        self.check, self.held = None, None
        if holdout > 0:
            n = len(calib)
            n_held = round(holdout * n)
            if not 1 <= n_held < n:
                raise SpikepruneError(f"--holdout {holdout:g} of a calibration split of {n} images leaves "
                                      f"{n_held} held out and {n - n_held} to check on: both need at least one")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed + 3)).tolist()
            calib = self.check = torch.utils.data.Subset(calib, sorted(perm[n_held:]))
            self.held = torch.utils.data.Subset(ctx.calib, sorted(perm[:n_held]))
        self.screen = ctx.sample("calib", screen_images, ctx.seed + 1, images=calib)
        self.screen_is_check = len(self.screen) == len(calib)  # every image the check uses
        self.dense_groups = group_map(ctx.model)
        self.order = _call_order(ctx.model, torch.stack([self.screen[i][0] for i in range(min(2, len(self.screen)))]),
                                 ctx.device)
        self.batchnorms = {n for n, m in ctx.model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        self.minimum = {k: len(v) for k, v in minimum_kept(list(self.dense_groups.values()), ctx.round_to).items()}
        self.candidates_measured = 0

    @property
    def recal_count(self) -> int:
        return sum(len(y) for _, y in self.recal)

    def check_top1(self, model) -> float:
        """Top-1 on the images the walk checks the limit on: the calibration split, or with --holdout
        the part of it not held out."""
        return self.ctx.calib_top1(model, self.check)

    def held_top1(self, model) -> float:
        """Top-1 on the held-out calibration images (--holdout), which the walk never sees."""
        return self.ctx.calib_top1(model, self.held)

    def screen_eval(self, model) -> tuple[float, float]:
        """(mean cross-entropy, top-1) on the screening images; counted in the run's cost."""
        r = self.ctx.evaluate(model, self.screen)
        return r["loss"], r["top1"]

    def downstream(self, group: str) -> set[str]:
        """The BatchNorm layers that run at or after the first layer `group` cuts: the only ones
        whose inputs a cut of it changes."""
        # Layers a family applies functionally (e.g. fused q/k/v weights) never show in the call
        # order; the group's BatchNorm right after them does. Nothing known: every layer.
        known = [self.order[m] for m in self.dense_groups[group].layers if m in self.order]
        first = min(known, default=0)
        return {name for name, i in self.order.items() if i >= first and name in self.batchnorms}

    def recalibrate(self, model, group: str, check: bool = False):
        """Re-estimate the BatchNorm layers downstream of a cut of `group` (upstream ones keep their
        statistics: re-measuring them would only add noise): on RECAL_IMAGES images for a
        candidate; on CHECK_RECAL_IMAGES for a model that is checked and may be returned (fewer
        images leave the statistics noisier: re-estimating every layer of the dense Fashion-MNIST
        model on 256 images costs it 0.7 calibration points, on 1,024 0.3)."""
        n = recalibrate_batchnorm(model, self.recal_check if check else self.recal, device=self.ctx.device,
                                  only=self.downstream(group))
        self.ctx.images_evaluated += n  # training images through the model: the same cost as calibration ones
        return model

    def min_units(self, group: str) -> int:
        """The smallest cut of a group: per-head groups lose the same number of channels in every head."""
        g = self.dense_groups[group]
        return g.heads if g.unit == "channel" and g.heads > 1 else 1

    def units(self, model, group: str, scale: float, cap: int | None = None, need: int | None = None) -> int:
        """How many units of `group` the next cut removes: the fewest that save `scale` x STEP of the
        current model's memory (estimated from the group's bytes per unit), at most MAX_CUT of its
        width and at most `cap` (half a cut of it that broke the limit), at least its smallest cut.
        `need`: bytes (at the run's precision) still over the memory budget; a cut saving more than
        that is trimmed to it, so that a target is met, not overshot by up to a whole cut."""
        g = group_map(model)[group]
        per_unit = g.memory_bytes / max(g.size, 1)  # fp32 bytes
        fp32_now = self.ctx.memory(model, "fp32")
        want = self.step * scale * fp32_now
        n = math.ceil(want / per_unit) if per_unit > 0 else 1
        n = min(n, int(MAX_CUT * g.size))
        if cap is not None:
            n = min(n, cap)
        low = self.min_units(group)
        n = max(low, (n // low) * low)
        if need is not None and per_unit > 0:
            enough = math.ceil(need * fp32_now / max(self.ctx.memory(model), 1) / per_unit)
            n = min(n, max(low, -(-enough // low) * low))  # whole smallest cuts, rounded up: the budget is met
        return n

    def cut(self, model, group: str, units: int):
        """(model with `units` units of `group` removed, kept indices), or None when it cannot go."""
        size = group_map(model)[group].size
        if size - units < self.minimum[group]:
            units = size - self.minimum[group]
        if units <= 0:
            return None
        try:
            pruned, kept = self.ctx.cut(model, group, units / size)
        except SpikepruneError:
            return None
        return None if len(kept) >= size else (pruned, kept)

    def candidate(self, model, mem_now: int, loss_now: float, group: str, units: int,
                  need: int | None = None) -> _Candidate | None:
        made = self.cut(model, group, units)
        if made is None:
            return None
        pruned, kept = made
        mem = self.ctx.memory(pruned)
        # a cut trimmed to the last bytes of a budget may save less than MIN_GAIN and still be worth it
        if mem_now - mem < min(MIN_GAIN * self.ctx.dense_memory, need if need is not None else math.inf):
            return None
        self.recalibrate(pruned, group)
        loss, top1 = self.screen_eval(pruned)
        self.candidates_measured += 1
        return _Candidate(group, pruned, kept, mem, loss, top1, (loss - loss_now) / (mem_now - mem))


def _call_order(model, images: torch.Tensor, device) -> dict[str, int]:
    """Module name -> the position of its first call in one forward pass (names survive surgery)."""
    order: dict[str, int] = {}

    def seen(name):
        def hook(module, args):  # returns None: the input goes on unchanged
            order.setdefault(name, len(order))
        return hook

    hooks = [m.register_forward_pre_hook(seen(name)) for name, m in model.named_modules() if name]
    try:
        with torch.inference_mode():
            model.to(torch.device(device))(images.to(torch.device(device)))
    finally:
        for h in hooks:
            h.remove()
    return order


def _apply_cut(ctx: PruneContext, walk: _Walk, model, cut: Cut):
    """`model` with an accepted cut replayed from its kept indices, BatchNorm re-estimated as the
    walk did when it accepted it (so a replay gives the same statistics)."""
    return walk.recalibrate(ctx.keep(model, cut.group, cut.kept), cut.group, check=True)


def _apply(ctx: PruneContext, walk: _Walk, cuts: list[Cut]):
    """The dense model with the first cuts applied (exact: kept indices)."""
    model = ctx.model
    for c in cuts:
        model = _apply_cut(ctx, walk, model, c)
    return model


def _confirm_on_held_out(ctx: PruneContext, walk: _Walk, cuts: list[Cut], L: float):
    """--holdout: the largest k such that the first k cuts stay within L points on the held-out
    calibration images (bisection over k). Returns (k, model, the checks made, the dense model's
    top-1 on the held-out images)."""
    dense = walk.held_top1(ctx.model)
    checks: dict[int, tuple] = {}

    def within(k: int) -> bool:
        model = _apply(ctx, walk, cuts[:k])
        top1 = walk.held_top1(model)
        drop = (dense - top1) * 100
        checks[k] = (model, {"k": k, "memory_saved": cuts[k - 1].memory_saved, "check_top1": cuts[k - 1].calib_top1,
                             "held_out_top1": top1, "acc_drop": round(drop, 4), "ok": drop <= L + _EPS})
        ctx.log(f"shrink: the first {k} cuts ({cuts[k - 1].memory_saved:.2%} saved) on the held-out images: top-1 "
                f"{top1:.2%} (drop {drop:.2f}) -> {'within' if drop <= L + _EPS else 'over'} the limit")
        return drop <= L + _EPS

    k = largest_within(len(cuts), within)
    model = checks[k][0] if k in checks else _apply(ctx, walk, cuts[:k])
    return k, model, [c[1] for _, c in sorted(checks.items())], dense


def _choose_by_distillation(ctx: PruneContext, walk: _Walk, cuts: list[Cut], L: float, steps: int):
    """--limit-after-finetune: the largest k such that the first k cuts, distilled `steps` steps from
    the dense model, stay within L points on the calibration split (with --holdout: on its held-out
    images) (bisection over k; k = 0, the dense model, always does). Returns (model, memory, calib
    top-1, probes)."""
    ft = ctx.finetuning  # the run's fine-tuning: the probes distil as it will
    train = ctx.dataset("train", augment=True)
    probes: dict[int, tuple] = {}
    dense_held = walk.held_top1(ctx.model) if walk.held is not None else None

    def probe(k: int) -> bool:
        model = _apply(ctx, walk, cuts[:k])
        before = cuts[k - 1].calib_top1
        distilled, _ = finetune(copy.deepcopy(model), train, 1, teacher=ctx.model, kd_weight=ft.kd_weight,
                                kd_temperature=ft.kd_temperature, lr=ft.lr, batch_size=ft.batch_size,
                                max_steps_per_epoch=steps, device=ctx.device, seed=ctx.seed, progress=False)
        distilled.eval()
        distilled.pruning = model.pruning
        top1 = ctx.calib_top1(distilled)
        drop = ctx.acc_drop(top1) if dense_held is None else (dense_held - walk.held_top1(distilled)) * 100
        ok = drop <= L + _EPS
        probes[k] = (distilled, top1, {"k": k, "memory_saved": cuts[k - 1].memory_saved, "calib_top1_before": before,
                                       "calib_top1": top1, "acc_drop": round(drop, 4), "ok": ok})
        ctx.log(f"shrink: probe k={k} ({cuts[k - 1].memory_saved:.2%} saved): calib top-1 {before:.2%} -> {top1:.2%} "
                f"after {steps} distillation steps (drop {drop:.2f}) -> {'within' if ok else 'over'} the limit")
        return ok

    lo = largest_within(len(cuts), probe)
    table = [p[2] for p in probes.values()]
    if lo == 0:
        ctx.log("shrink: no probe stays within the limit after short distillation: the model stays dense")
        return ctx.model, ctx.memory(ctx.model), ctx.dense_calib_top1, table
    model, top1, _ = probes[lo]
    ctx.log(f"shrink: after-fine-tuning choice: the first {lo} of {len(cuts)} cuts ({cuts[lo - 1].memory_saved:.2%} saved)")
    return model, ctx.memory(model), top1, table


def plot_walk(path, dense_bytes: int, dense_top1: float, cuts: list[Cut], max_acc_drop: float,
              budget_bytes: int | None, precision: str) -> None:
    plot_trajectory(path, [TrajectoryPoint(c.memory_bytes, c.calib_top1, c.group) for c in cuts],
                    dense_bytes=dense_bytes, dense_top1=dense_top1, max_acc_drop=max_acc_drop,
                    budget_bytes=budget_bytes, precision=precision,
                    title="shrink: one cut at a time, the cheapest per byte",
                    series="after each cut (BatchNorm re-estimated)", color="tab:purple", key_title="cut")


def _report(ctx: PruneContext, cuts: list[Cut], rejected: list[dict], settings: dict, stop: str, top1: float,
            mem: int, walk: _Walk, walk_L: float, probes: list[dict] | None, held: dict | None = None) -> str:
    c = ctx.constraints
    lines = [
        f"Limit {c.max_acc_drop:g} points of calibration top-1; memory at **{c.precision}** (dense "
        f"{format_bytes(c.dense_bytes)})" + (f"; budget {format_bytes(c.budget_bytes)}." if c.budget_bytes else
                                             "; no memory target: as far as the limit allows."),
        "",
        f"How it chose: every group's next cut (the fewest units saving {settings['step']:.0%} of the current "
        f"memory, at most {MAX_CUT:.0%} of the group, units ranked by "
        f"{ctx.importance}) is tried on the current model; BatchNorm statistics are re-estimated on "
        f"{settings['recal_images']} training images; the cut whose cross-entropy on {settings['screen_images']} "
        "calibration images rises least per byte saved is taken, if "
        + ("the whole calibration split stays" if held is None else
           f"the {1 - settings['holdout']:.0%} of the calibration split not held out stays")
        + " within the limit. A cut that breaks it is undone and that group's next cut halved. The cut that meets a memory "
        "target is trimmed to the bytes still needed. "
        f"Each step re-measures the {settings['fresh']} cheapest groups, all of them every {settings['refresh']} steps.",
        "",
        f"**Stopped: {stop}.** "
        + (f"{len(cuts)} cuts" if held is None or held["kept_cuts"] == len(cuts) else
           f"{held['kept_cuts']} of the walk's {len(cuts)} cuts kept")
        + f"; {1 - mem / c.dense_bytes:.2%} of the memory saved "
        f"({format_bytes(mem)}), calibration top-1 {top1:.2%}.",
        "",
    ]
    if c.budget_bytes is not None and mem > c.budget_bytes:
        lines += [f"**Memory budget not met:** {mem - c.budget_bytes:,} bytes ({format_bytes(mem - c.budget_bytes)}) "
                  f"over it, {(mem - c.budget_bytes) / c.dense_bytes:.2%} of the dense model short. Every further cut "
                  "breaks the accuracy limit: allow a larger --max-acc-drop, count memory at a lower --precision, or "
                  "fine-tune and prune again.", ""]
    lines += _cuts_lines(cuts, walk, held)
    if rejected:
        lines += ["", "Cuts undone because they broke the limit (the group's cuts halved, or it was finished): "
                  + ", ".join(f"{r['group']} at step {r['at_step']} (drop {r['acc_drop']:.2f})" for r in rejected) + "."]
    if held is not None:
        lines += _held_lines(held, settings, len(cuts), top1)
    lines += _after_finetune_lines(ctx, walk, walk_L, probes, settings)
    lines += ["", f"Search cost: {walk.candidates_measured} candidates measured (over every session of the run), each one BatchNorm "
                  f"re-estimation ({settings['recal_images']} images) and one screening pass."]
    return "\n".join(lines)


def _cuts_lines(cuts: list[Cut], walk: _Walk, held: dict | None) -> list[str]:
    """Where the memory came from, by group, and every accepted cut."""
    if not cuts:
        return []
    by_group: dict[str, list[Cut]] = {}
    for cut in cuts:
        by_group.setdefault(cut.group, []).append(cut)
    lines = ["Where the memory came from:", "", "| group | dense width | final width | cuts |", "|---|---|---|---|"]
    for g, cs in sorted(by_group.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {g} | {walk.dense_groups[g].size} | {cs[-1].size_after} | {len(cs)} |")
    lines += ["", f"| cut | group | width | loss rise per MB | {'calib' if held is None else 'checked'} top-1 | drop "
                  "| memory | saved |",
              "|---|---|---|---|---|---|---|---|"]
    for i, cut in enumerate(cuts, 1):
        lines.append(f"| {i} | {cut.group} | {cut.size_before} -> {cut.size_after} | {cut.cost_per_mb:.4f} "
                     f"| {cut.calib_top1:.2%} | {cut.acc_drop:.2f} | {format_bytes(cut.memory_bytes)} "
                     f"| {cut.memory_saved:.2%} |")
    return lines


def _held_lines(held: dict, settings: dict, n_cuts: int, top1: float) -> list[str]:
    lines = ["", f"**Held out (--holdout {settings['holdout']:g}).** {held['images']:,} calibration images took "
             "no part in the walk, so a cut that passed the check by luck on the others is found out on them. "
             f"The walk's result is confirmed on them (dense top-1 there {held['dense_top1']:.2%}); "
             "where it breaks the limit there, the largest number of its first cuts that holds it is found by "
             f"bisection: **{held['kept_cuts']} of {n_cuts} cuts kept**, calibration top-1 {top1:.2%} on the "
             "whole split.", "", "| first k cuts | memory saved | top-1 checked | top-1 held out | drop held out "
             "| within |", "|---|---|---|---|---|---|"]
    for ch in held["checks"]:
        lines.append(f"| {ch['k']} | {ch['memory_saved']:.2%} | {ch['check_top1']:.2%} | {ch['held_out_top1']:.2%} "
                     f"| {ch['acc_drop']:.2f} | {'yes' if ch['ok'] else 'no'} |")
    return lines


def _after_finetune_lines(ctx: PruneContext, walk: _Walk, walk_L: float, probes: list[dict] | None,
                          settings: dict) -> list[str]:
    if ctx.limit_after_finetune and probes is None:
        return ["", f"**Limit after fine-tuning, with a memory target.** The walk went to the target (limit before "
                f"fine-tuning: {walk_L:g} points); fewer cuts would miss it, so no probe chose among them: the run's "
                "fine-tuning follows and its check judges the limit on the fine-tuned model."]
    if probes is None:
        return []
    lines = ["", f"**Limit after fine-tuning.** The walk went on to a drop of {walk_L:g} points before "
             f"fine-tuning; each probe below replays the first k cuts and distils {settings['probe_steps']} steps "
             "from the dense model, and the largest k whose calibration drop after that is within the limit "
             "(bisection over k) is the model handed to the run's fine-tuning"
             + (" (the drop judged on the held-out calibration images)." if walk.held is not None else "."), "",
             "| k cuts | memory saved | calib top-1 before | after short distillation | drop | within |",
             "|---|---|---|---|---|---|"]
    for pr in sorted(probes, key=lambda p: p["k"]):
        lines.append(f"| {pr['k']} | {pr['memory_saved']:.2%} | {pr['calib_top1_before']:.2%} "
                     f"| {pr['calib_top1']:.2%} | {pr['acc_drop']:.2f} | {'yes' if pr['ok'] else 'no'} |")
    return lines


_IMAGES = "a whole number >= 1"
OPTIONS = (
    Option("shrink_step", float, STEP, "shrink: each cut saves F of the current model's memory",
           valid=lambda f: 0 < f < 1, must="a fraction of a group's width in (0, 1)"),
    Option("shrink_fresh", int, FRESH, "shrink: groups re-measured per step", valid=lambda n: n >= 1, must=_IMAGES),
    Option("shrink_refresh", int, REFRESH, "shrink: re-measure every group every N steps", valid=lambda n: n >= 1,
           must=_IMAGES),
    Option("recal_images", int, RECAL_IMAGES, "shrink: training images for re-estimating BatchNorm after a cut",
           valid=lambda n: n >= 1, must=_IMAGES),
    Option("check_recal_images", int, CHECK_RECAL_IMAGES, "shrink: training images for re-estimating BatchNorm of "
           "the cut that is checked and kept", valid=lambda n: n >= 1, must=_IMAGES),
    Option("walk_drop", float, None, "shrink with --limit-after-finetune: how far (calibration points, before "
           "fine-tuning) the walk may go before the probes choose (default 4 x max-acc-drop + 4)",
           valid=lambda w: 0 <= w <= 100, must="in calibration top-1 points (0-100)", metavar="POINTS"),
    Option("probe_steps", int, PROBE_STEPS, "shrink with --limit-after-finetune: distillation steps per probe",
           valid=lambda n: n >= 1, must=_IMAGES),
    Option("holdout", float, 0.0, "shrink: hold out F of the calibration split from the walk; where the walk's "
           "result breaks the limit on those images, it is cut back until it holds (0: none held out)",
           valid=lambda f: 0 <= f < 1, must="a fraction of the calibration split in [0, 1)"),
    Option("screen_images", int, SCREEN_IMAGES, "shrink: calibration images candidates are compared on",
           valid=lambda n: n >= 1, must=_IMAGES),
)


def _settings(ctx: PruneContext) -> dict:
    """The walk's settings (its declared options, checked before the run started), as progress keys them."""
    o = ctx.option
    s = {"step": o("shrink_step"), "fresh": o("shrink_fresh"), "refresh": o("shrink_refresh"),
         "recal_images": o("recal_images"), "screen_images": o("screen_images"),
         "check_recal_images": o("check_recal_images"), "probe_steps": o("probe_steps"), "walk_drop": o("walk_drop")}
    if o("holdout") > 0:  # only when used: progress saved without it keeps its key
        s["holdout"] = o("holdout")
    return s


def _walk_limit(S: dict, L: float, after: bool, budget: int | None) -> float:
    """How far (points) the walk may go before fine-tuning. With the limit on the fine-tuned model,
    further than the limit (fine-tuning recovers part of the loss; short distillation probes then
    choose how far to keep); with a memory target as well, the target says how far to cut and the
    run's fine-tuning and check judge the limit: no limit before fine-tuning unless --walk-drop."""
    if not after:
        return L
    if S["walk_drop"] is not None:
        return S["walk_drop"]
    return 100.0 if budget is not None else min(100.0, 4 * L + 4)


def _check(options: dict, model) -> None:
    if not options.get("limit_after_finetune"):  # set by the run (policy_api: after_finetune policies)
        given = [f"--{k.replace('_', '-')}" for k in ("walk_drop", "probe_steps") if options.get(k) is not None]
        if given:
            raise SpikepruneError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} with "
                                  "--limit-after-finetune (the walk past the "
                                  "limit and the probes that fine-tune it); add it, or drop them")


@dataclass
class _Greedy:
    """The lazy greedy walk (module docstring, 1-5) and the progress a resumed run replays."""

    ctx: PruneContext
    walk: _Walk
    S: dict
    names: list[str]
    walk_L: float
    dense_top1: float  # on the images the walk checks the limit on
    key: dict
    cuts: list[Cut] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    scale: dict = field(default_factory=dict)  # halved for a group each time its cut breaks the limit
    # A group's next cut is at most half the units of its last cut that broke the limit: halving the
    # scale alone changes nothing while MAX_CUT, not the scale, sizes the cut.
    cap: dict = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    steps_without_cut: int = 0
    stale: dict = field(default_factory=dict)  # group -> loss rise per byte of its cut when last measured

    def __post_init__(self):
        self.scale = {n: 1.0 for n in self.names}
        self.progress = self.ctx.resumable(CHECKPOINT, self.key, {})
        self.model = self.ctx.model
        if self.progress.resumed:
            self._restore(self.progress.state)
        self.dense_loss, self.dense_screen_top1 = self.walk.screen_eval(self.ctx.model)
        self.loss_now = self.cuts[-1].screen_loss if self.cuts else self.dense_loss
        self.mem = self.ctx.memory(self.model)
        self.top1 = self.cuts[-1].calib_top1 if self.cuts else self.dense_top1

    def _restore(self, saved: dict) -> None:
        cuts = [Cut(**c) for c in saved["cuts"]]
        model = self.ctx.replay(cuts, lambda m, c: _apply_cut(self.ctx, self.walk, m, c), "shrink")
        if model is None:
            return
        self.ctx.log(f"shrink: resumed after {len(cuts)} accepted cuts")
        self.model, self.cuts = model, cuts
        self.rejected, self.scale, self.finished, self.cap = saved["rejected"], saved["scale"], saved["finished"], \
            saved["cap"]
        self.steps_without_cut = saved["steps_without_cut"]
        self.walk.candidates_measured = int(saved.get("candidates_measured", 0))  # the earlier sessions' too
        self.stale.update({g: (math.inf if v is None else v) for g, v in saved["stale"].items()})

    def save(self) -> None:
        self.progress.state.update(
            cuts=[c.to_dict() for c in self.cuts], rejected=self.rejected, scale=self.scale, cap=self.cap,
            finished=self.finished, steps_without_cut=self.steps_without_cut,
            candidates_measured=self.walk.candidates_measured,
            # the lazy greedy's last measured costs (None: infinite), so a resumed run measures the
            # same groups as an uninterrupted one would
            stale={g: (None if math.isinf(v) else v) for g, v in self.stale.items()})
        self.progress.save()

    def reject(self, group: str, cand: _Candidate, drop: float, step: int) -> None:
        """A cut that breaks the limit: undone; the group's cuts halve, or it is finished."""
        before, after = group_map(self.model)[group].size, group_map(cand.model)[group].size
        self.rejected.append({"group": group, "at_step": step + 1, "acc_drop": round(drop, 4), "units": before - after})
        low = self.walk.min_units(group)
        half = (before - after) // 2 // low * low  # whole smallest cuts
        if half < low:
            self.finished.append(group)  # even its smallest cut breaks the limit
            self.stale.pop(group, None)
            self.ctx.log(f"shrink: cutting {group} {before} -> {after} breaks the limit (drop {drop:.2f}); it is "
                         "finished")
        else:
            self.scale[group] /= 2
            self.cap[group] = half
            self.stale[group] = math.inf  # measured again at the next refresh
            self.ctx.log(f"shrink: cutting {group} {before} -> {after} breaks the limit (drop {drop:.2f}); its cuts "
                         "halve")

    def stop_reason(self, step: int, budget: int | None) -> str | None:
        if step >= MAX_STEPS:
            return f"reached {MAX_STEPS} steps"
        if budget is not None and self.mem <= budget:
            return "memory budget met"
        if not [n for n in self.names if n not in self.finished]:
            return "every group is at its limit (a smaller cut breaks the accuracy limit or nothing is left)"
        return None

    def candidates(self, step: int, budget: int | None) -> tuple[list[_Candidate], int]:
        """This step's candidates: the FRESH groups last measured cheapest (every group every REFRESH
        steps), each with its next cut measured; (the candidates, how many groups were measured)."""
        live = [n for n in self.names if n not in self.finished]
        if not self.stale or step % self.S["refresh"] == 0:
            todo = live
        else:
            todo = sorted(live, key=lambda n: (self.stale.get(n, -math.inf), n))[:self.S["fresh"]]
        found = []
        need = None if budget is None else self.mem - budget  # bytes still over the budget
        for n in todo:
            cand = self.walk.candidate(self.model, self.mem, self.loss_now, n,
                                       self.walk.units(self.model, n, self.scale[n], self.cap.get(n), need), need)
            if cand is None:  # nothing left to cut, or too little to be worth a pass
                self.finished.append(n)
                self.stale.pop(n, None)
                continue
            # When the screening images are the whole calibration split, a candidate they already put
            # over the limit is not worth a check (a subset is too noisy to reject anything: on 512
            # images one standard error is over a point).
            screen_drop = (self.dense_screen_top1 - cand.top1) * 100
            if self.walk.screen_is_check and screen_drop > self.walk_L + _EPS:
                self.reject(n, cand, screen_drop, step)
                continue
            self.stale[n] = cand.priority
            found.append(cand)
        return found, len(todo)

    def take(self, best: _Candidate, measured: int, step: int) -> None:
        """Check the cheapest candidate against the limit: accept it, or undo it."""
        size_before = group_map(self.model)[best.group].size
        self.walk.recalibrate(best.model, best.group, check=True)  # the statistics it is checked and returned with
        cal = self.walk.check_top1(best.model)
        drop = (self.dense_top1 - cal) * 100
        if drop > self.walk_L + _EPS:
            self.reject(best.group, best, drop, step)
            self.steps_without_cut += 1
            return
        self.model, self.mem, self.loss_now, self.top1 = best.model, best.memory_bytes, best.loss, cal
        size_after = group_map(self.model)[best.group].size
        dense_bytes = self.ctx.constraints.dense_bytes
        cut = Cut(best.group, size_before, size_after, self.mem, 1 - self.mem / dense_bytes, best.loss, cal,
                  round(drop, 4), best.priority * 1e6, measured, best.kept)
        self.cuts.append(cut)
        self.stale.pop(best.group, None)  # its next cut starts from a new width: measure it again
        self.ctx.log(f"shrink: cut {len(self.cuts)}: {best.group} {size_before} -> {size_after}; memory "
                     f"{format_bytes(self.mem)} ({cut.memory_saved:.2%} saved), calib top-1 {cal:.2%} (drop {drop:.2f})")

    def run(self, budget: int | None) -> str:
        """Walk until a stop; returns why it stopped."""
        while True:
            step = len(self.cuts) + self.steps_without_cut
            stop = self.stop_reason(step, budget)
            if stop is not None:
                return stop
            found, measured = self.candidates(step, budget)
            if not found:
                self.steps_without_cut += 1
            else:
                self.take(min(found, key=lambda c: (c.priority, c.group)), measured, step)
            self.save()


@register_policy("shrink", options=OPTIONS, after_finetune=True, check=_check,
                 help="ours: one small cut at a time, each group's next cut measured after re-estimating "
                      "BatchNorm, the cheapest per byte taken, until the accuracy limit or memory budget")
def shrink(ctx: PruneContext) -> PolicyResult:
    """shrink (module docstring)."""
    S = _settings(ctx)
    cons = ctx.constraints
    L, budget, after = cons.max_acc_drop, cons.budget_bytes, ctx.limit_after_finetune
    walk_L = _walk_limit(S, L, after, budget)
    walk = _Walk(ctx, S["step"], S["recal_images"], S["screen_images"], S["check_recal_images"], S.get("holdout", 0.0))
    dense_top1 = ctx.dense_calib_top1 if walk.check is None else walk.check_top1(ctx.model)  # on what the walk checks
    patterns = [p.strip() for p in ctx.groups.split(",") if p.strip()]
    names = [n for n in walk.dense_groups if any(fnmatch.fnmatch(n, p) for p in patterns)]  # --groups
    # "walk": the version of the walk's rules; progress saved under other rules starts afresh
    key = {"walk": 2, "settings": S, "max_acc_drop": L, "walk_drop": walk_L, "budget": budget,
           "precision": cons.precision, "importance": ctx.importance, "round_to": ctx.round_to, "groups": names}
    g = _Greedy(ctx, walk, S, names, walk_L, dense_top1, key)
    ctx.log(f"shrink: {len(names)} groups, each cut saving about {S['step']:.0%} of the memory, BatchNorm re-estimated on "
            f"{walk.recal_count} training images after each")
    stop = g.run(budget)
    cuts, mem, top1 = g.cuts, g.mem, g.top1
    ctx.log(f"shrink: stopped ({stop}): {len(cuts)} cuts, {1 - mem / cons.dense_bytes:.2%} saved, calib top-1 "
            f"{top1:.2%}; {walk.candidates_measured} candidates measured")
    model, probes, held = g.model, None, None
    if after and budget is not None and mem <= budget:
        # Fewer cuts would miss the target: nothing is left to choose. The run fine-tunes this model
        # and judges the limit on it (a model that breaks it is reported as such).
        ctx.log("shrink: the memory target is met; the run's fine-tuning and check judge the limit on this model")
    elif after:
        model, mem, top1, probes = _choose_by_distillation(ctx, walk, cuts, L, S["probe_steps"])
    elif walk.held is not None:
        model, mem, top1, held, stop = _cut_back(ctx, walk, cuts, L, stop)
    met = budget is None or mem <= budget
    info = {
        "shrink": {**S, "stop_reason": stop, "memory_met": met, "candidates_measured": walk.candidates_measured,
                   "cuts": [{k: v for k, v in c.to_dict().items() if k != "kept"} for c in cuts],
                   "rejected": g.rejected, "dense_screen_loss": g.dense_loss, "dense_screen_top1": g.dense_screen_top1,
                   "bn_recalibrated_on": f"{walk.recal_count} training images",
                   "limit_after_finetune": after, "walk_drop": walk_L, "probes": probes, "held_out": held},
        "shortfall": None if met else {"bytes": mem - budget, "fraction": (mem - budget) / cons.dense_bytes,
                                       "budget_bytes": budget, "memory_bytes": mem},
        "calib_top1": top1,
        "tradeoff": {"shrink cuts": [[0.0, dense_top1]] + [[c.memory_saved, c.calib_top1] for c in cuts]},
        "plots": [("shrink_walk.png",
                   lambda path: plot_walk(path, cons.dense_bytes, dense_top1, cuts, L, budget, cons.precision),
                   "shrink: memory against calibration top-1 after each cut")],
        "report_sections": [("shrink", _report(ctx, cuts, g.rejected, S, stop, top1, mem, walk, walk_L, probes, held))],
    }
    return PolicyResult(model, info)


def _cut_back(ctx: PruneContext, walk: _Walk, cuts: list[Cut], L: float, stop: str):
    """--holdout: the walk's first cuts that hold the limit on the held-out images. Returns (model,
    memory, calibration top-1 on the whole split, what the report says of the held-out check, stop)."""
    k, model, checks, dense_held = _confirm_on_held_out(ctx, walk, cuts, L)
    mem, top1 = ctx.memory(model), ctx.calib_top1(model)  # the whole calibration split, as the run reports it
    held = {"images": len(walk.held), "dense_top1": dense_held, "kept_cuts": k, "checks": checks}
    if k < len(cuts):
        stop = f"the walk: {stop}; then cut back to its first {k} cuts, which hold the limit on the held-out images"
    ctx.log(f"shrink: kept the first {k} of {len(cuts)} cuts ({1 - mem / ctx.constraints.dense_bytes:.2%} saved), "
            f"calib top-1 {top1:.2%} on the whole split")
    return model, mem, top1, held, stop
