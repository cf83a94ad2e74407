"""bitshrink: widths and weight bit widths chosen together under one byte budget.

The budget counts the bytes of the exported file (`--precision file-int4` or another file-*
precision, with --memory-budget / --target-saving; spikeprune.precision): packed int4 values, int8
values, per-channel scales, zero points, BatchNorm folded. The policy, on the calibration split:

 1. Bit-width sensitivity of the dense model: each interior weight layer alone at int4 (the rest
    fp32), its calibration top-1 (--bit-images images), checkpointed. The first conv and the head
    stay at int8 (the image and the class scores are where 4 bits hurt most).
 2. Candidate widths (--bit-widths: walk, uniform, or both, the default):
    - walk: shrink's walk (spikeprune.policies.shrink: one small cut at a time, the cheapest per
      byte after re-estimating BatchNorm) down to the budget, the bytes counted as the file at int4
      (first conv and head at int8). Widths chosen this way keep the groups that matter wide and
      cut the rest deeper than a uniform ratio can.
    - uniform: for each width ratio r of the grid (--bit-ratios; every channel group loses r of its
      channels, as the `uniform` policy does), the --bit-candidates smallest ratios whose file
      fits; BatchNorm statistics re-estimated on --bit-recal-images training images (a uniform
      cut leaves them describing the wider model).
    Every candidate starts from every interior layer at int4; the spare bytes under the budget go
    to int8 for the layers that lose most at int4 per byte int8 costs them (from step 1), then to
    the others, while the file still fits.
 3. Each candidate is scored by its calibration top-1 as the fake-quantised model (weights on their
    grid, spikeprune.quantise); with --limit-after-finetune after a short quantisation-aware
    distillation probe from the dense fp32 model (--bit-probe-steps steps: the straight-through
    estimator on the weight rounding, the LIF surrogate gradients unchanged). The best is taken.

The model handed back carries its plan (`model.weight_precision`, saved in config.json): the run's
fine-tuning is then quantisation-aware with the same estimator (and distils with --kd), the run
measures the fake-quantised model, and `spikeprune export RUN/model` writes that plan as int4 / int8
DequantizeLinear weights. A budget that the narrowest ratio of the grid cannot meet at int4 is said
in the report (the best the grid reaches), as for every policy.
"""
from __future__ import annotations

import copy
import math

from torch.utils.data import Subset

from ..errors import SpikepruneError
from ..policy_api import Option, PolicyResult, PruneContext, get_policy, register_policy
from ..precision import BITS, FILE_PREFIX, file_weight_bytes, layer_bytes, weight_layers
from ..quantise import apply_plan, quantisation_aware
from ..ratios import parse_ratios, uniform_ratio_map
from ..data import make_loader
from ..training import finetune, recalibrate_batchnorm
from ..units import format_bytes

RATIOS = tuple(round(0.05 * i, 2) for i in range(19))  # 0 .. 0.9
CANDIDATES = 3
BIT_IMAGES = 200
PROBE_STEPS = 30
RECAL_IMAGES = 512  # training images for re-estimating BatchNorm after a uniform cut


WIDTHS = ("both", "walk", "uniform")
_WHOLE = "a whole number >= 1"


def _valid_ratios(text: str) -> bool:
    parse_ratios(text, "--bit-ratios")  # raises its own message naming the bad ratio
    return True


OPTIONS = (
    Option("bit_widths", str, "both", "bitshrink: how the widths are chosen: walk (shrink's walk to the budget), "
           "uniform (the ratio grid) or both, scored against each other", valid=lambda w: w in WIDTHS,
           must="one of " + ", ".join(WIDTHS), metavar="HOW"),
    Option("bit_ratios", str, ",".join(f"{r:g}" for r in RATIOS), "bitshrink: uniform width ratios tried "
           "(default 0,0.05,...,0.9)", valid=_valid_ratios, metavar="R,R,..."),
    Option("bit_candidates", int, CANDIDATES, "bitshrink: the N smallest fitting uniform ratios are scored",
           valid=lambda n: n >= 1, must=_WHOLE),
    Option("bit_images", int, BIT_IMAGES, "bitshrink: calibration images of the per-layer int4 sensitivity",
           valid=lambda n: n >= 1, must=_WHOLE),
    Option("bit_recal_images", int, RECAL_IMAGES, "bitshrink: training images for re-estimating BatchNorm after a "
           "uniform cut", valid=lambda n: n >= 1, must=_WHOLE),
    Option("bit_probe_steps", int, PROBE_STEPS, "bitshrink with --limit-after-finetune: quantisation-aware "
           "distillation steps per candidate", valid=lambda n: n >= 1, must=_WHOLE),
)


def _options(ctx: PruneContext) -> dict:
    o = ctx.option
    return {"widths": o("bit_widths"), "ratios": list(parse_ratios(o("bit_ratios"), "--bit-ratios")),
            "candidates": o("bit_candidates"), "bit_images": o("bit_images"), "probe_steps": o("bit_probe_steps"),
            "recal_images": o("bit_recal_images")}


def _subset(ds, n: int):
    return ds if n >= len(ds) else Subset(ds, range(n))


def _int4_sensitivity(ctx: PruneContext, n_images: int) -> dict[str, float]:
    """Calibration top-1 lost (points) by each interior weight layer alone at int4, checkpointed."""
    saved = ctx.load_checkpoint("bit_sensitivity")
    names = [r.name for r in weight_layers(ctx.model)]
    layers = names[1:-1]
    if saved is not None and saved.get("images") == n_images and set(saved["drop"]) == set(layers):
        return saved["drop"]
    data = _subset(ctx.calib, n_images)

    def top1(model):
        return ctx.calib_top1(model, data)  # counted in the run's cost, sharded under torchrun

    base = top1(ctx.model)
    fp32 = dict.fromkeys(names, "fp32")
    drop = {}
    for name in layers:
        plan = {**fp32, name: "int4"}
        drop[name] = round(100 * (base - top1(apply_plan(copy.deepcopy(ctx.model), plan))), 4)
    ctx.log("bitshrink: int4 sensitivity (points lost, each layer alone): "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(drop.items(), key=lambda kv: -kv[1])[:6]) + ", ...")
    ctx.checkpoint("bit_sensitivity", {"images": n_images, "base_top1": base, "drop": drop})
    return drop


def _plan_within(model, budget: int, drop: dict[str, float]) -> dict[str, str] | None:
    """int4 inside, int8 ends; then int8 for the layers that lose most at int4 per extra byte,
    while the file fits `budget`. None when even the all-int4 file does not fit."""
    rows = weight_layers(model)
    plan = {r.name: "int4" for r in rows}
    plan[rows[0].name] = plan[rows[-1].name] = "int8"
    total = file_weight_bytes(model, plan)["total"]
    if total > budget:
        return None
    extra = {r.name: layer_bytes(r, "int8")["bytes"] - layer_bytes(r, "int4")["bytes"] for r in rows[1:-1]}
    # the layers int4 hurts most per byte first; then, with bytes to spare under the budget (the
    # ratio grid is coarse), the rest, smallest first: a spare byte left unused buys nothing
    order = sorted(extra, key=lambda n: (-max(drop.get(n, 0.0), 0.0) / max(extra[n], 1), extra[n], n))
    for name in order:
        if total + extra[name] <= budget:
            plan[name] = "int8"
            total += extra[name]
    return plan


def _recalibration_batches(ctx: PruneContext, n: int) -> list:
    """`n` training images (no augmentation), as batches, for re-estimating BatchNorm after a cut."""
    train = ctx.dataset("train")
    loader = make_loader(_subset(train, n), batch_size=min(64, ctx.batch_size))
    return [images for images, _ in loader]


def _probe(ctx: PruneContext, model, plan, steps: int):
    """A short quantisation-aware distillation from the dense fp32 model, as the run's fine-tuning
    (ctx.finetuning) will distil."""
    ft = ctx.finetuning
    student = copy.deepcopy(model)
    with quantisation_aware(student, plan):
        student, _ = finetune(student, ctx.dataset("train", augment=True), 1, teacher=ctx.model,
                              kd_weight=ft.kd_weight, kd_temperature=ft.kd_temperature, lr=ft.lr,
                              batch_size=ft.batch_size, max_steps_per_epoch=steps, device=ctx.device,
                              seed=ctx.seed, progress=False)
    student = apply_plan(student.eval(), plan)
    student.pruning = model.pruning
    return student


def _int4_ends(model) -> dict[str, str]:
    """int4 inside, int8 first conv and head: the narrowest plan."""
    plan = {row.name: "int4" for row in weight_layers(model)}
    plan[next(iter(plan))] = plan[list(plan)[-1]] = "int8"
    return plan


def _walk(ctx: PruneContext):
    """shrink's walk to the budget (counted as the int4 file: ctx.constraints' file precision), as a
    step of this run: checkpointed under the run's steps like a shrink run's, resumed the same way."""
    step = ctx.as_policy("shrink")
    result = get_policy("shrink").fn(step)
    ctx.absorb(step)
    return result


def _uniform(ctx: PruneContext, S: dict, budget: int, drop: dict[str, float]) -> list:
    """The smallest uniform ratios of the grid whose file fits (S["candidates"] of them), or the
    narrowest of the grid when none does."""
    fitting = []
    for r in sorted(S["ratios"]):
        model = ctx.model if r == 0 else ctx.prune(uniform_ratio_map(ctx.model, r))
        plan = _plan_within(model, budget, drop)
        if plan is not None:
            fitting.append((f"uniform {r:g}", model, plan, r > 0))
        if len(fitting) == S["candidates"]:
            break
    if not fitting:
        r = max(S["ratios"])
        model = ctx.prune(uniform_ratio_map(ctx.model, r))
        fitting = [(f"uniform {r:g}", model, _int4_ends(model), True)]
        ctx.log(f"bitshrink: no ratio of the grid fits {budget:,} B at int4; the narrowest ({r:g}) is a candidate")
    return fitting


def _score(ctx: PruneContext, S: dict, candidates: list):
    """Each candidate on its plan's grid, scored by calibration top-1 (after a short quantisation-aware
    distillation with --limit-after-finetune). Returns (rows, (best model, its top-1, its row))."""
    after = ctx.limit_after_finetune
    recal = _recalibration_batches(ctx, S["recal_images"])
    rows, best = [], None
    for label, model, plan, stale_bn in candidates:
        model = copy.deepcopy(model)
        if stale_bn:  # a uniform cut leaves every BatchNorm's statistics describing the wider model
            ctx.images_evaluated += recalibrate_batchnorm(model, recal, device=ctx.device)
        q = apply_plan(model, plan)
        before = ctx.calib_top1(q)
        top1 = before
        if after:
            q = _probe(ctx, q, plan, S["probe_steps"])
            top1 = ctx.calib_top1(q)
        fb = file_weight_bytes(q)
        row = {"widths": label, "bytes": fb["total"], "int8_layers": sum(p == "int8" for p in plan.values()),
               "int4_layers": sum(p == "int4" for p in plan.values()), "bits_per_weight": round(fb["bits_per_weight"], 3),
               "calib_top1_quantised": before, "calib_top1": top1, "acc_drop": round(ctx.acc_drop(top1), 4)}
        rows.append(row)
        ctx.log(f"bitshrink: {label}: {fb['total']:,} B ({row['int4_layers']} int4 / {row['int8_layers']} int8 "
                f"layers, {fb['bits_per_weight']:.2f} bits per weight): calib top-1 {before:.2%}"
                + (f" -> {top1:.2%} after {S['probe_steps']} quantisation-aware distillation steps" if after else ""))
        if best is None or top1 > best[1]:
            best = (q, top1, row)
    return rows, best


def _report(ctx: PruneContext, S: dict, rows: list[dict], chosen: dict, fb: dict) -> list[str]:
    """The report's bitshrink section: the budget, the candidates and the chosen plan's bytes."""
    cons, budget = ctx.constraints, ctx.constraints.budget_bytes
    kinds = {"both": "shrink's walk to the budget and the smallest fitting uniform width ratios",
             "walk": "shrink's walk to the budget", "uniform": "the smallest fitting uniform width ratios"}[S["widths"]]
    lines = [f"Budget: {format_bytes(budget)} ({budget:,} B) of file weight bytes ({cons.precision}); dense model "
             f"{format_bytes(cons.dense_bytes)} at the same count. Candidate widths: {kinds}; int4 inside, int8 first "
             "conv and head, int8 for the layers int4 hurts most per byte while it fits; scored on the calibration "
             "split as fake-quantised models"
             + (f", after {S['probe_steps']} quantisation-aware distillation steps each"
                if ctx.limit_after_finetune else "") + ":", "",
             "| widths | file bytes | int4 / int8 layers | bits per weight | calib top-1 | drop (points) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['widths']} | {row['bytes']:,} | {row['int4_layers']} / {row['int8_layers']} | "
                     f"{row['bits_per_weight']:.2f} | {100 * row['calib_top1']:.2f}% | {row['acc_drop']:.2f} |")
    lines += ["", f"Chosen: {chosen['widths']}, {fb['total']:,} B "
                  f"({'within' if fb['total'] <= budget else 'over'} the budget); bytes by precision: "
              + ", ".join(f"{p} {b:,} B ({fb['share_of_weights'][p]:.1%} of the weights)"
                          for p, b in sorted(fb["by_precision"].items(), key=lambda kv: -BITS[kv[0]]) if b) + "."]
    return lines


@register_policy("bitshrink", options=OPTIONS, after_finetune=True,
                 help="ours: widths (shrink's walk, or uniform) and per-layer int4 / int8 weights chosen together "
                      "under a budget on the exported file's bytes (--precision file-int4)")
def bitshrink(ctx: PruneContext) -> PolicyResult:
    """bitshrink (module docstring)."""
    S = _options(ctx)
    cons = ctx.constraints
    if not cons.precision.startswith(FILE_PREFIX) or cons.budget_bytes is None:
        raise SpikepruneError("bitshrink chooses bit widths for a budget on the exported file's bytes: give "
                              "--precision file-int4 (or another file-* precision) with --memory-budget or --target-saving")
    budget = cons.budget_bytes
    drop = _int4_sensitivity(ctx, S["bit_images"])
    candidates, walked = [], None
    if S["widths"] in ("both", "walk"):
        walked = _walk(ctx)
        plan = _plan_within(walked.model, budget, drop)
        if plan is None:  # the walk stopped short of the budget (every group at its smallest)
            plan = _int4_ends(walked.model)
        candidates.append(("walk", walked.model, plan, False))  # its BatchNorm was re-estimated by the walk
    if S["widths"] in ("both", "uniform"):
        candidates += _uniform(ctx, S, budget, drop)
    rows, (model, top1, chosen) = _score(ctx, S, candidates)
    fb = file_weight_bytes(model)
    ctx.log(f"bitshrink: chose {chosen['widths']}: {fb['total']:,} B of {budget:,} B")
    lines = _report(ctx, S, rows, chosen, fb)
    sections = [("bitshrink", "\n".join(lines))]
    walk = None
    if walked is not None:
        w = walked.info["shrink"]
        walk = {"stop_reason": w["stop_reason"], "cuts": len(w["cuts"]), "candidates_measured": w["candidates_measured"],
                "memory_met": w["memory_met"]}
        sections += [("bitshrink: the width walk (shrink's, to the budget at int4)", section)
                     for _, section in walked.info["report_sections"]]
    info = {"calib_top1": top1, "report_sections": sections,
            "plots": walked.info.get("plots", []) if walked is not None else [],
            "bitshrink": {"budget_bytes": budget, "candidates": rows, "chosen": chosen,
                          "plan": model.weight_precision, "file_bytes": {"total": fb["total"],
                                                                         "by_precision": fb["by_precision"],
                                                                         "share_of_weights": fb["share_of_weights"]},
                          "int4_sensitivity": drop, "settings": S, "walk": walk, "budget_met": fb["total"] <= budget}}
    if not math.isfinite(top1):
        raise SpikepruneError("bitshrink: the chosen model's calibration top-1 is not finite")
    return PolicyResult(model, info)
