"""Deployment export: fold BatchNorm, unroll the LIF over T, write an ONNX file, and check it.

    export(model, "model.onnx", precision="fp32" | "fp16" | "int8", opset=17, check=True, data=...)

What the file holds (any registered family, dense or pruned):
  * BatchNorm folded into the Conv / Linear before it: the family's cost table says which BN
    follows which weight layer (Layer.bn); W' = W * s, b' = (b - mean) * s + beta with
    s = gamma / sqrt(var + eps), computed in float64. A BatchNorm the table does not pair stays a
    BatchNormalization node (named in the report). The fold is verified, never assumed: the folded,
    unrolled model is run against the original in float64 before anything is written.
  * The LIF as plain tensor ops unrolled over the model's T (neuron.plain_ops): per step Mul / Sub
    / Add, GreaterOrEqual for the fire decision, Cast, and the hard reset. T is fixed (it is the
    number of unrolled steps); the batch size is dynamic. Input `images` [B, C, H, W] float32,
    output `logits` [B, classes] float32.
  * precision: fp32 as is; fp16 stores every parameter as float16 with a Cast to float32 in front
    of its use; int8 stores each Conv / Linear weight as int8, symmetric per output channel
    (scale = max|w| / 127, zero point 0), behind a DequantizeLinear, with biases at fp32 (QDQ
    weight-only quantisation). Why QDQ and not ONNX Runtime's quantize_dynamic / quantize_static:
    those quantise activations too (dynamic int8 activations, or static ones needing calibration
    ranges), but between spiking layers the activations are already binary spikes, and the real-
    valued ones (the residual stream of spike sums, the image) are few; weight-only QDQ stores
    exactly the bytes spikeprune's memory accounting counts, runs on any runtime that reads
    standard ONNX (ONNX Runtime folds the DequantizeLinear into fp32 weights at load), and keeps
    the spike function unchanged apart from the weight rounding. fp16 and int8 keep fp32 compute.
  * The opset in the file's opset_import and in its metadata (`spikeprune.opset`), with the family,
    the config (every per-layer width), T, the precision and what was folded.

The check (unless check=False), run on the written file before it is moved into place (a failed
check leaves no file): ONNX Runtime against the PyTorch model on images of `data` (its
calibration split; random images when no data is given, said so):
  * predicted classes: the fraction that agree, and the top-1 of both when there are labels;
  * spike decisions (fp32): every GreaterOrEqual of the graph against the PyTorch LIF's spikes, in
    execution order. In each image the first decision that differs has identical spikes upstream,
    so it differs by float32 rounding alone (a membrane on the threshold): these "tie" flips are
    counted with their float64 distance to the threshold; later flips in that image follow from it
    ("downstream"). An image whose logits differ beyond float rounding without a single flipped
    spike means the file computes another function: the export is refused;
  * float64: the folded, unrolled model against the original, both in float64 (the same function:
    logits equal to ~1e-12, classes identical);
  * int8 / fp16: a top-1 drop of more than `max_drop` points (default INT8_MAX_DROP) against the
    fp32 PyTorch model is refused loudly (no file) unless keep_inaccurate=True, which keeps the
    file with a warning.

The file is written to a temporary name in the target folder and renamed when done; an existing
path is refused unless force=True. onnx and onnxruntime are the optional extra `export`
(pip install 'spikeprune[export]').
"""
from __future__ import annotations

import copy
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .data import dataset_for_model
from .errors import SpikepruneError
from .costs import deployed_memory_bytes, layer_table, memory_bytes  # deployed_memory_bytes re-exported
from .models import get_family
from .neuron import LIF, plain_ops
from .validation import PRECISIONS, renamed_arguments

FORMATS = ("onnx",)
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"
DEFAULT_OPSET = 17  # read by ONNX Runtime >= 1.14, TensorRT >= 8.6, OpenVINO >= 2022.3
MAX_OPSET = 20  # the newest opset torch's TorchScript exporter writes
# GreaterOrEqual (the LIF's fire decision) exists from opset 12; DequantizeLinear takes a per-channel
# `axis` from opset 13.
MIN_OPSET = {"fp32": 12, "fp16": 12, "int8": 13}
INT8_MAX_DROP = 1.0  # points of top-1 a reduced-precision file may lose against fp32 before it is refused
CHECK_IMAGES = 500  # the calibration split of the bundled data is 500 images
RANDOM_CHECK_IMAGES = 32  # without data: random images (the function, not accuracy, is checked)
FLOAT64_IMAGES = 16
CHECK_BATCH = 50
TRACE_BATCH = 2  # the batch traced; the check runs other batch sizes, so the dynamic batch is tested
SPIKE_BUDGET = 100_000_000  # fire decisions compared per batch (bool, held by both runtimes)
LOGIT_TOLERANCE = 1e-3  # |logit difference| / (1 + max |logit|) allowed between runtimes with no spike flip


def _need_onnx(check: bool):
    try:
        import onnx  # optional dependency: the `export` extra
        if check:
            import onnxruntime  # noqa: F401  (optional dependency, only for the check)
    except ImportError as e:
        raise SpikepruneError(f"exporting needs onnx and onnxruntime ({e.name} is missing): "
                              "pip install 'spikeprune[export]'") from None
    return onnx


# ------------------------------------------------------------------------------------------------
# BatchNorm folding
# ------------------------------------------------------------------------------------------------
def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]], list[str]]:
    """A copy of `model` (eval mode, same dtype) with every BatchNorm of the family's cost table
    folded into the weight layer before it and replaced by an Identity.

    Returns (folded model, [(layer, bn) folded], [BatchNorms left unfolded]). The arithmetic is done
    in float64 and rounded once to the model's dtype.
    """
    fam = get_family(model)
    folded = copy.deepcopy(model).eval()
    modules = dict(folded.named_modules())
    pairs = []
    for row in fam.layer_table(model.cfg):
        if not row.weight_shape or row.bn is None:
            continue
        layer, bn = modules.get(row.name), modules.get(row.bn)
        if layer is None or bn is None:
            raise SpikepruneError(f"the {fam.name} cost table pairs {row.name} with BatchNorm {row.bn}, but the "
                                  f"model has no module {row.name if layer is None else row.bn}")
        if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.running_var is None:
            raise SpikepruneError(f"{row.bn} ({type(bn).__name__}) is not a BatchNorm with running statistics, "
                                  f"so it cannot be folded into {row.name}")
        w = layer.weight
        if w.shape[0] != bn.num_features:
            raise SpikepruneError(f"{row.name} has {w.shape[0]} output channels but {row.bn} normalises "
                                  f"{bn.num_features}: the {fam.name} cost table pairs layers that do not follow")
        with torch.no_grad():
            var, mean = bn.running_var.double(), bn.running_mean.double()
            gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
            beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
            scale = gamma / torch.sqrt(var + bn.eps)
            bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(var)
            new_w = w.double() * scale.view(-1, *[1] * (w.dim() - 1))
            new_b = (bias - mean) * scale + beta
            w.copy_(new_w.to(w.dtype))
            if layer.bias is None:
                layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=False)
            else:
                layer.bias.copy_(new_b.to(w.dtype))
        _set_module(folded, row.bn, nn.Identity())
        pairs.append((row.name, row.bn))
    leftover = [n for n, m in folded.named_modules() if isinstance(m, _BatchNorm)]
    return folded, pairs, leftover


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


# ------------------------------------------------------------------------------------------------
# The ONNX graph
# ------------------------------------------------------------------------------------------------
def _trace_to_onnx(folded: nn.Module, fam_name: str, opset: int):
    onnx = _need_onnx(check=False)
    cfg = folded.cfg
    x = torch.rand(TRACE_BATCH, cfg.in_channels, cfg.img_size, cfg.img_size,
                   generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    try:
        with plain_ops(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(folded, (x,), buf, dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)
    except SpikepruneError:
        raise
    except Exception as e:  # whatever the tracer or an op's exporter raises, named for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpikepruneError(f"the {fam_name} family's forward cannot be exported to ONNX at opset {opset}: "
                              f"{type(e).__name__}: {msg[:300]}") from e
    return onnx.load_from_string(buf.getvalue())


def _parameter_initializers(proto, folded: nn.Module) -> dict[str, tuple[str, int]]:
    """Initializer name -> (parameter name, axis of its output channels), found by content (the
    exporter may rename or reshape a constant-folded weight, or store it transposed)."""
    from onnx import numpy_helper  # optional dependency (the `export` extra)

    by_bytes: dict[bytes, tuple[str, int]] = {}
    for name, p in folded.named_parameters():
        a = p.detach().cpu().float().numpy()
        by_bytes.setdefault(np.ascontiguousarray(a).tobytes(), (name, 0))
        if a.ndim == 2:
            by_bytes.setdefault(np.ascontiguousarray(a.T).tobytes(), (name, 1))
    found = {}
    for init in proto.graph.initializer:
        if init.data_type != 1:  # float32 only
            continue
        hit = by_bytes.get(np.ascontiguousarray(numpy_helper.to_array(init)).tobytes())
        if hit is not None:
            found[init.name] = hit
    return found


def _replace_initializers(proto, replacements: list[tuple[str, list, object]]) -> None:
    """Swap initializers: (old name, new initializers, node computing the old name from them); the
    nodes go first in the graph, so every consumer still finds the old name."""
    keep = [i for i in proto.graph.initializer if i.name not in {r[0] for r in replacements}]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    for _, inits, node in replacements:
        proto.graph.initializer.extend(inits)
        proto.graph.node.append(node)
    proto.graph.node.extend(nodes)


def quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: scale = max|w| / 127 (1 for an all-zero channel),
    q = round(w / scale) in [-127, 127]."""
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    peak = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape).astype(np.float64)), -127, 127).astype(np.int8)
    return q, scale


def _reduce_precision(proto, folded: nn.Module, precision: str) -> dict:
    """fp16: every parameter as float16 behind a Cast; int8: every weight-layer weight as int8
    behind a per-channel DequantizeLinear. Returns what was converted."""
    from onnx import TensorProto, helper, numpy_helper  # optional dependency (the `export` extra)

    params = _parameter_initializers(proto, folded)
    weight_names = {f"{r.name}.weight" for r in layer_table(folded) if r.weight_shape}
    inits = {i.name: i for i in proto.graph.initializer}
    replacements, converted = [], {}
    for init_name, (param, axis) in params.items():
        a = numpy_helper.to_array(inits[init_name])
        if precision == "fp16":
            half = numpy_helper.from_array(a.astype(np.float16), f"{init_name}__fp16")
            node = helper.make_node("Cast", [half.name], [init_name], to=TensorProto.FLOAT, name=f"{init_name}__cast")
            replacements.append((init_name, [half], node))
            converted[param] = "fp16"
        elif param in weight_names:
            q, scale = quantize_per_channel(a, axis)
            qi = numpy_helper.from_array(q, f"{init_name}__int8")
            si = numpy_helper.from_array(scale, f"{init_name}__scale")
            zi = numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{init_name}__zero_point")
            node = helper.make_node("DequantizeLinear", [qi.name, si.name, zi.name], [init_name], axis=axis,
                                    name=f"{init_name}__dequantize")
            replacements.append((init_name, [qi, si, zi], node))
            converted[param] = "int8"
    if precision == "int8":
        missing = sorted(weight_names - set(converted))
        if missing:
            raise SpikepruneError(f"int8: the weights of {', '.join(missing[:3])} were not found as constants in the "
                                  "exported graph, so they cannot be stored as int8")
    _replace_initializers(proto, replacements)
    return converted


def _compact_names(proto) -> None:
    """Short names for the intermediate values and no node names: the TorchScript exporter's scope
    names ("/block.0/attn/Mul_3_output_0") are most of the graph's bytes. Initializers (named after
    the parameters), the graph's input and output keep their names. Skipped for graphs with subgraphs."""
    g = proto.graph
    if any(a.type in (5, 10) for n in g.node for a in n.attribute):  # GRAPH / GRAPHS attributes
        return
    keep = {i.name for i in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
    short: dict[str, str] = {}
    for n in g.node:
        for out in n.output:
            if out and out not in keep and out not in short:
                short[out] = f"v{len(short):x}"
    for n in g.node:
        n.name = ""
        n.input[:] = [short.get(i, i) for i in n.input]
        n.output[:] = [short.get(o, o) for o in n.output]
    for v in g.value_info:
        v.name = short.get(v.name, v.name)


def _file_breakdown(proto, size: int) -> dict:
    """Bytes of the file by kind: int8 weights, scales, zero points, float16 / float32 constants,
    and the rest (graph structure, names, protobuf framing)."""
    from onnx import numpy_helper  # optional dependency (the `export` extra)

    parts = {"int8_weights": 0, "scales": 0, "zero_points": 0, "fp16": 0, "fp32_constants": 0, "other_constants": 0}
    for init in proto.graph.initializer:
        n = numpy_helper.to_array(init).nbytes
        if init.name.endswith("__int8"):
            parts["int8_weights"] += n
        elif init.name.endswith("__scale"):
            parts["scales"] += n
        elif init.name.endswith("__zero_point"):
            parts["zero_points"] += n
        elif init.data_type == 10:
            parts["fp16"] += n
        elif init.data_type == 1:
            parts["fp32_constants"] += n
        else:
            parts["other_constants"] += n
    parts["graph"] = size - sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------
def _batch_starts(n: int, batch_size: int) -> list[tuple[int, int]]:
    """A batch of one image first, then batch_size ones: the check runs two batch sizes, neither the
    traced one, so the dynamic batch dimension is exercised."""
    bounds = [0, 1] if n > 1 else [0]
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + batch_size))
    return list(zip(bounds[:-1], bounds[1:]))


def _check_batches(data, model, split: str, n_images: int, batch_size: int):
    """(images, labels or None) batches: a dataset spec / Dataset, a tensor of images, or None
    (random images with a fixed seed)."""
    cfg = model.cfg
    if data is None:
        g = torch.Generator().manual_seed(0)
        n = min(n_images, RANDOM_CHECK_IMAGES)
        images = torch.rand(n, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g)
        return [(images[a:b], None) for a, b in _batch_starts(n, batch_size)], f"{n} random images"
    if isinstance(data, torch.Tensor):
        images = data[:n_images].float()
        return [(images[a:b], None) for a, b in _batch_starts(len(images), batch_size)], f"{len(images)} given images"
    ds = dataset_for_model(data, model, split=split) if isinstance(data, str) else data
    n = min(len(ds), n_images)
    if n == 0:
        raise SpikepruneError("the check data has no images")
    batches = []
    for a, b in _batch_starts(n, batch_size):
        idx = list(range(a, b))
        if hasattr(ds, "batch"):
            images, labels = ds.batch(idx)
        else:
            items = [ds[j] for j in idx]
            images, labels = torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])
        batches.append((images.float(), labels))
    where = f"{getattr(ds, 'name', 'data')}:{getattr(ds, 'split', split)}"
    return batches, f"{n} {where} images"


def _probe_session(path: str, with_spikes: bool):
    """An ONNX Runtime session of the file; with_spikes also returns every GreaterOrEqual output."""
    import onnx  # optional dependency (the `export` extra)
    import onnxruntime as ort  # optional dependency (the `export` extra)

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = torch.get_num_threads()  # as many as torch uses: a fair comparison, no oversubscription
    if not with_spikes:
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]), 0
    proto = onnx.load(path)
    spikes = [n.output[0] for n in proto.graph.node if n.op_type == "GreaterOrEqual"]
    for name in spikes:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]), len(spikes)


def _membranes(x: torch.Tensor, spikes: torch.Tensor, tau: float) -> torch.Tensor:
    """The LIF's membrane h_t before each fire decision, recomputed in float64 from its input and
    its own spikes (for the distance of a decision to the threshold)."""
    x = x.detach().double()
    hs, v = [], None
    for t in range(x.shape[0]):
        h = x[t] / tau if v is None else v + (x[t] - v) / tau
        hs.append(h)
        v = h - h * (spikes[t] != 0).double()
    return torch.stack(hs)


class _SpikeComparison:
    """Forward hooks on the PyTorch model's LIFs compare each step's spikes with ONNX Runtime's,
    in execution order, and sort the flips into first-in-image ties and downstream ones."""

    def __init__(self, model: nn.Module):
        self.lifs = [m for m in model.modules() if isinstance(m, LIF)]
        self.decisions = self.tie_flips = self.downstream_flips = 0
        self.max_tie_margin = 0.0
        self.comparable = True
        self.note = None
        self.flip_images = 0

    def run(self, model, images, ort_spikes: list[np.ndarray]):
        B = images.shape[0]
        state = {"i": 0, "seen": torch.zeros(B, dtype=torch.bool)}

        def hook(mod, inp, out):
            if not self.comparable:
                return
            membranes = None  # float64, computed only when this LIF has a flip
            for t in range(out.shape[0]):
                if state["i"] >= len(ort_spikes):
                    return self._stop("the graph has fewer fire decisions than the model's LIF steps")
                theirs = torch.from_numpy(ort_spikes[state["i"]])
                state["i"] += 1
                ours = out[t] != 0
                if tuple(theirs.shape) != tuple(ours.shape) or ours.dim() == 0 or ours.shape[0] != B:
                    return self._stop("the graph's fire decisions do not line up with the model's LIF steps")
                diff = ours != theirs
                self.decisions += diff.numel()
                if not bool(diff.any()):
                    continue
                per_image = diff.reshape(B, -1)
                any_b = per_image.any(1)
                first = any_b & ~state["seen"]
                if bool(first.any()):  # identical spikes upstream: a float32 rounding tie
                    if membranes is None:
                        membranes = _membranes(inp[0], out, mod.tau)
                    margins = (membranes[t] - mod.v_threshold).abs().reshape(B, -1)[first][per_image[first]]
                    self.tie_flips += int(per_image[first].sum())
                    self.max_tie_margin = max(self.max_tie_margin, float(margins.max()))
                self.downstream_flips += int(per_image[state["seen"]].sum())
                state["seen"] |= any_b

        hooks = [m.register_forward_hook(hook) for m in self.lifs]
        try:
            with torch.no_grad():
                logits = model(images)
        finally:
            for h in hooks:
                h.remove()
        if self.comparable and state["i"] != len(ort_spikes):
            self._stop("the graph has more fire decisions than the model's LIF steps")
        self.flip_images += int(state["seen"].sum())
        return logits, state["seen"]

    def _stop(self, why: str):
        self.comparable, self.note = False, why


def float64_check(model: nn.Module, images: torch.Tensor, source: str = "given images") -> dict:
    """The folded, unrolled model against the original, both in float64, on `images`."""
    original = copy.deepcopy(model).double().eval()
    folded, _, _ = fold_batchnorm(original)
    with torch.no_grad():
        ref = original(images.double())
        with plain_ops():
            got = folded(images.double())
    return {"images": len(images), "source": source, "max_abs_logit_diff": float((ref - got).abs().max()),
            "max_abs_logit": float(ref.abs().max()),
            "class_agreement": float((ref.argmax(1) == got.argmax(1)).double().mean())}


def check_export(path, model: nn.Module, data=None, split: str = "calib", n_images: int = CHECK_IMAGES,
                 batch_size: int = CHECK_BATCH, precision: str | None = None, float64: bool = True) -> dict:
    """ONNX Runtime's outputs of the file at `path` against the PyTorch model (see the module
    docstring). `data`: a dataset spec or Dataset (its `split`), a tensor of images, or None
    (random images). Returns plain data; raises when the file computes another function."""
    _need_onnx(check=True)
    model = copy.deepcopy(model).float().cpu().eval()
    precision = precision or _file_precision(path)
    batches, source = _check_batches(data, model, split, n_images, batch_size)
    with_spikes = precision == "fp32"
    sess, n_decisions = _probe_session(str(path), with_spikes)
    spikes = _SpikeComparison(model) if with_spikes else None
    n = agree = hit_torch = hit_ort = labelled = unexplained = 0
    max_diff_clean = 0.0
    limit = {"images": batch_size}  # lowered after the first (one-image) batch if its spikes are many

    def chunks():
        for images, labels in batches:
            for a in range(0, len(images), limit["images"]):
                b = a + limit["images"]
                yield images[a:b], None if labels is None else labels[a:b]

    sizes = set()
    for images, labels in chunks():
        sizes.add(len(images))
        outs = sess.run(None, {"images": images.numpy()})
        ort_logits = torch.from_numpy(outs[0])
        if spikes is not None:
            logits, flipped = spikes.run(model, images, outs[1:])
            if n == 0:  # every fire decision of a batch is held in memory twice: keep that near SPIKE_BUDGET
                per_image = max(1, sum(o.size for o in outs[1:]) // len(images))
                limit["images"] = max(1, min(batch_size, SPIKE_BUDGET // per_image))
        else:
            with torch.no_grad():
                logits = model(images)
            flipped = torch.zeros(len(images), dtype=torch.bool)
        if tuple(ort_logits.shape) != tuple(logits.shape):
            raise SpikepruneError(f"the exported graph gives logits {list(ort_logits.shape)} for a batch of "
                                  f"{len(images)}, the model {list(logits.shape)}")
        agree += int((ort_logits.argmax(1) == logits.argmax(1)).sum())
        if spikes is not None and spikes.comparable:
            clean = ~flipped
            if bool(clean.any()):
                diff = (ort_logits[clean] - logits[clean]).abs().amax(1) / (1 + logits[clean].abs().amax(1))
                max_diff_clean = max(max_diff_clean, float(diff.max()))
                unexplained += int((diff > LOGIT_TOLERANCE).sum())
        if labels is not None:
            labelled += len(labels)
            hit_torch += int((logits.argmax(1) == labels).sum())
            hit_ort += int((ort_logits.argmax(1) == labels).sum())
        n += len(images)
    report = {"images": n, "source": source, "precision": precision, "class_agreement": agree / n,
              "top1_torch": hit_torch / labelled if labelled else None,
              "top1_onnx": hit_ort / labelled if labelled else None, "labelled": labelled,
              "batch_sizes": sorted(sizes)}
    if spikes is not None:
        report["spikes"] = {"comparable": spikes.comparable, "note": spikes.note, "graph_decisions": n_decisions,
                            "decisions": spikes.decisions, "tie_flips": spikes.tie_flips,
                            "downstream_flips": spikes.downstream_flips, "images_with_flips": spikes.flip_images,
                            "max_tie_margin": spikes.max_tie_margin,
                            "max_rel_logit_diff_without_flips": max_diff_clean,
                            "images_differing_without_flips": unexplained}
        if spikes.comparable and unexplained:
            raise SpikepruneError(
                f"the exported file computes another function: on {unexplained} of {n} images its logits differ from "
                f"PyTorch's by up to {max_diff_clean:.3g} (relative) with every spike equal")
    if float64:
        report["float64"] = float64_check(model, torch.cat([b[0] for b in batches])[:FLOAT64_IMAGES],
                                          f"{FLOAT64_IMAGES} of the {source}")
    return report


def _file_precision(path) -> str:
    import onnx  # optional dependency (the `export` extra)

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return meta.get("spikeprune.precision", "fp32")


# ------------------------------------------------------------------------------------------------
# export()
# ------------------------------------------------------------------------------------------------
def _check_options(fmt: str, precision: str, opset) -> int:
    if fmt not in FORMATS:
        raise SpikepruneError(f"unknown export format {fmt!r}; spikeprune exports {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise SpikepruneError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise SpikepruneError(f"the opset is a whole number, got {opset!r}")
    low = MIN_OPSET[precision]
    if opset < low:
        why = "per-channel DequantizeLinear (int8 weights)" if precision == "int8" else "GreaterOrEqual (the LIF's fire decision)"
        raise SpikepruneError(f"opset {opset} is too old: a {precision} export needs opset {low} or newer for {why}")
    if opset > MAX_OPSET:
        raise SpikepruneError(f"opset {opset} is newer than the exporter writes (at most {MAX_OPSET})")
    return opset


def _check_path(path, force: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise SpikepruneError(f"{path} is a folder; give the file to write, e.g. {path / 'model.onnx'}")
    if path.exists() and not force:
        raise SpikepruneError(f"{path} exists; replace it with --force (force=True in Python)")
    if not path.parent.is_dir():
        above = next((q for q in path.parents if q.exists()), None)
        if above is not None and not above.is_dir():
            raise SpikepruneError(f"cannot write {path}: {above} is a file, not a folder")
        raise SpikepruneError(f"the folder {path.parent} does not exist")
    return path


def _temp_file(path: Path) -> Path:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as e:
        raise SpikepruneError(f"cannot write in {path.parent}: {e.strerror or e}") from None
    os.close(fd)
    return Path(tmp)


def _export_to(tmp: Path, model, fam, path: Path, format: str, precision: str, opset: int, check: bool, data,
               check_images: int) -> dict:
    """Fold, verify the fold in float64, trace, convert the precision, write `tmp`, check it."""
    onnx = _need_onnx(check)
    source = copy.deepcopy(model).float().cpu().eval()
    folded, pairs, leftover = fold_batchnorm(source)
    f64_batches, f64_source = _check_batches(data, source, "calib", FLOAT64_IMAGES, FLOAT64_IMAGES)
    f64 = float64_check(source, torch.cat([b[0] for b in f64_batches]), f64_source)
    if f64["class_agreement"] < 1 or f64["max_abs_logit_diff"] > 1e-9 * (1 + f64["max_abs_logit"]):
        raise SpikepruneError(
            f"folding the {fam.name} model's BatchNorms changes its function (float64 logits differ by "
            f"{f64['max_abs_logit_diff']:.3g}): its cost table pairs a BatchNorm with a layer it does not directly follow")
    proto = _trace_to_onnx(folded, fam.name, opset)
    converted = _reduce_precision(proto, folded, precision) if precision != "fp32" else {}
    _compact_names(proto)
    cfg = model.cfg
    meta = {"spikeprune.family": fam.name, "spikeprune.config": json.dumps(model.config_dict()["config"]),
            "spikeprune.T": str(cfg.T), "spikeprune.precision": precision, "spikeprune.opset": str(opset),
            "spikeprune.batchnorm_folded": json.dumps([f"{a} <- {b}" for a, b in pairs]),
            "spikeprune.input": f"images [batch, {cfg.in_channels}, {cfg.img_size}, {cfg.img_size}] float32",
            "spikeprune.output": f"logits [batch, {cfg.num_classes}] float32 (mean over T={cfg.T} steps)"}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.doc_string = "spikeprune", (
        f"{fam.name} model, BatchNorm folded, LIF unrolled over T={cfg.T} steps as plain ops, {precision} weights, "
        f"opset {opset}; dynamic batch")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the file is an ordinary output
    size = tmp.stat().st_size
    report = {"path": str(path), "format": format, "precision": precision, "opset": opset, "exporter": EXPORTER,
              "family": fam.name, "T": cfg.T, "bytes": size, "batchnorm_folded": len(pairs),
              "batchnorm_unfolded": leftover, "converted": len(converted),
              "memory": {"measure": memory_bytes(model), "deployed": deployed_memory_bytes(model),
                         "file": _file_breakdown(proto, size)},
              "float64": f64, "check": None, "warnings": []}
    if precision == "int8":
        report["memory"]["int8_reconciliation"] = int8_reconciliation(model, size)
    if check:
        report["check"] = check_export(tmp, source, data, "calib", check_images, precision=precision, float64=False)
    return report


@renamed_arguments(path="output", overwrite="force", check_images="max_images", verbose="progress")
def export(model: nn.Module, output, format: str = "onnx", precision: str = "fp32", opset: int = DEFAULT_OPSET,
           check: bool = True, data=None, force: bool = False, max_drop: float = INT8_MAX_DROP,
           keep_inaccurate: bool = False, max_images: int = CHECK_IMAGES, progress: bool = True) -> dict:
    """Write `model` (any registered family, dense or pruned) to the file `output` as ONNX; see the
    module docstring for what the file holds and what the check verifies. An existing file is
    replaced only with force=True.

    data: images for the check (a dataset spec such as "mnist5k", whose calibration split is used, a
      Dataset, or a tensor of images); None checks on random images (no accuracy figures).
    max_drop / keep_inaccurate: an fp16 / int8 file whose top-1 falls more than `max_drop` points
      below the fp32 model's is removed (an error) unless keep_inaccurate=True (kept, with a warning).
    max_images: images the check runs on (of the calibration split).
    Returns the report (plain data) that progress=True also prints.
    """
    opset = _check_options(format, precision, opset)
    path = _check_path(output, force)
    check_images = max_images
    _need_onnx(check)
    fam = get_family(model)
    if check_images < 1:
        raise SpikepruneError(f"max_images must be at least 1, got {check_images}")
    if max_drop < 0:
        raise SpikepruneError(f"max_drop is in points of top-1 and cannot be negative, got {max_drop}")
    tmp = _temp_file(path)  # first, so that an unwritable folder fails before any work
    done = False
    try:
        report = _export_to(tmp, model, fam, path, format, precision, opset, check, data, check_images)
        if check:
            _accuracy_gate(report, max_drop, keep_inaccurate)
        if path.exists() and not force:  # appeared while we worked
            raise SpikepruneError(f"{path} exists; replace it with --force (force=True in Python)")
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
    if progress:
        print(format_export_report(report))
    return report


def _accuracy_gate(report: dict, max_drop: float, keep: bool) -> None:
    c = report["check"]
    if report["precision"] == "fp32" or c["top1_torch"] is None:
        if report["precision"] != "fp32":
            report["warnings"].append(f"{report['precision']} accuracy not checked: the check data has no labels "
                                      "(give --data)")
        return
    drop = 100 * (c["top1_torch"] - c["top1_onnx"])
    c["top1_drop_points"] = drop
    if drop <= max_drop:
        return
    msg = (f"the {report['precision']} file's top-1 is {100 * c['top1_onnx']:.2f}% against {100 * c['top1_torch']:.2f}% "
           f"at fp32 on {c['source']}: {drop:.2f} points lower, more than the {max_drop:g}-point margin")
    if not keep:
        raise SpikepruneError(msg + "; no file written (keep_inaccurate=True / --keep-inaccurate keeps it)")
    report["warnings"].append("WARNING: " + msg + "; kept because it was asked for")
    print(f"spikeprune: WARNING: {msg}; the file is kept because it was asked for", file=sys.stderr)


def _kb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def format_export_report(r: dict) -> str:
    m = r["memory"]
    lines = [f"wrote {r['path']}: {r['format']} opset {r['opset']}, {r['precision']} weights, {_kb(r['bytes'])} "
             f"({r['family']}, T={r['T']} unrolled, dynamic batch; {r['exporter']})",
             f"BatchNorm folded into {r['batchnorm_folded']} layers"
             + (f"; not folded (no layer before them in the cost table): {', '.join(r['batchnorm_unfolded'])}"
                if r["batchnorm_unfolded"] else ""),
             f"weights after folding: {m['deployed']['params']:,} values; fp32 {_kb(m['deployed']['fp32'])}, "
             f"int8 {_kb(m['deployed']['int8'])} (measure, BN unfolded: fp32 {_kb(m['measure']['fp32'])}, "
             f"int8 {_kb(m['measure']['int8'])})"]
    f = m["file"]
    parts = ", ".join(f"{k.replace('_', ' ')} {v:,} B" for k, v in f.items() if v)
    lines.append(f"file bytes: {parts}")
    rec = m.get("int8_reconciliation")
    if rec:
        lines.append(f"int8 size: measure {rec['measure_int8']:,} B {rec['batchnorm_folding']:+,} B BatchNorm folded "
                     f"+{rec['scales']:,} B scales +{rec['zero_points']:,} B zero points = {rec['weights_in_file']:,} B "
                     f"of weights in the file, +{rec['graph']:,} B graph = {rec['file']:,} B on disk")
    f64 = r["float64"]
    lines.append(f"float64 check ({f64['source']}): folded + unrolled vs original, max |logit diff| "
                 f"{f64['max_abs_logit_diff']:.2e}, classes agree {100 * f64['class_agreement']:.1f}%")
    c = r["check"]
    if c is None:
        lines.append("ONNX Runtime check: skipped (--no-check)")
    else:
        line = (f"ONNX Runtime vs PyTorch on {c['source']} (batches {c['batch_sizes']}): predicted classes agree on "
                f"{100 * c['class_agreement']:.2f}%")
        if c["top1_torch"] is not None:
            line += (f"; top-1 PyTorch fp32 {100 * c['top1_torch']:.2f}%, ONNX {c['precision']} "
                     f"{100 * c['top1_onnx']:.2f}%")
        lines.append(line)
        s = c.get("spikes")
        if s and s["comparable"]:
            lines.append(f"spike decisions: {s['decisions']:,} compared, {s['tie_flips']} flipped at float32 threshold "
                         f"ties (max float64 distance to threshold {s['max_tie_margin']:.1e}), {s['downstream_flips']} "
                         f"downstream of those, in {s['images_with_flips']} images; logits of the other images "
                         f"agree to {s['max_rel_logit_diff_without_flips']:.1e} (relative)")
        elif s:
            lines.append(f"spike decisions not compared: {s['note']}")
    lines += r["warnings"]
    return "\n".join(lines)
