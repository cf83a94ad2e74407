"""Run the whole bad-input table (bench/bad_input_cases.py, issue 10) and print one line per row and
the totals: clear errors / tracebacks / silent wrong / files lost (and the rarer outcomes: a clear
error in other words than expected, files left behind, work done before the refusal).

    python bench/bad_inputs.py            # every row, about a minute on one core
    python bench/bad_inputs.py --json out.json
Exit status 0 when every row is a clear error, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from bad_input_cases import CASES, CATEGORIES, World, run_case  # bench/bad_input_cases.py, beside this script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="also write every row's outcome to this file")
    p.add_argument("-k", default=None, help="only rows whose id contains this text")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="spikeprune-bad-inputs-") as root:
        world = World.build(Path(root) / "world")
        for i, case in enumerate(c for c in CASES if not args.k or args.k in c.id):
            if case.needs_readonly and world.readonly is None:
                rows.append({"id": case.id, "category": "skipped", "message": "no read-only folder here"})
                continue
            o = run_case(case, world, Path(root) / f"case-{i}")
            rows.append({"id": case.id, "kind": case.kind, "owner": case.owner, "category": o.category,
                         "message": o.message.splitlines()[0] if o.message else "", "detail": o.detail,
                         "seconds": round(o.seconds, 2), "forwards": o.forwards})
            mark = "ok " if o.ok else "BAD"
            print(f"{mark} {case.kind:4s} {case.id[:60]:60s} {o.category:20s} {o.seconds:6.2f}s  "
                  f"{(o.message.splitlines() or [''])[0][:110]}", flush=True)
            if not o.ok and o.detail:
                print(f"    {o.detail[:300]}", flush=True)
    counts = Counter(r["category"] for r in rows)
    print()
    print(f"{len(rows)} bad inputs: " + ", ".join(f"{counts.get(c, 0)} {c}" for c in CATEGORIES)
          + (f", {counts['skipped']} skipped" if counts.get("skipped") else ""))
    print(f"totals: clear errors {counts.get('clear', 0) + counts.get('clear, other words', 0)} / "
          f"tracebacks {counts.get('traceback', 0)} / silent wrong {counts.get('silent wrong', 0)} / "
          f"files lost {counts.get('files lost', 0)}")
    open_rows = [r for r in rows if r["category"] not in ("clear", "skipped")]
    for r in open_rows:
        print(f"  open: {r['id']} ({r['category']}; owner: {r.get('owner') or 'helper C'})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "counts": dict(counts)}, indent=2) + "\n")
    return 0 if not open_rows else 1


if __name__ == "__main__":
    sys.exit(main())
