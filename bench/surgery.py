"""Benchmark the pruning engine (not a test; `python bench/surgery.py`, about 6-8 minutes on 2 cores).

1. Surgery time on spikformer-8-512 (goal: under 2 s): `prune` with the uniform ratios at 0.3 and
   l2 scores (scoring + planning + building + copying), and `apply_plan` alone.
2. CPU latency against MACs for uniform ratios 0.1 .. 0.7 on spikformer-4-384 (CIFAR, 32x32) and
   spikformer-8-512 (ImageNet, 224x224), batch 8, eval mode, no grad. Goal: a measured speedup of
   at least 0.8 x the MAC ratio (speedup = dense time / pruned time, MAC ratio = dense MACs /
   pruned MACs).
3. Where the time goes (torch.profiler, spikformer-4-384, dense and ratio 0.7): GEMM / conv time
   shrinks with the MACs, while LIF, BatchNorm, pooling and copies shrink only linearly with the
   widths -- that is what keeps the speedup below the MAC ratio.

Timing is round-robin: each repeat times every model once, so slow spells of a shared machine
spread over all ratios instead of landing on one. The figure used is the minimum over repeats
(the least-disturbed run); medians are recorded beside it. Results: bench/results/surgery.json
and bench/results/surgery.md (with --tag T: surgery-T.json / .md).

    python bench/surgery.py                                  # this machine, all its threads
    python bench/surgery.py --threads 2 --tag quiet-2threads # e.g. on a quiet machine, 2 threads
    python bench/surgery.py --device cuda --tag h100         # GPU latency (no profile)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spikeprune.costs import count_macs, count_params, memory_bytes  # noqa: E402
from spikeprune.models import create_model  # noqa: E402
from spikeprune.serialization import atomic_path, write_json  # noqa: E402
from spikeprune.ratios import uniform_ratio_map  # noqa: E402
from spikeprune.surgery import apply_plan, plan, prune  # noqa: E402

RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
BATCH = 8
LATENCY = {"spikformer-4-384": dict(repeats=5, warmup=1), "spikformer-8-512": dict(repeats=2, warmup=1)}
OUT = ROOT / "bench" / "results"


def surgery_time(name: str = "spikformer-8-512", ratio: float = 0.3, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    model = create_model(name).eval()
    ratios = uniform_ratio_map(model, ratio)
    total, cut = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prune(model, ratios, "l2")
        total.append(time.perf_counter() - t0)
        p = plan(model, ratios, "l2")
        t0 = time.perf_counter()
        apply_plan(model, p)
        cut.append(time.perf_counter() - t0)
    return {"model": name, "ratio": ratio, "params": count_params(model),
            "prune_s": {"min": min(total), "median": statistics.median(total)},
            "apply_plan_s": {"min": min(cut), "median": statistics.median(cut)}, "goal_s": 2.0}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def latency_sweep(name: str, repeats: int, warmup: int, device: str = "cpu") -> list[dict]:
    torch.manual_seed(0)
    dense = create_model(name).eval()
    c = dense.cfg
    x = torch.randn(BATCH, c.in_channels, c.img_size, c.img_size, device=device)
    models = {r: (dense if r == 0 else prune(dense, uniform_ratio_map(dense, r), "l2").eval()).to(device) for r in RATIOS}
    times: dict[float, list[float]] = {r: [] for r in RATIOS}
    with torch.no_grad():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for i in range(repeats):
            for r, m in models.items():
                _sync(device)
                t0 = time.perf_counter()
                m(x)
                _sync(device)
                times[r].append(time.perf_counter() - t0)
            print(f"  {name}: repeat {i + 1}/{repeats} done", file=sys.stderr)
    rows = []
    dense_macs, dense_t = count_macs(dense), min(times[0.0])
    for r, m in models.items():
        macs, t = count_macs(m), min(times[r])
        mac_ratio, speedup = dense_macs / macs, dense_t / t
        rows.append({"ratio": r, "params": count_params(m), "memory_fp32": memory_bytes(m)["fp32"], "macs": macs,
                     "ms_min": 1000 * t, "ms_median": 1000 * statistics.median(times[r]),
                     "mac_ratio": mac_ratio, "speedup": speedup, "speedup_over_mac_ratio": speedup / mac_ratio,
                     "meets_0.8": speedup >= 0.8 * mac_ratio})
    return rows


GEMM_OPS = ("aten::mkldnn_convolution", "aten::thnn_conv2d", "aten::slow_conv2d_forward", "aten::mm", "aten::addmm",
            "aten::bmm")


def time_breakdown(name: str, ratios=(0.0, 0.7)) -> dict:
    """CPU ms by part for one forward of batch 8 (after one warm-up): conv / GEMM kernels (self
    time), the LIF neurons (everything inside the LIF autograd Function), BatchNorm, max-pool, and
    the rest (reshapes, copies, residual additions, ...)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    dense = create_model(name).eval()
    c = dense.cfg
    x = torch.randn(BATCH, c.in_channels, c.img_size, c.img_size)
    out = {}
    for r in ratios:
        m = dense if r == 0 else prune(dense, uniform_ratio_map(dense, r), "l2").eval()
        with torch.no_grad():
            m(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                m(x)
        ev = {e.key: e for e in prof.key_averages()}
        total = sum(e.self_cpu_time_total for e in ev.values()) / 1000.0
        cats = {"conv / GEMM": sum(ev[k].self_cpu_time_total for k in GEMM_OPS if k in ev) / 1000.0,
                "LIF": sum(e.cpu_time_total for k, e in ev.items() if "LIF" in k) / 1000.0,
                "BatchNorm": ev["aten::batch_norm"].cpu_time_total / 1000.0 if "aten::batch_norm" in ev else 0.0,
                "max-pool": sum(e.self_cpu_time_total for k, e in ev.items() if "max_pool" in k) / 1000.0}
        cats["other"] = max(0.0, total - sum(cats.values()))
        out[str(r)] = {"total_ms": round(total, 1), **{k: round(v, 1) for k, v in cats.items()}}
    return out


def to_markdown(res: dict) -> str:
    s = res["surgery"]
    lines = ["# Pruning-engine benchmark", "",
             f"Machine: {res['machine']['cpus']} CPUs, torch {res['machine']['torch']}, {res['machine']['threads']} "
             f"threads, timed on {res['machine']['device']} ({res['machine']['device_name']}), load average at "
             f"start {res['machine']['loadavg_start']}, at end {res['machine']['loadavg_end']} "
             "(timings are minimums over round-robin repeats).", ""]
    if s:
        lines += ["## Surgery time", "",
                  f"{s['model']} ({s['params']:,} params), uniform ratio {s['ratio']}, l2: `prune` "
                  f"{s['prune_s']['min']:.3f} s (median {s['prune_s']['median']:.3f} s), `apply_plan` alone "
                  f"{s['apply_plan_s']['min']:.3f} s. Goal < {s['goal_s']:.0f} s: "
                  f"{'met' if s['prune_s']['median'] < s['goal_s'] else 'NOT met'}.", ""]
    if res["latency"]:
        lines += [f"## Latency vs MACs ({res['machine']['device']}, batch {BATCH}, eval, no grad)", ""]
    for name, rows in res["latency"].items():
        lines += [f"### {name}", "", "| ratio | params | MACs/img | ms (min) | ms (median) | MAC ratio | speedup | "
                  "speedup / MAC ratio | >= 0.8 |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['ratio']:.1f} | {r['params']:,} | {r['macs'] / 1e9:.2f} G | {r['ms_min']:.1f} | "
                         f"{r['ms_median']:.1f} | {r['mac_ratio']:.2f} | {r['speedup']:.2f} | "
                         f"{r['speedup_over_mac_ratio']:.2f} | {'yes' if r['meets_0.8'] else 'no'} |")
        lines.append("")
    if res["breakdown"]:
        lines += ["## Where the time goes (CPU ms, one forward, torch.profiler)", ""]
    for name, by_ratio in res["breakdown"].items():
        for r, cats in by_ratio.items():
            total = cats["total_ms"]
            parts = ", ".join(f"{k} {v:.0f} ms ({v / total:.0%})" for k, v in cats.items() if k != "total_ms")
            lines.append(f"- {name} ratio {r}: {total:.0f} ms in all: {parts}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="time surgery and latency against MACs of uniformly pruned Spikformers")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--tag", default="", help="results go to surgery-TAG.json / .md")
    ap.add_argument("--parts", default="surgery,latency,breakdown",
                    help="comma-separated parts to run: surgery, latency, breakdown (default all)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    res = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "device": args.device, "device_name": dev_name, "python": platform.python_version(),
                       "loadavg_start": [round(x, 2) for x in os.getloadavg()]}}
    res["surgery"], res["latency"], res["breakdown"] = None, {}, {}
    if "surgery" in parts:
        print("surgery time ...", file=sys.stderr)
        res["surgery"] = surgery_time()
    for name, kw in (LATENCY.items() if "latency" in parts else ()):
        print(f"latency {name} ...", file=sys.stderr)
        if args.device == "cuda":
            kw = dict(repeats=20, warmup=3)
        res["latency"][name] = latency_sweep(name, device=args.device, **kw)
    if args.device == "cpu" and "breakdown" in parts:
        print("time breakdown ...", file=sys.stderr)
        res["breakdown"] = {"spikformer-4-384": time_breakdown("spikformer-4-384")}
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(os.environ.get("BENCH_OUT", OUT))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"surgery-{args.tag}" if args.tag else "surgery"
    write_json(out / f"{stem}.json", res)
    with atomic_path(out / f"{stem}.md") as tmp:
        tmp.write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
