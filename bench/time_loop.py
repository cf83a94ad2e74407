"""The time steps unrolled or in one ONNX Loop (`spikeprune export --time-loop`): what the Loop
saves in graph bytes, and what it costs in ONNX Runtime CPU latency (issue 25, point 1).
(a benchmark, not a test: `python bench/time_loop.py`, a few minutes on 2 cores)

For each bundled model (spikformer-2-128-mnist on mnist5k, T=4; spikformer-2-128-fmnist and
sdt-2-128-fmnist on Fashion-MNIST, T=2), at fp32 and int4 weights (post-training, `--precision
int4`: int8 ends; accuracy is not the point here, the file's bytes and speed are), both files are
written by spikeprune.export with its check (ONNX Runtime against the PyTorch model on CHECK
calibration images: class agreement, every spike decision) and timed in ONNX Runtime's CPU provider
(one intra-op thread, full graph optimisation, no spinning) at batch 1 and 64, the unrolled and the
Loop file interleaved (spikeprune.costs.interleaved_latency: each repeat runs both, the order
rotating; medians and quartiles). Also: the graph bytes against T (the Fashion-MNIST Spikformer's
weights at T = 1, 2, 4, 8; files unchecked, bytes only) and at a fixed batch of 1 (`--batch 1`),
and what ONNX Runtime's optimiser makes of each file (nodes before and after, the Loop's body
included).

    python bench/time_loop.py                 # bench/results/time-loop.{json,md}
    python bench/time_loop.py --repeats 40 --tag quiet
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
sys.path.insert(0, str(ROOT / "bench"))

from spikeprune.bundled import bundled_model  # noqa: E402
from spikeprune.costs import interleaved_latency  # noqa: E402
from spikeprune.deploy import TIME_LOOPS, export  # noqa: E402
from spikeprune.deploy.check import check_batches  # noqa: E402
from spikeprune.models import get_family  # noqa: E402
from spikeprune.serialization import write_json  # noqa: E402

OUT = ROOT / "bench" / "results"
MODELS = (("spikformer-2-128-mnist", "mnist5k"), ("spikformer-2-128-fmnist", "fashion-mnist"),
          ("sdt-2-128-fmnist", "fashion-mnist"))
PRECISIONS = ("fp32", "int4")
BATCHES = (1, 64)
T_SWEEP = (1, 2, 4, 8)


def _session(path: str, threads: int, optimized: str | None = None):
    import onnxruntime as ort  # the `export` extra

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _node_counts(path: str) -> dict:
    """Nodes of the main graph and of every Loop body, and the op types in the body."""
    import onnx  # the `export` extra

    proto = onnx.load(path, load_external_data=False)
    bodies = [a.g for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    ops: dict[str, int] = {}
    for n in (bodies[0].node if bodies else proto.graph.node):
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"main": len(proto.graph.node), "body": sum(len(b.node) for b in bodies),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:8])}


def bench_model(name: str, data: str, check_images: int, repeats: int, warmup: int, threads: int, tmp: Path) -> dict:
    model = bundled_model(name).eval()
    res = {"model": name, "data": data, "family": get_family(model).name, "T": model.cfg.T, "files": {},
           "latency": {}}
    paths = {}
    for precision in PRECISIONS:
        for tl in TIME_LOOPS:
            path = tmp / f"{name}-{precision}-{tl}.onnx"
            r = export(model, path, precision=precision, data=data, max_images=check_images, time_loop=tl,
                       keep_inaccurate=True, force=True, progress=False)
            c, rec = r["check"], r["memory"]["reconciliation"]
            optimized = str(path.with_suffix(".opt.onnx"))
            _session(str(path), threads, optimized)
            res["files"][f"{precision}/{tl}"] = {
                "precision": r["precision"], "time_loop": tl, "file_bytes": r["bytes"],
                "graph_bytes": r["memory"]["file"]["graph"], "weight_bytes": rec["counted"],
                "reconciled": rec["unaccounted"] == 0, "nodes": r["graph"]["nodes"],
                "check": {"images": c["images"], "class_agreement": c["class_agreement"],
                          "spikes_compared": c["spikes"]["decisions"], "comparable": c["spikes"]["comparable"],
                          "tie_flips": c["spikes"]["tie_flips"], "top1_onnx": c["top1_onnx"],
                          "top1_reference": c["top1_reference"]},
                "ort_nodes": {"as_written": _node_counts(str(path)), "optimised": _node_counts(optimized)}}
            paths[(precision, tl)] = str(path)
            f = res["files"][f"{precision}/{tl}"]
            print(f"{name} {precision} {tl}: file {f['file_bytes']:,} B, graph {f['graph_bytes']:,} B, "
                  f"check {100 * c['class_agreement']:.2f}% agree on {c['images']}", flush=True)
        batches, _ = check_batches(data, model, "calib", max(BATCHES), max(BATCHES), raw=True)
        pixels = torch.cat([b[0] for b in batches])
        for batch in BATCHES:
            x = pixels[:batch].numpy()
            sessions = {tl: _session(paths[(precision, tl)], threads) for tl in TIME_LOOPS}
            calls = {tl: (lambda _images, s=s: s.run(None, {"images": x})) for tl, s in sessions.items()}
            lat = interleaved_latency(calls, pixels[:batch], repeats=repeats, warmup=warmup)
            res["latency"][f"{precision}/{batch}"] = {**lat["models"], "reliable": lat["reliable"], "why": lat["why"],
                                                      "load_per_cpu": lat["load_per_cpu"]}
            u, lp = lat["models"]["unrolled"]["latency_ms"], lat["models"]["loop"]["latency_ms"]
            print(f"{name} {precision} batch {batch}: unrolled {u:.2f} ms, loop {lp:.2f} ms ({lp / u:.2f}x)",
                  flush=True)
    return res


def t_sweep(name: str, data: str, Ts: list[int], tmp: Path, repeats: int, warmup: int, threads: int) -> list[dict]:
    """Graph bytes of `name`'s weights at several T (the config's T changed: same weights), dynamic
    batch and a fixed batch of 1, both time loops, and the dynamic-batch files' ONNX Runtime latency
    at batch 1 (interleaved, on random images); files unchecked."""
    base = bundled_model(name).eval()
    fam = get_family(base)
    rows = []
    for T in Ts:
        model = fam.build({**base.cfg.to_dict(), "T": T})
        model.load_state_dict(base.state_dict())
        model.eval()
        row = {"T": T}
        for tl in TIME_LOOPS:
            for batch in (None, 1):
                r = export(model, tmp / f"sweep-{T}-{tl}-{batch}.onnx", time_loop=tl, batch=batch, check=False,
                           normalisation=data, force=True, progress=False)
                row[f"{tl}/{'dynamic' if batch is None else 'batch 1'}"] = r["memory"]["file"]["graph"]
        x = torch.rand(1, base.cfg.in_channels, base.cfg.img_size, base.cfg.img_size,
                       generator=torch.Generator().manual_seed(T))
        calls = {tl: (lambda _images, s=_session(str(tmp / f"sweep-{T}-{tl}-None.onnx"), threads): s.run(
            None, {"images": x.numpy()})) for tl in TIME_LOOPS}
        lat = interleaved_latency(calls, x, repeats=repeats, warmup=warmup)
        row["latency_ms"] = {tl: lat["models"][tl]["latency_ms"] for tl in TIME_LOOPS}
        row["latency_reliable"] = lat["reliable"]
        rows.append(row)
        print(f"T={T}: " + ", ".join(f"{k} {v:,} B" for k, v in row.items() if "/" in k)
              + f"; batch 1: unrolled {row['latency_ms']['unrolled']:.2f} ms, loop {row['latency_ms']['loop']:.2f} ms",
              flush=True)
    return rows


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# The time steps unrolled or in one ONNX Loop: graph bytes and ONNX Runtime latency", "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
             f"onnx {m['onnx']}, Python {m['python']}; {res['threads']} intra-op thread(s)", "",
             "Graph bytes: the file's bytes besides the weights (structure, names, framing; "
             "spikeprune.deploy.accounting). Both files of a row checked by the export against PyTorch on "
             f"{res['check_images']} calibration images (class agreement; every spike decision, read inside the "
             "Loop as per-step scan outputs). int4: `--precision int4` after training (int8 ends), "
             "not fine-tuned.", "",
             "## Bytes", "",
             "| model | T | weights | weight bytes | graph bytes unrolled | graph bytes loop | saved | file bytes "
             "unrolled | file bytes loop | nodes unrolled | nodes loop (body) | check (loop) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        for p in PRECISIONS:
            u, lp = r["files"][f"{p}/unrolled"], r["files"][f"{p}/loop"]
            c = lp["check"]
            lines.append(
                f"| {r['model']} | {r['T']} | {lp['precision']} | {lp['weight_bytes']:,} | {u['graph_bytes']:,} | "
                f"{lp['graph_bytes']:,} | {1 - lp['graph_bytes'] / u['graph_bytes']:.1%} | {u['file_bytes']:,} | "
                f"{lp['file_bytes']:,} | {u['nodes']} | {lp['ort_nodes']['as_written']['body']} | "
                f"{100 * c['class_agreement']:.2f}% of {c['images']}, {c['spikes_compared']:,} spikes, "
                f"{c['tie_flips']} tie flips |")
    lines += ["", "## ONNX Runtime CPU latency (ms, median [quartiles] over interleaved repeats)", "",
              "| model | weights | batch | unrolled | loop | loop / unrolled |", "|---|---|---|---|---|---|"]
    for r in res["results"]:
        for key, lat in r["latency"].items():
            p, b = key.split("/")
            u, lp = lat["unrolled"], lat["loop"]
            cell = lambda v: f"{v['latency_ms']:.2f} [{v['latency_ms_q1']:.2f}-{v['latency_ms_q3']:.2f}]"  # noqa: E731
            lines.append(f"| {r['model']} | {p} | {b} | {cell(u)} | {cell(lp)} | "
                         f"{lp['latency_ms'] / u['latency_ms']:.2f}x |")
    why = sorted({w for r in res["results"] for lat in r["latency"].values() for w in lat["why"]})
    lines += ["", "Every timing reliable by interleaved_latency's rules (spread and machine load)." if not why else
              f"Timings interleaved_latency marks unreliable: {'; '.join(why)}."]
    lines += ["", f"## Graph bytes against T ({res['sweep_model']}'s weights, files unchecked; latency of the "
              "dynamic-batch files, random images)", "",
              "| T | unrolled, dynamic batch | loop, dynamic batch | unrolled, batch 1 | loop, batch 1 | "
              "latency at batch 1 (ms): unrolled | loop |",
              "|---|---|---|---|---|---|---|"]
    for row in res["t_sweep"]:
        lat = row["latency_ms"]
        lines.append(f"| {row['T']} | {row['unrolled/dynamic']:,} | {row['loop/dynamic']:,} | "
                     f"{row['unrolled/batch 1']:,} | {row['loop/batch 1']:,} | {lat['unrolled']:.2f} | "
                     f"{lat['loop']:.2f} ({lat['loop'] / lat['unrolled']:.2f}x) |")
    lines += ["", "## What ONNX Runtime's optimiser keeps (nodes: main graph + Loop body)", "",
              "| model | weights | time loop | as written | after ORT_ENABLE_ALL | body ops after (top) |",
              "|---|---|---|---|---|---|"]
    for r in res["results"]:
        for key, f in r["files"].items():
            a, o = f["ort_nodes"]["as_written"], f["ort_nodes"]["optimised"]
            lines.append(f"| {r['model']} | {f['precision']} | {f['time_loop']} | {a['main']} + {a['body']} | "
                         f"{o['main']} + {o['body']} | "
                         + (", ".join(f"{k} {v}" for k, v in o["ops"].items()) if f["time_loop"] == "loop" else "-")
                         + " |")
    return "\n".join(lines) + "\n"


def docs_table(res: dict) -> str:
    """The summary docs/deployment.md shows (bench/update_docs.py writes it between its markers):
    per model and weights, graph bytes and ONNX Runtime CPU latency, unrolled against loop."""
    lines = ["| model | T | weights | graph bytes: unrolled | loop | latency batch 1 (ms): unrolled | loop | "
             "batch 64: unrolled | loop |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        for p in PRECISIONS:
            u, lp = r["files"][f"{p}/unrolled"]["graph_bytes"], r["files"][f"{p}/loop"]["graph_bytes"]
            lat = [r["latency"][f"{p}/{b}"][tl]["latency_ms"] for b in BATCHES for tl in TIME_LOOPS]
            lines.append(f"| {r['model']} | {r['T']} | {p} | {u:,} | {lp:,} ({lp / u - 1:+.0%}) | {lat[0]:.2f} | "
                         f"{lat[1]:.2f} ({lat[1] / lat[0]:.2f}x) | {lat[2]:.1f} | "
                         f"{lat[3]:.1f} ({lat[3] / lat[2]:.2f}x) |")
    timings = [lat for r in res["results"] for lat in r["latency"].values()]
    busy = sum(not lat["reliable"] for lat in timings)
    if busy:
        lines += ["", f"{busy} of the {len(timings)} timing pairs are marked unreliable by interleaved_latency (the "
                  "machine was shared and busy, or the repeats spread widely: bench/results/time-loop.md says which); "
                  "read the latency columns as rough."]
    sweep = res["t_sweep"]
    lines += ["", f"Graph bytes against T ({res['sweep_model']}'s weights, dynamic batch): unrolled "
              + ", ".join(f"T={row['T']} {row['unrolled/dynamic']:,}" for row in sweep) + "; loop "
              + ", ".join(f"T={row['T']} {row['loop/dynamic']:,}" for row in sweep) + ". At a fixed batch of 1: "
              "unrolled " + ", ".join(f"T={row['T']} {row['unrolled/batch 1']:,}" for row in sweep) + "; loop "
              + ", ".join(f"T={row['T']} {row['loop/batch 1']:,}" for row in sweep) + ". Latency at batch 1, loop / "
              "unrolled: " + ", ".join(f"T={row['T']} {row['latency_ms']['loop'] / row['latency_ms']['unrolled']:.2f}x"
                                       for row in sweep) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import onnx  # the `export` extra
    import onnxruntime  # the `export` extra

    from policies import _cpu_name  # bench/policies.py: the machine's description

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check-images", type=int, default=200)
    p.add_argument("--tag", default="", help="results go to time-loop-TAG.{json,md}")
    p.add_argument("--models", default=",".join(f"{m}:{d}" for m, d in MODELS),
                   help="bundled models and their data, NAME:DATA,...")
    p.add_argument("--sweep-T", default=",".join(map(str, T_SWEEP)), help="the T values of the graph-bytes sweep")
    p.add_argument("--sweep-model", default="spikformer-2-128-fmnist:fashion-mnist")
    p.add_argument("--out", type=Path, default=OUT, help="results folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"command": " ".join(["python bench/time_loop.py", *(sys.argv[1:] if argv is None else argv)]),
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "repeats": args.repeats,
           "threads": args.threads, "check_images": args.check_images,
           "machine": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                       "python": platform.python_version()},
           "results": [], "sweep_model": args.sweep_model.split(":")[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models.split(","):
            name, data = spec.split(":")
            res["results"].append(bench_model(name, data, args.check_images, args.repeats, args.warmup, args.threads,
                                              Path(tmp)))
        name, data = args.sweep_model.split(":")
        res["t_sweep"] = t_sweep(name, data, [int(t) for t in args.sweep_T.split(",")], Path(tmp), args.repeats,
                                 args.warmup, args.threads)
    suffix = f"-{args.tag}" if args.tag else ""
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"time-loop{suffix}.json", res)
    (args.out / f"time-loop{suffix}.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
