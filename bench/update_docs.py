"""Write the benchmark tables of README.md and docs/ from the results the benchmarks stored in
bench/results/, between markers, so that no figure in the documentation is copied by hand:

    <!-- bench-table:NAME:start -->
    ...written here...
    <!-- bench-table:NAME:end -->

    python bench/update_docs.py            # rewrite every marked table
    python bench/update_docs.py --check    # exit 1 (listing them) if a committed table differs

Each table is drawn from the JSON a benchmark command wrote (bench/policies.py's policies.json, the
run folders' summary.json that `spikeprune prune` wrote); the policy tables use bench/policies.py's
own table functions, so they read exactly as the command printed them. tests/test_docs_tables.py
runs the check.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import policies as bench_policies  # noqa: E402  (bench/policies.py, beside this script)
import time_loop as bench_time_loop  # noqa: E402  (bench/time_loop.py, beside this script)

from spikeprune.stats import differ  # noqa: E402
from spikeprune.units import format_percent  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
MARKER = re.compile(r"(<!-- bench-table:([\w.-]+):start -->\n)(.*?)(<!-- bench-table:\2:end -->)", re.S)

# The policy benchmarks the docs show, by the folder their command wrote (bench/results/<folder>).
BENCHMARKS = {
    "mnist5k": ("", "Spikformer-2-128, mnist5k"),
    "fmnist": ("fmnist", "Spikformer-2-128, Fashion-MNIST"),
    "sdt-fmnist-quick": ("sdt-fmnist-quick", "SDT-2-128, Fashion-MNIST (quick)"),
    "sdt-mnist-quick": ("sdt-mnist-quick", "SDT-1-64, mnist5k (quick)"),
}


def _bench(name: str) -> dict:
    folder, _ = BENCHMARKS[name]
    return json.loads((RESULTS / folder / "policies.json").read_text())


def _result(doc: dict, policy: str, limit: float) -> dict:
    return next(r for r in doc["results"] if r["policy"] == policy and r["limit"] == limit)


def _summary(path: str) -> dict:
    return json.loads((RESULTS / path / "summary.json").read_text())


def policy_tables(name: str) -> str:
    """The main table at each limit and the frontier, as bench/policies.py wrote them."""
    doc = _bench(name)
    out = []
    for limit in doc["settings"]["limits"]:
        out += [f"Limit {limit:g} point{'s' if limit != 1 else ''}:", "", bench_policies.main_table(doc, limit), ""]
    if doc["frontier"]:
        out += ["Frontier (test top-1 at each memory target" + (", before -> after the common fine-tuning):"
                                                                 if doc["settings"].get("frontier_finetune") else "):"),
                "", bench_policies.frontier_table(doc), ""]
    return "\n".join(out)


def at_a_glance() -> str:
    """Per benchmark and limit: memory saved and test top-1 (before fine-tuning) of the three
    sensitivity-driven policies; the dense test top-1 beside it."""
    pols = ("psvit", "primesvt", "shrink")
    lines = ["| model, data | limit | dense top-1 | " + " | ".join(bench_policies.LABELS[p] for p in pols) + " |",
             "|---|---|---|" + "---|" * len(pols)]
    for name, (folder, label) in BENCHMARKS.items():
        doc = _bench(name)
        link = f"[{label}](bench/results/{folder + '/' if folder else ''}policies.md)"
        for limit in doc["settings"]["limits"]:
            cells = [f"{format_percent(r['memory_saved'], 1)} saved, {format_percent(r['test']['top1'])}"
                     for r in (_result(doc, p, limit) for p in pols)]
            lines.append(f"| {link} | {limit:g} | {format_percent(doc['dense']['test']['top1'])} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shrink_holdout() -> str:
    """`shrink` with and without --holdout 0.5 and PrimeSVT, on the Fashion-MNIST benchmark's caps."""
    doc = _bench("fmnist")
    lines = ["| limit | policy | memory saved | calib drop | test top-1 | calibration images |",
             "|---|---|---|---|---|---|"]
    for limit in (1.0, 3.0):
        held = _summary(f"shrink-holdout/holdout-L{limit:g}")
        rows = [("`shrink`", _result(doc, "shrink", limit)), ("`shrink --holdout 0.5`", None),
                ("PrimeSVT", _result(doc, "primesvt", limit))]
        for label, r in rows:
            if r is None:
                saved, drop = held["memory_saved"], held["constraint_checks"]["acc_drop_calib"]
                test, images = held["top1"]["test"], held["cost"]["policy_calib_images"]
            else:
                saved, drop, test, images = r["memory_saved"], r["calib_drop"], r["test"]["top1"], r["cost"]["calib_images"]
            lines.append(f"| {limit:g} | {label} | {format_percent(saved)} | {drop:.2f} | {format_percent(test)} | "
                         f"{images:,} |")
    return "\n".join(lines) + "\n"


def shrink_aims() -> str:
    """Memory `shrink` keeps against PrimeSVT's, test top-1 before fine-tuning against PrimeSVT's
    (and whether the test split tells them apart), calibration images against PrimeSVT's."""
    lines = ["| benchmark | limit | memory kept vs PrimeSVT | test top-1, shrink vs PrimeSVT | calibration images "
             "vs PrimeSVT |", "|---|---|---|---|---|"]
    for name, (folder, label) in BENCHMARKS.items():
        doc = _bench(name)
        n = doc["split_sizes"]["test"]
        for limit in doc["settings"]["limits"]:
            s, p = _result(doc, "shrink", limit), _result(doc, "primesvt", limit)
            kept = (1 - s["memory_saved"]) / (1 - p["memory_saved"])
            ts, tp = s["test"]["top1"], p["test"]["top1"]
            apart = "more than 2 SE apart" if differ(ts, tp, n, n) else "within 2 SE"
            lines.append(f"| {label} | {limit:g} | {kept:.2f}x | {format_percent(ts)} vs {format_percent(tp)}, {apart} | "
                         f"{s['cost']['calib_images'] / p['cost']['calib_images']:.1f}x |")
    return "\n".join(lines) + "\n"


def distributed_timings() -> str:
    """The CPU timings of one and two processes (bench/results/distributed-cpu.json says how they were taken)."""
    doc = json.loads((RESULTS / "distributed-cpu.json").read_text())

    def cell(runs: list[dict], per_process: bool) -> str:
        if not runs:
            return "-"
        fmt = lambda key: " / ".join(str(r[key]) if isinstance(r[key], int) else f"{r[key]:.1f}" for r in runs)  # noqa: E731
        return f"{fmt('cpu_s')} s CPU{' per process' if per_process else ''} (wall {fmt('wall_s')} s)"

    lines = ["| job | " + " | ".join(doc["settings"]) + " |", "|---|" + "---|" * len(doc["settings"])]
    for job in doc["jobs"]:
        cells = [cell(job["runs"].get(s, []), s.startswith("2 processes")) for s in doc["settings"]]
        lines.append(f"| {job['job']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bytes_table() -> str:
    """Bytes against accuracy (bench/bytes.py's bytes.json): per model, each row's weights, its share
    of the dense fp32 weight bytes, the whole file, test top-1 +- one SE, and the aim where one is set."""
    doc = json.loads((RESULTS / "bytes.json").read_text())
    lines = ["| model | row | weights | share of dense fp32 weights | file bytes | test top-1 | aim |",
             "|---|---|---|---|---|---|---|"]
    for m in doc["models"]:
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"| {m['model']} | {r['row']} | - | - | - | {r['error']} | - |")
                continue
            aim = "-"
            if r.get("aim"):
                a = r["aim"]
                aim = (f"within {a['points']:g} pt: met" if a["met"] else
                       f"within {a['points']:g} pt: missed by {a['missed_by_points']:.2f} pt")
            lines.append(f"| {m['model']} | {r['row']} | {r['precision']} | {r['share_of_dense_fp32']:.2%} | "
                         f"{r['file_bytes']:,} | {100 * r['test_top1']:.2f}% +- {r['se_points']:.2f} | {aim} |")
    return "\n".join(lines) + "\n"


TABLES = {
    "at-a-glance": at_a_glance,
    "bytes": bytes_table,
    "policies-mnist5k": lambda: policy_tables("mnist5k"),
    "policies-fmnist": lambda: policy_tables("fmnist"),
    "shrink-holdout": shrink_holdout,
    "shrink-aims": shrink_aims,
    "distributed-timings": distributed_timings,
    "time-loop": lambda: bench_time_loop.docs_table(json.loads((RESULTS / "time-loop.json").read_text())),
}


def rewrite(text: str) -> str:
    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"bench/update_docs.py: error: no table named {name!r}; known: {', '.join(TABLES)}")
        return m.group(1) + TABLES[name]() + m.group(4)

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a committed table differs")
    args = p.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = rewrite(text)
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("tables differ from bench/results (run python bench/update_docs.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    if not args.check:
        print(f"rewrote the tables of {', '.join(stale)}" if stale else "every table is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
