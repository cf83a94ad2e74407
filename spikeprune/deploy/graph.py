"""The ONNX graph: tracing the folded model, storing each weight layer at its plan's precision
(fp16 Cast, int8 / int4 DequantizeLinear), short value names, and the file's bytes by kind."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from ..errors import SpikepruneError
from ..neuron import plain_ops
from ..precision import QMAX, weight_layers

TRACE_BATCH = 2  # the batch traced; the check runs other batch sizes, so the dynamic batch is tested
MAX_TRACE_OPSET = 20  # the newest opset torch's TorchScript exporter writes; newer ones by onnx's converter
QUANT_SUFFIX = {"int8": "__int8", "int4": "__int4"}


def need_onnx(check: bool):
    try:
        import onnx  # optional dependency: the `export` extra
        if check:
            import onnxruntime  # noqa: F401  (optional dependency, only for the check)
    except ImportError as e:
        raise SpikepruneError(f"exporting needs onnx and onnxruntime ({e.name} is missing): "
                              "pip install 'spikeprune[export]'") from None
    return onnx


def trace_images(cfg, batch: int | None = None) -> torch.Tensor:
    """The images a graph is traced on (fixed seed)."""
    return torch.rand(batch or TRACE_BATCH, cfg.in_channels, cfg.img_size, cfg.img_size,
                      generator=torch.Generator().manual_seed(0))


def trace_to_onnx(module: nn.Module, fam_name: str, opset: int, batch: int | None = None,
                  states: tuple[torch.Tensor, ...] = ()):
    """The module traced to ONNX at `opset` (the TorchScript exporter up to MAX_TRACE_OPSET, then
    onnx's version converter: it rewrites only ops whose signature changed). `states`: further
    inputs after the images (a SteppedModel's membranes: inputs m0.., outputs n0.. after the step's
    logits, named `step`)."""
    onnx = need_onnx(check=False)
    x = trace_images(module.cfg, batch)
    buf = io.BytesIO()
    traced = min(opset, MAX_TRACE_OPSET)
    ins, outs = (["images", *[f"m{i}" for i in range(len(states))]],
                 ["step" if states else "logits", *[f"n{i}" for i in range(len(states))]])
    try:
        with plain_ops(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(module, (x, *states), buf, dynamo=False, opset_version=traced, input_names=ins,
                              output_names=outs,
                              dynamic_axes=None if batch else {name: {0: "batch"} for name in ins + outs},
                              do_constant_folding=True)
    except SpikepruneError:
        raise
    except Exception as e:  # whatever the tracer or an op's exporter raises, named for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpikepruneError(f"the {fam_name} family's forward cannot be exported to ONNX at opset {traced}: "
                              f"{type(e).__name__}: {msg[:300]}") from e
    proto = onnx.load_from_string(buf.getvalue())
    if opset > traced:
        from onnx import version_converter  # optional dependency (the `export` extra)
        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as e:  # the converter's errors are plain exceptions naming the op
            raise SpikepruneError(f"the {fam_name} graph traced at opset {traced} cannot be converted to opset "
                                  f"{opset}: {str(e).strip().splitlines()[0][:300]}") from e
        del proto.graph.value_info[:]  # shape annotations the converter adds: bytes, not function
    return proto


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


def quantize_per_channel(w: np.ndarray, axis: int, precision: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per output channel: scale = max|w| / QMAX (1 for an all-zero channel),
    q = round(w / scale) in [-QMAX, QMAX] as int8 codes (int4: values in [-7, 7])."""
    qmax = QMAX[precision]
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    peak = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.where(peak > 0, peak / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape).astype(np.float64)), -qmax, qmax).astype(np.int8)
    return q, scale


def pack_int4(values: np.ndarray) -> bytes:
    """Signed 4-bit values, two to a byte in ONNX's order (the first in the low nibble), the whole
    tensor in row-major order; an odd count leaves the last high nibble zero."""
    flat = (values.astype(np.int8).ravel() & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _quantised_initializers(a: np.ndarray, name: str, axis: int, precision: str) -> list:
    from onnx import TensorProto, helper, numpy_helper  # optional dependency (the `export` extra)

    q, scale = quantize_per_channel(a, axis, precision)
    si = numpy_helper.from_array(scale, f"{name}__scale")
    if precision == "int8":
        return [numpy_helper.from_array(q, f"{name}__int8"), si,
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}__zero_point")]
    return [helper.make_tensor(f"{name}__int4", TensorProto.INT4, q.shape, pack_int4(q), raw=True), si,
            helper.make_tensor(f"{name}__zero_point", TensorProto.INT4, scale.shape,
                               pack_int4(np.zeros(scale.shape, np.int8)), raw=True)]


def reduce_precision(proto, folded: nn.Module, plan: dict[str, str]) -> dict:
    """Store each weight layer's parameters at its plan's precision: fp16 weight and bias as
    float16 behind a Cast; int8 / int4 weight behind a per-channel DequantizeLinear, bias fp32.
    A plan that is fp16 throughout stores every parameter as float16 (also any BatchNorm left
    unfolded). Returns {parameter: precision} of what was converted."""
    from onnx import TensorProto, helper, numpy_helper  # optional dependency (the `export` extra)

    all_fp16 = set(plan.values()) == {"fp16"}
    params = _parameter_initializers(proto, folded)
    inits = {i.name: i for i in proto.graph.initializer}
    replacements, converted = [], {}
    for init_name, (param, axis) in params.items():
        layer, _, kind = param.rpartition(".")
        p = "fp16" if all_fp16 else plan.get(layer, "fp32")
        if p == "fp32" or (p in QMAX and kind != "weight"):
            continue
        a = numpy_helper.to_array(inits[init_name])
        if p == "fp16":
            half = numpy_helper.from_array(a.astype(np.float16), f"{init_name}__fp16")
            node = helper.make_node("Cast", [half.name], [init_name], to=TensorProto.FLOAT, name=f"{init_name}__cast")
            replacements.append((init_name, [half], node))
        else:
            new = _quantised_initializers(a, init_name, axis, p)
            node = helper.make_node("DequantizeLinear", [i.name for i in new], [init_name], axis=axis,
                                    name=f"{init_name}__dequantize")
            replacements.append((init_name, new, node))
        converted[param] = p
    wanted = {f"{r.name}.weight" for r in weight_layers(folded)  # a layer never called is not in the graph
              if plan.get(r.name, "fp32") != "fp32" and r.input != "unused"}
    missing = sorted(wanted - set(converted))
    if missing:
        raise SpikepruneError(f"the weights of {', '.join(missing[:3])} were not found as constants in the exported "
                              "graph, so they cannot be stored at reduced precision")
    _replace_initializers(proto, replacements)
    return converted


def dedupe_constants(proto) -> int:
    """Keep one Constant node per distinct value: the tracer writes the LIF's constants and the
    reshape targets again at every use (462 Constant nodes holding 15 values, 20 kB of a 54 kB graph
    on the bundled Fashion-MNIST Spikformer). A later copy's consumers read the first copy, which
    comes earlier in the (topologically sorted) node list. Returns the nodes removed."""
    g = proto.graph
    outputs = {v.name for v in g.output}
    first: dict[bytes, str] = {}
    alias: dict[str, str] = {}
    keep = []
    for n in g.node:
        if alias:
            n.input[:] = [alias.get(i, i) for i in n.input]
        if n.op_type == "Constant" and len(n.output) == 1 and n.output[0] not in outputs and not n.domain:
            key = b"".join(a.SerializeToString() for a in n.attribute)
            if key in first:
                alias[n.output[0]] = first[key]
                continue
            first[key] = n.output[0]
        keep.append(n)
    removed = len(g.node) - len(keep)
    if removed:
        del g.node[:]
        g.node.extend(keep)
    return removed


def compact_names(proto) -> None:
    """Short names for the intermediate values and no node names: the TorchScript exporter's scope
    names ("/block.0/attn/Mul_3_output_0") are most of the graph's bytes. Initializers (named after
    the parameters), the graph's input and output keep their names. A graph with subgraphs (a Loop
    file, whose step graph was compacted before it became the body) only loses its node names."""
    g = proto.graph
    if any(a.type in (5, 10) for n in g.node for a in n.attribute):  # GRAPH / GRAPHS attributes
        for n in g.node:
            n.name = ""
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


def _stored_bytes(init) -> int:
    """Bytes of an initializer's values (packed int4 counted as stored)."""
    from onnx import numpy_helper  # optional dependency (the `export` extra)

    if init.raw_data:
        return len(init.raw_data)
    return numpy_helper.to_array(init).nbytes


def file_breakdown(proto, size: int) -> dict:
    """Bytes of the file by kind: int8 and int4 weights, scales, zero points, float16 / float32
    constants, other constants (a Loop body's initializers included), and the rest (graph
    structure, names, protobuf framing)."""
    parts = {"int8_weights": 0, "int4_weights": 0, "scales": 0, "zero_points": 0, "fp16": 0, "fp32_constants": 0,
             "other_constants": 0}
    bodies = [a.g for n in proto.graph.node for a in n.attribute if a.type == 5]  # a Loop's body (GRAPH attribute)
    for init in [*proto.graph.initializer, *(i for b in bodies for i in b.initializer)]:
        n = _stored_bytes(init)
        if init.name.endswith("__int8"):
            parts["int8_weights"] += n
        elif init.name.endswith("__int4"):
            parts["int4_weights"] += n
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


def graph_census(proto) -> dict:
    """What the graph (not its weights) is made of: nodes by type (a Loop's body nodes counted once,
    beside the Loop node), and the bytes of the main graph's node protos (a Loop's, its body's)."""
    counts: dict[str, int] = {}
    nodes = list(proto.graph.node)
    nodes += [b for n in proto.graph.node for a in n.attribute if a.type == 5 for b in a.g.node]  # a Loop's body
    for n in nodes:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"nodes": len(nodes), "node_bytes": sum(n.ByteSize() for n in proto.graph.node),
            "by_op": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}
