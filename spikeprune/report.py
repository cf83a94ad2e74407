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

from pathlib import Path

from .plots import new_figure, pyplot, save_figure
from .serialization import atomic_path
from .units import format_bytes, format_number, format_percent


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
        ax.axhline(100 * dense_top1 - max_acc_drop, color="tab:red", ls="--", lw=1, label=f"limit (-{max_acc_drop:g} pts)")
    ax.set_xlabel("uniform ratio (fraction of every channel group removed)")
    ax.set_ylabel("top-1 (%)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(r, [100 * x["memory_saved_frac"] for x in rows], "s--", color="tab:green", label="memory saved")
    ax2.set_ylabel("memory saved (%)", color="tab:green")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=8)
    ax.set_title("Uniform channel pruning sweep")
    save_figure(fig, path)


def plot_sensitivity(path, table, max_acc_drop: float | None = None) -> None:
    """PSViT step 2: per group, accuracy drop against the ratio (left) and against memory saved (right)."""
    fig, (a, b) = new_figure(1, 2, figsize=(11, 4.4), sharey=True)
    cmap = pyplot().get_cmap("tab20")
    for i, g in enumerate(table.groups):
        rows = table.for_group(g)
        c = cmap(i % 20)
        a.plot([r["ratio"] for r in rows], [r["acc_drop"] for r in rows], "o-", ms=3, color=c, label=g)
        b.plot([100 * r["memory_saved_frac"] for r in rows], [r["acc_drop"] for r in rows], "o-", ms=3, color=c)
    for ax in (a, b):
        ax.axhline(0, color="grey", lw=0.8)
        if max_acc_drop is not None:
            ax.axhline(max_acc_drop, color="tab:red", ls="--", lw=1)
        ax.grid(alpha=0.3)
    a.set_xlabel("ratio (fraction of the group removed)")
    a.set_ylabel("calibration top-1 drop (points)")
    b.set_xlabel("memory saved (% of the dense model)")
    a.set_title("Sensitivity: each group pruned alone")
    a.legend(fontsize=6, ncol=2, loc="upper left")
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
        ax.axhline(100 * calib["dense_top1"] - max_acc_drop, color="tab:red", ls="--", lw=1,
                   label=f"limit (-{max_acc_drop:g} pts)")
    ax.set_xlabel(f"memory saved (% of the dense model, {summary['constraints']['precision']})")
    ax.set_ylabel("calibration top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against memory")
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------
def _latency_cell(m: dict) -> str:
    """A latency figure with its interquartile spread, marked '?' when the run judged it unreliable."""
    text = format_number(m.get("latency_ms"))
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


def _constraints_section(s: dict) -> list[str]:
    c, k = s["constraints"], s["constraint_checks"]
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    lines = ["## Constraints", "", "| constraint | asked | reached | met |", "|---|---|---|---|",
             f"| accuracy drop, calibration split | <= {c['max_acc_drop']:g} points | {k['acc_drop_calib']:.2f} points | "
             f"{yes(k['acc_ok'])} |"]
    target = []
    if c.get("target_saving") is not None:
        target.append(f"save >= {format_percent(c['target_saving'])}")
    if c.get("memory_budget") is not None:
        target.append(f"<= {format_bytes(c['memory_budget'])}")
    lines.append(f"| memory at {c['precision']} | {' and '.join(target) or 'none'} | {format_bytes(k['memory_bytes'])} "
                 f"({format_percent(s['memory_saved'])} saved) | {yes(k['memory_ok'])} |")
    lines.append(f"| (for information) accuracy drop, test split | | {k['acc_drop_test']:.2f} points | |")
    if k.get("acc_drop_test_finetuned") is not None:
        lines.append(f"| (for information) accuracy drop after fine-tuning, test split | | "
                     f"{k['acc_drop_test_finetuned']:.2f} points | |")
    return lines + [""]


def _results_section(s: dict) -> list[str]:
    lines = ["## Results (test split)", "",
             "| model | top-1 | top-5 | params | memory fp32 | memory fp16 | memory int8 | MACs | SOPs | energy (mJ) | "
             "latency (ms) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("dense", "pruned", "finetuned"):
        m = s.get(name)
        if not m:
            continue
        mb = m["memory_bytes"]
        lines.append(f"| {name} | {format_percent(m['top1'])} | {format_percent(m.get('top5'))} | {m['params']:,} | {format_bytes(mb.get('fp32'))} | "
                     f"{format_bytes(mb.get('fp16'))} | {format_bytes(mb.get('int8'))} | {m['macs']:,} | {format_number(m.get('sops'))} | "
                     f"{format_number(m.get('energy_mj'))} | {_latency_cell(m)} |")
    cal = s["calib"]
    lines += ["", f"Calibration split ({cal['n']} images, where every decision was made): dense {format_percent(cal['dense_top1'])}, "
                  f"pruned {format_percent(cal['pruned_top1'])}"
              + (f", fine-tuned {format_percent(cal['finetuned_top1'])}" if cal.get("finetuned_top1") is not None else "") + ".",
              "Latency: batch 1, median of the repeats, the models timed in turn (interleaved), ± half the "
              "interquartile range; on this machine. Energy: the Spikformer papers' 45 nm estimate."]
    lat = s.get("latency") or {}
    if lat and not lat.get("reliable", True):
        lines += ["", "**Latency marked ? is unreliable**: " + "; ".join(lat.get("why") or []) + "."]
    final = s.get("finetuned") or s.get("pruned") or {}
    if final.get("deployed_bytes"):  # what an embedded target stores: `spikeprune export` writes these weights
        dep = final["deployed_bytes"]
        lines.append(f"Deployed weights (BatchNorm folded into the layer before it, as `spikeprune export` writes them; "
                     f"int8 with its per-channel scales and zero points; the graph itself adds a little): "
                     f"fp32 {format_bytes(dep['fp32'])}, fp16 {format_bytes(dep['fp16'])}, int8 {format_bytes(dep['int8'])}.")
    if s.get("finetune"):
        ft = s["finetune"]
        lines.append(f"Fine-tuning: {ft['epochs']} epochs, lr {ft['lr']:g}"
                     + (f", distillation from the dense model (weight {ft['kd_weight']:g}, T {ft['kd_temperature']:g})"
                        if ft.get("kd") else ", no distillation") + ".")
    return lines + [""]


def _widths_section(s: dict) -> list[str]:
    lines = ["## Widths per group (before -> after)", "", "| group | unit | before | after | removed |", "|---|---|---|---|---|"]
    for w in s["widths"]:
        after = w["after"]
        removed = "-" if after is None else (f"{1 - after / w['before']:.0%}" if after != w["before"] else "")
        lines.append(f"| {w['group']} | {w['unit']} | {w['before']} | {after} | {removed} |")
    return lines + [""]


def _cost_section(s: dict) -> list[str]:
    fc = s.get("forward_cost") or {}
    lines = ["## Cost", "", f"- wall time: {s['wall_time_s']:.1f} s" + (" (over several sessions: resumed)" if s.get("resumed") else ""),
             f"- calibration passes in this session: {fc.get('calib_evaluations_this_run', 0)} "
             f"({fc.get('calib_images_this_run', 0):,} images)"]
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
    head = [f"# spikeprune run: {s['policy']} on {s.get('model') or 'a model'} / {s.get('data')}", "",
            f"**Outcome: constraints {'met' if ok else 'NOT met'}.** The pruned model "
            f"{'loses' if k['acc_drop_calib'] >= 0 else 'gains'} {abs(k['acc_drop_calib']):.2f} points of calibration "
            f"top-1 (limit {s['constraints']['max_acc_drop']:g}) and saves {format_percent(s['memory_saved'])} of the memory "
            f"({format_bytes(s['dense']['memory_bytes']['fp32'])} -> {format_bytes(s['pruned']['memory_bytes']['fp32'])} at fp32). "
            f"Test top-1: dense {format_percent(s['dense']['top1'])}, pruned {format_percent(s['pruned']['top1'])}"
            + (f", fine-tuned {format_percent(ft['top1'])}" if ft else "") + ".", ""]
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
    for title, md in sections:
        body += [f"## {title}", "", md.rstrip(), ""]
    body += _cost_section(s)
    if s.get("warnings"):
        body += ["## Warnings", ""] + [f"- {w}" for w in s["warnings"]] + [""]
    body += ["## Files", "", "- `model/`: the final model (`spikeprune.load_model`, or MODEL in any command)",
             "- `summary.json`: every figure above", "- `sensitivity.csv`: the per-group sensitivity table"
             if table is not None else "", "- `steps/`: finished steps, reused when the same command is run again",
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
           "markdown_table"]
