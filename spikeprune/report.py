"""The run report: RUN/report.md (the page a person reads first) and its plots (matplotlib, Agg).

report.md, top to bottom: the outcome in one line (constraints met or not, with the numbers); the
constraints asked and reached; dense / pruned / fine-tuned on the test split (top-1, size, MACs,
SOPs, energy, latency); the width of every group before and after; the plots; the policy's own
sections (PolicyResult.info["report_sections"], a list of (title, markdown)); the cost (wall time,
calibration passes, the sensitivity analysis' forward accounting); warnings.

Plots are PNG files under RUN/plots/. The pipeline always draws accuracy_memory.png (calibration
top-1 against memory saved: dense, pruned, and any series a policy hands in through
info["tradeoff"]); policies draw their own through info["plots"] entries (filename, draw(path)
[, caption]), usually with the helpers below (plot_uniform_sweep, plot_sensitivity); figures of
your own: spikeprune.plots (new_figure, save_figure).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from .plots import limit_line, new_figure, pyplot, save_figure
from .serialization import atomic_path
from .stats import top1_standard_error
from .units import MISSING, format_bytes, format_number, format_percent


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def plot_uniform_sweep(path, rows: list[dict], dense_top1: float, max_acc_drop: float | None = None) -> None:
    """PSViT step 1: calibration top-1 and memory of the uniformly pruned model against the ratio."""
    fig, ax = new_figure()
    r = [x["ratio"] for x in rows]
    ax.plot(r, [100 * x["top1"] for x in rows], "o-", color="tab:blue", label="calibration top-1")
    ax.axhline(100 * dense_top1, color="tab:blue", ls=":", lw=1, label="dense")
    if max_acc_drop is not None:
        limit_line(ax, 100 * dense_top1 - max_acc_drop, f"accuracy limit (-{max_acc_drop:g} pts)")
    ax.set_xlabel("uniform ratio (fraction of every channel group removed)")
    ax.set_ylabel("calibration top-1 (%)", color="tab:blue")
    ax2 = ax.twinx()
    saved = [100 * x["memory_saved_frac"] for x in rows]
    ax2.plot(r, saved, "s--", color="tab:green", label="memory saved")
    ax2.set_ylabel("memory saved (% of the dense model)", color="tab:green")
    ax2.set_ylim(0, max(100.0, *saved) if saved else 100.0)  # a share: from zero
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8,
              frameon=False)  # below the axes: two curves cross the whole plot, so no corner is free
    ax.set_title("Uniform channel pruning sweep")
    save_figure(fig, path)


def group_kind(name: str) -> str:
    """A group's kind: its name with the block number replaced ('block3.mlp.hidden' -> 'blockN.mlp.hidden'),
    so the same group of every block lands in one panel of the sensitivity plot."""
    return re.sub(r"^([A-Za-z_]+)\d+\.", r"\1N.", name)


def plot_sensitivity(path, table, max_acc_drop: float | None = None) -> None:
    """PSViT step 2: per group, the calibration top-1 drop against the fraction removed, one panel per
    group kind (the same group of every block together, a few distinct colours each); the panel's
    title gives the memory its groups hold."""
    kinds: dict[str, list[str]] = {}
    for g in table.groups:
        kinds.setdefault(group_kind(g), []).append(g)
    n = len(kinds)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(3.2 * ncols + 0.6, 2.7 * nrows + 0.9), sharex=True, sharey=True,
                           squeeze=False)
    colours = pyplot().get_cmap("tab10")
    drops = [r["acc_drop"] for g in table.groups for r in table.for_group(g)]
    for ax, (kind, groups) in zip(axes.flat, kinds.items()):
        for i, g in enumerate(groups):
            rows = table.for_group(g)
            ax.plot([100 * r["ratio"] for r in rows], [r["acc_drop"] for r in rows], "o-", ms=3, lw=1.2,
                    color=colours(i % 10), label=g if len(groups) > 1 else "drop")
        ax.axhline(0, color="grey", lw=0.8)
        if max_acc_drop is not None:
            ax.axhline(max_acc_drop, color="tab:red", ls="--", lw=1, label=f"limit ({max_acc_drop:g} pts)")
        top = max((r["memory_saved_frac"] for g in groups for r in table.for_group(g)), default=0.0)
        ax.set_title(f"{kind}: {len(groups)} group{'s' if len(groups) != 1 else ''}, at most {top:.0%} saved each",
                     fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if drops:
        low, high = min(0.0, *drops), max(drops + ([max_acc_drop] if max_acc_drop is not None else []))
        axes.flat[0].set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
    for ax in axes[-1]:
        ax.set_xlabel("removed (% of the group)")
    for ax in axes[:, 0]:
        ax.set_ylabel("calib top-1 drop (points)")
    fig.suptitle("Sensitivity: each group pruned alone (calibration split)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_tradeoff(path, summary: dict, series: dict, max_acc_drop: float | None = None) -> None:
    """Calibration top-1 against memory saved: the policy's series, dense and the pruned result."""
    fig, ax = new_figure()
    markers = "os^vD<>p"
    for i, (name, pts) in enumerate(series.items()):
        pts = [p for p in pts if p and p[1] is not None]
        if pts:
            ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], markers[i % len(markers)] + "-",
                    ms=4, lw=1, label=name)
    calib = summary["calib"]
    ax.plot([0], [100 * calib["dense_top1"]], "k*", ms=12, label="dense")
    ax.plot([100 * summary["memory_saved"]], [100 * calib["pruned_top1"]], "r*", ms=14, label=f"{summary['policy']} result")
    if calib.get("finetuned_top1") is not None:
        ax.plot([100 * summary["memory_saved"]], [100 * calib["finetuned_top1"]], "g*", ms=14, label="fine-tuned")
    if max_acc_drop is not None:
        limit_line(ax, 100 * calib["dense_top1"] - max_acc_drop, f"accuracy limit (-{max_acc_drop:g} pts)")
    ax.set_xlim(left=-2)  # a share: from zero (the dense star sits on it)
    ax.set_xlabel(f"memory saved (% of the dense model, {summary['constraints']['precision']})")
    ax.set_ylabel("calibration top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against memory")
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------
def _latency_cell(m: dict, decimals: int | None = None) -> str:
    """A latency figure (with `decimals`, as the rest of its column) with its interquartile spread,
    marked '?' when the run judged it unreliable."""
    text = format_number(m.get("latency_ms")) if decimals is None else _fixed(m.get("latency_ms"), decimals)
    if m.get("latency_spread") is not None:
        text += f" ±{100 * m['latency_spread'] / 2:.0f}%"
    return text + (" ?" if m.get("latency_reliable") is False else "")


def format_summary_table(summary: dict) -> str:
    """The dense / pruned / fine-tuned table (test split) the CLI and the demo print."""
    head = (f"{'model':10s} {'top-1':>8s} {'params':>11s} {'mem fp32':>10s} {'mem int8':>10s} {'MACs':>14s} "
            f"{'energy mJ':>10s} {'latency ms':>14s}")
    lines = [f"policy {summary['policy']}: test split; constraints "
             f"{'met' if summary['constraints_met'] else 'NOT met'} (calibration drop "
             f"{summary['constraint_checks']['acc_drop_calib']:.2f} points, limit "
             f"{summary['constraints']['max_acc_drop']:g}); memory saved {summary['memory_saved']:.2%}", head]
    for name in ("dense", "pruned", "finetuned"):
        m = summary.get(name)
        if not m:
            continue
        lines.append(f"{name:10s} {format_percent(m['top1']):>8s} {m['params']:>11,d} {format_bytes(m['memory_bytes']['fp32']):>10s} "
                     f"{format_bytes(m['memory_bytes']['int8']):>10s} {m['macs']:>14,d} {format_number(m['energy_mj']):>10s} "
                     f"{_latency_cell(m):>14s}")
    if any((summary.get(n) or {}).get("latency_reliable") is False for n in ("dense", "pruned", "finetuned")):
        lines.append("? latency unreliable: " + "; ".join((summary.get("latency") or {}).get("why") or []))
    lines.append(f"wall time {summary['wall_time_s']:.1f} s")
    return "\n".join(lines)


def plural(n: int, word: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def with_error(top1: float | None, n: int | None) -> str:
    """A top-1 with its standard error on n images: '90.46% ± 0.29'; without n, the top-1 alone."""
    if top1 is None:
        return MISSING
    if not n:
        return format_percent(top1)
    return f"{format_percent(top1)} ± {100 * top1_standard_error(top1, n):.2f}"


def drop_with_error(drop_points: float, a: float, b: float, n: int | None) -> str:
    """A drop in points between top-1 a and b, both on the same n images, with the standard error of
    the difference (taken as independent: an upper bound when the two models err on the same images)."""
    if not n:
        return f"{drop_points:.2f} points"
    se = 100 * math.hypot(top1_standard_error(a, n), top1_standard_error(b, n))
    return f"{drop_points:.2f} ± {se:.2f} points"


def _test_images(s: dict, name: str = "dense") -> int | None:
    m = s.get(name) or {}
    return m.get("images") or s.get("test_images")


def _constraints_section(s: dict) -> list[str]:
    c, k = s["constraints"], s["constraint_checks"]
    cal, n_test = s["calib"], _test_images(s)
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    judged_ft = k.get("limit_judged_on") == "fine-tuned model" and cal.get("finetuned_top1") is not None
    final_calib = cal["finetuned_top1"] if judged_ft else cal["pruned_top1"]
    lines = ["## Constraints", "",
             "Accuracy drops are dense minus pruned top-1, in points, ± their standard error (each top-1 counted on "
             "the images named; see Results).", "",
             "| constraint | asked | reached | met |", "|---|---|---|---|",
             f"| accuracy drop, calibration split ({plural(cal['n'], 'image')}) | <= {c['max_acc_drop']:g} points | "
             f"{drop_with_error(k['acc_drop_calib'], cal['dense_top1'], final_calib, cal['n'])} | {yes(k['acc_ok'])} |"]
    target = []
    if c.get("target_saving") is not None:
        target.append(f"save >= {format_percent(c['target_saving'])}")
    if c.get("memory_budget") is not None:
        target.append(f"<= {format_bytes(c['memory_budget'])}")
    lines.append(f"| memory at {c['precision']} | {' and '.join(target) or 'none'} | {format_bytes(k['memory_bytes'])} "
                 f"({format_percent(s['memory_saved'])} saved) | {yes(k['memory_ok'])} |")
    test_n = f" ({plural(n_test, 'image')})" if n_test else ""
    lines.append(f"| (for information) accuracy drop, test split{test_n} | | "
                 f"{drop_with_error(k['acc_drop_test'], s['dense']['top1'], s['pruned']['top1'], n_test)} | |")
    if k.get("acc_drop_test_finetuned") is not None and s.get("finetuned"):
        lines.append(f"| (for information) accuracy drop after fine-tuning, test split{test_n} | | "
                     f"{drop_with_error(k['acc_drop_test_finetuned'], s['dense']['top1'], s['finetuned']['top1'], n_test)}"
                     " | |")
    return lines + [""]


def _fixed(x, decimals: int) -> str:
    return MISSING if x is None else f"{x:.{decimals}f}"


def _column_decimals(values, significant: int = 3, least: int = 2) -> int:
    """Decimals that give the column's smallest non-zero figure `significant` significant digits
    (at least `least`): one fixed format for the whole column, never an exponent."""
    small = min((abs(v) for v in values if v), default=None)
    if small is None:
        return least
    return max(least, significant - 1 - math.floor(math.log10(small)))


def _whole(x) -> str:
    return MISSING if x is None else f"{round(x):,}"


def _results_section(s: dict) -> list[str]:
    lines = _results_table(s) + [""] + _results_notes(s)
    lat = s.get("latency") or {}
    if lat and not lat.get("reliable", True):
        lines += ["", "**Latency marked ? is unreliable**: " + "; ".join(lat.get("why") or []) + "."]
    lines += _deployed_lines(s.get("finetuned") or s.get("pruned") or {})
    if s.get("finetune"):
        ft = s["finetune"]
        lines.append(f"Fine-tuning: {plural(ft['epochs'], 'epoch')}, lr {ft['lr']:g}"
                     + (f", distillation from the dense model (weight {ft['kd_weight']:g}, T {ft['kd_temperature']:g})"
                        if ft.get("kd") else ", no distillation") + ".")
    return lines + [""]


def _results_table(s: dict) -> list[str]:
    """The heading and one row per model of the run (dense, pruned, fine-tuned)."""
    lines = ["## Results (test split)", "",
             "| model | top-1 | top-5 | params | memory fp32 | memory fp16 | memory int8 | MACs | SOPs | energy (mJ) | "
             "latency (ms) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    shown = [s[name] for name in ("dense", "pruned", "finetuned") if s.get(name)]
    energy_dp = _column_decimals([m.get("energy_mj") for m in shown])
    latency_dp = _column_decimals([m.get("latency_ms") for m in shown])
    for name in ("dense", "pruned", "finetuned"):
        m = s.get(name)
        if not m:
            continue
        mb, n = m["memory_bytes"], _test_images(s, name)
        lines.append(f"| {name} | {with_error(m['top1'], n)} | {with_error(m.get('top5'), n)} | {m['params']:,} | "
                     f"{format_bytes(mb.get('fp32'))} | {format_bytes(mb.get('fp16'))} | {format_bytes(mb.get('int8'))} | "
                     f"{m['macs']:,} | {_whole(m.get('sops'))} | {_fixed(m.get('energy_mj'), energy_dp)} | "
                     f"{_latency_cell(m, latency_dp)} |")
    return lines


def _results_notes(s: dict) -> list[str]:
    """What the table's figures rest on: images, standard errors, the calibration split, SOPs, latency."""
    n_test = _test_images(s)
    cal = s["calib"]
    measured = s.get("settings", {}).get("measure_images")
    return [(f"Top-1 and top-5 on {plural(n_test, 'test image')}; " if n_test else "Top-1 and top-5 on the test "
             "split; ") + "± is the standard error of that figure (sqrt(p(1-p)/n), in points): figures closer "
            "than about two of them cannot be told apart.",
            f"Calibration split ({plural(cal['n'], 'image')}, where every decision was made): dense "
            f"{with_error(cal['dense_top1'], cal['n'])}, pruned {with_error(cal['pruned_top1'], cal['n'])}"
            + (f", fine-tuned {with_error(cal['finetuned_top1'], cal['n'])}" if cal.get("finetuned_top1") is not None
               else "") + ".",
            "MACs per image; SOPs (synaptic operations: spikes times the fan-out they reach) and energy are means "
            + (f"over {plural(min(measured, n_test or measured), 'test image')}" if measured else "over test images")
            + "; energy: the Spikformer papers' 45 nm estimate. Latency: batch 1, median of the repeats, the models "
            "timed in turn (interleaved), ± half the interquartile range; on this machine."]


def _deployed_lines(final: dict) -> list[str]:
    """The final model's weights as an exported file stores them (none when the summary lacks them)."""
    if not final.get("deployed_bytes"):  # what an embedded target stores: `spikeprune export` writes these weights
        return []
    dep = final["deployed_bytes"]
    lines = [f"Deployed weights (BatchNorm folded into the layer before it, as `spikeprune export` writes them; "
             f"int8 with its per-channel scales and zero points; the graph itself adds a little): "
             f"fp32 {format_bytes(dep['fp32'])}, fp16 {format_bytes(dep['fp16'])}, int8 {format_bytes(dep['int8'])}"
             + (f", int4 {format_bytes(final['file_bytes']['int4'])} (packed; first conv and head at int8)"
                if final.get("file_bytes") else "") + "."]
    plan = (final.get("file_bytes") or {}).get("plan")
    if plan and plan["quantised"]:  # a model whose weights are on a per-layer precision grid
        held = ", ".join(f"{p} {format_bytes(b)} ({plan['share_of_weights'][p]:.1%} of the weights)"
                         for p, b in plan["by_precision"].items() if b)
        lines.append(f"This model's weights as its file holds them: {format_bytes(plan['total'])} ({held}; "
                     f"{plan['bits_per_weight']:.2f} bits per weight).")
    return lines


def _widths_section(s: dict) -> list[str]:
    lines = ["## Widths per group (before -> after)", "",
             "Before is the dense model's width, after the final one (from the pruning record). A policy's own table "
             "below may show other \"before\" widths: it gives each step's width after the steps before it (and a "
             "removed head takes its channels of qk and v with it).", "",
             "| group | unit | before | after | removed |", "|---|---|---|---|---|"]
    for w in s["widths"]:
        after = w["after"]
        removed = "-" if after is None else (f"{1 - after / w['before']:.0%}" if after != w["before"] else "")
        lines.append(f"| {w['group']} | {w['unit']} | {w['before']} | {after} | {removed} |")
    return lines + [""]


def _cost_section(s: dict) -> list[str]:
    fc = s.get("forward_cost") or {}
    total = fc.get("calib_evaluations_this_run", 0)
    policy = (s.get("cost") or {}).get("policy_calib_passes")
    split = ""
    if policy is not None and not s.get("resumed"):
        split = (f": {policy:,} while the policy ran (its search, and the dense model's figure), "
                 f"{max(total - policy, 0):,} after it (the run's own checks of the pruned"
                 + (" and fine-tuned models" if s.get("finetuned") else " model") + ")")
    lines = ["## Cost", "", f"- wall time: {s['wall_time_s']:.1f} s" + (" (over several sessions: resumed)" if s.get("resumed") else ""),
             f"- calibration passes (one evaluation of a model on the calibration split) in this session: "
             f"{total:,} ({fc.get('calib_images_this_run', 0):,} images){split}"]
    sc = fc.get("sensitivity")
    if sc:
        lines.append(f"- sensitivity analysis: {sc['candidates']} candidates, {sc['spent']:,.0f} image-block passes spent "
                     f"against {sc['full_recompute']:,.0f} for recomputing everything ({sc['ratio']:.2f}x fewer; "
                     f"{sc['rows_reused']} rows reused from an earlier session). Unit: {sc['unit']}; here the stem "
                     f"counts {sc['stem_units']:.2f} blocks and a full forward {sc['full_forward_units']:.2f}.")
    return lines + [""]


def write_report(run_dir, summary: dict, sections=(), table=None) -> Path:
    """Write RUN/report.md from the summary, the policy's sections and the plots."""
    s = summary
    ok = s["constraints_met"]
    k = s["constraint_checks"]
    ft = s.get("finetuned")
    cal, n_test = s["calib"], _test_images(s)
    head = [f"# spikeprune run: {s['policy']} on {s.get('model') or 'a model'} / {s.get('data')}", "",
            f"**Outcome: constraints {'met' if ok else 'NOT met'}.** The "
            + ("fine-tuned" if k.get("limit_judged_on") == "fine-tuned model" else "pruned") + " model "
            f"{'loses' if k['acc_drop_calib'] >= 0 else 'gains'} {abs(k['acc_drop_calib']):.2f} points of calibration "
            f"top-1 ({plural(cal['n'], 'image')}; limit {s['constraints']['max_acc_drop']:g}) and saves "
            f"{format_percent(s['memory_saved'])} of the memory "
            f"({format_bytes(s['dense']['memory_bytes']['fp32'])} -> {format_bytes(s['pruned']['memory_bytes']['fp32'])} at fp32). "
            f"Test top-1" + (f" on {plural(n_test, 'image')}" if n_test else "") + ": dense "
            f"{with_error(s['dense']['top1'], n_test)}, pruned {with_error(s['pruned']['top1'], n_test)}"
            + (f", fine-tuned {with_error(ft['top1'], n_test)}" if ft else "") + " (± standard error, points).", ""]
    if not k["acc_ok"]:
        head.append("The accuracy limit is broken: see the policy's section below for why.\n")
    if not k["memory_ok"]:
        head.append(f"The memory target is not reached: {format_bytes(k['memory_bytes'])} against a budget of "
                    f"{format_bytes(k['budget_bytes'])}.\n")
    body = head + _constraints_section(s) + _results_section(s) + _widths_section(s)
    plots = s.get("plots") or []
    if plots:
        body += ["## Plots", ""]
        for p in plots:
            body += [f"![{p.get('caption', '')}]({p['file']})", f"*{p.get('caption', '')}*", ""]
    cal = s["calib"]
    calib_note = (f"*Calibration top-1 figures in this section rest on the {plural(cal['n'], 'calibration image')}: "
                  f"at the dense model's {format_percent(cal['dense_top1'])} one of them has a standard error of "
                  f"{100 * top1_standard_error(cal['dense_top1'], cal['n']):.2f} points.*")
    for title, md in sections:
        body += [f"## {title}", "", md.rstrip(), "", calib_note, ""]
    body += _cost_section(s)
    if s.get("warnings"):
        body += ["## Warnings", ""] + [f"- {w}" for w in s["warnings"]] + [""]
    body += ["## Files", "", "- `model/`: the final model (`spikeprune.load_model`, or MODEL in any command)",
             "- `summary.json`: every figure above", "- `sensitivity.csv`: the per-group sensitivity table"
             if table is not None else None, "- `steps/`: finished steps, reused when the same command is run again",
             "- `run.json`: every setting of the run (a rerun with other settings is refused; --force replaces it)",
             "- `log.txt`: the run's log", ""]
    path = Path(run_dir) / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(x for x in body if x is not None) + "\n")
    return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str, callable]]) -> str:
    """rows -> a markdown table; columns are (header, key, format function)."""
    out = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k)) for _, k, fmt in columns) + " |")
    return "\n".join(out)


__all__ = ["plot_uniform_sweep", "plot_sensitivity", "plot_tradeoff", "format_summary_table", "write_report",
           "markdown_table", "plural", "with_error", "drop_with_error"]
