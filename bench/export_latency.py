"""Dense against pruned, in ONNX Runtime and in PyTorch on the CPU: does the speed-up follow the MACs?
(a benchmark, not a test: `python bench/export_latency.py`, about 5-10 minutes on 2 cores)

Models: the bundled spikformer-2-128-mnist (trained) and spikformer-4-384 (random weights: latency
does not depend on the values), each dense and pruned uniformly at 0.5 (every channel, head-dim and
hidden group of the uniform kinds, l2 importance; `--ratio`), and with `--pruned DIR` a saved
pruned model (e.g. a PrimeSVT run's RUN/model) against its dense model.
Each model is exported with spikeprune.deploy.export (fp32, BatchNorm folded, LIF unrolled) and timed at
batch 1 and 8: PyTorch eval + inference_mode, and ONNX Runtime's CPU provider with the same number
of intra-op threads, full graph optimisation. Timing is round-robin (each repeat times every
model/runtime once, so slow spells of a shared machine spread over all of them); the figure used is
the minimum over repeats (the least-disturbed run), medians are recorded beside it.

speed-up = dense time / pruned time; MAC ratio = dense MACs / pruned MACs; the aim is a speed-up of at
least 0.8x the MAC ratio. Results: bench/results/export-latency.json and .md (--tag T: -T).

    python bench/export_latency.py
    python bench/export_latency.py --threads 2 --repeats 15 --tag quiet

On a GPU (`--device cuda`): the same pairs plus spikformer-8-512 and sdt-8-512 (ImageNet size, random
weights), timed in PyTorch at batch 1, 8 and 64, eager and replayed as a CUDA graph (the whole
forward captured once: the per-kernel launch cost of the LIF's time loop is what eager mode pays),
with CUDA events; ONNX Runtime's CUDA provider where the installed onnxruntime has it.

    python bench/export_latency.py --device cuda --tag gpu
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # the policy benchmark's machine description, shared

from spikeprune.bundled import bundled_model  # noqa: E402
from spikeprune.deploy import export  # noqa: E402
from spikeprune.costs import count_macs, count_params  # noqa: E402
from spikeprune.models import create_model  # noqa: E402
from spikeprune.ratios import uniform_ratio_map  # noqa: E402
from spikeprune.serialization import load_model, write_json  # noqa: E402
from spikeprune.surgery import prune  # noqa: E402
from policies import _cpu_name  # noqa: E402  (bench/policies.py)

OUT = ROOT / "bench" / "results"
BATCHES = (1, 8)


def _pairs(ratio: float, pruned_dir: str | None) -> list[tuple[str, torch.nn.Module, torch.nn.Module, str]]:
    out = []
    dense = bundled_model().eval()
    out.append(("spikformer-2-128-mnist (bundled)", dense, prune(dense, uniform_ratio_map(dense, ratio), "l2").eval(),
                f"uniform {ratio}"))
    torch.manual_seed(0)
    big = create_model("spikformer-4-384").eval()
    out.append(("spikformer-4-384 (random weights)", big, prune(big, uniform_ratio_map(big, ratio), "l2").eval(),
                f"uniform {ratio}"))
    if pruned_dir:
        small = load_model(pruned_dir).eval()
        rec = getattr(small, "pruning", None)
        if rec is None:
            raise SystemExit(f"{pruned_dir} is not a pruned model (it has no pruning record)")
        from spikeprune.models import build_from_config  # only for --pruned: its dense model from the record

        base = build_from_config({"family": rec.family, "config": rec.dense_config}).eval()
        if rec.dense_preset == "spikformer-2-128-mnist":
            base = dense
        out.append((f"{pruned_dir} (its dense model: {rec.dense_preset or rec.family})", base, small,
                    "saved pruned model"))
    return out


def _gpu_pairs(ratio: float) -> list[tuple[str, torch.nn.Module, torch.nn.Module, str]]:
    out = _pairs(ratio, None)
    for preset in ("spikformer-8-512", "sdt-8-512"):
        torch.manual_seed(0)
        big = create_model(preset).eval()
        out.append((f"{preset} (random weights)", big, prune(big, uniform_ratio_map(big, ratio), "l2").eval(),
                    f"uniform {ratio}"))
    return out


def _cuda_ms(fn, repeats: int, warmup: int) -> list[float]:
    """Milliseconds per call, one CUDA-event pair around each call (the GPU's own clock)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def _graphed(model: torch.nn.Module, x: torch.Tensor):
    """`model(x)` captured once as a CUDA graph; the returned call replays it on the same input buffer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as CUDA graph capture requires
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def bench_pair_cuda(name, dense, pruned, how, repeats: int, warmup: int, tmp: Path, ort_cuda: bool) -> dict:
    """Dense vs pruned on the GPU: PyTorch eager, PyTorch as a CUDA graph, and ONNX Runtime's CUDA
    provider when present. Calls alternate model by model within each repeat (interleaved), so a slow
    spell of the machine falls on both."""
    dev = torch.device("cuda")
    c = dense.cfg
    res = {"model": name, "pruned_how": how, "macs": {}, "params": {}, "batches": {}}
    for tag, model in (("dense", dense), ("pruned", pruned)):
        res["macs"][tag], res["params"][tag] = count_macs(model), count_params(model)
    res["mac_ratio"] = res["macs"]["dense"] / res["macs"]["pruned"]
    models = {"dense": dense.to(dev), "pruned": pruned.to(dev)}
    sessions = {}
    if ort_cuda:
        import onnxruntime as ort  # the `export` extra

        for tag, model in models.items():
            path = tmp / f"{tag}.onnx"
            export(model.cpu(), path, check=False, force=True, progress=False, input="normalised")
            model.to(dev)
            sessions[tag] = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    for batch in (1, 8, 64):
        x = torch.rand(batch, c.in_channels, c.img_size, c.img_size, generator=torch.Generator().manual_seed(batch))
        xd = x.to(dev)
        calls = {}
        with torch.inference_mode():
            for tag, model in models.items():
                calls[("torch eager", tag)] = lambda m=model: m(xd)
                calls[("torch CUDA graph", tag)] = _graphed(model, xd)
            for tag, sess in sessions.items():
                calls[("onnxruntime CUDA", tag)] = lambda s=sess, xn=x.numpy(): s.run(None, {"images": xn})
            times = {k: [] for k in calls}
            for _ in range(repeats):
                for k, fn in calls.items():
                    times[k] += _cuda_ms(fn, 1, warmup if not times[k] else 0)
        row = {}
        for runtime in dict.fromkeys(k[0] for k in calls):
            d, p = times[(runtime, "dense")], times[(runtime, "pruned")]
            row[runtime] = {"dense_ms": min(d), "pruned_ms": min(p), "dense_median_ms": statistics.median(d),
                            "pruned_median_ms": statistics.median(p), "speedup": min(d) / min(p),
                            "speedup_median": statistics.median(d) / statistics.median(p),
                            "of_mac_ratio": min(d) / min(p) / res["mac_ratio"]}
        res["batches"][str(batch)] = row
        print(f"{name} batch {batch}: MAC ratio {res['mac_ratio']:.2f}; " + "; ".join(
            f"{rt} dense {v['dense_ms']:.3f} ms, pruned {v['pruned_ms']:.3f} ms, speed-up {v['speedup']:.2f}x"
            for rt, v in row.items()), flush=True)
    for m in models.values():
        m.cpu()
    return res


def to_markdown_cuda(res: dict) -> str:
    m = res["machine"]
    lines = ["# Export latency on a GPU: dense vs pruned, PyTorch eager and CUDA graph", "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
             f"Machine: {m['gpu']}; {m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}, onnxruntime {m['onnxruntime']} "
             f"(providers: {', '.join(m['ort_providers'])}), Python {m['python']}", "",
             f"Clock: CUDA events around each call; the minimum over {res['repeats']} interleaved repeats (medians in "
             "the JSON). fp32, eval, inference mode. Speed-up = dense / pruned; of MAC = speed-up / MAC ratio.", "",
             "| model | pruned | MAC ratio | batch | runtime | dense ms | pruned ms | speed-up (of MAC) | median speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        for b, row in r["batches"].items():
            for rt, v in row.items():
                lines.append(f"| {r['model']} | {r['pruned_how']} | {r['mac_ratio']:.2f} | {b} | {rt} | "
                             f"{v['dense_ms']:.3f} | {v['pruned_ms']:.3f} | {v['speedup']:.2f}x ({v['of_mac_ratio']:.2f}) "
                             f"| {v['speedup_median']:.2f}x |")
    if "CUDAExecutionProvider" not in m["ort_providers"]:
        lines += ["", "ONNX Runtime on that machine has no CUDA provider, so the exported files were not timed on the GPU."]
    return "\n".join(lines) + "\n"


def main_cuda(args, suffix: str) -> None:
    import onnxruntime  # the `export` extra

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device")
    providers = onnxruntime.get_available_providers()
    res = {"command": "python bench/export_latency.py " + " ".join(sys.argv[1:]), "device": "cuda",
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "repeats": args.repeats,
           "machine": {"gpu": torch.cuda.get_device_name(), "cpu": _cpu_name(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "ort_providers": providers,
                       "python": platform.python_version()},
           "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dense, pruned, how in _gpu_pairs(args.ratio):
            res["results"].append(bench_pair_cuda(name, dense, pruned, how, args.repeats, args.warmup, Path(tmp),
                                                  "CUDAExecutionProvider" in providers))
    write_json(OUT / f"export-latency{suffix}.json", res)
    (OUT / f"export-latency{suffix}.md").write_text(to_markdown_cuda(res))
    print(to_markdown_cuda(res))


def _ort_session(path: str, threads: int):
    import onnxruntime as ort  # the `export` extra

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # ONNX Runtime's workers spin-wait after each run by default: timed round-robin beside PyTorch,
    # they would eat the cores PyTorch is being timed on
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


CATEGORIES = {"conv / GEMM": {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"},
              "LIF element-wise": {"Mul", "Sub", "Add", "GreaterOrEqual", "Cast"},
              "copies (slice / stack / reshape)": {"Gather", "Unsqueeze", "Concat", "Reshape", "Transpose", "Expand",
                                                   "Slice", "ReorderInput", "ReorderOutput", "Squeeze"}}


def ort_profile(path: str, threads: int, x) -> dict:
    """Share of ONNX Runtime's kernel time by kind of op (3 runs of x, after one warm-up)."""
    import json

    import onnxruntime as ort  # the `export` extra

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(path).with_suffix(""))
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for _ in range(4):
        sess.run(None, {"images": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_kind: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            kind = next((k for k, ops in CATEGORIES.items() if op in ops), "other (pooling, means, ...)")
            by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"]
    total = sum(by_kind.values())
    return {k: v / total for k, v in sorted(by_kind.items())}


def bench_pair(name, dense, pruned, how, threads: int, repeats: int, warmup: int, tmp: Path) -> dict:
    runners = {}
    for tag, model in (("dense", dense), ("pruned", pruned)):
        path = tmp / f"{tag}.onnx"
        export(model, path, check=False, force=True, progress=False, input="normalised")
        runners[tag] = (model, _ort_session(str(path), threads))
    c = dense.cfg
    res = {"model": name, "pruned_how": how, "macs": {}, "params": {}, "batches": {}}
    for tag, (model, _) in runners.items():
        res["macs"][tag], res["params"][tag] = count_macs(model), count_params(model)
    mac_ratio = res["macs"]["dense"] / res["macs"]["pruned"]
    res["mac_ratio"] = mac_ratio
    for batch in BATCHES:
        x = torch.rand(batch, c.in_channels, c.img_size, c.img_size, generator=torch.Generator().manual_seed(batch))
        xn = x.numpy()
        calls = {}
        for tag, (model, sess) in runners.items():
            calls[("torch", tag)] = lambda m=model: m(x)
            calls[("onnxruntime", tag)] = lambda s=sess: s.run(None, {"images": xn})
        wall = {k: [] for k in calls}
        cpu = {k: [] for k in calls}
        with torch.inference_mode():
            for _ in range(warmup):
                for fn in calls.values():
                    fn()
            for _ in range(repeats):
                for k, fn in calls.items():
                    c0, t0 = time.thread_time(), time.perf_counter()
                    fn()
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.thread_time() - c0)
        row = {}
        for runtime in ("torch", "onnxruntime"):
            # one thread: both runtimes compute in the calling thread, whose CPU time does not count
            # the time other processes hold the core (wall-clock minima favour short runs there)
            use = cpu if threads == 1 else wall
            d, p = use[(runtime, "dense")], use[(runtime, "pruned")]
            dw, pw = wall[(runtime, "dense")], wall[(runtime, "pruned")]
            speedup = min(d) / min(p)
            row[runtime] = {"dense_ms": 1e3 * min(d), "pruned_ms": 1e3 * min(p), "clock": "thread CPU time"
                            if threads == 1 else "wall", "speedup": speedup, "of_mac_ratio": speedup / mac_ratio,
                            "speedup_median": statistics.median(d) / statistics.median(p),
                            "wall_dense_min_ms": 1e3 * min(dw), "wall_pruned_min_ms": 1e3 * min(pw),
                            "wall_dense_median_ms": 1e3 * statistics.median(dw),
                            "wall_pruned_median_ms": 1e3 * statistics.median(pw)}
        res["batches"][str(batch)] = row
        if batch == max(BATCHES):
            res["ort_time_shares"] = {tag: ort_profile(str(tmp / f"{tag}.onnx"), threads, xn) for tag in runners}
        print(f"{name} batch {batch}: MAC ratio {mac_ratio:.2f}; " + "; ".join(
            f"{rt} dense {v['dense_ms']:.2f} ms, pruned {v['pruned_ms']:.2f} ms, speed-up {v['speedup']:.2f}x "
            f"({v['of_mac_ratio']:.2f} of the MAC ratio)" for rt, v in row.items()), flush=True)
    return res


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Export latency: dense vs pruned, ONNX Runtime and PyTorch, CPU", "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['threads']} intra-op threads for both runtimes; torch "
             f"{m['torch']}, onnxruntime {m['onnxruntime']}, Python {m['python']}; load average at start "
             f"{m['loadavg_start']}, at end {m['loadavg_end']} (a machine shared with other work: minima over "
             f"{res['repeats']} round-robin repeats are used, medians and wall-clock figures are in the JSON)", "",
             f"Clock: {res['clock']}.", "",
             "Speed-up = dense time / pruned time (minimum over repeats); of MAC = speed-up / MAC ratio (aim: 0.8 "
             "or more). Files: fp32 ONNX from `spikeprune.deploy.export` (BatchNorm folded, LIF unrolled over T).", "",
             "| model | pruned | MAC ratio | batch | torch dense ms | torch pruned ms | torch speed-up (of MAC) "
             "| ORT dense ms | ORT pruned ms | ORT speed-up (of MAC) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        for b, row in r["batches"].items():
            t, o = row["torch"], row["onnxruntime"]
            lines.append(f"| {r['model']} | {r['pruned_how']} | {r['mac_ratio']:.2f} | {b} | {t['dense_ms']:.2f} | "
                         f"{t['pruned_ms']:.2f} | {t['speedup']:.2f}x ({t['of_mac_ratio']:.2f}) | {o['dense_ms']:.2f} | "
                         f"{o['pruned_ms']:.2f} | {o['speedup']:.2f}x ({o['of_mac_ratio']:.2f}) |")
    kinds = sorted({k for r in res["results"] for t in r["ort_time_shares"].values() for k in t})
    lines += ["", f"Where ONNX Runtime's time goes (share of kernel time, batch {max(BATCHES)}; ONNX Runtime's profiler):",
              "", "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for r in res["results"]:
        for tag, shares in r["ort_time_shares"].items():
            lines.append(f"| {r['model']}, {tag} | " + " | ".join(f"{100 * shares.get(k, 0):.0f}%" for k in kinds) + " |")
    lines += ["", "Why the speed-up stays below the MAC ratio: pruning the widths by half divides the conv / GEMM work by "
              "about four (both sides of a weight shrink), but the LIF's element-wise ops (charge, fire, reset: about "
              "six per neuron and step), the slicing of x[t] and the stacking of the T spike maps shrink only with the "
              "width (by two), and every node of the graph (about 1,700 for the bundled model) has a fixed cost per run "
              "that does not shrink at all. Where conv / GEMM is a small share of the time (the small bundled model, batch 1) the speed-up "
              "is furthest below the MAC ratio; on spikformer-4-384 at batch 8, where it is 70%, ONNX Runtime comes "
              "closest to it. In PyTorch the LIF is one autograd Function running four element-wise kernels per step, "
              "and its non-GEMM work (that loop, and BatchNorm, which is not folded there) shrinks the same linear way.", "",
              "No GPU was lent to the session that ran this: the GPU inference path of issue 14 (CUDA graphs / "
              "ONNX Runtime's CUDA provider) is not measured here."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of both runtimes")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.5, help="uniform pruning ratio (default 0.5)")
    ap.add_argument("--pruned", metavar="DIR", help="also a saved pruned model against its dense model")
    ap.add_argument("--tag", default="", help="results file suffix")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the recorded .json")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default): PyTorch and ONNX Runtime "
                    "on the CPU; cuda: PyTorch eager and CUDA graph on the GPU, ONNX Runtime's CUDA provider if present")
    args = ap.parse_args()
    suffix = f"-{args.tag}" if args.tag else ""
    if args.markdown_only:
        import json  # only to re-read the recorded results

        res = json.loads((OUT / f"export-latency{suffix}.json").read_text())
        (OUT / f"export-latency{suffix}.md").write_text(to_markdown_cuda(res) if res.get("device") == "cuda"
                                                         else to_markdown(res))
        return
    if args.device == "cuda":
        main_cuda(args, suffix)
        return
    import onnxruntime  # the `export` extra

    torch.set_num_threads(args.threads)
    clock = ("thread CPU time of the calling thread (one intra-op thread: both runtimes compute in it), so the "
             "time other processes hold the core is not counted" if args.threads == 1 else "wall clock")
    res = {"command": "python bench/export_latency.py " + " ".join(sys.argv[1:]), "clock": clock,
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "repeats": args.repeats,
           "machine": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                       "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                       "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
           "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dense, pruned, how in _pairs(args.ratio, args.pruned):
            res["results"].append(bench_pair(name, dense, pruned, how, args.threads, args.repeats, args.warmup,
                                             Path(tmp)))
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(OUT / f"export-latency{suffix}.json", res)
    (OUT / f"export-latency{suffix}.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
