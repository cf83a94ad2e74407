"""The time steps as one ONNX Loop (export's time_loop="loop"): the model's one-time-step twin
(Family.one_step: same weights, T=1) is traced once with every LIF's membrane potential as an
explicit input and output, and that step graph becomes the body of a Loop that runs T times with
the membranes loop-carried (starting at 0, as every LIF's forward does) and the per-step logits
as a scan output, averaged over T after the loop. fp32 weights live in the body; int8 / int4
weights and their DequantizeLinear stay in the main graph (the body reads the dequantised weights
from the outer scope), so they are dequantised once per call, not once per step (constants_into_body).

Before anything is traced, the step-wise forward is proven equal to the model's T-step forward in
float64 (stepwise_check), so a family that declares one_step wrongly, or a neuron spikeprune does
not step (anything but neuron.LIF keeps its state inside one forward), is refused, not written."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import SpikepruneError
from ..models import get_family
from ..neuron import LIF, lif_plain_step

TIME_LOOPS = ("unrolled", "loop")
STEPWISE_TOLERANCE = 1e-9  # float64 |logit difference| / (1 + max |logit|) of the step-wise forward

# names of the Loop's own values (the body's traced values are v<hex>, m<i>, n<i>: no clash)
_TRIP, _COND, _ZERO, _PER_STEP = "steps", "go", "zero", "per_step"


def check_time_loop(time_loop: str) -> str:
    if time_loop not in TIME_LOOPS:
        raise SpikepruneError(f"unknown time loop {time_loop!r}; choose {' or '.join(TIME_LOOPS)}")
    return time_loop


def one_step_twin(model: nn.Module) -> nn.Module:
    """The family's one-time-step twin of `model`, or a clear error for a family without one."""
    fam = get_family(model)
    if fam.one_step is None:
        raise SpikepruneError(f"the {fam.name} family does not say how to run one time step at a time "
                              "(Family.one_step), so its time steps cannot be written as one ONNX Loop; export with "
                              "time_loop='unrolled' (--time-loop unrolled)")
    return fam.one_step(model)


class _Membranes:
    """The membranes the stepped LIFs read (v_in, by slot; a missing slot starts at 0) and write."""

    def __init__(self):
        self.v_in: dict[str, torch.Tensor] = {}
        self.v_out: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # slots in the order the forward calls them


class _SteppedLIF(nn.Module):
    """One time step of a LIF (neuron.lif_plain_step) with its membrane in a _Membranes."""

    def __init__(self, lif: LIF, slot: str, membranes: _Membranes):
        super().__init__()
        self.inv_tau, self.v_threshold = 1.0 / lif.tau, lif.v_threshold
        self.slot, self.membranes = slot, membranes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise SpikepruneError(f"a neuron of the one-time-step twin got {x.shape[0]} time steps, not 1")
        s, self.membranes.v_out[self.slot] = lif_plain_step(x[0], self.membranes.v_in.get(self.slot), self.inv_tau,
                                                            self.v_threshold)
        if self.slot not in self.membranes.order:
            self.membranes.order.append(self.slot)
        return s.unsqueeze(0)


class SteppedModel(nn.Module):
    """forward(images, *membranes) -> (logits of this step, *membranes after it): a T=1 model whose
    LIFs are replaced by stepped ones. `slots` (after discover()) lists the LIFs the forward calls,
    in call order; their membranes are the inputs and outputs, in that order."""

    def __init__(self, twin: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(twin).eval()
        self.cfg = twin.cfg
        self.membranes = _Membranes()
        for name, mod in list(self.model.named_modules()):
            if isinstance(mod, LIF):
                parent, _, leaf = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, leaf,
                        _SteppedLIF(mod, name, self.membranes))
        self.slots: list[str] = []

    def step(self, images: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        self.membranes.v_in, self.membranes.v_out = state, {}
        logits = self.model(images)
        return logits, dict(self.membranes.v_out)

    def discover(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Run one step from rest; set `slots`; return the membranes after it (their shapes)."""
        self.membranes.order = []
        with torch.no_grad():
            _, state = self.step(images, {})
        self.slots = list(self.membranes.order)
        return [state[s] for s in self.slots]

    def run(self, images: torch.Tensor, T: int) -> torch.Tensor:
        """The T-step forward, step by step: the mean of the per-step logits."""
        state, total = {}, None
        for _ in range(T):
            logits, state = self.step(images, state)
            total = logits if total is None else total + logits
        return total / T

    def forward(self, images: torch.Tensor, *membranes: torch.Tensor):
        logits, state = self.step(images, dict(zip(self.slots, membranes)))
        return (logits, *[state[s] for s in self.slots])


def stepwise_check(model: nn.Module, images: torch.Tensor, source: str) -> dict:
    """The model's T-step forward against its one-time-step twin run T times with the LIF membranes
    carried, both in float64 with BatchNorm as it is; a difference is an error (the family's eval
    forward mixes time steps outside its LIFs, or a neuron keeps state the twin does not carry)."""
    original = copy.deepcopy(model).double().eval()
    stepped = SteppedModel(one_step_twin(original)).double()
    x = images.double()
    with torch.no_grad():
        ref = original(x)
        got = stepped.run(x, model.cfg.T)
    diff, peak = float((ref - got).abs().max()), float(ref.abs().max())
    out = {"images": len(images), "source": source, "T": model.cfg.T, "max_abs_logit_diff": diff,
           "max_abs_logit": peak, "class_agreement": float((ref.argmax(1) == got.argmax(1)).double().mean())}
    if not diff <= STEPWISE_TOLERANCE * (1 + peak):
        raise SpikepruneError(
            f"the {get_family(model).name} model cannot be written as one time step in an ONNX Loop: run step by "
            f"step with its LIF membranes carried it differs from its {model.cfg.T}-step forward by {diff:.3g} in "
            "float64 (a layer mixes time steps, or a neuron other than spikeprune's LIF keeps state); export with "
            "time_loop='unrolled'")
    return out


SENTINEL_BATCHES = (3, 5)  # the two batch sizes the step is traced at to find its batch-size constants


def _int_dims(proto) -> dict[str, list]:
    """Every value's inferred dims (None where not a fixed number), by name."""
    from onnx import shape_inference  # optional dependency (the `export` extra)

    g = shape_inference.infer_shapes(proto).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*g.value_info, *g.input, *g.output)}


def _reshape_fill(node, positions, dims: tuple[dict, dict], va) -> int | None:
    """A Reshape target's batch positions: 0 (copy the input's dim) where the input's dim there is
    the batch in both traces; -1 where it is the target's one unknown; else None."""
    a, b = SENTINEL_BATCHES
    if any(at.name == "allowzero" and at.i for at in node.attribute):
        return None
    da, db = (d.get(node.input[0]) or [] for d in dims)
    if all(i < len(da) and i < len(db) and da[i] == a and db[i] == b for i in positions):
        return 0
    return -1 if len(positions) == 1 and -1 not in va else None


def _batch_replacement(node, index: int, positions, dims: tuple[dict, dict], va, consumers) -> int | None:
    """What a consumer of a shape constant needs at its batch-size positions: a Reshape target
    _reshape_fill's, 1 in an Expand shape (broadcast; also through the exporter's Equal / Where
    around it); None: unknown."""
    if node.op_type == "Reshape" and index == 1:
        return _reshape_fill(node, positions, dims, va)
    if (node.op_type == "Expand" and index == 1) or node.op_type == "Equal":
        return 1
    if node.op_type == "Where" and index == 2:
        later = consumers.get(node.output[0], [])
        return 1 if later and all(n.op_type == "Expand" and i == 1 for n, i in later) else None
    return None


def _same_but_constants(ga, gb) -> bool:
    """The two traces have the same ops in the same order and the same initializers."""
    return ([n.op_type for n in ga.node] == [n.op_type for n in gb.node] and len(ga.initializer) == len(gb.initializer)
            and all(x.SerializeToString() == y.SerializeToString() for x, y in zip(ga.initializer, gb.initializer)))


def _generalise(na, nb, dims: tuple[dict, dict], consumers) -> bool:
    """Rewrite Constant na (its twin nb from the other trace) where it holds the batch size; False
    when it differs in another way, or its consumers need different things there."""
    from onnx import numpy_helper  # optional dependency (the `export` extra)

    a, b = SENTINEL_BATCHES
    va, vb = (numpy_helper.to_array(next(at.t for at in n.attribute if at.name == "value")) for n in (na, nb))
    if va.dtype.kind != "i" or va.shape != vb.shape or va.ndim != 1:
        return False
    positions = [int(i) for i in (va != vb).nonzero()[0]]
    if any(va[i] != a or vb[i] != b for i in positions):
        return False
    wanted = {_batch_replacement(n, i, positions, dims, va, consumers) for n, i in consumers.get(na.output[0], [])}
    if len(wanted) != 1 or None in wanted:
        return False
    new = va.copy()
    new[positions] = wanted.pop()
    value = next(at for at in na.attribute if at.name == "value")
    value.t.CopyFrom(numpy_helper.from_array(new, value.t.name))
    return True


def batch_free(static_a, static_b):
    """The step graph traced at the batch sizes SENTINEL_BATCHES (static_a, static_b: no shape
    arithmetic, the batch size written into its shape constants), made to take any batch size:
    each int64 constant that differs between the two traces exactly at positions holding the two
    batch sizes gets, there, what its consumers need (_batch_replacement). Returns static_a
    rewritten, or None when the two traces differ in any other way (then the dynamic trace is used)."""
    ga, gb = static_a.graph, static_b.graph
    if not _same_but_constants(ga, gb):
        return None
    consumers: dict[str, list] = {}
    for n in ga.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    dims = (_int_dims(static_a), _int_dims(static_b))
    for na, nb in zip(ga.node, gb.node):
        if na.op_type == "Constant" and na.SerializeToString() != nb.SerializeToString() and not _generalise(
                na, nb, dims, consumers):
            return None
    del ga.value_info[:]
    for v in (*ga.input, *ga.output):
        if v.type.tensor_type.shape.dim:
            v.type.tensor_type.shape.dim[0].dim_param = "batch"  # also clears the traced dim_value
    return static_a


def wrap_in_loop(step_proto, T: int, n_states: int, opset: int):
    """The traced step graph (inputs images, m0..; outputs step logits, n0..) as the body of one
    Loop over T steps in a new model with input `images` and output `logits` (the per-step logits'
    mean). The step graph's initializers go to the main graph (where reduce_precision finds them;
    constants_into_body moves back what only the body reads); the body reads `images` from the
    outer scope. Value shapes inside the body are dropped (the membranes start
    as a scalar 0 and take their shape from the first step)."""
    from onnx import TensorProto, helper  # optional dependency (the `export` extra)

    g = step_proto.graph
    images, step_logits = g.input[0], g.output[0]
    states_in = [v.name for v in g.input[1:]]
    states_out = [v.name for v in g.output[1:]]
    if len(states_in) != n_states or len(states_out) != n_states:
        raise SpikepruneError(f"the traced step has {len(states_in)} membrane inputs and {len(states_out)} outputs, "
                              f"not {n_states}: an internal error, please report it")
    untyped = lambda name, elem: helper.make_tensor_value_info(name, elem, None)  # noqa: E731
    body = helper.make_graph(
        nodes=[*g.node, helper.make_node("Identity", ["go_in"], ["go_out"])],
        name="time_step",
        inputs=[helper.make_tensor_value_info("t", TensorProto.INT64, []),
                helper.make_tensor_value_info("go_in", TensorProto.BOOL, []),
                *[untyped(n, TensorProto.FLOAT) for n in states_in]],
        outputs=[helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
                 *[untyped(n, TensorProto.FLOAT) for n in states_out],
                 untyped(step_logits.name, TensorProto.FLOAT)])
    # the Loop's own constants are Constant nodes (graph bytes), not initializers (weights)
    consts = [helper.make_node("Constant", [], [_TRIP], value=helper.make_tensor("", TensorProto.INT64, [], [T])),
              helper.make_node("Constant", [], [_COND], value=helper.make_tensor("", TensorProto.BOOL, [], [True])),
              helper.make_node("Constant", [], [_ZERO], value=helper.make_tensor("", TensorProto.FLOAT, [], [0.0]))]
    loop = helper.make_node("Loop", [_TRIP, _COND, *[_ZERO] * n_states],
                            [*[f"last{i}" for i in range(n_states)], _PER_STEP], body=body)
    if opset >= 18:  # ReduceMean takes its axes as an input from opset 18
        consts.append(helper.make_node("Constant", [], ["axis0"],
                                       value=helper.make_tensor("", TensorProto.INT64, [1], [0])))
        mean = helper.make_node("ReduceMean", [_PER_STEP, "axis0"], ["logits"], keepdims=0)
    else:
        mean = helper.make_node("ReduceMean", [_PER_STEP], ["logits"], axes=[0], keepdims=0)
    out = copy.deepcopy(step_proto.graph.output[0])
    out.name = "logits"
    graph = helper.make_graph(nodes=[*consts, loop, mean], name=g.name or "spikeprune", inputs=[images], outputs=[out],
                              initializer=list(g.initializer))
    proto = helper.make_model(graph, opset_imports=list(step_proto.opset_import), ir_version=step_proto.ir_version)
    return proto


def constants_into_body(proto) -> int:
    """Move every initializer of a Loop file's main graph that only the body reads into the body.
    ONNX Runtime prepares a graph's own constant weights for its kernels (pre-packing) but not values
    a subgraph reads from the outer scope: moved, the fp32 file's Loop costs a few percent of the
    unrolled file's latency instead of about a fifth (bench/time_loop.py). What the main graph's
    nodes read stays there: the int8 / int4 weights and their DequantizeLinear (and fp16 Casts),
    which so run once per call, not once per step. Returns the initializers moved."""
    loop = next(n for n in proto.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    read_outside = {i for n in proto.graph.node if n is not loop for i in n.input} | set(loop.input)
    move = [i for i in proto.graph.initializer if i.name not in read_outside]
    keep = [i for i in proto.graph.initializer if i.name in read_outside]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    body.initializer.extend(move)
    return len(move)


def step_bodies(proto) -> list:
    """The Loop bodies of a file's main graph (empty for an unrolled file)."""
    return [a.g for n in proto.graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body"]
