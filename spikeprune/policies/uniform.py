"""Fixed-ratio policies and the uniform sweep (PSViT step 1).

uniform: every channel group (stem stages, residual, qk, v, MLP hidden; not the heads groups, see
    ratios.uniform_ratio_map) loses the same fraction of its channels, ranked by the run's importance
    criterion. With `--uniform R` the ratio is R. Without it, the ratios of the sweep grid
    (--uniform-ratios, default 0.1 .. 0.9) are all measured on the calibration split and the
    largest whose drop stays within --max-acc-drop is taken; with a memory target, the smallest
    ratio within the limit that meets it (more accuracy for the same goal). The sweep is measured
    in full (not stopped at the first failure) because accuracy need not fall monotonically and the
    table is what PSViT's step 1 reports.
groups: explicit ratios, `--ratio PATTERN=R` (repeatable), as spikeprune.prune takes them.
"""
from __future__ import annotations

from tqdm import tqdm

from ..errors import SpikepruneError
from ..coupling import groups as model_groups
from ..costs import count_macs, count_params, memory_bytes
from ..policy_api import Option, PolicyResult, PruneContext, register_policy
from ..ratios import parse_ratios, uniform_ratio_map
from ..report import markdown_table, plot_uniform_sweep
from ..surgery import match_ratios


def uniform_sweep(ctx: PruneContext, ratios=None, skip=()) -> list[dict]:
    """Calibration top-1 and size of the uniformly pruned model for every ratio of the grid.

    Each measured ratio is checkpointed (step "uniform_sweep"), so an interrupted sweep resumes.
    Rows: ratio, top1, acc_drop (points), params, memory_bytes {fp32, fp16, int8},
    memory_saved_frac (fp32), macs.
    """
    ratios = parse_ratios(ratios if ratios is not None else ctx.uniform_ratios, "--uniform-ratios")
    step = ctx.resumable("uniform_sweep", list(skip), {"rows": []}, key_field="skip")
    rows = {r["ratio"]: r for r in step.state["rows"]}
    dense_fp32 = memory_bytes(ctx.model)["fp32"]
    todo = [r for r in ratios if r not in rows]
    if todo:
        ctx.log(f"uniform sweep (PSViT step 1): ratios {', '.join(f'{r:g}' for r in todo)}")
    bar = None
    if ctx.progress and todo:
        bar = tqdm(total=len(ratios), initial=len(ratios) - len(todo), desc="uniform sweep", leave=False)
    for r in todo:
        model = ctx.prune(uniform_ratio_map(ctx.model, r, list(skip)))
        top1 = ctx.calib_top1(model)
        mem = {k: int(v) for k, v in memory_bytes(model).items()}
        rows[r] = {"ratio": r, "top1": top1, "acc_drop": round(ctx.acc_drop(top1), 6), "params": int(count_params(model)),
                   "memory_bytes": mem, "memory_saved_frac": 1 - mem["fp32"] / dense_fp32, "macs": int(count_macs(model))}
        step.state["rows"] = [rows[k] for k in sorted(rows)]
        step.save()
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return [rows[r] for r in ratios]


def sweep_table_md(rows: list[dict], limit: float) -> str:
    return markdown_table(rows, [
        ("ratio", "ratio", lambda x: f"{x:g}"),
        ("calib top-1", "top1", lambda x: f"{100 * x:.2f}%"),
        ("drop (points)", "acc_drop", lambda x: f"{x:.2f}" + (" (over the limit)" if x > limit + 1e-9 else "")),
        ("params", "params", lambda x: f"{x:,}"),
        ("memory saved", "memory_saved_frac", lambda x: f"{100 * x:.2f}%"),
        ("MACs", "macs", lambda x: f"{x:,}")])


def best_uniform(ctx: PruneContext, rows: list[dict]) -> dict | None:
    """The sweep row a uniform policy takes: the largest ratio within the accuracy limit, or with a
    memory target the smallest such ratio that meets it; None when no ratio is within the limit."""
    ok = [r for r in rows if ctx.within_limit(r["top1"])]
    if not ok:
        return None
    budget = ctx.budget_bytes
    if budget is not None:
        meeting = [r for r in ok if r["memory_bytes"][ctx.constraints.precision] <= budget]
        if meeting:
            return min(meeting, key=lambda r: r["ratio"])
    return max(ok, key=lambda r: r["ratio"])


UNIFORM_OPTIONS = (
    Option("uniform", float, None, "remove this fraction of every channel group, in [0, 1); without it the largest "
           "ratio of the sweep within --max-acc-drop is chosen", valid=lambda r: 0 <= r < 1,
           must="a pruning ratio in [0, 1)", metavar="R"),
    Option("skip", str, help="leave groups matching this glob dense (repeatable), e.g. --skip residual "
           "--skip 'stem.*'", many=True, metavar="PATTERN"),
)


def _uniform_check(options: dict, model) -> None:
    """Every --skip pattern matching a channel group of `model`."""
    uniform_ratio_map(model, 0.0, list(options.get("skip") or []))


@register_policy("uniform", help="the same ratio for every channel group: --uniform R, or the largest within the "
                                 "accuracy limit", check=_uniform_check, options=UNIFORM_OPTIONS)
def uniform_policy(ctx: PruneContext) -> PolicyResult:
    skip = ctx.option("skip")
    r = ctx.option("uniform")
    if r is not None:
        return PolicyResult(ctx.prune(uniform_ratio_map(ctx.model, r, skip)),
                            {"uniform_ratio": r, "selection": "fixed (--uniform)"})

    rows = uniform_sweep(ctx, skip=skip)
    limit = ctx.constraints.max_acc_drop
    best = best_uniform(ctx, rows)
    if best is None:
        ctx.log(f"uniform: no ratio of the sweep keeps the calibration drop within {limit:g} points; keeping the "
                "dense model")
        model, top1 = ctx.prune({}), ctx.dense_calib_top1
        chosen = 0.0
    else:
        chosen = best["ratio"]
        model, top1 = ctx.prune(uniform_ratio_map(ctx.model, chosen, skip)), best["top1"]
        ctx.log(f"uniform: ratio {chosen:g} (calibration drop {best['acc_drop']:.2f} points, "
                f"{100 * best['memory_saved_frac']:.2f}% memory saved)")
    dense = ctx.dense_calib_top1
    info = {
        "uniform_ratio": chosen,
        "selection": "largest sweep ratio within the accuracy limit" if best is not None else "none within the limit",
        "uniform_sweep": rows,
        "calib_top1": top1,
        "tradeoff": {"uniform sweep": [[r["memory_saved_frac"], r["top1"]] for r in rows]},
        "plots": [("uniform_sweep.png", lambda p: plot_uniform_sweep(p, rows, dense, limit),
                   "uniform sweep: calibration top-1 and memory saved against the ratio")],
        "report_sections": [("Uniform sweep", sweep_table_md(rows, limit))],
    }
    return PolicyResult(model, info)


def _parse_ratio_options(items) -> dict[str, float]:
    ratios = {}
    for item in items or []:
        key, sep, value = item.rpartition("=")
        try:
            ratios[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise SpikepruneError(f"--ratio expects PATTERN=R with R a number, e.g. 'residual=0.25'; got {item!r}")
        parse_ratios([ratios[key]], f"--ratio {key}")
    if not ratios:
        raise SpikepruneError("the groups policy needs at least one --ratio PATTERN=R")
    return ratios


def _groups_check(options: dict, model) -> None:
    """Every --ratio well formed and every pattern matching a group of `model` (before any work)."""
    match_ratios([g.name for g in model_groups(model)], _parse_ratio_options(options.get("ratio")))


@register_policy("groups", help="explicit ratios per group or glob pattern (--ratio PATTERN=R)", check=_groups_check,
                 options=[Option("ratio", str, help="ratio for the groups matching a glob (repeatable), e.g. --ratio "
                                 "'block*.mlp.hidden=0.5'", many=True, metavar="PATTERN=R")])
def groups_policy(ctx: PruneContext) -> PolicyResult:
    ratios = _parse_ratio_options(ctx.option("ratio"))
    return PolicyResult(ctx.prune(ratios), {"selection": "explicit (--ratio)"})
