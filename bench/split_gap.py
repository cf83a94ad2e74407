"""Does a pruned model's calibration drop predict its test drop? Top-1 of a dense model and of
pruned models on the *whole* calibration and test splits (not the capped subsets a run decided
on), with each model's drop against the dense one.

    python bench/split_gap.py DENSE NAME=MODEL [NAME=MODEL ...] --data fashion-mnist --out bench/results/X

MODEL: anything `spikeprune evaluate` loads (a saved model folder, e.g. RUN/model, or
RUN/steps/policy_model for a run that fine-tuned). Writes OUT/split_gap.json and OUT/split_gap.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from spikeprune.cli import resolve_model
from spikeprune.data import dataset_for_model
from spikeprune.errors import SpikepruneError
from spikeprune.serialization import write_json
from spikeprune.training import evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dense", help="the dense model the others were pruned from")
    p.add_argument("models", nargs="+", metavar="NAME=MODEL")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    named = [("dense", a.dense)]
    for item in a.models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"give each pruned model as NAME=MODEL, got {item!r}")
        named.append((name, path))
    try:
        models = [(name, path, resolve_model(argparse.Namespace(model_spec=path, preset=None, checkpoint=None,
                                                                overrides=[])).eval()) for name, path in named]
    except SpikepruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, t0 = [], time.perf_counter()
    splits = {s: dataset_for_model(a.data, models[0][2], split=s) for s in ("calib", "test")}
    for name, path, model in models:
        row = {"name": name, "model": path}
        for split, ds in splits.items():
            r = evaluate(model, ds, split=split, batch_size=256, progress=False)
            row[split] = {"top1": r["top1"], "n": len(ds)}
        rows.append(row)
        print(f"{name}: calib {row['calib']['top1']:.2%}, test {row['test']['top1']:.2%}", flush=True)
    dense = rows[0]
    for row in rows:
        for split in splits:
            row[split]["drop"] = (dense[split]["top1"] - row[split]["top1"]) * 100
    a.out.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/split_gap.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(a.out / "split_gap.json", {"command": cmd, "data": a.data, "rows": rows,
                                          "wall_s": time.perf_counter() - t0})
    se = {s: 100 * math.sqrt(max(dense[s]["top1"] * (1 - dense[s]["top1"]), 1e-12) / dense[s]["n"]) for s in splits}
    lines = [f"`{cmd}`", "",
             f"Top-1 on the whole calibration split ({dense['calib']['n']:,} images) and test split "
             f"({dense['test']['n']:,}); drops in points against the dense model (one standard error at its "
             f"accuracy: {se['calib']:.2f} / {se['test']:.2f} points).", "",
             "| model | calib top-1 | calib drop | test top-1 | test drop | test drop - calib drop |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        c, t = row["calib"], row["test"]
        lines.append(f"| {row['name']} | {c['top1']:.2%} | {c['drop']:.2f} | {t['top1']:.2%} | {t['drop']:.2f} "
                     f"| {t['drop'] - c['drop']:+.2f} |")
    (a.out / "split_gap.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out / 'split_gap.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
