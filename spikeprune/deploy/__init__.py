"""Deployment export: fold BatchNorm, unroll the LIF over T, store each weight layer at its
precision, write an ONNX file that takes raw pixels, and check it.

    export(model, "model.onnx", precision="fp32" | "fp16" | "int8" | "int4" | {layer glob: precision},
           data="mnist5k")

What the file holds (any registered family, dense or pruned):
  * Input `images` [B, C, H, W] float32: raw pixels in [0, 1] (input="raw", the default): the
    model's input normalisation (x - mean) / std is a Sub and a Div at the front of the graph,
    with mean / std from `normalisation` (a dataset name or (mean, std)) or from the check data's
    dataset. input="normalised" keeps the older behaviour (the caller normalises). Either way the
    file's metadata `spikeprune.preprocessing` says what to feed it. Output `logits` [B, classes].
  * BatchNorm folded into the Conv / Linear before it (fold.py; the family's cost table says which
    BN follows which layer), verified in float64 before anything is written.
  * The LIF as plain tensor ops unrolled over the model's T (neuron.plain_ops); T fixed, batch dynamic.
    Or (time_loop="loop", loop.py) one time step written once, as the body of an ONNX Loop run T
    times with every LIF's membrane loop-carried: a graph that does not grow with T.
  * Weights at a per-layer precision (spikeprune.precision): fp32; fp16 behind a Cast; int8 or int4
    symmetric per output channel behind a DequantizeLinear (weight-only QDQ; biases fp32). int4 is
    stored packed (two values a byte) and needs opset 21, which the file then declares (the graph
    is traced at opset 20, the newest the TorchScript exporter writes, and raised by onnx's version
    converter). Why weight-only QDQ and not ONNX Runtime's quantize_dynamic / quantize_static: those
    quantise activations too, but between spiking layers the activations are binary spikes already;
    weight-only QDQ stores exactly the bytes the budget counts, runs on any runtime that reads
    standard ONNX (ONNX Runtime dequantises the constant weights once, at load, and computes in
    fp32), and keeps the spike function unchanged apart from the weight rounding.
  * Metadata: family, config, T, precision and the per-layer plan, opset, what was folded, the
    preprocessing.

The check (unless check=False), run on the written file before it is moved into place (a failed
check leaves no file; check.py): ONNX Runtime against the PyTorch model the file should compute --
the fp32 model, or for reduced precision the fake-quantised model (spikeprune.quantise) -- on
images of `data` (its calibration split; random images without data, said so): predicted classes,
every spike decision (flips at float32 threshold ties counted; a logit difference without a flipped
spike, or a top-1 difference larger than the images with flips, refuses the file), and a top-1 drop
against the fp32 model of more than `max_drop` points (compared as counts of images) refuses a
reduced-precision file unless keep_inaccurate=True. A file ONNX Runtime cannot load is an error
naming the runtime, never a silent fp32 file.

The file is written to a temporary name in the target folder and renamed when done (temporaries of
a killed export are removed by the next export to that path); an existing path is refused unless
force=True. onnx and onnxruntime are the optional extra `export` (pip install 'spikeprune[export]').
"""
from __future__ import annotations

import copy
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from ..costs import deployed_memory_bytes, memory_bytes
from ..errors import SpikepruneError
from ..models import get_family
from ..precision import BITS, QMAX, model_plan, resolve_plan
from ..quantise import apply_plan
from ..serialization import atomic_path
from ..validation import renamed_arguments
from .accounting import int8_reconciliation, reconcile
from .check import CHECK_IMAGES, FLOAT64_IMAGES, check_batches, check_export, file_metadata
from .fold import INPUTS, RawInput, float64_check, fold_batchnorm, resolve_normalisation
from .graph import (MAX_TRACE_OPSET, compact_names, dedupe_constants, file_breakdown, graph_census, need_onnx,
                    quantize_per_channel, reduce_precision, trace_images, trace_to_onnx)
from .loop import (SENTINEL_BATCHES, TIME_LOOPS, SteppedModel, batch_free, check_time_loop, constants_into_body,
                   one_step_twin, stepwise_check, wrap_in_loop)
from .text import format_export_report

FORMATS = ("onnx",)
PRECISIONS = ("fp32", "fp16", "int8", "int4")
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"
DEFAULT_OPSET = 17  # read by ONNX Runtime >= 1.14, TensorRT >= 8.6, OpenVINO >= 2022.3
INT4_OPSET = 21  # DequantizeLinear takes int4 from opset 21 (verified on ONNX Runtime 1.32)
MAX_OPSET = 21
# GreaterOrEqual (the LIF's fire decision) exists from opset 12; DequantizeLinear takes a per-channel
# `axis` from opset 13, int4 from 21.
MIN_OPSET = {"fp32": 12, "fp16": 12, "int8": 13, "int4": INT4_OPSET}
INT8_MAX_DROP = 1.0  # points of top-1 a reduced-precision file may lose against fp32 before it is refused


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------
def _plan_name(plan: dict[str, str]) -> str:
    kinds = set(plan.values())
    if len(kinds) == 1:
        return kinds.pop()
    return "mixed (" + ", ".join(f"{p} x{sum(v == p for v in plan.values())}"
                                 for p in sorted(kinds, key=lambda p: BITS[p])) + ")"


def _check_options(fmt: str, plan: dict[str, str], opset) -> int:
    if fmt not in FORMATS:
        raise SpikepruneError(f"unknown export format {fmt!r}; spikeprune exports {', '.join(FORMATS)}")
    need = max(MIN_OPSET[p] for p in plan.values())
    if opset is None:
        return max(DEFAULT_OPSET, need)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise SpikepruneError(f"the opset is a whole number, got {opset!r}")
    if opset < need:
        p = max(plan.values(), key=lambda p: MIN_OPSET[p])
        why = {"int8": "per-channel DequantizeLinear (int8 weights)", "int4": "int4 DequantizeLinear (int4 weights)"}.get(
            p, "GreaterOrEqual (the LIF's fire decision)")
        raise SpikepruneError(f"opset {opset} is too old: a {p} export needs opset {need} or newer for {why}")
    if opset > MAX_OPSET:
        raise SpikepruneError(f"opset {opset} is newer than spikeprune writes (at most {MAX_OPSET})")
    return opset


def _check_path(path, overwrite: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise SpikepruneError(f"{path} is a folder; give the file to write, e.g. {path / 'model.onnx'}")
    if path.exists() and not overwrite:
        raise SpikepruneError(f"{path} exists; replace it with --force (force=True in Python)")
    if path.parent.exists() and not path.parent.is_dir():
        raise SpikepruneError(f"{path.parent} is a file, so {path.name} cannot be written inside it")
    if not path.parent.is_dir():
        raise SpikepruneError(f"the folder {path.parent} does not exist")
    return path


def _check_max_drop(max_drop) -> float:
    try:
        value = float(max_drop)
    except (TypeError, ValueError):
        raise SpikepruneError(f"max_drop is a number of top-1 points, got {max_drop!r}") from None
    if not math.isfinite(value) or value < 0:  # NaN would pass every comparison and fail only at the gate
        raise SpikepruneError(f"max_drop is a non-negative number of top-1 points (1 = at most one point below "
                              f"fp32), got {max_drop}")
    return value


def _remove_stale_partials(path: Path) -> None:
    """Temporaries of exports killed midway by versions that named them `.NAME.*.partial` (the
    current ones are atomic_path's `.NAME.<pid>-*.tmp`, which it cleans itself)."""
    for tmp in path.parent.glob(f".{path.name}.*.partial"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)


def _preprocessing(input: str, norm, cfg) -> dict:
    shape = f"[batch, {cfg.in_channels}, {cfg.img_size}, {cfg.img_size}] float32"
    if input == "raw":
        mean, std, where = norm
        return {"input": "raw", "mean": list(mean), "std": list(std), "source": where,
                "description": f"images {shape}, raw pixels in [0, 1] (channel order as trained, resized to "
                               f"{cfg.img_size}x{cfg.img_size}); the graph normalises them: (x - {list(mean)}) / "
                               f"{list(std)}, {where}"}
    if norm is None:
        return {"input": "normalised", "mean": None, "std": None, "source": None,
                "description": f"images {shape}, normalised as the model was trained (x - mean) / std; the mean "
                               "and std are not known to the export: give normalisation=... to record them"}
    mean, std, where = norm
    return {"input": "normalised", "mean": list(mean), "std": list(std), "source": where,
            "description": f"images {shape}, normalised by the caller: (pixels in [0, 1] - {list(mean)}) / "
                           f"{list(std)}, {where}"}


# ------------------------------------------------------------------------------------------------
# export()
# ------------------------------------------------------------------------------------------------
def _weights_model(source: nn.Module, plan: dict) -> nn.Module:
    """The model whose folded weights the file stores: int8 / int4 layers put on their grid before
    folding (so the file's rounding of the folded weights is exact)."""
    if not any(p in QMAX for p in plan.values()):
        return source
    return apply_plan(copy.deepcopy(source), {k: p if p in QMAX else "fp32" for k, p in plan.items()})


def _float64_proofs(source: nn.Module, fam, data, time_loop: str) -> tuple[dict, dict | None]:
    """Folding (and, for a Loop, running step by step) proven in float64 on a few check images."""
    f64_batches, f64_source = check_batches(data, source, "calib", FLOAT64_IMAGES, FLOAT64_IMAGES)
    images = torch.cat([b[0] for b in f64_batches])
    f64 = float64_check(source, images, f64_source)
    if f64["class_agreement"] < 1 or f64["max_abs_logit_diff"] > 1e-9 * (1 + f64["max_abs_logit"]):
        raise SpikepruneError(
            f"folding the {fam.name} model's BatchNorms changes its function (float64 logits differ by "
            f"{f64['max_abs_logit_diff']:.3g}): its cost table pairs a BatchNorm with a layer it does not directly follow")
    return f64, (stepwise_check(source, images, f64_source) if time_loop == "loop" else None)


def _graph(weights: nn.Module, fam, pre: dict, opset: int, batch: int | None, time_loop: str):
    """(the ONNX graph at fp32 weights, the folded module whose parameters it holds, how a Loop's
    body was traced or None): the model unrolled over T, or its one-time-step twin as the body of
    one Loop (loop.py)."""
    if time_loop == "unrolled":
        folded, _, _ = fold_batchnorm(weights)
        traced = RawInput(folded, pre["mean"], pre["std"]).eval() if pre["input"] == "raw" else folded
        return trace_to_onnx(traced, fam.name, opset, batch), folded, None
    folded, _, _ = fold_batchnorm(one_step_twin(weights))
    stepped = SteppedModel(RawInput(folded, pre["mean"], pre["std"]).eval() if pre["input"] == "raw" else folded)

    def trace(at: int | None):
        states = tuple(stepped.discover(trace_images(weights.cfg, at)))
        return trace_to_onnx(stepped, fam.name, opset, at, states=states)

    # a dynamic batch: traced at two fixed sizes and generalised (no shape arithmetic in the body), else traced dynamic
    step, how = (trace(batch), f"traced at the fixed batch of {batch}") if batch else (
        batch_free(*(trace(b) for b in SENTINEL_BATCHES)), "traced at batches {} and {}, its batch-size constants "
        "generalised (no shape arithmetic)".format(*SENTINEL_BATCHES))
    if step is None:
        step, how = trace(None), "traced with a dynamic batch (its batch-size constants could not be generalised)"
    dedupe_constants(step)
    compact_names(step)
    return wrap_in_loop(step, weights.cfg.T, len(stepped.slots), opset), folded, how


def _metadata(model, fam, plan: dict, opset: int, batch, pairs, pre: dict, time_loop: str) -> tuple[dict, str]:
    """The file's spikeprune.* metadata and its doc string (an unrolled file's as before Loop files existed)."""
    cfg = model.cfg
    precision = _plan_name(plan)
    meta = {"spikeprune.family": fam.name, "spikeprune.config": json.dumps(model.config_dict()["config"]),
            "spikeprune.T": str(cfg.T), "spikeprune.precision": precision,
            "spikeprune.weight_precision": json.dumps(plan), "spikeprune.opset": str(opset),
            "spikeprune.batch": str(batch) if batch else "dynamic",
            "spikeprune.batchnorm_folded": json.dumps([f"{a} <- {b}" for a, b in pairs]),
            "spikeprune.preprocessing": json.dumps({k: v for k, v in pre.items()}),
            "spikeprune.input": pre["description"],
            "spikeprune.output": f"logits [batch, {cfg.num_classes}] float32 (mean over T={cfg.T} steps)"}
    how = f"LIF unrolled over T={cfg.T} steps as plain ops"
    if time_loop == "loop":
        meta["spikeprune.time_loop"] = "loop"
        how = f"one time step (LIF as plain ops, membranes carried) as the body of one Loop over T={cfg.T} steps"
    doc = (f"{fam.name} model, BatchNorm folded, {how}, {precision} weights, "
           f"opset {opset}; {f'batch of {batch}' if batch else 'dynamic batch'}; input: {pre['description']}")
    return meta, doc


def _export_to(tmp: Path, model, fam, path: Path, format: str, plan: dict, opset: int, check: bool, data,
               check_images: int, pre: dict, check_split: str = "calib", batch: int | None = None,
               time_loop: str = "unrolled") -> dict:
    """Fold, verify the fold in float64, trace, convert the precision, write `tmp`, check it."""
    onnx = need_onnx(check)
    source = copy.deepcopy(model).float().cpu().eval()
    _, pairs, leftover = fold_batchnorm(source)
    f64, stepwise = _float64_proofs(source, fam, data, time_loop)
    proto, folded, body = _graph(_weights_model(source, plan), fam, pre, opset, batch, time_loop)
    converted = reduce_precision(proto, folded, plan) if set(plan.values()) != {"fp32"} else {}
    dedupe_constants(proto)
    compact_names(proto)
    if time_loop == "loop":
        constants_into_body(proto)
    meta, proto.doc_string = _metadata(model, fam, plan, opset, batch, pairs, pre, time_loop)
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "spikeprune"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    size = tmp.stat().st_size
    breakdown = file_breakdown(proto, size)
    rec = reconcile(model, plan, breakdown, size, 2 * 4 * model.cfg.in_channels if pre["input"] == "raw" else 0)
    if rec["unaccounted"] > 0 and not leftover:  # fewer is fine: the exporter stores identical constants once
        raise SpikepruneError(f"the file holds {rec['unaccounted']:,} B of weights more than the byte count says "
                              "(an internal error: please report it)")
    report = {"path": str(path), "format": format, "precision": meta["spikeprune.precision"], "weight_precision": plan,
              "opset": opset, "batch": batch, "time_loop": time_loop,
              "exporter": EXPORTER, "family": fam.name, "T": model.cfg.T, "bytes": size,
              "batchnorm_folded": len(pairs), "batchnorm_unfolded": leftover, "converted": len(converted),
              "preprocessing": pre,
              "memory": {"measure": memory_bytes(model), "deployed": deployed_memory_bytes(model),
                         "file": breakdown, "reconciliation": rec},
              "graph": graph_census(proto), "float64": f64, "check": None, "warnings": []}
    if stepwise is not None:
        report["stepwise"], report["loop_body"] = stepwise, body
    if set(plan.values()) == {"int8"}:
        report["memory"]["int8_reconciliation"] = int8_reconciliation(model, size)
    if check:
        report["check"] = check_export(tmp, source, data, check_split, check_images, float64=False)
    return report


def _resolve_plan(model, precision, ends) -> dict[str, str]:
    if precision is None:
        return model_plan(model) or resolve_plan(model, "fp32", ends)
    if isinstance(precision, str) and precision not in PRECISIONS:
        raise SpikepruneError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}, or give a "
                              "{layer: precision} plan")
    return resolve_plan(model, precision, ends)


def _check_counts(check_images, batch, check_split) -> None:
    if isinstance(check_images, bool) or not isinstance(check_images, int) or check_images < 1:
        raise SpikepruneError(f"max_images must be a whole number of at least 1, got {check_images!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise SpikepruneError(f"batch is None (dynamic) or a whole number of at least 1, got {batch!r}")
    if check_split not in ("calib", "test"):
        raise SpikepruneError(f"check_split is calib or test, got {check_split!r}")


def _input_preprocessing(model, input: str, normalisation, data) -> dict:
    if input not in INPUTS:
        raise SpikepruneError(f"input must be one of {', '.join(INPUTS)}, got {input!r}")
    norm = resolve_normalisation(normalisation, data, model.cfg.in_channels)
    if input == "raw" and norm is None:
        raise SpikepruneError("the file would take raw pixels in [0, 1], but the model's input normalisation is not "
                              "known: give the dataset it was trained on (normalisation='mnist5k', --normalisation "
                              "mnist5k), check data from it (--data), or input='normalised' (--input normalised) "
                              "for a file that takes normalised images")
    return _preprocessing(input, norm, model.cfg)


@renamed_arguments(path="output", overwrite="force", check_images="max_images", verbose="progress")
def export(model: nn.Module, output, format: str = "onnx", precision=None, opset: int | None = None,
           check: bool = True, data=None, force: bool = False, max_drop: float = INT8_MAX_DROP,
           keep_inaccurate: bool = False, max_images: int = CHECK_IMAGES, progress: bool = True,
           input: str = "raw", normalisation=None, ends: str | None = None, check_split: str = "calib",
           batch: int | None = None, time_loop: str = "unrolled") -> dict:
    """Write `model` (any registered family, dense or pruned) to the file `output` as ONNX; see the
    module docstring for what the file holds and what the check verifies. An existing file is
    replaced only with force=True.

    precision: fp32 | fp16 | int8 | int4, or {layer name or glob: precision}; None: the plan the
      model carries (a model quantised by spikeprune.quantise or the `bitshrink` policy), else fp32.
      ends: the precision of the first conv and the head (int4 keeps them at int8 unless told).
    opset: None picks 17, or 21 when a layer is int4.
    batch: None (the batch size is dynamic) or a fixed batch size: the graph loses the shape
      arithmetic a dynamic batch needs (about half its bytes), and the file runs at that size only.
    time_loop: "unrolled" (every time step's ops written out, T times) or "loop" (one time step
      written once, as the body of an ONNX Loop run T times with the LIF membranes carried: a graph
      that does not grow with T; for a family with Family.one_step, else an error; docs/deployment.md).
    input: "raw" (the file takes pixels in [0, 1]; the normalisation comes from `normalisation`, a
      dataset name or (mean, std), or from `data`) or "normalised" (the caller normalises).
    data: images for the check (a dataset spec such as "mnist5k", whose `check_split` is used --
      calib by default, or test --, a Dataset, or a tensor of the file's input images); None checks
      on random images (no accuracy).
    max_drop / keep_inaccurate: a reduced-precision file whose top-1 falls more than `max_drop`
      points below the fp32 model's (counted in images) is removed (an error) unless
      keep_inaccurate=True (kept, with a warning).
    max_images: images the check runs on (of `check_split`).
    Returns the report (plain data) that progress=True also prints.
    """
    path, overwrite, check_images = output, force, max_images
    fam = get_family(model)
    plan = _resolve_plan(model, precision, ends)
    opset = _check_options(format, plan, opset)
    max_drop = _check_max_drop(max_drop)
    check_time_loop(time_loop)
    pre = _input_preprocessing(model, input, normalisation, data)
    path = _check_path(path, overwrite)
    need_onnx(check)
    _check_counts(check_images, batch, check_split)
    if time_loop == "loop":
        one_step_twin(model)  # a family without a one-time-step twin: its error before any work
    _remove_stale_partials(path)
    try:
        with atomic_path(path) as tmp:  # a failed check or gate deletes the temporary: no file
            report = _export_to(tmp, model, fam, path, format, plan, opset, check, data, check_images, pre, check_split,
                                batch, time_loop)
            if check:
                _accuracy_gate(report, max_drop, keep_inaccurate)
            if path.exists() and not overwrite:  # appeared while we worked
                raise SpikepruneError(f"{path} exists; replace it with --force (force=True in Python)")
    except OSError as e:
        raise SpikepruneError(f"cannot write in {path.parent}: {e.strerror or e}") from None
    if progress:
        print(format_export_report(report))
    return report


def _accuracy_gate(report: dict, max_drop: float, keep: bool) -> None:
    """Refuse a reduced-precision file that loses more than `max_drop` points of top-1 against the
    fp32 model, comparing counts of images (100 * lost <= max_drop * images, max_drop read as the
    decimal it was written as), so an exact 1-point drop passes a 1-point margin."""
    c = report["check"]
    if set(report["weight_precision"].values()) == {"fp32"} or not c["labelled"]:
        if set(report["weight_precision"].values()) != {"fp32"}:
            report["warnings"].append(f"{report['precision']} accuracy not checked: the check data has no labels "
                                      "(give --data)")
        return
    lost, n = c["hits"]["fp32"] - c["hits"]["onnx"], c["labelled"]
    c["top1_drop_images"] = lost
    c["top1_drop_points"] = 100 * lost / n
    if 100 * lost <= Fraction(repr(max_drop)) * n:
        return
    msg = (f"the {report['precision']} file's top-1 is {100 * c['top1_onnx']:.2f}% against {100 * c['top1_torch']:.2f}% "
           f"at fp32 on {c['source']}: {lost} of {n} images, {100 * lost / n:.2f} points lower, more than the "
           f"{max_drop:g}-point margin")
    if not keep:
        raise SpikepruneError(msg + "; no file written (keep_inaccurate=True / --keep-inaccurate keeps it)")
    report["warnings"].append("WARNING: " + msg + "; kept because it was asked for")
    print(f"spikeprune: WARNING: {msg}; the file is kept because it was asked for", file=sys.stderr)


__all__ = ["CHECK_IMAGES", "DEFAULT_OPSET", "FORMATS", "INPUTS", "INT4_OPSET", "INT8_MAX_DROP", "MAX_OPSET",
           "MAX_TRACE_OPSET", "MIN_OPSET", "PRECISIONS", "QMAX", "TIME_LOOPS", "check_export", "deployed_memory_bytes",
           "export",
           "file_metadata", "float64_check", "fold_batchnorm", "format_export_report", "int8_reconciliation",
           "quantize_per_channel"]
