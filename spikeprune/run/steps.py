"""The steps of a run after its checks, each checkpointed under RUN/steps/ so that a resumed run
reads back what a previous session finished: the policy (and its plots), fine-tuning, measuring
(test top-1, measure(), the interleaved latency), and the judgement of the constraints, the
warnings and the widths that go into summary.json.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time

import torch
from torch import nn

from .. import distributed
from ..coupling import groups as model_groups
from ..costs import budget_bytes, deployed_memory_bytes, interleaved_latency, measure
from ..errors import SpikepruneError
from ..policy_api import PolicyResult, PolicySpec, PruneContext
from ..precision import FILE_PRECISIONS, model_plan
from ..quantise import apply_plan, quantisation_aware
from ..record import PruningRecord
from ..stats import resolution_warning
from ..surgery import record_of
from ..training import evaluate, finetune
from ..validation import drop_within
from .folder import jsonable


def render_plots(ctx: PruneContext, plots) -> tuple[list[dict], list[str]]:
    """Draw the policy's (filename, draw[, caption]) plots into RUN/plots: (file + caption of each
    drawn plot, a line for each that failed)."""
    if not distributed.is_main():  # rank 0 draws
        return [], []
    out, failed = [], []
    for item in plots or []:
        if isinstance(item, dict):
            out.append({"file": item["file"], "caption": item.get("caption", "")})
            continue
        filename, draw, *rest = item
        try:
            draw(ctx.plot_path(filename))
            out.append({"file": f"plots/{filename}", "caption": rest[0] if rest else ""})
        except Exception as e:  # a plot must never cost the run its result; the report says it is missing
            failed.append(f"this run has no plot {filename}: drawing it failed ({type(e).__name__}: {e})")
            ctx.log(f"warning: {failed[-1]}")
    return out, failed


def run_policy(ctx: PruneContext, spec: PolicySpec) -> tuple[nn.Module, dict]:
    """Steps 1-2: the policy's pruned model and what it said (info, calibration top-1, plots that
    failed), read back when a previous session finished them."""
    pruned, saved = ctx.load_checkpoint("policy_model"), ctx.load_checkpoint("policy")
    if pruned is not None and saved is not None:
        return pruned, saved
    t0, passes0, images0 = time.perf_counter(), ctx.evaluations, ctx.images_evaluated
    ctx.log(f"policy {spec.name}: dense calibration top-1 {ctx.dense_calib_top1:.2%}, limit "
            f"{ctx.constraints.max_acc_drop:g} points")
    result = spec.fn(ctx)
    if not isinstance(result, PolicyResult):
        raise SpikepruneError(f"internal: policy {spec.name} returned {type(result).__name__}, not a PolicyResult")
    pruned = result.model
    if pruned is ctx.model:  # the policy kept the dense model: the run's copy carries the (empty) record
        pruned = copy.deepcopy(pruned)
    pruned.pruning = record_of(pruned)
    pruned.eval()
    info = dict(result.info)
    info["plots"], failed = render_plots(ctx, info.get("plots"))
    calib = info.pop("calib_top1", None)
    calib = float(calib) if calib is not None else ctx.calib_top1(pruned)
    saved = {"info": jsonable(info), "plot_problems": failed, "calib_top1": calib,
             "cost": {"policy_wall_s": time.perf_counter() - t0, "policy_calib_passes": ctx.evaluations - passes0,
                      "policy_calib_images": ctx.images_evaluated - images0}}
    ctx.checkpoint("policy_model", pruned)
    ctx.checkpoint("policy", saved)
    return pruned, saved


def finetune_step(ctx: PruneContext, pruned: nn.Module) -> nn.Module:
    """Step 3: fine-tune a copy of the pruned model (distilling from the dense one with kd);
    train() checkpoints every epoch under RUN/steps/finetune, so an interrupted run resumes."""
    done = ctx.load_checkpoint("finetuned_model")
    if done is not None:
        return done
    s, f = ctx.settings, ctx.settings.finetuning
    ctx.log(f"fine-tuning for {f.epochs} epoch{'s' if f.epochs != 1 else ''}"
            + (" with distillation from the dense model" if f.kd else ""))
    t0 = time.perf_counter()
    caps = s.max_images or {}
    # Without caps the spec goes to train() as it always did; with caps the capped splits do.
    data, val = ((ctx.dataset("train", augment=True), ctx.calib) if caps.get("train") or caps.get("calib")
                 else (ctx.data, None))
    student = copy.deepcopy(pruned)
    plan = model_plan(pruned)  # a model with quantised weights is fine-tuned quantisation-aware, kept on its grid
    with quantisation_aware(student, plan) if plan else contextlib.nullcontext():
        model, history = finetune(
            student, data, f.epochs, teacher=ctx.model if f.kd else None, val_data=val,
            device=ctx.device, seed=ctx.seed, workers=ctx.workers, output=ctx.run_dir / "steps" / "finetune",
            resume=True, progress=ctx.progress, **f.train_kwargs())
    if plan:
        model = apply_plan(model, plan)  # the same object as student unless train() returned another
    model.eval()
    model.pruning = pruned.pruning  # fine-tuning changes weights, not what was pruned
    ctx.checkpoint("finetune_history", {"history": jsonable(history), "wall_s": time.perf_counter() - t0})
    ctx.checkpoint("finetuned_model", model)
    return model


def measure_model(ctx: PruneContext, model: nn.Module, name: str) -> dict:
    """Test top-1 and measure.measure totals, checkpointed per model."""
    saved = ctx.load_checkpoint(f"measure_{name}")
    if saved is not None:
        return saved
    s = ctx.settings
    ctx.log(f"measuring the {name} model on the test split")
    test = ctx.dataset("test")
    acc = evaluate(model, test, split="test", batch_size=ctx.batch_size, device=ctx.device, progress=ctx.progress,
                   workers=ctx.workers)
    if not math.isfinite(float(acc["loss"])):
        raise SpikepruneError(f"the {name} model gives a {acc['loss']} loss on the test split: its outputs are not "
                              "finite (NaN / Inf); no figures are reported for a broken model")
    m = distributed.from_main(lambda: measure(  # rank 0 measures; the others wait; latency: measure_latency
        model, data=test, device=ctx.device, max_images=min(s.measure_images, len(test)), batch_size=64,
        latency=False), f"measuring the {name} model")
    t = m["total"]
    out = {"top1": acc["top1"], "top5": acc["top5"], "images": int(acc["n"]), "params": int(t["params"]),
           "memory_bytes": {**{k: int(v) for k, v in t["memory_bytes"].items()},
                            **{p: budget_bytes(model, p) for p in FILE_PRECISIONS}},  # what file-* budgets count
           "deployed_bytes": {k: int(v) for k, v in deployed_memory_bytes(model).items() if k != "params"},
           "file_bytes": t["file_bytes"], "macs": int(t["macs"]), "sops": t.get("sops"), "energy_mj": t.get("energy_mj"),
           "latency_ms": t.get("latency_ms")}
    ctx.checkpoint(f"measure_{name}", out)
    return out


def measure_latency(ctx: PruneContext, models: dict) -> dict:
    """The models' forward latency (batch 1), timed interleaved so that the machine's load hits each
    alike (costs.interleaved_latency), with its spread and a verdict on its reliability; once per
    run (checkpointed), by rank 0 while the others wait."""
    saved = ctx.load_checkpoint("latency")
    if saved is not None:
        return saved
    cfg, dev = ctx.model.cfg, torch.device(ctx.device)
    ctx.log("timing " + ", ".join(models) + " interleaved")
    x = torch.rand(1, cfg.in_channels, cfg.img_size, cfg.img_size, device=dev)
    on_device = {name: m.to(dev).eval() for name, m in models.items()}
    saved = distributed.from_main(lambda: interleaved_latency(on_device, x, ctx.settings.latency_repeats, warmup=2),
                                  "timing the models")
    ctx.checkpoint("latency", saved)
    return saved


def calib_once(ctx: PruneContext, model: nn.Module, step: str) -> float:
    saved = ctx.load_checkpoint(step)
    if saved is None:
        saved = {"top1": ctx.calib_top1(model)}
        ctx.checkpoint(step, saved)
    return float(saved["top1"])


def constraint_checks(ctx: PruneContext, figures: dict, pruned_calib: float,
                      finetuned_calib: float | None = None) -> dict:
    """Were the constraints met? Judged where the decisions were made: the pruned model's calibration
    drop (the fine-tuned model's with --limit-after-finetune), and its memory at the constraints'
    precision. Test drops are given beside them."""
    c = ctx.constraints
    dense_mem, mem = figures["dense"]["memory_bytes"][c.precision], figures["pruned"]["memory_bytes"][c.precision]
    judged = finetuned_calib if ctx.settings.limit_after_finetune else pruned_calib
    drop = (ctx.dense_calib_top1 - judged) * 100
    ok = drop_within(ctx.dense_calib_top1, judged, len(ctx.calib), c.max_acc_drop)  # in images, not floats
    checks = {"acc_drop_calib": drop, "acc_ok": ok,
              "limit_judged_on": "fine-tuned model" if ctx.settings.limit_after_finetune else "pruned model",
              "acc_drop_test": (figures["dense"]["top1"] - figures["pruned"]["top1"]) * 100,
              "memory_bytes": mem, "budget_bytes": c.budget_bytes,
              "memory_ok": c.budget_bytes is None or mem <= c.budget_bytes,
              "memory_saved": 1 - mem / dense_mem if dense_mem else 0.0}
    if figures["finetuned"] is not None:
        checks["acc_drop_test_finetuned"] = (figures["dense"]["top1"] - figures["finetuned"]["top1"]) * 100
    return checks


def run_warnings(ctx: PruneContext, table, checks: dict) -> list[str]:
    out = list(table.warnings) if table is not None else []
    if table is None:
        w = resolution_warning(len(ctx.calib), ctx.dense_calib_top1)
        out += [w] if w else []
    if checks["acc_ok"] and checks["acc_drop_test"] > ctx.constraints.max_acc_drop:
        out.append(f"the pruned model is within the limit on the calibration split ({checks['acc_drop_calib']:.2f} "
                   f"points) but not on the test split ({checks['acc_drop_test']:.2f} points): the calibration split "
                   "is a noisy stand-in for the test distribution")
    return out


def group_widths(record: PruningRecord, final: nn.Module) -> list[dict]:
    """Per group: the dense width and the final one, from the pruning record."""
    units = {g.name: g.unit for g in model_groups(final)}
    kept = record.kept_counts()
    return [{"group": name, "unit": units.get(name, "channel"), "before": size, "after": kept[name]}
            for name, size in record.dense_sizes.items()]


