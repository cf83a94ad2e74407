"""Per-layer weight precision and the bytes a deployed file holds for it.

A precision plan says, for every weight layer of a model's cost table (Conv / Linear, named as in
the state dict), how its weights are stored:

    fp32   4 B per weight and per bias
    fp16   2 B per weight and per bias (a Cast to float32 in front of its use)
    int8   1 B per weight, symmetric per output channel: scale = max|w| / 127, zero point 0
    int4   4 bits per weight (two to a byte, the whole tensor packed), symmetric per output
           channel: scale = max|w| / 7, zero point 0 (the -8 code is unused)

int8 / int4 layers keep their bias at fp32 and add, per output channel, a 4 B fp32 scale and a
zero point (1 B for int8, half a byte for int4, packed): what ONNX's DequantizeLinear reads. The
counting is that of the deployed file: BatchNorm folded into the layer before it (a layer with a
bias or a folded BatchNorm has one bias per output channel; the BatchNorm's four vectors are gone).
Why per-output-channel symmetric scales: folding a BatchNorm multiplies each output channel by one
number, and symmetric per-channel rounding commutes with that (round(w * s / (s * m)) =
round(w / m)), so weights quantised before folding are still exactly on the grid after it.

A plan is built from a precision name (every layer alike), or a dict {layer name or glob: precision}
(the first matching pattern wins; every weight layer must match one), and `ends`: the precision of
the first weight layer (the image conv) and the last (the head), which may stay wider. int4 keeps
its ends at int8 unless told otherwise (DEFAULT_ENDS).

`file_weight_bytes` counts a plan per layer; costs.budget_bytes is what `--precision file-...`
budgets count (a model that carries its own plan, `model.weight_precision`, is counted at that plan).
"""
from __future__ import annotations

from fnmatch import fnmatchcase

from .errors import SpikepruneError
from .models import get_family
from .structure import Layer

WEIGHT_PRECISIONS = ("fp32", "fp16", "int8", "int4")
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
QMAX = {"int8": 127, "int4": 7}  # symmetric codes: [-QMAX, QMAX]
DEFAULT_ENDS = {"int4": "int8"}  # the first conv and the head, unless `ends` says otherwise
FILE_PREFIX = "file-"  # budget precisions that count the deployed file's bytes: file-fp32 ... file-int4
FILE_PRECISIONS = tuple(FILE_PREFIX + p for p in WEIGHT_PRECISIONS)
PLAN_ATTRIBUTE = "weight_precision"  # a model quantised by spikeprune.quantise carries its plan here


def _config(model_or_config):
    cfg = getattr(model_or_config, "cfg", model_or_config)
    get_family(cfg)
    return cfg


def weight_layers(model_or_config) -> list[Layer]:
    """The cost table's rows that hold weights, in forward order."""
    cfg = _config(model_or_config)
    return [r for r in get_family(cfg).layer_table(cfg) if r.weight_shape]


def _check_precision(p, what: str) -> str:
    if p not in WEIGHT_PRECISIONS:
        raise SpikepruneError(f"{what}: unknown weight precision {p!r}; choose one of {', '.join(WEIGHT_PRECISIONS)}")
    return p


def resolve_plan(model_or_config, precision="fp32", ends: str | None = None) -> dict[str, str]:
    """{weight layer: precision} for `precision` (a name, or {layer name or glob: name}); `ends`
    (default DEFAULT_ENDS for a uniform name, else none) sets the first and last weight layers."""
    layers = [r.name for r in weight_layers(model_or_config)]
    if isinstance(precision, dict):
        patterns = {str(k): _check_precision(v, f"layer {k}") for k, v in precision.items()}
        plan, used = {}, set()
        for name in layers:
            hit = next((k for k in patterns if fnmatchcase(name, k)), None)
            if hit is None:
                raise SpikepruneError(f"the precision plan names no precision for layer {name}; add it, or a "
                                      "catch-all '*' entry")
            plan[name] = patterns[hit]
            used.add(hit)
        unused = [k for k in patterns if k not in used]
        if unused:
            raise SpikepruneError(f"the precision plan's {', '.join(map(repr, unused[:3]))} match no weight layer of "
                                  f"the model (its layers: {', '.join(layers[:4])}, ...)")
    else:
        _check_precision(precision, "precision")
        plan = dict.fromkeys(layers, precision)
        ends = DEFAULT_ENDS.get(precision) if ends is None else ends
    if ends is not None:
        _check_precision(ends, "ends (first conv and head)")
        if BITS[ends] < min(BITS[p] for p in plan.values()):
            raise SpikepruneError(f"ends={ends} would make the first conv and head narrower than the other layers; "
                                  "ends is for keeping them wider")
        for name in (layers[0], layers[-1]):
            plan[name] = ends if BITS[ends] > BITS[plan[name]] else plan[name]
    return plan


def model_plan(model) -> dict[str, str] | None:
    """The plan a quantised model carries (None: an fp32 model)."""
    plan = getattr(model, PLAN_ATTRIBUTE, None)
    return dict(plan) if plan else None


def layer_bytes(layer: Layer, precision: str) -> dict:
    """Bytes of one weight layer in the deployed file (BatchNorm folded) at `precision`."""
    channels = layer.weight_shape[0]
    biases = channels if (layer.bias or layer.bn) else 0
    w = layer.weights
    if precision == "fp32":
        parts = {"weights": 4 * w, "biases": 4 * biases, "scales": 0, "zero_points": 0}
    elif precision == "fp16":
        parts = {"weights": 2 * w, "biases": 2 * biases, "scales": 0, "zero_points": 0}
    elif precision == "int8":
        parts = {"weights": w, "biases": 4 * biases, "scales": 4 * channels, "zero_points": channels}
    elif precision == "int4":
        parts = {"weights": (w + 1) // 2, "biases": 4 * biases, "scales": 4 * channels,
                 "zero_points": (channels + 1) // 2}
    else:
        raise SpikepruneError(f"unknown weight precision {precision!r}")
    return {**parts, "bytes": sum(parts.values()), "values": w + biases}


def file_weight_bytes(model_or_config, precision=None, ends: str | None = None) -> dict:
    """The deployed file's weight bytes, per layer and in total, for a plan (see resolve_plan;
    precision=None: the model's own plan, else fp32).

    Returns {"plan": {layer: precision}, "layers": [{name, precision, weights, biases, scales,
    zero_points, bytes, values}], "total": bytes, "parts": {weights, biases, scales, zero_points},
    "by_precision": {precision: bytes}, "share_of_weights": {precision: fraction of the weight
    values held at it}, "bits_per_weight": mean bits per weight value (scales etc. included)}."""
    if precision is None:
        plan = model_plan(model_or_config) or resolve_plan(model_or_config, "fp32")
    elif isinstance(precision, dict) and set(precision) == {r.name for r in weight_layers(model_or_config)} \
            and ends is None:
        plan = {r.name: _check_precision(precision[r.name], r.name) for r in weight_layers(model_or_config)}
    else:
        plan = resolve_plan(model_or_config, precision, ends)
    rows, by_p, values_p = [], dict.fromkeys(WEIGHT_PRECISIONS, 0), dict.fromkeys(WEIGHT_PRECISIONS, 0)
    parts = {"weights": 0, "biases": 0, "scales": 0, "zero_points": 0}
    for r in weight_layers(model_or_config):
        b = layer_bytes(r, plan[r.name])
        rows.append({"name": r.name, "precision": plan[r.name], **b})
        by_p[plan[r.name]] += b["bytes"]
        values_p[plan[r.name]] += r.weights
        for k in parts:
            parts[k] += b[k]
    total = sum(by_p.values())
    n_weights = sum(values_p.values())
    return {"plan": plan, "layers": rows, "total": total, "parts": parts, "by_precision": by_p,
            "share_of_weights": {p: v / n_weights for p, v in values_p.items()},
            "bits_per_weight": 8 * total / n_weights}


def format_plan_bytes(fb: dict) -> str:
    """One line: total, bytes and weight share per precision, mean bits per weight."""
    parts = [f"{p} {fb['by_precision'][p]:,} B ({fb['share_of_weights'][p]:.1%} of weights)"
             for p in WEIGHT_PRECISIONS if fb["by_precision"][p]]
    return f"{fb['total']:,} B ({'; '.join(parts)}; {fb['bits_per_weight']:.2f} bits per weight)"
