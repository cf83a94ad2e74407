"""A pruning run: one settings object, one run folder, the same steps for every policy.

    import spikeprune as sp
    summary = sp.prune_run(sp.bundled_model(), "mnist5k", "runs/mine", policy="psvit", max_acc_drop=3)
    # or: run(RunSettings(data="mnist5k", output="runs/mine", policy="psvit"), model)

`spikeprune prune` (cli.py), `spikeprune.prune_run` and the benchmark all build a RunSettings and
call run(). RunSettings checks every field when it is built; run() checks what needs the model
(constraints against its memory, group and ratio patterns, the data, the output folder) -- all of
it before anything is written or deleted. Then:

  1. RUN/run.json records the run's fingerprint (the model's weights and every setting that
     changes the result). A folder holding another run, or a run of an older format, is refused
     (force=True replaces it); the same command again resumes: finished steps are read back.
  2. The policy runs (spikeprune.policy_api): fn(ctx) -> PolicyResult(model, info); what was pruned
     is model.pruning, the PruningRecord against the dense model.
  3. Optional fine-tuning of the pruned model (train.finetune; distillation from the dense model
     with kd), checkpointed per epoch under RUN/steps/finetune/.
  4. Measurements of dense / pruned / fine-tuned (measure.measure) and their top-1 on the *test*
     split. Decisions only ever use the calibration split.
  5. RUN/model/ (the final model: fine-tuned when asked), then RUN/summary.json, RUN/report.md and
     RUN/plots/*.png. The model is written before the summary, and a summary about to be replaced
     is removed first, so a kill at any moment never leaves a summary describing a missing model;
     a later session removes the temporary copies a killed one left behind.

Wall time counts every session of the run, killed ones included: it is saved with every
checkpoint and log line (at most every few seconds).

This module is the run itself: its checks, the order of its steps, summary.json. Beside it:
settings.py (RunSettings), folder.py (run.json and resume, the lock, shared steps, the wall time,
RUN/model/) and steps.py (each step, checkpointed).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import time
from pathlib import Path

import torch
from torch import nn

from ..policies import BUILTIN as BUILTIN_POLICIES  # noqa: F401  (importing them registers the built-in policies)
from .. import distributed
from ..coupling import groups as model_groups
from ..errors import SpikepruneError
from ..hashing import fingerprint, model_hash
from ..policy_api import Constraints, PolicySpec, PruneContext, get_policy
from ..report import plot_tradeoff, write_report
from ..serialization import write_json
from ..surgery import record_of
from ..validation import check_finite, check_writable, renamed_arguments
from .folder import (RUN_FORMAT, RUN_VERSION, Clock, RunLock, check_shared_steps, copy_shared_steps, jsonable,
                     prepare_run_dir, remove_leftovers, write_final_model)
from .settings import LATENCY_REPEATS, MEASURE_IMAGES, RunSettings
from .steps import (calib_once, constraint_checks, finetune_step, group_widths, measure_latency, measure_model,
                    run_policy, run_warnings)


# ------------------------------------------------------------------------------------------------
# Checks before anything is written
# ------------------------------------------------------------------------------------------------
def _check_groups_pattern(model: nn.Module, patterns: str) -> None:
    names = [g.name for g in model_groups(model)]
    for p in (p.strip() for p in patterns.split(",")):
        if p and not fnmatch.filter(names, p):
            raise SpikepruneError(f"--groups {p!r} matches no group of this model; groups are: {', '.join(names)}")


def _check(settings: RunSettings, model: nn.Module, spec: PolicySpec) -> PruneContext:
    """Every check that needs the model or the data; returns the run's context (which resolves
    the constraints against the dense model). Nothing is written."""
    check_finite(model, "the model to prune")
    check_writable(settings.output, "run folder", folder=True)
    ctx = PruneContext(model, settings)
    _check_groups_pattern(model, settings.groups)
    if spec.check:
        # a policy that can hold the limit after fine-tuning is told whether it must (options of that mode need it)
        spec.check({**settings.options, "limit_after_finetune": settings.limit_after_finetune}
                   if spec.after_finetune else settings.options, model)
    for split in ("calib", "test") + (("train",) if settings.finetune_epochs else ()):
        ds = ctx.dataset(split, augment=split == "train")
        if len(ds) == 0:
            raise SpikepruneError(f"the {split} split of {settings.data} is empty; nothing to prune against")
    return ctx


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------
def run(settings: RunSettings, model: nn.Module) -> dict:
    """Run settings.policy on `model`, fill the run folder settings.output, return the summary.

    Every check runs before the run folder is touched. Every decision uses the calibration split;
    dense / pruned / fine-tuned top-1 in the summary are on the test split (fractions). With
    settings.threads, torch uses that many CPU threads for the run (the count before is restored)."""
    if not isinstance(settings, RunSettings):
        raise SpikepruneError(f"run() takes a RunSettings, got {type(settings).__name__}")
    if not isinstance(model, nn.Module):
        raise SpikepruneError(f"run() takes a model (torch.nn.Module), got {type(model).__name__}")
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, model)
    finally:
        torch.set_num_threads(previous_threads)


def _run(settings: RunSettings, model: nn.Module) -> dict:
    s, out = settings, settings.output
    spec = get_policy(s.policy)
    model = model.eval()
    ctx = _check(s, model, spec)
    fields = {"model": model_hash(model), **s.fingerprint_fields()}
    if s.shared_steps:
        check_shared_steps(s.shared_steps, fields)
    lock = RunLock(Path(out))
    distributed.from_main(lambda: lock.acquire() and None, "locking the run folder")  # rank 0 writes RUN
    try:
        return _run_locked(s, model, spec, ctx, fields)
    finally:
        lock.release()


def _run_locked(s: RunSettings, model: nn.Module, spec: PolicySpec, ctx: PruneContext, fields: dict) -> dict:
    """run() once the run folder is this process's: the steps in order, then the summary and the files."""
    resumed, clock = _open_run_folder(s, ctx, fields)
    torch.manual_seed(s.seed)

    pruned, outcome = run_policy(ctx, spec)  # 1-2
    clock.save()
    finetuned = finetune_step(ctx, pruned) if s.finetune_epochs else None  # 3
    clock.save()
    t_measure = time.perf_counter()
    figures, latency = _measure_models(ctx, {"dense": ctx.model, "pruned": pruned, "finetuned": finetuned})  # 4
    measure_wall = time.perf_counter() - t_measure

    # 5. Outcome, summary, model, report.
    final = finetuned if finetuned is not None else pruned
    summary, table = _summary(ctx, outcome, pruned, finetuned, figures, latency, measure_wall, resumed)
    if not distributed.is_main():  # rank 0 plots and writes the run folder; the others return its summary
        return distributed.from_main(lambda: None, "writing the run folder")
    return _write_run_folder(ctx, summary, outcome, table, final, clock)


def _open_run_folder(s: RunSettings, ctx: PruneContext, fields: dict) -> tuple[bool, Clock]:
    """Create or resume RUN (rank 0's; the other processes follow what it found), copy the shared
    steps into a new run, remove what a killed session left; (resuming?, the run's clock)."""
    out = s.output
    resumed = distributed.from_main(
        lambda: prepare_run_dir(out, fingerprint(fields), fields, s.force), "opening the run folder")
    shared = copy_shared_steps(s.shared_steps, out) if s.shared_steps and not resumed and distributed.is_main() else []
    leftovers = remove_leftovers(out) if distributed.is_main() else []
    clock = Clock(out)
    ctx.on_progress = clock.tick
    if resumed:
        ctx.log(f"resuming the run in {out}: finished steps are reused"
                + (f" (removed {len(leftovers)} temporary copies a killed session left)" if leftovers else ""))
    if shared:
        ctx.log(f"reusing {', '.join(shared)} from {s.shared_steps}")
    return resumed, clock


def _measure_models(ctx: PruneContext, models: dict) -> tuple[dict, dict]:
    """Step 4: each model's figures on the test split (None for a model the run has not), with its
    latency from one interleaved timing of them all; (figures by name, the latency step)."""
    figures = {name: measure_model(ctx, m, name) if m is not None else None for name, m in models.items()}
    latency = measure_latency(ctx, {name: m for name, m in models.items() if m is not None})
    for name, timed in latency["models"].items():
        figures[name] = {**figures[name], **timed, "latency_reliable": latency["reliable"]}
    return figures, latency


def _summary(ctx: PruneContext, outcome: dict, pruned: nn.Module, finetuned: nn.Module | None, figures: dict,
             latency: dict, measure_wall: float, resumed: bool) -> tuple[dict, object]:
    """summary.json's content before the plots and the wall time, and the sensitivity table if the
    run computed one."""
    s = ctx.settings
    pruned_calib = float(outcome["calib_top1"])
    finetuned_calib = calib_once(ctx, finetuned, "finetuned_calib") if finetuned is not None else None
    checks = constraint_checks(ctx, figures, pruned_calib, finetuned_calib)
    ft_saved = (ctx.load_checkpoint("finetune_history") or {}) if s.finetune_epochs else {}
    table = ctx.sensitivity_if_computed()
    record = record_of(pruned)
    summary = {
        "policy": s.policy, "model": s.model_spec, "data": s.data,
        "dense": figures["dense"], "pruned": figures["pruned"], "finetuned": figures["finetuned"],
        "memory_saved": checks["memory_saved"],
        "test_images": len(ctx.dataset("test")),  # what every test figure rests on (the report states it)
        "constraints": ctx.constraints.to_dict(),
        "constraints_met": bool(checks["acc_ok"] and checks["memory_ok"]),
        "constraint_checks": checks,
        "calib": {"n": len(ctx.calib), "dense_top1": ctx.dense_calib_top1, "pruned_top1": pruned_calib,
                  "finetuned_top1": finetuned_calib},
        "top1": {"calib": pruned_calib, "test": figures["pruned"]["top1"]},
        "pruning": record.to_dict(),
        "removed": record.removed_fractions(),
        "notes": record.notes,
        "widths": group_widths(record, finetuned if finetuned is not None else pruned),
        "importance": s.importance, "round_to": s.round_to, "seed": s.seed, "finetune": s.finetune,
        "finetune_history": ft_saved.get("history") if s.finetune_epochs else None,
        "settings": s.to_dict(),
        # Where the time went: the policy's search and fine-tuning as they ran (saved with their
        # steps, so a rerun reports the same), measuring in this session (0 when read back).
        "cost": {**outcome["cost"], "finetune_wall_s": ft_saved.get("wall_s"), "measure_wall_s": measure_wall},
        "forward_cost": {"calib_evaluations_this_run": ctx.evaluations, "calib_images_this_run": ctx.images_evaluated,
                         "sensitivity": table.forward_cost if table is not None else None},
        "latency": latency,
        "warnings": run_warnings(ctx, table, checks) + (
            [] if latency["reliable"] else [f"latency figures are unreliable ({'; '.join(latency['why'])}): "
                                            "compare them only after a rerun on an idle machine"]),
        "resumed": resumed,
    }
    for k, v in outcome["info"].items():
        if k != "report_sections":
            summary[f"policy_{k}" if k in summary else k] = v  # never replace the run's own keys
    return summary, table


def _write_run_folder(ctx: PruneContext, summary: dict, outcome: dict, table, final: nn.Module, clock: Clock) -> dict:
    """Rank 0: the trade-off plot, then RUN/model/, summary.json and report.md (in that order: a
    summary never describes a model that is not there); returns the summary as written."""
    out, info = ctx.settings.output, outcome["info"]
    problems = list(outcome.get("plot_problems") or [])
    try:
        plot_tradeoff(ctx.plot_path("accuracy_memory.png"), summary, info.get("tradeoff") or {},
                      ctx.constraints.max_acc_drop)
        summary["plots"] = [{"file": "plots/accuracy_memory.png", "caption": "calibration top-1 against memory saved"},
                            *summary.get("plots", [])]
    except Exception as e:  # a plot must never cost the run its result; the report says it is missing
        problems.append(f"this run has no plot accuracy_memory.png: drawing it failed ({type(e).__name__}: {e})")
        ctx.log(f"warning: {problems[-1]}")
    summary["warnings"] += problems + ctx.problems
    summary["wall_time_s"] = round(clock.elapsed(), 2)
    summary = jsonable(summary)
    write_final_model(out, final)
    write_json(out / "summary.json", summary)
    write_report(out, summary, info.get("report_sections") or [], table)
    clock.save(complete=True, seconds=summary["wall_time_s"])  # what summary.json says, for later reruns
    ctx.log(f"wrote {out / 'model'}, {out / 'summary.json'} and {out / 'report.md'}")
    return distributed.from_main(lambda: summary, "writing the run folder")


_CONSTRAINT_KEYS = ("max_acc_drop", "target_saving", "memory_budget", "precision")


@renamed_arguments(out="output")
def prune_run(model: nn.Module, data: str, output: str | Path, **settings) -> dict:
    """Prune `model` with a policy into the run folder `output` and return the summary (summary.json).

    settings: any RunSettings field (policy="psvit", finetune_epochs=1, kd=True, ...), and the
    limits max_acc_drop / target_saving / memory_budget / precision (or constraints=Constraints(...)).
    Example: sp.prune_run(sp.bundled_model(), "mnist5k", "runs/mine", max_acc_drop=3, target_saving=0.5)
    """
    limits = {k: settings.pop(k) for k in _CONSTRAINT_KEYS if k in settings}
    if limits and "constraints" in settings:
        raise SpikepruneError(f"give either constraints=Constraints(...) or {', '.join(limits)}, not both")
    known = {f.name for f in dataclasses.fields(RunSettings)} - {"data", "output"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SpikepruneError(f"prune_run() got unknown setting(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known | set(_CONSTRAINT_KEYS)))}")
    if "constraints" not in settings:
        settings["constraints"] = Constraints(**limits)
    return run(RunSettings(data=data, output=output, **settings), model)


__all__ = ["LATENCY_REPEATS", "MEASURE_IMAGES", "RUN_FORMAT", "RUN_VERSION", "RunSettings", "check_writable",
           "prune_run", "run"]
