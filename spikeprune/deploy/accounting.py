"""The bytes of an exported file, term by term against what a memory budget counted
(spikeprune.precision) and against measure's parameter counting."""
from __future__ import annotations

from ..costs import layer_table, memory_bytes
from ..precision import file_weight_bytes, weight_layers


def int8_reconciliation(model_or_config, file_bytes: int | None = None) -> dict:
    """measure's int8 weight memory, term by term, to the bytes of an int8 file: BatchNorm folding
    (2 fp32 values per channel, plus a bias the layer had, become one fp32 bias; negative = saved),
    the per-channel fp32 scales and int8 zero points measure does not count, then the graph."""
    rows = [r for r in layer_table(model_or_config) if r.weight_shape]
    channels = sum(r.weight_shape[0] for r in rows)
    folding = sum(4 * (r.weight_shape[0] if (r.bias or r.bn) else 0)
                  - 4 * ((r.weight_shape[0] if r.bias else 0) + 2 * r.bn_features) for r in rows)
    out = {"measure_int8": memory_bytes(model_or_config)["int8"], "batchnorm_folding": folding,
           "scales": 4 * channels, "zero_points": channels}
    out["weights_in_file"] = out["measure_int8"] + folding + out["scales"] + out["zero_points"]
    if file_bytes is not None:
        out["graph"] = file_bytes - out["weights_in_file"]
        out["file"] = file_bytes
    return out


def reconcile(model_or_config, plan: dict[str, str], breakdown: dict, file_bytes: int,
              normalisation_bytes: int = 0) -> dict:
    """The file's bytes by kind (graph.file_breakdown) against the budget's count of `plan`
    (precision.file_weight_bytes), term by term. Returns {"terms": [{term, counted, in_file}],
    "counted": the budget's bytes, "outside_count": {input_normalisation, other_constants, graph,
    never_called (minus the bytes of layers the cost table marks unused: counted by the budget, never
    called by the forward, so not in the graph)}, "unaccounted": bytes of weights in the file the
    count does not explain (0 when they agree), "file": file_bytes}."""
    fb = file_weight_bytes(model_or_config, plan)
    unused = {r.name for r in weight_layers(model_or_config) if r.input == "unused"}
    by = {p: {"weights": 0, "biases": 0} for p in ("fp32", "fp16", "int8", "int4")}
    scales = zero_points = never_called = 0
    for row in fb["layers"]:
        if row["name"] in unused:
            never_called += row["bytes"]
            continue
        by[row["precision"]]["weights"] += row["weights"]
        by[row["precision"]]["biases"] += row["biases"]
        scales, zero_points = scales + row["scales"], zero_points + row["zero_points"]
    fp32_counted = by["fp32"]["weights"] + by["fp32"]["biases"] + by["int8"]["biases"] + by["int4"]["biases"]
    terms = [
        {"term": "int8 weights", "counted": by["int8"]["weights"], "in_file": breakdown["int8_weights"]},
        {"term": "int4 weights (packed)", "counted": by["int4"]["weights"], "in_file": breakdown["int4_weights"]},
        {"term": "per-channel scales (fp32)", "counted": scales, "in_file": breakdown["scales"]},
        {"term": "zero points", "counted": zero_points, "in_file": breakdown["zero_points"]},
        {"term": "fp16 weights and biases", "counted": by["fp16"]["weights"] + by["fp16"]["biases"],
         "in_file": breakdown["fp16"]},
        {"term": "fp32 weights and biases", "counted": fp32_counted,
         "in_file": breakdown["fp32_constants"] - normalisation_bytes},
    ]
    unaccounted = sum(t["in_file"] - t["counted"] for t in terms)
    return {"terms": terms, "counted": fb["total"], "unaccounted": unaccounted,
            "outside_count": {"input_normalisation": normalisation_bytes,
                              "other_constants": breakdown["other_constants"], "graph": breakdown["graph"],
                              "never_called": -never_called},
            "file": file_bytes, "by_precision": fb["by_precision"], "share_of_weights": fb["share_of_weights"],
            "bits_per_weight": fb["bits_per_weight"]}
