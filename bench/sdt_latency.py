"""CPU forward latency: spikeprune's Spike-driven Transformer against a direct transcription of the
reference code (spikeprune.testing.reference_sdt: its reshapes, `.contiguous()` copies and Conv2d
calls, SpikingJelly's LIF as a per-step autograd loop).

Issue 12 asks for eval-mode forward latency on CPU: sdt-8-512 (224x224, T=4) at batch 1 and the CIFAR
2-512 (32x32, T=4) at batch 8, ours at least as fast as the straight port. Both models hold the same
weights; their logits are compared once, then the timed forwards alternate (ours, reference,
reference, ours, ...) so that load from other processes falls on both alike. Medians are reported.

    .venv/bin/python bench/sdt_latency.py --threads 1   # full run, writes bench/results/sdt-latency.{json,md}
    .venv/bin/python bench/sdt_latency.py --quick       # tiny models, seconds: a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the Spikformer bench's timing helpers, shared

from spikeprune.models import create_model  # noqa: E402
from spikeprune.serialization import atomic_path, write_json  # noqa: E402
from spikeprune.testing.reference_sdt import reference_from_config  # noqa: E402
from latency import _make_neurons_fire, machine, time_pair  # noqa: E402  (bench/latency.py)

RESULTS = Path(__file__).resolve().parent / "results"

# (preset, batch, config overrides)
CASES = [("sdt-8-512", 1, {}), ("sdt-cifar10-2-512", 8, {})]
QUICK_CASES = [("sdt-8-512", 1, dict(embed_dim=32, depth=1, img_size=64)),
               ("sdt-cifar10-2-512", 2, dict(embed_dim=32, depth=1))]


def run_case(preset: str, batch: int, overrides: dict, repeats: int, warmup: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    ours = create_model(preset, **overrides).eval()
    _make_neurons_fire(ours, seed)
    ref = reference_from_config(ours.cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    cfg = ours.cfg
    x = torch.rand(batch, cfg.in_channels, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (ours(x) - ref(x)[0]).abs().max().item()
    ref_logits = lambda images: ref(images)[0]  # noqa: E731  (the reference returns (logits, hook))
    t_ours, t_ref = time_pair(ours, ref_logits, x, repeats, warmup)
    ms = lambda ts: 1e3 * statistics.median(ts)  # noqa: E731
    return {
        "preset": preset, "overrides": overrides, "batch": batch, "T": cfg.T, "img_size": cfg.img_size,
        "params": sum(p.numel() for p in ours.parameters()), "repeats": repeats, "warmup": warmup,
        "ours_ms": ms(t_ours), "reference_ms": ms(t_ref),
        "ours_ms_min": 1e3 * min(t_ours), "reference_ms_min": 1e3 * min(t_ref),
        "speedup": statistics.median(t_ref) / statistics.median(t_ours),
        "max_abs_logit_diff": diff,
    }


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# CPU forward latency: spikeprune's SDT vs a direct transcription of the reference Spike-driven Transformer",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}; 1-min load average {m['load_average_1m_at_start']} "
        f"at start, {result['load_average_1m_at_end']} at end (the machine is shared)",
        "",
        "Eval mode, `torch.no_grad()`, T=4, random weights with BatchNorm shifted so every layer spikes "
        "(latency does not depend on the values), the same weights in both models; timed forwards alternate "
        "between the two. Median (and best) of the repeats.",
        "",
        "| model | batch | params | ours ms (best) | reference ms (best) | speed-up | max abs logit diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        name = c["preset"] + (f" {c['overrides']}" if c["overrides"] else "")
        lines.append(f"| {name} | {c['batch']} | {c['params']:,} | {c['ours_ms']:.1f} ({c['ours_ms_min']:.1f}) | "
                     f"{c['reference_ms']:.1f} ({c['reference_ms_min']:.1f}) | {c['speedup']:.2f}x | "
                     f"{c['max_abs_logit_diff']:.2e} |")
    lines += ["", "speed-up = reference median / ours median (above 1: ours is faster). Where ours gains: the first "
              "conv and BN run once in eval mode (the T input copies are identical), blocks run on channel-last "
              "tokens (each 1x1 conv one GEMM, no reshape copies), and the LIF is one fused autograd Function. A "
              "non-zero logit difference is float32 rounding (GEMM summation order can flip a spike sitting exactly "
              "at a threshold); tests/test_sdt.py shows in float64 that the two compute the same function."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models and 3 repeats: a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per model (default 7, quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per model first (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    cases = QUICK_CASES if args.quick else CASES
    command = "python bench/sdt_latency.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"command": command.strip(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine(), "cases": []}
    for preset, batch, overrides in cases:
        case = run_case(preset, batch, overrides, repeats, args.warmup)
        print(f"{preset:18s} batch {batch}: ours {case['ours_ms']:8.1f} ms   reference {case['reference_ms']:8.1f} ms   "
              f"speed-up {case['speedup']:.2f}x   max logit diff {case['max_abs_logit_diff']:.1e}", flush=True)
        result["cases"].append(case)
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    stem = "sdt-latency-quick" if args.quick else "sdt-latency"
    write_json(args.out / f"{stem}.json", result)
    with atomic_path(args.out / f"{stem}.md") as tmp:
        tmp.write_text(to_markdown(result))
    print(f"wrote {args.out / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
