"""PSViT: uniform sweep, per-group sensitivity, fine-grained single-shot pruning with back-off.

The seed paper (../shared/seeds/psvit-abstract.txt) gives three steps and leaves the numbers open.
What this policy does, and why:

Step 1, uniform sweep (policies/uniform.py): every channel group pruned by the same ratio,
    0.1 .. 0.9, calibration top-1 and memory measured. A reference curve: the fine-grained result
    should beat the best uniform ratio within the limit, and the report compares the two.

Step 2, sensitivity (sensitivity.py): each prunable group alone, at each ratio of the grid
    (--ratios, default 0.1, 0.3, 0.5, 0.7, 0.9). The paper's "layer" is our coupled group: a
    Spikformer layer cannot lose output channels on its own (its readers must lose the matching
    inputs, and the residual width is shared by every block), so `residual`, the `stem.proj_conv*` and per
    block `attn.qk`, `attn.v`, `attn.heads` and `mlp.hidden` are the layers this analysis ranks.

Step 3, fine-grained selection. Per group, the tested ratios become levels (ratio 0 first) with
    a predicted drop d(r) = max(0, max over r' <= r of the measured single-group drop) -- the
    running maximum makes the prediction monotone, so a noisy dip at a larger ratio is not
    trusted -- and a saving s(r) = the fp32 bytes that pruning saves. Levels whose d alone exceeds
    the limit, or that save nothing more than a smaller ratio, are dropped.
    Additive assumption: the drop of several groups pruned together is predicted as the sum of
    their single-group drops. It is a first-order model (the groups' damages are treated as
    independent); in practice the damages compound, which is why step 3 measures and backs off.
    Greedy selection (the classic greedy for a multiple-choice knapsack): starting from no
    pruning, repeatedly take the upgrade -- one group moved from its current level to any higher
    one -- with the most memory saved per predicted point of accuracy (upgrades that cost no
    predicted accuracy first, largest saving first), as long as the predicted total stays within
    --max-acc-drop. This yields an ordered chain of upgrades; the selection is the whole chain.
    Architecture: the engine enforces coupling, equal head dims and round_to (the sensitivity
    rows were measured through the same engine with the same round_to, so a level's kept count
    is what the final prune keeps); a block's `attn.heads` and its `attn.qk` / `attn.v` remove
    the same weights two ways, so the chain never uses both in one block (their savings are not
    additive).
    With a memory target (--target-saving / --memory-budget) the chain stops at the first upgrade
    whose predicted saving reaches it: no more accuracy is spent than the target needs.

Prune once with the selected ratios and measure the real calibration top-1. Back-off, if the
    measured drop breaks the limit: the chain's prefixes form a path from the dense model (drop 0,
    within the limit) to the full selection (over it); bisection on the prefix length finds a
    prefix k within the limit whose next prefix k + 1 is over it, in ceil(log2(chain length))
    further calibration passes. The measured drop need not grow monotonically along the chain,
    so this is a boundary, not necessarily the longest good prefix -- but every model it returns
    was measured within the limit (prefix 0, the dense model, always is).

Resume: the sweep (per ratio), the sensitivity rows and every measured prefix are checkpointed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..coupling import groups as model_groups
from ..policy_api import PolicyResult, PruneContext, largest_within, register_policy
from ..report import markdown_table, plot_sensitivity, plot_uniform_sweep
from .uniform import best_uniform, sweep_table_md, uniform_sweep

_EPS = 1e-9


@dataclass
class Level:
    ratio: float
    drop: float  # predicted points, the running maximum of the measured single-group drops, >= 0
    saving: int  # fp32 bytes saved by this group alone
    kept: int


def group_levels(table, max_drop: float, names=None) -> dict[str, list[Level]]:
    """Per group, the usable levels of the sensitivity table (step 3 in the module docstring)."""
    out = {}
    for g in names or table.groups:
        rows = table.for_group(g)
        if not rows:
            continue
        levels = [Level(0.0, 0.0, 0, rows[0]["size"])]
        env = 0.0
        for r in rows:
            env = max(env, float(r["acc_drop"]), 0.0)
            if env > max_drop + _EPS:
                break  # the envelope only grows: every larger ratio breaks the limit alone too
            if r["memory_saved_bytes"] <= levels[-1].saving:
                continue  # no more saved than a smaller ratio (same kept count, or nothing removed)
            levels.append(Level(float(r["ratio"]), env, int(r["memory_saved_bytes"]), int(r["kept"])))
        out[g] = levels
    return out


def exclusive_groups(head_group: dict[str, str]) -> dict[str, set[str]]:
    """Which groups exclude each other: a heads group and the per-head channel groups whose heads
    it removes (the family declares them: Group.head_group, e.g. block0.attn.qk -> block0.attn.heads).

    head_group: {per-head channel group: its heads group}."""
    out: dict[str, set[str]] = {}
    for channels, heads in head_group.items():
        out.setdefault(heads, set()).add(channels)
        out.setdefault(channels, set()).add(heads)
    return out


def upgrade_chain(levels: dict[str, list[Level]], max_drop: float, stop_saving: int | None = None,
                  conflicts: dict[str, set[str]] | None = None) -> list[dict]:
    """The greedy chain of upgrades (module docstring); each step records the cumulative prediction.

    stop_saving: stop after the first step whose predicted cumulative saving reaches this (bytes).
    conflicts: exclusive_groups(...): a group is never upgraded while one it excludes is pruned.
    """
    cur = {g: 0 for g in levels}
    conflicts = conflicts or {}
    total, saved, chain = 0.0, 0, []
    while stop_saving is None or saved < stop_saving:
        best = None
        for g, lv in levels.items():
            if any(cur.get(o, 0) > 0 for o in conflicts.get(g, ())):
                continue
            here = lv[cur[g]]
            for j in range(cur[g] + 1, len(lv)):
                dd, ds = lv[j].drop - here.drop, lv[j].saving - here.saving
                if total + dd > max_drop + _EPS or ds <= 0:
                    continue
                key = (0, -ds) if dd <= _EPS else (1, -ds / dd)
                if best is None or key < best[0]:
                    best = (key, g, j, dd, ds)
        if best is None:
            break
        _, g, j, dd, ds = best
        prev = levels[g][cur[g]].ratio
        cur[g] = j
        total, saved = total + dd, saved + ds
        chain.append({"group": g, "ratio": levels[g][j].ratio, "from_ratio": prev, "kept": levels[g][j].kept,
                      "step_drop": round(dd, 6), "predicted_drop": round(total, 6), "step_saving": ds,
                      "predicted_saving_bytes": saved})
    return chain


def ratios_at(chain: list[dict], k: int) -> dict[str, float]:
    """Per-group ratios after the first k upgrades of the chain."""
    out: dict[str, float] = {}
    for step in chain[:k]:
        out[step["group"]] = step["ratio"]
    return out


def backoff_search(k_full: int, within: callable) -> tuple[int, list[int]]:
    """Largest-prefix search: `within(k)` measures prefix k (True = within the limit).

    Returns (k, the prefixes measured, in order). Prefix 0 is the dense model, within by definition.
    """
    tried: list[int] = []

    def measured(k: int) -> bool:
        tried.append(k)
        return within(k)

    return largest_within(k_full, measured), tried


@register_policy("psvit", help="PSViT: uniform sweep, per-group sensitivity, fine-grained pruning with back-off")
def psvit_policy(ctx: PruneContext) -> PolicyResult:
    limit = ctx.constraints.max_acc_drop
    dense_top1 = ctx.dense_calib_top1

    # Step 1 and step 2.
    sweep = uniform_sweep(ctx)
    table = ctx.sensitivity()

    # Step 3: the chain, cut at the memory target when there is one.
    levels = group_levels(table, limit)
    stop = None
    budget = ctx.budget_bytes
    dense_fp32 = int(table.meta.get("dense_memory_bytes") or ctx.memory(ctx.model, "fp32"))
    if budget is not None:
        need_frac = 1 - budget / ctx.dense_memory
        stop = int(need_frac * dense_fp32 + 0.999999)
    conflicts = exclusive_groups({g.name: g.head_group for g in model_groups(ctx.model) if g.head_group})
    chain = upgrade_chain(levels, limit, stop, conflicts)

    step = ctx.resumable("psvit_search", chain, {"measured": {}}, key_field="chain")
    measured: dict[str, dict] = step.state["measured"]
    models = {}

    def within(k: int) -> bool:
        key = str(k)
        if key not in measured:
            model = ctx.prune(ratios_at(chain, k))
            top1 = ctx.calib_top1(model)
            measured[key] = {"top1": top1, "acc_drop": round(ctx.acc_drop(top1), 6),
                             "memory_saved": 1 - ctx.memory(model) / ctx.dense_memory,
                             "predicted_drop": chain[k - 1]["predicted_drop"]}
            models[k] = model
            step.save()
            ctx.log(f"psvit: {k} of {len(chain)} upgrades: predicted drop {measured[key]['predicted_drop']:.2f}, "
                    f"measured {measured[key]['acc_drop']:.2f} points, memory saved "
                    f"{100 * measured[key]['memory_saved']:.2f}%")
        return ctx.within_limit(measured[key]["top1"])

    k, tried = backoff_search(len(chain), within)
    ratios = ratios_at(chain, k)
    model = models[k] if k in models else ctx.prune(ratios)
    top1 = measured[str(k)]["top1"] if k else dense_top1
    backed_off = k < len(chain)
    if backed_off:
        ctx.log(f"psvit: the full selection measured {measured[str(len(chain))]['acc_drop']:.2f} points (> {limit:g}); "
                f"backed off to {k} of {len(chain)} upgrades ({len(tried) - 1} more calibration passes)")

    uni = best_uniform(ctx, sweep)
    info = {
        "calib_top1": top1,
        "psvit": {
            "limit_points": limit,
            "additive_assumption": "predicted drop = sum of single-group drops (running maximum over ratios, >= 0)",
            "chain": chain,
            "selected_upgrades": k,
            "backed_off": backed_off,
            "prefixes_measured": tried,
            "measured": dict(measured),  # prefix length (as a string, JSON keys) -> calibration figures
            "predicted_drop": chain[k - 1]["predicted_drop"] if k else 0.0,
            "measured_drop": round((dense_top1 - top1) * 100, 6),
            "memory_target_stop_bytes": stop,
            "best_uniform": ({"ratio": uni["ratio"], "top1": uni["top1"], "memory_saved_frac": uni["memory_saved_frac"]}
                             if uni else None),
        },
        "uniform_sweep": sweep,
        "tradeoff": {
            "uniform sweep": [[r["memory_saved_frac"], r["top1"]] for r in sweep],
            "PSViT prefixes measured": sorted([v["memory_saved"], v["top1"]] for v in measured.values()),
        },
        "plots": [
            ("uniform_sweep.png", lambda p: plot_uniform_sweep(p, sweep, dense_top1, limit),
             "PSViT step 1: uniform sweep (calibration top-1 and memory saved against the ratio)"),
            ("sensitivity.png", lambda p: plot_sensitivity(p, table, limit),
             "PSViT step 2: accuracy drop of each group pruned alone, against the ratio and the memory saved"),
        ],
        "report_sections": _sections(ctx, sweep, table, levels, chain, measured, k, tried, uni, limit),
    }
    return PolicyResult(model, info)


def _sections(ctx, sweep, table, levels, chain, measured, k, tried, uni, limit) -> list[tuple[str, str]]:
    s1 = sweep_table_md(sweep, limit)
    if uni:
        s1 += (f"\n\nBest uniform ratio within the limit: {uni['ratio']:g} ({100 * uni['memory_saved_frac']:.2f}% "
               f"memory saved, calibration top-1 {100 * uni['top1']:.2f}%).")
    else:
        s1 += "\n\nNo uniform ratio of the sweep stays within the limit."

    fc = table.forward_cost
    s2 = ("Each group (the paper's \"layer\") pruned alone; calibration top-1 drop in points. "
          "Full table: `sensitivity.csv`.\n\n```\n" + table.format() + "\n```\n\n"
          f"Forward cost: {fc['spent']:,.0f} image-block passes against {fc['full_recompute']:,.0f} for recomputing "
          f"every candidate from the image ({fc['ratio']:.2f}x fewer): the inputs of each block and stem stage are "
          "cached once, and each candidate runs only from the first stage it changes.")

    rows = [dict(step=i + 1, **c) for i, c in enumerate(chain)]
    s3 = ("Predicted drop = the sum of the single-group drops (additive assumption; see the policy's docstring). "
          "Upgrades in the greedy order (memory saved per predicted point):\n\n")
    s3 += markdown_table(rows, [
        ("#", "step", str), ("group", "group", str), ("ratio", "ratio", lambda x: f"{x:g}"),
        ("from", "from_ratio", lambda x: f"{x:g}"), ("kept", "kept", str),
        ("step drop", "step_drop", lambda x: f"{x:.2f}"), ("predicted drop", "predicted_drop", lambda x: f"{x:.2f}"),
        ("predicted saving", "predicted_saving_bytes", lambda x: f"{x:,} B")]) if chain else "(no upgrade fits the limit)"
    if chain:
        meas = [dict(prefix=int(x), **v) for x, v in sorted(measured.items(), key=lambda kv: int(kv[0]))]
        s3 += "\n\nMeasured (prune once with the first k upgrades, calibration split):\n\n" + markdown_table(meas, [
            ("k", "prefix", str), ("predicted drop", "predicted_drop", lambda x: f"{x:.2f}"),
            ("measured drop", "acc_drop", lambda x: f"{x:.2f}" + (" (over)" if x > limit + 1e-9 else "")),
            ("memory saved", "memory_saved", lambda x: f"{100 * x:.2f}%")])
        if k < len(chain):
            s3 += (f"\n\nThe full selection broke the limit, so the run backed off by bisection on the number of "
                   f"upgrades (prefixes measured in order: {', '.join(map(str, tried))}) and kept the first {k}.")
        else:
            s3 += "\n\nThe full selection held the limit: no back-off was needed."
    final = ratios_at(chain, k)
    s3 += "\n\nFinal per-group ratios: " + (", ".join(f"`{g}` {r:g}" for g, r in final.items()) or "none (dense)") + "."
    return [("PSViT step 1: uniform sweep", s1), ("PSViT step 2: sensitivity per group", s2),
            ("PSViT step 3: fine-grained selection", s3)]


__all__ = ["Level", "group_levels", "exclusive_groups", "upgrade_chain", "ratios_at", "backoff_search",
           "psvit_policy"]
