"""The exported files against PyTorch on the real test split (a benchmark, not a test:
`python bench/export_check.py`, a few minutes on 2 cores).

For the bundled model, dense and pruned (PRUNED: three quarters of each MLP hidden layer, half of
each q-k width and of stem stage 3, l2 importance, not fine-tuned: 94.8% calibration top-1, 1.77x
fewer MACs), at fp32, fp16 and int8: ONNX
Runtime's predicted classes against PyTorch's on every test image, the spike decisions that flip at
float32 threshold ties (fp32), the float64 comparison, the top-1 of both, and the file size beside
measure's int8 weight memory with the difference counted. Results: bench/results/export-check.json / .md.

Other models: `--model NAME=FOLDER` (repeatable; saved model folders, e.g. a run's RUN/model) replaces
the bundled pair, `--precisions` picks the files, `--out STEM` names the results
(bench/results/STEM.json / .md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spikeprune.bundled import bundled_model  # noqa: E402
from spikeprune.deploy import check_export, export  # noqa: E402
from spikeprune.serialization import load_model, write_json  # noqa: E402
from spikeprune.surgery import prune  # noqa: E402

OUT = ROOT / "bench" / "results"
PRUNED = {"block*.mlp.hidden": 0.75, "block*.attn.qk": 0.5, "stem.proj_conv2": 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--images", type=int, default=1000, help="test images (mnist5k has 1,000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                    help="a saved model to check instead of the bundled pair (repeatable)")
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--out", default="export-check", metavar="STEM", help="results: bench/results/STEM.json / .md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if args.model:
        models = []
        for item in args.model:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                ap.error(f"give --model as NAME=FOLDER, got {item!r}")
            models.append((name, load_model(folder).eval()))
    else:
        dense = bundled_model().eval()
        pruned = prune(dense, PRUNED, "l2").eval()
        models = [("bundled dense", dense),
                  ("bundled pruned (MLP 0.75, q-k 0.5, stem 3 0.5; l2, not fine-tuned)", pruned)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models:
            for precision in precisions:
                path = Path(tmp) / f"m-{precision}.onnx"
                rep = export(model, path, precision=precision, check=False, force=True, progress=False, input="normalised")
                chk = check_export(path, model, args.data, split="test", n_images=args.images)
                row = {"model": name, "precision": precision, "bytes": rep["bytes"], "memory": rep["memory"],
                       "check": chk}
                rows.append(row)
                s = chk.get("spikes") or {}
                print(f"{name} {precision}: {rep['bytes']:,} B; agree {100 * chk['class_agreement']:.2f}% of "
                      f"{chk['images']}; top-1 torch {100 * chk['top1_torch']:.2f}% onnx {100 * chk['top1_onnx']:.2f}%; "
                      f"tie flips {s.get('tie_flips')}, downstream {s.get('downstream_flips')}; float64 max diff "
                      f"{chk['float64']['max_abs_logit_diff']:.1e}", flush=True)
    res = {"command": "python bench/export_check.py " + " ".join(sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                       "python": platform.python_version()}, "rows": rows}
    write_json(OUT / f"{args.out}.json", res)
    (OUT / f"{args.out}.md").write_text(to_markdown(res))
    print(to_markdown(res))


def to_markdown(res: dict) -> str:
    lines = ["# Exported ONNX files against PyTorch on the test split", "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}; torch {res['machine']['torch']}, "
             f"{res['machine']['cpus']} CPUs, {res['machine']['threads']} thread(s)", "",
             "Agreement = predicted classes of ONNX Runtime equal to PyTorch's (the fp32 model; for int8 / fp16 files "
             "since issue 25, the fake-quantised model the file computes, so its spikes are compared too). Tie flips: spike "
             "decisions that differ with identical spikes upstream (float32 rounding at the threshold), with the "
             "largest float64 distance of such a membrane to the threshold; downstream: flips that follow from them "
             "in the same image. float64: the folded, unrolled model against the original, both in float64.", "",
             "| model | weights | file bytes | agree | top-1 PyTorch fp32 | top-1 ONNX | tie flips (max dist.) "
             "| downstream | images with flips | float64 max logit diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c, s = r["check"], r["check"].get("spikes")
        flips = f"{s['tie_flips']} ({s['max_tie_margin']:.1e})" if s else "- (function changed by design)"
        lines.append(f"| {r['model']} | {r['precision']} | {r['bytes']:,} | {100 * c['class_agreement']:.2f}% of "
                     f"{c['images']} | {100 * c['top1_torch']:.2f}% | {100 * c['top1_onnx']:.2f}% | {flips} | "
                     f"{s['downstream_flips'] if s else '-'} | {s['images_with_flips'] if s else '-'} | "
                     f"{c['float64']['max_abs_logit_diff']:.1e} |")
    lines += ["", "## int8 file size against measure's int8 weight memory", "",
              "| model | measure int8 | BatchNorm folded | + scales | + zero points | = weights in file | + graph "
              "| = file |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["precision"] != "int8":
            continue
        rec = r["memory"]["int8_reconciliation"]
        lines.append(f"| {r['model']} | {rec['measure_int8']:,} | {rec['batchnorm_folding']:+,} | {rec['scales']:,} | "
                     f"{rec['zero_points']:,} | {rec['weights_in_file']:,} | {rec['graph']:,} | {rec['file']:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
