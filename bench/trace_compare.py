"""spikeprune's tracer against Torch-Pruning's DependencyGraph, on the same models (not a test).

Models: ours (the bundled model and the smallest preset of every registered family) and
SpikingJelly 2.0's zoo at tiny widths (bench/zoo_models.py: Spikformer, QKFormer, Spike-driven
Transformer, MaxFormer). For each model and tool, in a child process with a time limit per model
and tool (default 120 s; a tool that gives no answer in time is reported as such):

  trace       spikeprune.trace(model, x) / tp.DependencyGraph().build_dependency(model, x) and
              get_all_groups(root_module_types=[Conv1d, Conv2d, Linear], the classifier ignored):
              the groups found, the layers reported unprunable, the time to trace
  prune       30% of every group by L2 magnitude: spikeprune.prune(model, {every traced channel
              group: 0.3}, "l2"); Torch-Pruning as it comes: MetaPruner(importance=
              MagnitudeImportance(p=2), pruning_ratio=0.3, ignored_layers=[classifier]).step()
  runs        the pruned model's forward on the example input
  equivalent  the pruned model against the dense model with the same channels zeroed (written
              here from what each tool says it removed: output slices of the layers and BatchNorms
              that write a channel, input slices of the layers that read it), in float64, neuron
              state reset before each forward; max |difference| of the logits <= 1e-9

Results: bench/results/trace-compare.json (everything) and .md (the table, written here).

    python bench/trace_compare.py                        # all models, 120 s per model and tool
    python bench/trace_compare.py --models zoo-sdt,bundled --timeout 60 --out /tmp/tc
    pip install -c constraints.txt -e '.[bench]'         # Torch-Pruning 1.6.1 (needs only torch)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/zoo_models.py: the zoo models at tiny widths

from spikeprune.serialization import write_json  # noqa: E402
from zoo_models import make_lively, masked_dense, record_cuts, reset_states  # noqa: E402

TOOLS = ("spikeprune", "torch-pruning")
RATIO = 0.3
EQUIVALENCE_TOL = 1e-9
BATCH = 2
OUT = ROOT / "bench" / "results"


# -- the models ------------------------------------------------------------------------------------

def our_model_names() -> list[str]:
    """The bundled model and, for every registered family, its smallest preset (by parameters)."""
    from spikeprune.models import families, list_models, preset_summary

    summaries = [preset_summary(n) for n in list_models()]
    smallest = [min((s for s in summaries if s["family"] == f), key=lambda s: s["params"])["name"]
                for f in families() if any(s["family"] == f for s in summaries)]  # traced models have no presets
    return ["bundled"] + smallest


def zoo_model_names() -> list[str]:
    from zoo_models import ZOO_BUILDERS

    return list(ZOO_BUILDERS)


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A seeded model in eval mode and its example input (a batch of BATCH images)."""
    torch.manual_seed(0)
    if name.startswith("zoo-"):
        from zoo_models import ZOO_BUILDERS, example_input

        return ZOO_BUILDERS[name]().eval(), example_input(BATCH)
    if name == "bundled":
        from spikeprune.bundled import bundled_model

        model = bundled_model()
    else:
        from spikeprune.models import create_model

        model = create_model(name)
    c = model.cfg
    if name != "bundled":  # a preset's initial weights barely spike: draw weights that do, as for the zoo's
        make_lively(model, 0, (c.in_channels, c.img_size, c.img_size))
    x = torch.randn(BATCH, c.in_channels, c.img_size, c.img_size, generator=torch.Generator().manual_seed(0))
    return model.eval(), x


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    reset_states(model)
    with torch.no_grad():
        y = model(x)
    reset_states(model)
    return y


def classifier(model: nn.Module) -> nn.Module:
    """The last Linear layer: Torch-Pruning's recipes leave it out (its outputs are the classes)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the masked dense model ------------------------------------------------------------------------

def equivalence(dense: nn.Module, pruned: nn.Module, cuts, x: torch.Tensor) -> dict:
    masked = masked_dense(dense, cuts)
    p = copy.deepcopy(pruned).double()
    y_masked = forward(masked, x.double())
    diff = (forward(p, x.double()) - y_masked).abs().max().item()
    # the check is not vacuous: the cut changed what the dense model computes
    cut_matters = not torch.allclose(forward(copy.deepcopy(dense).double(), x.double()), y_masked)
    return {"equivalent": diff <= EQUIVALENCE_TOL, "max_abs_diff": diff, "cut_changes_output": cut_matters}


# -- one tool on one model (child process) ---------------------------------------------------------

def emit(**row) -> None:
    print("RESULT " + json.dumps(row), flush=True)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_torch_pruning(name: str, timeout: float) -> None:
    import torch_pruning as tp

    model, x = build(name)
    dense = copy.deepcopy(model)
    head = classifier(model)
    emit(phase="model", params=params(model), tool_version=tp.__version__)
    t0 = time.perf_counter()
    signal.alarm(int(timeout))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    built = time.perf_counter() - t0
    emit(phase="built", build_s=built)  # where a hang is: building the graph, or grouping it
    found = list(graph.get_all_groups(ignored_layers=[head], root_module_types=[nn.Conv1d, nn.Conv2d, nn.Linear]))
    names = {m: n for n, m in model.named_modules()}
    emit(phase="trace", trace_s=time.perf_counter() - t0, build_s=built, groups=len(found),
         group_layers=[sorted({names[d.target.module] for d, _ in g if d.target.module in names}) for g in found],
         unprunable=[])
    reset_states(model)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=RATIO,
                                  ignored_layers=[head])
    cuts = []
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            module = dep.target.module
            if module in names and dep.target.type != tp.ops.OPTYPE.PARAMETER:
                cuts.append((names[module], 0 if pruner.DG.is_out_channel_pruning_fn(dep.handler) else 1,
                             [int(i) for i in tp._helpers.to_plain_idxs(idxs)]))
        group.prune()
    emit(phase="prune", params_after=params(model), removed=1 - params(model) / params(dense))
    signal.alarm(0)
    forward(model, x)
    emit(phase="runs", runs=True)
    emit(phase="equivalent", **equivalence(dense, model, cuts, x))


class AsUserModule(nn.Module):
    """One of our family models seen as a user's module: spikeprune reads a family model's declared
    groups, so the model is wrapped in a class of no family, which the tracer must work out alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def group_key(g, prefix: str = "") -> tuple:
    """A group's structure without its name: kind, unit, size, heads, and its members (path, dim,
    unit width)."""
    return (g.kind, g.unit, g.size, g.heads,
            tuple(sorted((m.module[len(prefix):], m.dim, m.unit_width) for m in g.members)))


def run_spikeprune(name: str, timeout: float) -> None:
    import spikeprune

    model, x = build(name)
    declared = None
    if getattr(model, "family", None) is not None:
        from spikeprune.coupling import groups

        declared, model = groups(model), AsUserModule(model).eval()
    dense = copy.deepcopy(model)
    emit(phase="model", params=params(model), tool_version=getattr(spikeprune, "__version__", "") or "this tree")
    signal.alarm(int(timeout))
    t0 = time.perf_counter()
    traced = spikeprune.trace(model, x)
    trace_s = time.perf_counter() - t0
    row = dict(phase="trace", trace_s=trace_s, groups=len(traced.groups),
               group_layers=[g.layers for g in traced.groups],
               unprunable=[[n if isinstance(n, str) else type(n).__name__, r] for n, r in traced.unprunable])
    if declared is not None:  # a family model: the traced groups against the family's declaration
        row["matches_declared"] = (sorted(group_key(g, "model.") for g in traced.groups)
                                   == sorted(group_key(g) for g in declared))
    emit(**row)
    ratios = {g.name: RATIO for g in traced.groups if g.unit == "channel"}
    result = spikeprune.prune(model, ratios, "l2")
    pruned = model if result is None else result  # in place, or a new model
    emit(phase="prune", params_after=params(pruned), removed=1 - params(pruned) / params(dense))
    signal.alarm(0)
    forward(pruned, x)
    emit(phase="runs", runs=True)
    emit(phase="equivalent", **equivalence(dense, pruned, record_cuts(traced.groups, pruned.pruning), x))


def worker(tool: str, name: str, timeout: float) -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    try:
        (run_spikeprune if tool == "spikeprune" else run_torch_pruning)(name, timeout)
    except _Timeout:
        emit(phase="error", error=f"no answer in {timeout:g} s")
    except BaseException as e:  # the tool's own failure is the result
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb)), "")
        emit(phase="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}",
             where=where)


# -- the parent: every model and tool, the table ---------------------------------------------------

def measure(tool: str, name: str, timeout: float) -> dict:
    """One child process; its RESULT lines merged. A child that outlives the alarm is killed."""
    cmd = [sys.executable, __file__, "--worker", tool, name, "--timeout", str(timeout)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    row: dict = {"model": name, "tool": tool}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, env=env).stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        row["error"] = f"no answer in {timeout:g} s (killed)"
    for line in out.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            r.pop("phase")
            row.update(r)
    row["wall_s"] = time.perf_counter() - t0
    if "groups" not in row and "error" not in row:
        row["error"] = "the child process died without a result"
    return row


def _layers(n: int) -> str:
    return f"{n} layer" + ("" if n == 1 else "s")


def cell(row: dict) -> dict:
    """The table's words for one row."""
    err = row.get("error")
    traced = "groups" in row
    return {
        "groups": (f"{row['groups']}" + (f" ({_layers(len({n for n, _ in row['unprunable']}))} unprunable)"
                                         if row.get("unprunable") else "")
                   + ({True: ", = declared", False: ", != declared"}.get(row.get("matches_declared"), "")))
        if traced else "-",
        "trace_s": f"{row['trace_s']:.2f}" if traced else "-",
        "removed": f"{100 * row['removed']:.1f}%" if "removed" in row else "-",
        "runs": "yes" if row.get("runs") else ("no" if "removed" in row else "-"),
        "equivalent": ("yes" if row["equivalent"] else f"no ({row['max_abs_diff']:.2g})") if "equivalent" in row
        else "-",
        "error": (err + (f" [{row['where']}]" if row.get("where") else "")
                  + (f" (graph built in {row['build_s']:.2f} s; no groups)" if "build_s" in row and not traced else ""))
        if err else "",
    }


def table(rows: list[dict], command: str, meta: dict) -> str:
    lines = ["# Tracing: spikeprune against Torch-Pruning's DependencyGraph", "",
             f"Written by `{command}` ({meta['machine']}, torch {meta['torch']}, Torch-Pruning "
             f"{meta.get('torch_pruning', '?')}, SpikingJelly {meta.get('spikingjelly', '?')}, "
             f"{meta['timeout_s']:g} s per model and tool). Pruning: 30% of every group by L2 magnitude "
             "(Torch-Pruning: MetaPruner as it comes, the classifier ignored). *Equivalent*: the pruned "
             "model's logits against the dense model with the same channels zeroed, float64, max |diff| "
             f"<= {EQUIVALENCE_TOL:g}. *Groups*: coupled groups found (Torch-Pruning: get_all_groups over "
             "Conv / Linear roots); *= declared*: the traced groups equal the family's own declaration.", "",
             "| model | params | tool | groups | trace s | removed | runs | equivalent | failure |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = cell(r)
        lines.append(f"| {r['model']} | {r.get('params', '-'):,} | {r['tool']} | {c['groups']} | {c['trace_s']} | "
                     f"{c['removed']} | {c['runs']} | {c['equivalent']} | {c['error'].replace('|', '/')} |"
                     if isinstance(r.get("params"), int) else
                     f"| {r['model']} | - | {r['tool']} | {c['groups']} | {c['trace_s']} | {c['removed']} | "
                     f"{c['runs']} | {c['equivalent']} | {c['error'].replace('|', '/')} |")
    refused: dict[tuple[str, str], list[str]] = {}  # (model, reason) -> layers
    for r in rows:
        for layer, why in r.get("unprunable", []) if r["tool"] == "spikeprune" else []:
            refused.setdefault((r["model"], why), []).append(layer)
    if refused:
        lines += ["", "Layers spikeprune's tracer reports unprunable, by reason:", ""]
        lines += [f"- {m}: {why}: " + ", ".join(f"`{n}`" for n in layers) for (m, why), layers in refused.items()]
    return "\n".join(lines) + "\n"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    v = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, 1 thread",
         "torch": torch.__version__, "python": platform.python_version()}
    for key, dist in (("torch_pruning", "torch-pruning"), ("spikingjelly", "spikingjelly")):
        try:
            v[key] = version(dist)
        except PackageNotFoundError:
            v[key] = "not installed"
    return v


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated model names (default: ours, then the zoo's)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model and tool (default 120)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker, args.timeout)
    from zoo_models import zoo_unavailable

    meta = {**versions(), "timeout_s": args.timeout, "ratio": RATIO}
    missing = zoo_unavailable()
    names = [n for n in args.models.split(",") if n] or our_model_names() + ([] if missing else zoo_model_names())
    if missing and not args.models:
        print(f"trace_compare: the zoo models are left out: {missing}", file=sys.stderr)
    rows = []
    for name in names:
        for tool in [t for t in args.tools.split(",") if t]:
            if tool not in TOOLS:
                ap.error(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")
            rows.append(measure(tool, name, args.timeout))
            c = cell(rows[-1])
            print(f"{name:24s} {tool:14s} groups {c['groups']:>22s}  trace {c['trace_s']:>6s} s  removed "
                  f"{c['removed']:>6s}  runs {c['runs']:3s}  equivalent {c['equivalent']:10s} {c['error']}", flush=True)
    command = "python bench/trace_compare.py" + "".join(
        f" {flag} {value}" for flag, value, default in (("--models", args.models, ""), ("--tools", args.tools, ",".join(TOOLS)),
                                                        ("--timeout", f"{args.timeout:g}", "120"), ("--out", args.out, str(OUT)))
        if value != default)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "trace-compare.json", {"command": command, "meta": meta, "rows": rows})
    tmp = out / "trace-compare.md.tmp"
    tmp.write_text(table(rows, command, meta))
    os.replace(tmp, out / "trace-compare.md")
    print(f"wrote {out / 'trace-compare.json'} and {out / 'trace-compare.md'}\nreproduce: {command}")


if __name__ == "__main__":
    main()
