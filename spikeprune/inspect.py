"""What a (pruned) model looks like next to the dense model it came from.

Where the dense widths come from: every pruned model carries its pruning record
(`model.pruning`, spikeprune.record), saved in config.json, with the dense model's whole config,
so `spikeprune inspect RUN/model` rebuilds the dense model's shapes from it. A model with no
record (never pruned) is shown against itself, and the report says so.
"""
from __future__ import annotations

from torch import nn

from .coupling import groups as model_groups
from .costs import count_macs, count_params, deployed_memory_bytes, file_bytes_summary, memory_bytes
from .precision import file_weight_bytes, format_plan_bytes
from .models import build_from_config
from .record import PruningRecord
from .tracing_spec import TRACE_ATTR

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _layers(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHTED):
            w = m.weight
            out[name] = {"type": type(m).__name__, "in": int(w.shape[1]), "out": int(w.shape[0]),
                         "params": sum(p.numel() for p in m.parameters(recurse=False))}
    return out


def _totals(model: nn.Module) -> dict:
    return {"params": int(count_params(model)), "memory_bytes": {k: int(v) for k, v in memory_bytes(model).items()},
            "deployed_bytes": {k: int(v) for k, v in deployed_memory_bytes(model).items() if k != "params"},
            "file_bytes": file_bytes_summary(model), "macs": int(count_macs(model))}


def inspect_model(model: nn.Module) -> dict:
    """Groups (with the layers each cuts) and layers, current and dense widths; params, memory and
    MACs of both."""
    rec = getattr(model, "pruning", None)
    rec = rec if isinstance(rec, PruningRecord) else None
    dense = build_from_config(rec.dense_config) if rec else model
    dense_groups = {g.name: g for g in model_groups(dense)}
    dense_layers = _layers(dense)
    now, ref = _totals(model), _totals(dense)
    cfg = model.cfg
    stored = {row["name"]: row for row in file_weight_bytes(model)["layers"]}  # at the model's own precision
    return {
        "family": model.family,
        "input": [cfg.in_channels, cfg.img_size, cfg.img_size],
        "num_classes": cfg.num_classes,
        "T": cfg.T,
        "dense_known": rec is not None,
        "dense_preset": rec.dense_preset if rec else getattr(model, "preset", None),
        "groups": [{"name": g.name, "kind": g.kind, "unit": g.unit, "size": g.size,
                    "dense_size": dense_groups[g.name].size, "params": g.params,
                    "dense_params": dense_groups[g.name].params, "cuts": g.cuts()} for g in model_groups(model)],
        "layers": [{"name": n, **d, "dense_in": dense_layers[n]["in"], "dense_out": dense_layers[n]["out"],
                    "dense_params": dense_layers[n]["params"],
                    "precision": stored[n]["precision"] if n in stored else None,
                    "file_bytes": stored[n]["bytes"] if n in stored else None} for n, d in _layers(model).items()],
        "total": now,
        "dense_total": ref,
        "kept_fraction": {"params": now["params"] / ref["params"], "macs": now["macs"] / max(ref["macs"], 1)},
        "removed": rec.removed_fractions() if rec else {},
        "notes": rec.notes if rec else [],
        # a model made prunable by spikeprune.trace: the layers no group may cut, and why
        "unprunable": [{"module": m, "reason": why} for m, why in getattr(getattr(model, TRACE_ATTR, None),
                                                                          "unprunable", None) or []],
    }


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_report(r: dict) -> str:
    lines = [f"{r['family']}, input {r['input'][0]}x{r['input'][1]}x{r['input'][2]}, "
             f"{r['num_classes']} classes, T={r['T']}"]
    if r["dense_known"]:
        lines.append(f"pruned from {r['dense_preset'] or 'a dense model'} (its widths are shown as 'dense')")
    else:
        lines.append("no pruning record: shown against itself (dense = current widths)")
    lines += ["", f"{'group':22s} {'unit':8s} {'now':>6s} {'dense':>6s} {'kept':>6s} {'params':>10s}"]
    for g in r["groups"]:
        lines.append(f"{g['name']:22s} {g['unit']:8s} {g['size']:6d} {g['dense_size']:6d} "
                     f"{g['size'] / g['dense_size']:6.0%} {_human(g['params']):>10s}  cuts {', '.join(g['cuts'])}")
    lines += ["", f"{'layer':34s} {'type':7s} {'in x out (now)':>16s} {'in x out (dense)':>17s} {'params':>9s} "
                  f"{'weights':>7s} {'file B':>9s}"]
    for ly in r["layers"]:
        lines.append(f"{ly['name']:34s} {ly['type']:7s} {str(ly['in']) + ' x ' + str(ly['out']):>16s} "
                     f"{str(ly['dense_in']) + ' x ' + str(ly['dense_out']):>17s} {_human(ly['params']):>9s} "
                     f"{ly.get('precision') or '-':>7s} {_human(ly['file_bytes']) if ly.get('file_bytes') else '-':>9s}")
    t, d = r["total"], r["dense_total"]
    lines += [
        "",
        f"params      {t['params']:>14,d}   dense {d['params']:>14,d}   ({r['kept_fraction']['params']:.1%} kept)",
        f"memory fp32 {t['memory_bytes']['fp32']:>14,d} B dense {d['memory_bytes']['fp32']:>14,d} B",
        f"memory int8 {t['memory_bytes']['int8']:>14,d} B dense {d['memory_bytes']['int8']:>14,d} B",
        f"deployed    fp32 {t['deployed_bytes']['fp32']:,} B, int8 {t['deployed_bytes']['int8']:,} B "
        "(BatchNorm folded, int8 with scales: the weights `spikeprune export` writes)",
        f"file        fp32 {t['file_bytes']['fp32']:,} B, fp16 {t['file_bytes']['fp16']:,} B, int8 "
        f"{t['file_bytes']['int8']:,} B, int4 {t['file_bytes']['int4']:,} B (int4 packed, first conv and head at int8)",
        f"this model  {format_plan_bytes(t['file_bytes']['plan'])}"
        + ("" if t["file_bytes"]["plan"]["quantised"] else " (not quantised)"),
        f"MACs/image  {t['macs']:>14,d}   dense {d['macs']:>14,d}   ({r['kept_fraction']['macs']:.1%} kept)",
    ]
    lines += [f"note: {n}" for n in r["notes"]]
    if r.get("unprunable"):
        lines += ["", "layers no group may cut (the trace could not follow them with certainty):"]
        lines += [f"  {u['module']}: {u['reason']}" for u in r["unprunable"]]
    return "\n".join(lines)
