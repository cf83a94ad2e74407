"""Bytes against accuracy, side by side (issue 25, point 4): pruning alone, pruning + int8, and
bitshrink's widths and int4 / int8 weights chosen together under budgets of the exported file.

    python bench/bytes.py --quick     # the bundled mnist5k Spikformer, capped splits, 1 fine-tuning epoch
                                      # (a few CPU minutes): bench/results/bytes-quick.{json,md}
    python bench/bytes.py             # the full protocol: the bundled Fashion-MNIST Spikformer and SDT
                                      # and the mnist5k Spikformer, whole splits: bench/results/bytes.{json,md}

Not a test. For each model, the rows:
  dense fp32          the model as shipped
  PrimeSVT            `--policy primesvt --max-acc-drop L`, fine-tuned (the common fine-tuning)
  PrimeSVT + int8     that fine-tuned model with int8 weights (post-training, per-channel symmetric)
  shrink + int8       `--policy shrink --target-saving 0.8 --limit-after-finetune`, fine-tuned, then int8
                      weights
  bitshrink B%        `--policy bitshrink --precision file-int4 --memory-budget B% of the dense fp32
                      weight bytes --limit-after-finetune` (widths: shrink's walk to the budget and the
                      uniform grid, scored against each other), fine-tuned quantisation-aware
The common fine-tuning: the same epochs, learning rate and distillation from the dense fp32 model
for every row (quantisation-aware for bitshrink, whose model is on its int4 / int8 grid).

Columns: weight bytes (what the file holds for the weights: BatchNorm folded, int4 packed, scales,
zero points; spikeprune.precision), graph bytes (the rest of the file: the unrolled graph, names,
framing, the input normalisation), file bytes (the exported ONNX file on disk, written by
spikeprune.export and checked there), the share of the dense fp32 weight bytes, test top-1 of the
model as the file computes it (fake-quantised in PyTorch; the ONNX file is checked against it
with ONNX Runtime on the test images: class agreement, and top-1 equal up to tie flips) with one
standard error, and for bitshrink the aim: within 1 point of the dense model at 2.5% of its fp32
weight bytes, within 3 points at 1.5% (met, or missed by how much).

Run folders go to WORK (default runs/bench-bytes/<quick|full>/); the same command again resumes
every run (spikeprune.run's resume) and reads back every file row it wrote and checked for the
same weights (WORK/<model>/<row>.row.json; delete them to write the files again).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spikeprune.bundled import bundled_model  # noqa: E402
from spikeprune.data import dataset_for_model  # noqa: E402
from spikeprune.deploy import check_export, export  # noqa: E402
from spikeprune.hashing import model_hash  # noqa: E402
from spikeprune.policy_api import Constraints  # noqa: E402
from spikeprune.precision import file_weight_bytes, model_plan  # noqa: E402
from spikeprune.quantise import apply_plan  # noqa: E402
from spikeprune.run import RunSettings, run  # noqa: E402
from spikeprune.serialization import load_model, write_json  # noqa: E402
from spikeprune.stats import top1_standard_error  # noqa: E402
from spikeprune.training import evaluate  # noqa: E402

FULL_MODELS = [("spikformer-2-128-fmnist", "fashion-mnist"), ("sdt-2-128-fmnist", "fashion-mnist"),
               ("spikformer-2-128-mnist", "mnist5k")]
QUICK_MODELS = [("spikformer-2-128-mnist", "mnist5k")]
BUDGETS = (0.05, 0.025, 0.015)  # of the dense fp32 weight bytes
AIMS = {0.025: 1.0, 0.015: 3.0}  # points of test top-1 the dense model may be above
PROTOCOL = {
    "full": {"caps": None, "finetune_epochs": 3, "limit": 1.0, "ratios": (0.1, 0.3, 0.5, 0.7, 0.9),
             "calib_batches": 4, "bit_options": {"bit_widths": "walk"}, "shrink_options": {}, "check_images": None},
    "quick": {"caps": {"train": 384, "calib": 100, "test": 300}, "finetune_epochs": 1, "limit": 1.0,
              "ratios": (0.5,), "calib_batches": 1,
              "bit_options": {"bit_widths": "both", "bit_ratios": "0.4,0.5,0.6,0.7,0.8", "bit_candidates": 1,
                              "bit_images": 50, "bit_probe_steps": 4, "bit_recal_images": 256,
                              # the walk bitshrink takes from shrink, as quick as the shrink row's
                              "shrink_step": 0.5, "screen_images": 100, "recal_images": 64, "check_recal_images": 64},
              "shrink_options": {"shrink_step": 0.5, "screen_images": 100, "recal_images": 64,
                                 "check_recal_images": 64},
              "check_images": 100},
}


def log(msg: str) -> None:
    print(f"[bytes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def settings(P: dict, data: str, out: Path, policy: str, constraints: Constraints, options=None, after=False,
             device: str = "cpu"):
    return RunSettings(device=device, data=data, output=out, policy=policy, constraints=constraints, ratios=P["ratios"],
                       calib_batches=P["calib_batches"], finetune_epochs=P["finetune_epochs"], kd=True,
                       finetune_lr=1e-4, options=options or {}, max_images=P["caps"], latency_repeats=1,
                       measure_images=64, progress=False, limit_after_finetune=after, model_spec=str(out.name))


def file_row(model, name: str, data: str, work: Path, precision, test, n_check: int | None) -> dict:
    """Export `model` (raw-pixel input), check the file on the test images against the model it
    should compute, and give its bytes and the test top-1 of that model."""
    path = work / f"{name}.onnx"
    rep = export(model, path, precision=precision, data=data, force=True, check=False, progress=False)
    chk = check_export(path, model, test, split="test", n_images=n_check or len(test), float64=False)
    reference = apply_plan(copy.deepcopy(model), rep["weight_precision"]) if set(
        rep["weight_precision"].values()) != {"fp32"} else model
    acc = evaluate(reference, test, split="test", progress=False)
    rec = rep["memory"]["reconciliation"]
    # layers the forward never calls (SDT's) are counted by the budget but are not in the file
    in_file = rec["counted"] + rec["outside_count"].get("never_called", 0)
    return {"weight_bytes": in_file, "budget_counted_bytes": rec["counted"], "graph_bytes": rep["bytes"] - in_file,
            "file_bytes": rep["bytes"],
            "precision": rep["precision"], "test_top1": acc["top1"], "test_images": int(acc["n"]),
            "se_points": 100 * top1_standard_error(acc["top1"], int(acc["n"])),
            "onnx_check": {"images": chk["images"], "class_agreement": chk["class_agreement"],
                           "top1_reference": chk["top1_reference"], "top1_onnx": chk["top1_onnx"],
                           "images_with_flips": chk["spikes"]["images_with_flips"]},
            "bytes_by_precision": rec["by_precision"], "share_of_weights": rec["share_of_weights"]}


# Rows "bitshrink uniform B%": where WORK/<model>/bitshrink-uniform-<B> holds a finished run, its
# model is written and checked beside the others (not rerun: the folder is read as it is). The ones
# in bench/results/bytes.md are bitshrink's uniform width grid alone, as it was before the walk
# (commit a484059; today's `--bit-widths uniform`), trained by bench/bytes_gpu.sh at that commit
# under this same protocol.
RUNS = ("primesvt", "shrink") + tuple(f"bitshrink-{f:g}" for f in BUDGETS)


def model_runs(preset: str, data: str, P: dict, work: Path, device: str = "cpu", only=None) -> dict:
    """The policy runs of one model (run folders under `work`, resumed when they exist): the part
    that trains, so the part worth a GPU (`--runs-only --device cuda`); their summaries by name."""
    dense = bundled_model(preset)
    work.mkdir(parents=True, exist_ok=True)
    dense_fp32 = file_weight_bytes(dense, "fp32")["total"]
    L = P["limit"]
    wanted = [r for r in RUNS if not only or r in only]
    out = {}
    for name in wanted:
        if name == "primesvt":
            log(f"{preset}: PrimeSVT at {L:g} points")
            args = ("primesvt", Constraints(max_acc_drop=L))
        elif name == "shrink":
            log(f"{preset}: shrink at an 80% target")
            # the walk goes to the target; the limit is judged after fine-tuning
            args = ("shrink", Constraints(max_acc_drop=L, target_saving=0.8), P["shrink_options"], True)
        else:
            frac = float(name.split("-", 1)[1])
            budget = int(frac * dense_fp32)
            log(f"{preset}: bitshrink at {frac:.1%} of the dense fp32 weight bytes ({budget:,} B)")
            args = ("bitshrink", Constraints(max_acc_drop=L, memory_budget=budget, precision="file-int4"),
                    P["bit_options"], True)
        try:
            out[name] = run(settings(P, data, work / name, *args, device=device), dense)
        except Exception as e:  # a budget the policy cannot reach is a row that says so, not a lost benchmark
            log(f"{preset}: {name}: {type(e).__name__}: {e}")
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def bench_model(preset: str, data: str, P: dict, work: Path, device: str = "cpu") -> dict:
    summaries = model_runs(preset, data, P, work, device)
    dense = bundled_model(preset)
    test = dataset_for_model(data, dense, "test", max_images=(P["caps"] or {}).get("test"))
    dense_fp32 = file_weight_bytes(dense, "fp32")["total"]
    rows = []

    def add(label, model, precision, extra=None):
        stem = label.replace(" ", "_").replace("%", "pc").replace("+", "plus")
        # a row written and checked before for these very weights is read back: a rerun goes on
        done, weights = work / f"{stem}.row.json", model_hash(model)
        saved = json.loads(done.read_text()) if done.exists() else {}
        if saved.get("model_hash") == weights:
            log(f"{preset}: {label}: written and checked before ({done.name})")
            row = saved["row"]
        else:
            log(f"{preset}: {label}: export and check")
            row = file_row(model, stem, data, work, precision, test, P["check_images"])
            write_json(done, {"model_hash": weights, "row": row})
        row = {"row": label, **row, **(extra or {})}
        row["share_of_dense_fp32"] = row["weight_bytes"] / dense_fp32
        rows.append(row)
        return row

    d = add("dense fp32", dense, "fp32")
    if "error" in summaries["primesvt"]:
        rows += [{"row": label, "error": summaries["primesvt"]["error"]} for label in ("PrimeSVT", "PrimeSVT + int8")]
    else:
        prime = load_model(work / "primesvt" / "model").eval()
        add("PrimeSVT", prime, "fp32", {"run": str(work / "primesvt"),
                                        "constraints_met": summaries["primesvt"].get("constraints_met")})
        add("PrimeSVT + int8", prime, "int8", {"run": str(work / "primesvt")})
    if "error" in summaries["shrink"]:
        rows.append({"row": "shrink + int8", "error": summaries["shrink"]["error"]})
    else:
        add("shrink + int8", load_model(work / "shrink" / "model").eval(), "int8", {"run": str(work / "shrink")})
    for frac in BUDGETS:
        name = f"bitshrink-{frac:g}"
        s = summaries[name]
        if "error" in s:
            rows.append({"row": f"bitshrink {frac:.1%}", "error": s["error"]})
            continue
        folders = [(f"bitshrink {frac:.1%}", name, s)]
        uniform = work / f"bitshrink-uniform-{frac:g}"  # see UNIFORM_ROWS
        if (uniform / "summary.json").exists():
            folders.append((f"bitshrink uniform {frac:.1%}", uniform.name,
                            json.loads((uniform / "summary.json").read_text())))
        for label, folder, summary in folders:
            model = load_model(work / folder / "model").eval()
            row = add(label, model, None, {"run": str(work / folder), "budget_bytes": int(frac * dense_fp32),
                                           "budget_met": summary["bitshrink"]["budget_met"], "plan": model_plan(model)})
            if frac in AIMS:
                gap = 100 * (d["test_top1"] - row["test_top1"])
                row["aim"] = {"points": AIMS[frac], "drop_points": gap, "met": gap <= AIMS[frac],
                              "missed_by_points": max(0.0, gap - AIMS[frac])}
    return {"model": preset, "data": data, "dense_fp32_weight_bytes": dense_fp32, "test_images": len(test),
            "rows": rows}


def _b(n) -> str:
    return "-" if n is None else f"{n:,}"


def to_markdown(doc: dict) -> str:
    lines = ["# Bytes against accuracy: pruning, int8, and bitshrink's widths and bit widths together", "",
             f"Command: `{doc['command']}`  ",
             f"Date: {doc['date']}; torch {doc['machine']['torch']}, {doc['machine']['cpus']} CPUs; "
             f"protocol {doc['protocol_name']}: {json.dumps(doc['protocol'])}  ",
             f"Runs trained on: {doc.get('runs_trained_on', 'this machine')}; files written and checked on this "
             "machine's CPU (ONNX Runtime)", "",
             "Weight bytes: what the ONNX file holds for the weights (BatchNorm folded, int4 packed two to a byte, "
             "per-channel fp32 scales and zero points); graph bytes: the rest of the file (the graph unrolled over "
             "T, names, framing, the input normalisation); file: on disk. Test top-1: the model as the file "
             "computes it (fake-quantised in PyTorch), +- one standard error; the ONNX file is checked against it "
             "on the same test images with ONNX Runtime (agreement; top-1 equal up to images with a tie flip).", ""]
    for m in doc["models"]:
        lines += [f"## {m['model']} on {m['data']} ({m['test_images']} test images; dense fp32 weights "
                  f"{m['dense_fp32_weight_bytes']:,} B)", "",
                  "| row | weights | weight bytes | share of dense fp32 | graph bytes | file bytes | test top-1 | "
                  "ONNX agreement (checked images) | ONNX top-1 (checked images) | aim |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"| {r['row']} | - | - | - | - | - | {r['error']} | - | - | - |")
                continue
            c = r["onnx_check"]
            aim = "-"
            if r.get("aim"):
                a = r["aim"]
                aim = (f"within {a['points']:g} pt: met ({a['drop_points']:.2f} pt)" if a["met"] else
                       f"within {a['points']:g} pt: missed by {a['missed_by_points']:.2f} pt")
            lines.append(f"| {r['row']} | {r['precision']} | {_b(r['weight_bytes'])} | {r['share_of_dense_fp32']:.2%} | "
                         f"{_b(r['graph_bytes'])} | {_b(r['file_bytes'])} | {100 * r['test_top1']:.2f}% +- "
                         f"{r['se_points']:.2f} | {100 * c['class_agreement']:.2f}% of {c['images']} | "
                         f"{100 * c['top1_onnx']:.2f}% ({c['images_with_flips']} with flips) | {aim} |")
        lines.append("")
    lines += [f"Wall time of this session: {doc['wall_s']:.0f} s (runs resumed from the work folder are not re-timed; "
              "their run folders' report.md give their own costs).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the mnist5k model, capped splits, 1 fine-tuning epoch")
    p.add_argument("--work", default=None, help="run folders (default runs/bench-bytes/<quick|full>)")
    p.add_argument("--out", default=None, help="results name in bench/results (default bytes or bytes-quick)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the runs train and evaluate (cuda: the runs only need a GPU; "
                                                   "the ONNX files are checked with ONNX Runtime on the CPU)")
    p.add_argument("--runs-only", action="store_true",
                   help="only the policy runs (to train them on a GPU, then rerun without it here: the runs resume "
                        "as done and the files are written and checked)")
    p.add_argument("--runs-trained-on", default=None, metavar="TEXT",
                   help="where the resumed runs were trained, for the results (e.g. the GPU of bench/bytes_gpu.sh)")
    p.add_argument("--model", action="append", default=None, help="only this preset (repeatable; --runs-only)")
    p.add_argument("--row", action="append", default=None, choices=RUNS, help="only this run (repeatable; --runs-only)")
    args = p.parse_args(argv)
    if (args.model or args.row) and not args.runs_only:
        p.error("--model and --row select runs: give them with --runs-only (the results table needs every row)")
    torch.set_num_threads(args.threads)
    name = "quick" if args.quick else "full"
    P = PROTOCOL[name]
    work = Path(args.work) if args.work else ROOT / "runs" / "bench-bytes" / name
    out = ROOT / "bench" / "results" / (args.out or ("bytes-quick" if args.quick else "bytes"))
    t0 = time.perf_counter()
    chosen = [(m, d) for m, d in (QUICK_MODELS if args.quick else FULL_MODELS) if not args.model or m in args.model]
    if args.runs_only:
        for preset, data in chosen:
            done = model_runs(preset, data, P, work / preset, args.device, args.row)
            log(f"{preset}: " + ", ".join(f"{k}: {'error' if 'error' in v else 'done'}" for k, v in done.items()))
        log(f"runs done in {time.perf_counter() - t0:.0f} s")
        return 0
    models = [bench_model(preset, data, P, work / preset, args.device) for preset, data in chosen]
    doc = {"format": "spikeprune-bench-bytes", "version": 1,
           "command": "python bench/bytes.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": {"torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)),
                       "threads": args.threads, "python": platform.python_version()},
           "runs_trained_on": args.runs_trained_on or f"this machine ({args.device})",
           "protocol_name": name, "protocol": {k: v for k, v in P.items()}, "models": models,
           "wall_s": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), doc)
    md = to_markdown(doc)
    with open(out.with_suffix(".md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
