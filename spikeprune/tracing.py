"""Coupled groups of any spiking module, found by recording one forward: `spikeprune.trace`.

    t = spikeprune.trace(model, example_input)    # model: the user's own nn.Module
    t.groups          # [Group], the form the families declare (members, dims, unit widths, heads)
    t.unprunable      # [(module name, reason)]: layers that no group may cut, and why
    pruned = spikeprune.prune(model, {"residual": 0.25})   # the model is now a "traced" model

How it works (docs/tracing.md says more):
  1. Record. The model runs the example input once (eval mode, no grad, neuron state reset before
     and after) under a TorchFunctionMode that sees every tensor op: torch functions, Tensor
     methods and operators, F.linear / conv / batch_norm / layer_norm / pooling, whether a layer
     is called as a module or functionally on a view of its weight. Spiking neurons (a module
     with `v_threshold` and only scalar parameters) and classes registered with
     `register_channelwise` are recorded as one element-wise call. The run is concrete: Python
     control flow, loops over T and shapes read from tensors simply happen.
  2. Dims algebra. Every dim of every tensor is a row-major product of *atoms*; ops tie atoms
     (union-find): an element-wise op or a residual add ties aligned dims, a Linear ties x's last
     dim to its weight's dim 1, a reshape splits or merges atoms (the q projection's output atom
     becomes [heads, head_dim] at the head split), q @ k^T ties the contracted head dims of q and
     k, and the batch dims (the heads) of both. Every parameter dim is an atom too, keyed by
     (module, dim), so layers met in one atom class must be cut together.
  3. Doubt. What the rules do not understand taints the atoms it touches, with a reason: an
     unknown op, a reshape whose boundaries cut across a dim, a concatenation, a partial slice,
     LayerNorm / softmax / mean over a dim (they read every channel), the model input and output.
  4. Groups. Atom classes that carry parameter dims become groups: one leaf -> a channel group
     (residual when a skip add met it, qk when a product met it, stem for a spatial conv, hidden
     else); a split [H, d] -> a heads group (H, unit width d per member) and a per-head channel
     group (qk when contracted in q @ k^T, v else).
  5. Proof. Each group is pruned alone on the example input (half of its units, chosen at random)
     and the pruned model is compared with the masked dense model in float64; a group that fails,
     or whose pruned forward breaks, is listed as unprunable with the error. The same proof runs
     after every later prune of the traced model (models/traced.py).

Module attributes the forward read as widths are found by giving every int attribute of every
module a tracked int for the recording: a tracked value passed as a view / reshape size binds the
attribute to that dim, and pruning sets it to the dim's new size. Shapes the forward computes from
tensors (`C // self.num_heads`) follow by themselves; a width written as a literal, or computed
from another tensor's shape, shows up in the proof and the group is refused with the reason.
"""
from __future__ import annotations

import copy
import itertools
import math
import random
import uuid
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import SpikepruneError
from .models import get_family
from .tracing_spec import (FAMILY, Binding, CostRow, TracedConfig, TraceSpec, attach, cost_table, is_channelwise,
                            prune_units, register_channelwise, remember, reset_state)
from .structure import Group, Member, Probe

__all__ = ["Trace", "register_channelwise", "trace"]

PROOF_SEED = 0


# ------------------------------------------------------------------------------------------------
# Atoms: the dims algebra
# ------------------------------------------------------------------------------------------------
class Atom:
    """A factor of a tensor dim. Union-find node; `parts` once split into a row-major product."""
    _ids = itertools.count()

    def __init__(self, size: int, whole: "Atom | None" = None):
        self.size = size
        self.parent: Atom = self
        self.parts: list[Atom] | None = None
        self.whole = whole  # the atom this one was split from
        self.id = next(Atom._ids)
        self.reasons: list[str] = []
        self.flags: set[str] = set()


def find(a: Atom) -> Atom:
    while a.parent is not a:
        a.parent = a.parent.parent
        a = a.parent
    return a


def leaves(atoms) -> list[Atom]:
    """The leaf atoms (roots, size > 1) a dim is the row-major product of."""
    out = []
    for a in atoms:
        r = find(a)
        if r.parts is not None:
            out += leaves(r.parts)
        elif r.size > 1:
            out.append(r)
    return out


def mark(atoms, reason: str) -> None:
    for a in atoms:
        r = find(a)
        if reason not in r.reasons:
            r.reasons.append(reason)
        if r.parts is not None:
            mark(r.parts, reason)


def split(a: Atom, sizes: list[int]) -> list[Atom]:
    r = find(a)
    r.parts = [Atom(s, whole=r) for s in sizes]
    return r.parts


def union(a: Atom, b: Atom) -> None:
    ra, rb = find(a), find(b)
    if ra is rb:
        return
    rb.parent = ra
    ra.reasons += [x for x in rb.reasons if x not in ra.reasons]
    ra.flags |= rb.flags
    if ra.parts is None:
        ra.parts = rb.parts
    elif rb.parts is not None:
        unify(ra.parts, rb.parts)


def unify(dim_a, dim_b) -> None:
    """Tie two dims of equal size, splitting leaves where one side is finer."""
    qa, qb = leaves(dim_a), leaves(dim_b)
    while qa and qb:
        a, b = find(qa.pop(0)), find(qb.pop(0))
        if a is b:
            continue
        if a.parts is not None or b.parts is not None:  # split meanwhile: take its parts
            qa, qb = leaves([a]) + qa, leaves([b]) + qb
            continue
        if a.size == b.size:
            union(a, b)
        elif a.size % b.size == 0:
            p = split(a, [b.size, a.size // b.size])
            union(p[0], b)
            qa.insert(0, p[1])
        elif b.size % a.size == 0:
            p = split(b, [a.size, b.size // a.size])
            union(a, p[0])
            qb.insert(0, p[1])
        else:
            mark([a, b, *qa, *qb], "dims whose factors do not line up are tied")
            return


def ancestry_reasons(leaf: Atom) -> list[str]:
    out, a = [], find(leaf)
    seen = set()
    while a is not None and a.id not in seen:
        seen.add(a.id)
        out += [r for r in a.reasons if r not in out]
        a = find(a.whole) if a.whole is not None else None
    return out


# ------------------------------------------------------------------------------------------------
# Tracked ints: which module attributes the forward reads as sizes
# ------------------------------------------------------------------------------------------------
class TrackedInt(int):
    """An int attribute of a module during the recording; `origin` = (module path, attribute)."""

    def __new__(cls, value: int, origin: tuple[str, str]):
        obj = super().__new__(cls, value)
        obj.origin = origin
        return obj

    def __deepcopy__(self, memo):
        return int(self)


class ShapeInt(int):
    """A size read from a tensor during the recording; `atoms` = the dim it was read from."""

    def __new__(cls, value: int, atoms: list):
        obj = super().__new__(cls, value)
        obj.atoms = atoms
        return obj


class TrackedSize(tuple):
    """x.shape / x.size() during the recording: a tuple of ShapeInts (torch.Size's methods that
    forward code uses are here; code that needs a real torch.Size is recorded again without)."""

    def numel(self) -> int:
        return math.prod(int(n) for n in self)


def _track_ints(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    restore = []
    for path, mod in model.named_modules():
        for attr, v in list(vars(mod).items()):
            if type(v) is int and not attr.startswith("_"):
                restore.append((mod, attr, v))
                mod.__dict__[attr] = TrackedInt(v, (path, attr))
    return restore


# ------------------------------------------------------------------------------------------------
# The recorder
# ------------------------------------------------------------------------------------------------
@dataclass
class TInfo:
    dims: list[list[Atom]]
    spike_from: str | None = None  # the neuron whose spikes this tensor is (through shape ops only)


ELEMENTWISE = {
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow", "rsub", "maximum",
    "minimum", "where", "masked_fill", "clamp", "clip", "clamp_min", "clamp_max", "abs", "neg", "sign", "sigmoid",
    "tanh", "relu", "relu6", "gelu", "silu", "hardtanh", "leaky_relu", "elu", "exp", "log", "sqrt", "rsqrt",
    "reciprocal", "floor", "ceil", "round", "trunc", "heaviside", "ge", "gt", "le", "lt", "eq", "ne", "logical_and",
    "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "lerp", "addcmul", "addcdiv",
    "square", "erf", "dropout", "alpha_dropout", "hardsigmoid", "softplus", "isnan", "isinf", "nan_to_num",
    "float", "double", "half", "bfloat16", "int", "long", "bool", "to", "type", "type_as", "contiguous", "clone",
    "detach", "requires_grad_", "cpu", "cuda", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
    "randn_like", "__and__", "__or__", "__xor__", "__invert__", "__neg__", "__abs__",
    "__pos__", "data", "fill_", "zero_", "copy_", "detach_",
}
for _op in ("add", "sub", "mul", "div", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift"):
    ELEMENTWISE |= {f"__{_op}__", f"__r{_op}__", f"__i{_op}__", f"{_op}_"}
ELEMENTWISE |= {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "sigmoid_", "relu_", "clamp_",
                "masked_fill_", "sub_", "mul_", "div_", "add_", "addcmul_", "lerp_"}
ADDS = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_"}
PRODUCTS = {"mul", "__mul__", "__rmul__", "__imul__", "mul_"}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
            "squeeze_", "unsqueeze_", "ravel"}
SIZE_ARGS = {"view", "reshape", "expand", "repeat", "unflatten", "new_zeros", "new_ones", "new_empty"}
NO_TENSOR = {"__get__", "size", "dim", "numel", "__len__", "item", "tolist", "__bool__", "__format__", "__repr__",
             "is_floating_point", "is_contiguous", "__hash__", "stride", "element_size", "data_ptr", "get_device",
             "__index__", "__int__", "__float__", "nelement", "ndimension", "untyped_storage", "__iter__",
             "__contains__", "__reduce_ex__", "__setstate__", "__array__", "backward", "register_hook",
             "is_complex", "storage_offset", "__dlpack__"}
REDUCE_SUM = {"sum", "nansum"}
REDUCE_OTHER = {"mean", "nanmean", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "any",
                "all", "median", "argmax", "argmin"}
SOFTMAX = {"softmax", "log_softmax", "_softmax"}


def _name(func) -> str:
    name = getattr(func, "__name__", str(func))
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = f"__get__{getattr(owner, '__name__', '')}"
    return name.lstrip("_") if name.startswith("_") and not name.startswith("__") else name


class Recorder(TorchFunctionMode):
    """Records one forward as atom equalities (see the module docstring)."""

    def __init__(self, model: nn.Module, batch: int, track_shapes: bool = True):
        super().__init__()
        self.batch = batch
        self.track_shapes = track_shapes
        self.info: dict[int, TInfo] = {}
        self.keep: list = []  # tensors alive for the recording, so their ids stay unique
        self.param_owner: dict[int, tuple[str, str]] = {}
        self.member_atoms: dict[tuple[str, int], Atom] = {}
        self.member_order: dict[tuple[str, int], int] = {}
        self.bindings: list[tuple[tuple[str, str], list[Atom]]] = []
        self.calls: dict[str, list] = {}  # weight module -> [(macs, factor atoms, input spike source)]
        self.products: list[tuple[str, float, list[Atom], tuple[str, ...]]] = []
        self.neuron_calls: dict[str, int] = {}
        self.neuron_outputs: list[tuple[str, list]] = []  # (neuron, its output's dims) per call
        self.module_stack: list[str] = []
        self.leaf_depth = 0
        self.module_names = {id(m): n for n, m in model.named_modules()}
        for path, mod in model.named_modules():
            for pname, t in itertools.chain(mod._parameters.items(), mod._buffers.items()):
                if t is not None:
                    self.param_owner[id(t)] = (path, pname)

    # -- tensor info -------------------------------------------------------------------------------
    def get(self, t: torch.Tensor) -> TInfo:
        inf = self.info.get(id(t))
        if inf is not None and len(inf.dims) == t.dim():
            return inf
        owner = self.param_owner.get(id(t))
        if owner is not None:
            inf = TInfo([[self.member_atom(owner[0], d, n)] for d, n in enumerate(t.shape)])
        else:
            inf = TInfo([[Atom(n)] for n in t.shape])
        self.put(t, inf)
        return inf

    def put(self, t: torch.Tensor, inf: TInfo) -> None:
        self.info[id(t)] = inf
        self.keep.append(t)

    def member_atom(self, module: str, dim: int, size: int) -> Atom:
        key = (module, dim)
        a = self.member_atoms.get(key)
        if a is None:
            a = self.member_atoms[key] = Atom(size)
            self.member_order[key] = len(self.member_order)
        elif a.size != size:  # the module's tensors do not share a layout: none of them is cut on it
            reason = f"the tensors of {module} differ in size on dim {dim}"
            mark([a], reason)
            a = Atom(size)
            mark([a], reason)
        return a

    def fresh(self, t: torch.Tensor, spike_from: str | None = None) -> TInfo:
        inf = TInfo([[Atom(n)] for n in t.shape], spike_from)
        self.put(t, inf)
        return inf

    # -- module hooks (neurons and registered channel-wise modules are one call) --------------------
    def pre_hook(self, module, args):
        self.module_stack.append(self.module_names.get(id(module), "?"))
        if is_channelwise(module):
            self.leaf_depth += 1

    def post_hook(self, module, args, out):
        name = self.module_stack.pop() if self.module_stack else "?"
        if not is_channelwise(module):
            return
        self.leaf_depth -= 1
        if self.leaf_depth:
            return
        self.neuron_calls[name] = self.neuron_calls.get(name, 0) + 1
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.shape == out.shape:
            self.put(out, TInfo(list(self.get(x).dims), spike_from=name))
            self.neuron_outputs.append((name, list(self.get(x).dims)))
        else:
            for t in _tensors(args) + _tensors(out):
                mark(_all_atoms(self.get(t)), f"channel-wise module {name} changes its input's shape")

    # -- ops -----------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.leaf_depth:
            return out
        name = _name(func)
        if self.track_shapes and name in ("__get__shape", "size") and args and isinstance(args[0], torch.Tensor):
            dims = self.get(args[0]).dims
            if isinstance(out, int) and len(args) > 1:
                return ShapeInt(out, dims[args[1] % len(dims)])
            if isinstance(out, torch.Size):
                return TrackedSize(ShapeInt(n, d) for n, d in zip(out, dims))
            return out
        if name in NO_TENSOR or name.startswith("__get__") and name not in ("__get__T", "__get__mT", "__get__data"):
            return out
        try:
            self.rule(name, func, args, kwargs, out)
        except Exception as e:  # noqa: BLE001 -- a rule that cannot read this call: taint, never guess
            self.unknown(f"{name} ({type(e).__name__} while reading it)", args, kwargs, out)
        return out

    def unknown(self, what: str, args, kwargs, out) -> None:
        ins = _tensors(args) + _tensors(kwargs)
        outs = _tensors(out)
        reason = f"{what} is an op the tracer does not follow"
        for t in ins:
            mark(_all_atoms(self.get(t)), reason)
        for t in outs:
            mark(_all_atoms(self.fresh(t)), reason)

    def rule(self, name, func, args, kwargs, out) -> None:
        if not _tensors(out):
            return None
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name.startswith("conv") and name[4:6] in ("1d", "2d", "3d"):
            return self.conv(name, args, kwargs, out)
        if "pool" in name:
            return self.pool(name, args, kwargs, out)
        read = OP_RULES.get(name)
        if read is None:
            return self.unknown(name, args, kwargs, out)
        return read(self, Call(name, x, args, kwargs, out))

    def matmul_call(self, c: "Call") -> None:
        a, b = (c.args[1], c.args[0]) if c.name == "__rmatmul__" else (c.args[0], c.args[1])
        return self.matmul(a, b, c.out)

    def softmax(self, c: "Call") -> None:
        dim = c.args[1] if len(c.args) > 1 else c.kwargs.get("dim")
        inf = self.get(c.x)
        mark(inf.dims[dim], f"{c.name} over this dim reads every channel")
        return self.put(c.out, TInfo(list(inf.dims)))

    def reshaped(self, c: "Call") -> None:
        self.reshape(c.x, c.out)
        return self.bind(c.name, c.args, c.kwargs, c.out)

    def expand(self, c: "Call") -> None:
        x, out = c.x, c.out
        inf = self.get(x)
        dims = []
        for k, n in enumerate(out.shape):
            j = k - (out.dim() - x.dim())
            dims.append(inf.dims[j] if j >= 0 and x.shape[j] == n else [Atom(n)])
        self.put(out, TInfo(dims, inf.spike_from))
        return self.bind(c.name, c.args, c.kwargs, out)

    def repeat(self, c: "Call") -> None:
        x, out = c.x, c.out
        inf = self.get(x)
        lead = out.dim() - x.dim()
        dims = [[Atom(n)] for n in out.shape[:lead]]
        for j, n in enumerate(x.shape):
            if out.shape[lead + j] == n:
                dims.append(inf.dims[j])
            else:
                mark(inf.dims[j], "repeated along this dim")
                dims.append([Atom(out.shape[lead + j])])
        return self.put(out, TInfo(dims, inf.spike_from))

    def unbind(self, c: "Call") -> None:
        x = c.x
        dim = c.args[1] if len(c.args) > 1 else c.kwargs.get("dim", 0)
        inf = self.get(x)
        for t in c.out:
            self.put(t, TInfo([d for k, d in enumerate(inf.dims) if k != dim % x.dim()], inf.spike_from))
        return None

    def factory(self, c: "Call") -> None:
        for t in _tensors(c.out):
            self.fresh(t)
        return None

    def elementwise(self, name, ins, out) -> None:
        ins = [t for t in ins if t.dim() > 0]
        outs = _tensors(out)
        o = outs[0]
        dims = []
        acts = [t for t in ins if id(t) not in self.param_owner]
        # two activations (not a weight) added or multiplied: a residual sum, or a product such as q * k
        flag = "residual" if name in ADDS else "product" if name in PRODUCTS else None
        for k, n in enumerate(o.shape):
            cands = self._aligned_dims(ins, o, k, n)
            for c in cands[1:]:
                unify(cands[0], c)
            if flag and len(acts) >= 2 and len(cands) >= 2:
                for a in leaves(cands[0]):
                    find(a).flags.add(flag)
            dims.append(cands[0] if cands else [Atom(n)])
        spike = None
        if ins and name in ("to", "float", "double", "half", "contiguous", "clone", "detach", "type", "type_as"):
            spike = self.get(ins[0]).spike_from
        self.put(o, TInfo(dims, spike))

    def _aligned_dims(self, ins, o, k: int, n: int) -> list:
        """The dims of the inputs that broadcasting aligns with dim k (size n > 1) of the output o."""
        cands = []
        for t in ins:
            j = k - (o.dim() - t.dim())
            if j >= 0 and t.shape[j] == n and n != 1:
                cands.append(self.get(t).dims[j])
        return cands

    def reshape(self, x, out) -> None:
        inf = self.get(x)
        queue = leaves([a for d in inf.dims for a in d])
        dims = []
        for n in out.shape:
            need, taken = n, []
            while need > 1:
                if not queue:
                    raise ValueError("sizes do not match")
                leaf = find(queue.pop(0))
                if leaf.parts is not None:
                    queue = leaves(leaf.parts) + queue
                    continue
                if need % leaf.size == 0:
                    taken.append(leaf)
                    need //= leaf.size
                elif leaf.size % need == 0:
                    p = split(leaf, [need, leaf.size // need])
                    taken.append(p[0])
                    queue.insert(0, p[1])
                    need = 1
                else:
                    mark([leaf, *queue], "a reshape cuts across this dim's factors")
                    taken.append(leaf)  # placeholder; the dim is tainted anyway
                    need = 1
                    queue = []
            dims.append(taken if taken else [Atom(1)])
        self.put(out, TInfo(dims, inf.spike_from))

    def bind(self, name, args, kwargs, out) -> None:
        """Record the tracked int attributes passed as sizes: which output dim each one sets."""
        if name not in SIZE_ARGS:
            return
        sizes = list(args[1:])
        if name == "unflatten":
            dim = args[1] % (out.dim() - len(args[2]) + 1)
            pos = {dim + i: s for i, s in enumerate(args[2])}
        else:
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
                sizes = list(sizes[0])
            pos = dict(enumerate(sizes))
        inf = self.get(out)
        for k, s in pos.items():
            if isinstance(s, TrackedInt) and k < out.dim() and int(s) == out.shape[k]:  # not a -1 to infer
                self.bindings.append((s.origin, inf.dims[k]))
            if isinstance(s, ShapeInt) and k < out.dim() and name != "repeat" and int(s) == out.shape[k]:
                # a size read from another tensor's dim: the forward keeps the two equal, so they
                # must be cut together (e.g. a head merge that reshapes to the block input's width)
                unify(s.atoms, inf.dims[k])

    def permute(self, name, x, args, kwargs, out) -> None:
        inf = self.get(x)
        nd = x.dim()
        order = list(range(nd))
        if name == "permute":
            p = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
            order = [d % nd for d in (kwargs.get("dims") or p)]
        elif name in ("transpose", "transpose_", "swapaxes"):
            d0, d1 = args[1] % nd, args[2] % nd
            order[d0], order[d1] = order[d1], order[d0]
        elif name in ("t", "__get__T"):
            order = order[::-1]
        elif name == "__get__mT":
            order[-1], order[-2] = order[-2], order[-1]
        else:
            raise ValueError("movedim")
        self.put(out, TInfo([inf.dims[i] for i in order], inf.spike_from))

    def getitem(self, x, idx, out) -> None:
        inf = self.get(x)
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, torch.Tensor) or isinstance(i, (list,)) for i in idx):
            raise ValueError("advanced indexing")
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        dims, k = [], 0
        for i in idx:
            if i is Ellipsis:
                for _ in range(x.dim() - n_real):
                    dims.append(inf.dims[k])
                    k += 1
            elif i is None:
                dims.append([Atom(1)])
            elif isinstance(i, int):
                if x.shape[k] > 1:
                    mark(inf.dims[k], "one index of this dim is picked out")
                k += 1
            elif isinstance(i, slice):
                n = x.shape[k]
                if i.indices(n) == (0, n, 1):
                    dims.append(inf.dims[k])
                else:
                    mark(inf.dims[k], "a slice takes part of this dim")
                    dims.append([Atom(len(range(*i.indices(n))))])
                k += 1
            else:
                raise ValueError("index")
        dims += inf.dims[k:]
        self.put(out, TInfo(dims, inf.spike_from))

    def cat(self, name, args, kwargs, out) -> None:
        seq = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        infs = [self.get(t) for t in seq]
        if name == "stack":
            d = dim % out.dim()
            base = list(infs[0].dims)
            for inf in infs[1:]:
                for a, b in zip(base, inf.dims):
                    unify(a, b)
            dims = base[:d] + [[Atom(len(seq))]] + base[d:]
        else:
            d = dim % out.dim()
            dims = list(infs[0].dims)
            for inf in infs[1:]:
                for k, (a, b) in enumerate(zip(dims, inf.dims)):
                    if k != d:
                        unify(a, b)
            for inf in infs:
                mark(inf.dims[d], "tensors are concatenated along this dim")
            dims[d] = [Atom(out.shape[d])]
            mark(dims[d], "tensors are concatenated along this dim")
        spikes = {inf.spike_from for inf in infs}
        self.put(out, TInfo(dims, spikes.pop() if len(spikes) == 1 else None))

    def chunk(self, name, x, args, kwargs, out) -> None:
        """Equal parts along a dim: the dim is [parts, part] (row-major) and every part reads the
        inner factor; the parts' factor is tainted (a fused q/k/v projection cut into q, k, v:
        each of its units would repeat once per part in one weight, which a Group cannot say)."""
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        outs = _tensors(out)
        inf = self.get(x)
        d = dim % x.dim()
        n, size = len(outs), x.shape[d]
        if any(t.shape[d] != size // n for t in outs) or size % n:
            mark(inf.dims[d], f"{name} cuts this dim into unequal parts")
            for t in outs:
                self.fresh(t)
            return
        queue, part = leaves(inf.dims[d]), size // n
        inner = []
        need = part
        for leaf in reversed(queue):  # the inner factor: the last leaves, split where needed
            if need == 1:
                break
            if need % leaf.size == 0:
                inner.insert(0, leaf)
                need //= leaf.size
            elif leaf.size % need == 0:
                p = split(leaf, [leaf.size // need, need])
                inner.insert(0, p[1])
                mark([p[0]], f"{name} cuts this dim into {n} parts (e.g. a fused q/k/v projection): a group "
                              "cannot cut a unit that repeats once per part yet")
                need = 1
            else:
                raise ValueError("parts cut across factors")
        outer = [a for a in leaves(inf.dims[d]) if a not in inner]
        mark(outer, f"{name} cuts this dim into {n} parts (e.g. a fused q/k/v projection): a group cannot cut "
                    "a unit that repeats once per part yet")
        for t in outs:
            dims = list(inf.dims)
            dims[d] = inner or [Atom(1)]
            self.put(t, TInfo(dims, inf.spike_from))

    def reduce(self, name, x, args, kwargs, out) -> None:
        inf = self.get(x)
        dim = args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else kwargs.get("dim")
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return self.elementwise("maximum", [x, args[1]], out)
        nd = x.dim()
        reduced = list(range(nd)) if dim is None else [d % nd for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        if name not in REDUCE_SUM:
            for d in reduced:
                mark(inf.dims[d], f"{name} over this dim reads every channel")
        dims = []
        for d in range(nd):
            if d not in reduced:
                dims.append(inf.dims[d])
            elif keep:
                dims.append([Atom(1)])
        for t in _tensors(out):
            self.put(t, TInfo(list(dims)))

    def matmul(self, a, b, out) -> None:
        if a.dim() < 2 or b.dim() < 2:
            raise ValueError("matmul of vectors")
        ia, ib = self.get(a), self.get(b)
        unify(ia.dims[-1], ib.dims[-2])
        for leaf in leaves(ia.dims[-1]):
            find(leaf).flags.add("contracted")
        nb = out.dim() - 2
        dims = []
        for k in range(nb):
            cands = []
            for t, inf in ((a, ia), (b, ib)):
                j = k - (nb - (t.dim() - 2))
                if j >= 0 and t.shape[j] == out.shape[k] and out.shape[k] != 1:
                    cands.append(inf.dims[j])
            for c in cands[1:]:
                unify(cands[0], c)
            dims.append(cands[0] if cands else [Atom(out.shape[k])])
        dims += [ia.dims[-2], ib.dims[-1]]
        self.put(out, TInfo(dims))
        macs = out.numel() * a.shape[-1] / self.batch
        where = self.module_stack[-1] if self.module_stack else ""
        srcs = tuple(s for s in (ia.spike_from, ib.spike_from) if s)
        self.products.append((where, macs, [*[x for d in dims for x in d], *ia.dims[-1]], srcs if len(srcs) == 2 else ()))

    def linear(self, args, kwargs, out) -> None:
        x = args[0]
        w = args[1] if len(args) > 1 else kwargs["weight"]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        ix, iw = self.get(x), self.get(w)
        unify(ix.dims[-1], iw.dims[1])
        if b is not None:
            unify(self.get(b).dims[0], iw.dims[0])
        self.put(out, TInfo([*ix.dims[:-1], iw.dims[0]]))
        self.weight_call(w, out.numel() * w.shape[1] / self.batch, iw, ix)

    def weight_call(self, w, macs, iw, ix) -> None:
        owner = self.param_owner.get(id(w))
        if owner is None:  # a weight that is no module's parameter (computed): its layer is unknown
            base = getattr(w, "_base", None)
            owner = self.param_owner.get(id(base)) if base is not None else None
        if owner is not None:
            self.calls.setdefault(owner[0], []).append((macs, ix.spike_from))

    def conv(self, name, args, kwargs, out) -> None:
        x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        nsp = int(name[4])
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        ix, iw = self.get(x), self.get(w)
        batched = x.dim() == nsp + 2
        c = 1 if batched else 0
        mark([a for d in iw.dims[2:] for a in d], "a kernel window dim")
        if groups == 1:
            unify(ix.dims[c], iw.dims[1])
        elif groups == x.shape[c] == w.shape[0]:  # depthwise: channel c reads channel c only
            unify(ix.dims[c], iw.dims[0])
        else:
            mark(ix.dims[c] + iw.dims[0] + iw.dims[1], f"a grouped convolution ({groups} groups) is not followed")
        if b is not None:
            unify(self.get(b).dims[0], iw.dims[0])
        dims = ([ix.dims[0]] if batched else []) + [iw.dims[0]]
        for k in range(nsp):
            j = c + 1 + k
            same = x.shape[j] == out.shape[j] and w.shape[2 + k] == 1
            dims.append(ix.dims[j] if same else [Atom(out.shape[j])])
        self.put(out, TInfo(dims))
        self.weight_call(w, out.numel() * (w.shape[1] * math.prod(w.shape[2:])) / self.batch, iw, ix)

    def batch_norm(self, args, kwargs, out) -> None:
        x = args[0]
        ix = self.get(x)
        names = ("running_mean", "running_var", "weight", "bias")
        for k, key in enumerate(names):
            t = args[1 + k] if len(args) > 1 + k else kwargs.get(key)
            if isinstance(t, torch.Tensor):
                unify(ix.dims[1], self.get(t).dims[0])
        self.put(out, TInfo(list(ix.dims)))

    def layer_norm(self, args, kwargs, out) -> None:
        x = args[0]
        shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        ix = self.get(x)
        k = len(shape)
        for d in ix.dims[-k:]:
            mark(d, "LayerNorm normalises over this dim (a removed channel would change the others)")
        for key, pos in (("weight", 2), ("bias", 3)):
            t = args[pos] if len(args) > pos else kwargs.get(key)
            if isinstance(t, torch.Tensor):
                for a, b in zip(ix.dims[-k:], self.get(t).dims):
                    unify(a, b)
        self.put(out, TInfo(list(ix.dims)))

    def pool(self, name, args, kwargs, out) -> None:
        x = args[0]
        ix = self.get(x)
        nsp = 3 if "3d" in name else 1 if "1d" in name else 2
        ksize = args[1] if len(args) > 1 else kwargs.get("kernel_size", kwargs.get("output_size"))
        ks = list(ksize) if isinstance(ksize, (tuple, list)) else [ksize] * nsp
        outs = _tensors(out)
        o = outs[0]
        dims = list(ix.dims[:x.dim() - nsp])
        for k in range(nsp):
            j = x.dim() - nsp + k
            keepdim = x.shape[j] == o.shape[j] and ("adaptive" in name or ks[k] == 1)
            if not keepdim:
                mark(ix.dims[j], f"{name} pools over this dim")
            dims.append(ix.dims[j] if keepdim else [Atom(o.shape[j])])
        spike = ix.spike_from if "max" in name else None
        self.put(o, TInfo(dims, spike))
        for t in outs[1:]:
            self.fresh(t)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _all_atoms(inf: TInfo) -> list[Atom]:
    return [a for d in inf.dims for a in d]


class Call(NamedTuple):
    """One op call as a rule reads it: its name, its first tensor argument (or None), its arguments
    and its output."""
    name: str
    x: torch.Tensor | None
    args: tuple
    kwargs: dict
    out: object


# Op name -> how the recorder reads a call of it (ops named conv1d / 2d / 3d or with "pool" in their
# name are read as convolutions and pools first; an op of no family is unknown). The families are
# listed in the order they are tried: an op named in two goes to the first.
_OP_FAMILIES = (
    (("linear",), lambda r, c: r.linear(c.args, c.kwargs, c.out)),
    (("batch_norm",), lambda r, c: r.batch_norm(c.args, c.kwargs, c.out)),
    (("layer_norm",), lambda r, c: r.layer_norm(c.args, c.kwargs, c.out)),
    (("matmul", "__matmul__", "bmm", "__rmatmul__"), Recorder.matmul_call),
    (SOFTMAX, Recorder.softmax),
    (ELEMENTWISE | {"dropout", "feature_alpha_dropout"},
     lambda r, c: r.elementwise(c.name, _tensors(c.args) + _tensors(c.kwargs), c.out)),
    (RESHAPES, Recorder.reshaped),
    (("permute", "transpose", "transpose_", "t", "__get__T", "__get__mT", "swapaxes", "movedim"),
     lambda r, c: r.permute(c.name, c.x, c.args, c.kwargs, c.out)),
    (("expand", "expand_as", "broadcast_to"), Recorder.expand),
    (("repeat",), Recorder.repeat),
    (("__getitem__",), lambda r, c: r.getitem(c.x, c.args[1], c.out)),
    (("stack", "cat", "concat", "concatenate"), lambda r, c: r.cat(c.name, c.args, c.kwargs, c.out)),
    (("chunk", "split", "tensor_split", "split_with_sizes"), lambda r, c: r.chunk(c.name, c.x, c.args, c.kwargs, c.out)),
    (("unbind",), Recorder.unbind),
    (REDUCE_SUM | REDUCE_OTHER, lambda r, c: r.reduce(c.name, c.x, c.args, c.kwargs, c.out)),
    (("zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "rand", "randn", "new_zeros", "new_ones",
      "new_empty", "new_full", "new_tensor", "linspace", "eye"), Recorder.factory),
)
OP_RULES: dict[str, Callable[[Recorder, Call], None]] = {}
for _names, _read in _OP_FAMILIES:
    for _op in _names:
        OP_RULES.setdefault(_op, _read)


# ------------------------------------------------------------------------------------------------
# From atoms to groups
# ------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """What `trace` found: the groups (verified) and the layers no group may cut, with why."""
    groups: list[Group]
    unprunable: list[tuple[str, str]]
    spec: TraceSpec = field(repr=False)

    def summary(self) -> dict:
        return {"groups": [g.summary() for g in self.groups],
                "unprunable": [{"module": m, "reason": r} for m, r in self.unprunable]}


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        out.append(xs[0])
    return ".".join(out)


def _record(model: nn.Module, example: torch.Tensor) -> tuple[Recorder, list]:
    """Record the forward; sizes read from tensors are tracked unless the forward cannot take a
    tuple for a torch.Size (then it is recorded again without: such ties show up in the proof)."""
    try:
        return _record_once(model, example, track_shapes=True)
    except SpikepruneError:
        return _record_once(model, example, track_shapes=False)


def _record_once(model: nn.Module, example: torch.Tensor, track_shapes: bool) -> tuple[Recorder, list]:
    rec = Recorder(model, example.shape[0] if example.dim() else 1, track_shapes)
    restore = _track_ints(model)
    hooks = [nn.modules.module.register_module_forward_pre_hook(rec.pre_hook),
             nn.modules.module.register_module_forward_hook(rec.post_hook)]
    was_training = model.training
    model.eval()
    reset_state(model)
    try:
        inp = rec.fresh(example)
        mark(_all_atoms(inp), "the model's input")
        with torch.no_grad(), rec:
            out = model(example)
    except SpikepruneError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's forward failed on the example: say so
        raise SpikepruneError(f"the model's forward fails on the example input {list(example.shape)}: "
                              f"{type(e).__name__}: {e}") from None
    finally:
        for h in hooks:
            h.remove()
        for mod, attr, v in restore:
            mod.__dict__[attr] = v
        reset_state(model)
        model.train(was_training)
    outs = _tensors(out)
    if not outs:
        raise SpikepruneError("the model's forward returned no tensor on the example input")
    for t in outs:
        mark(_all_atoms(rec.get(t)), "the model's output")
    return rec, outs


def _candidates(rec: Recorder, model: nn.Module) -> tuple[list[Group], dict, dict, list[tuple[str, str]]]:
    """Groups from the atom classes; (groups, group -> leaf, member leaves, unprunable)."""
    modules = dict(model.named_modules())
    member_leaves = {k: leaves([a]) for k, a in rec.member_atoms.items()}
    roles = _leaf_roles(member_leaves, modules)
    unprunable: dict[tuple[str, str], None] = {}

    def order(keys):
        return min(rec.member_order[k] for k in keys)

    groups, group_leaf = [], {}
    for r in sorted(roles.values(), key=lambda r: order(r["alone"] + r["first"] + r["second"])):
        leaf = r["leaf"]
        keys = r["alone"] + r["first"] + r["second"]
        reasons = ancestry_reasons(leaf)
        if reasons:
            for m, _ in keys:
                unprunable[(m, reasons[0])] = None
            continue
        groups.append(_group_of(r, keys, member_leaves, modules))
        group_leaf[id(groups[-1])] = leaf.id
    return groups, group_leaf, member_leaves, list(unprunable)


def _leaf_roles(member_leaves: dict, modules: dict) -> dict[int, dict]:
    """leaf id -> {"alone" / "first" / "second": the (module, dim) keys whose dim is that leaf alone,
    or the first (heads) or second (channels in a head) factor of it; "leaf": the Atom}. A leaf used
    in ways no group can cut is marked."""
    roles: dict[int, dict] = {}
    for key, ls in member_leaves.items():
        if not ls or (key[1] >= 2 and isinstance(modules[key[0]], nn.modules.conv._ConvNd)):
            continue  # a kernel window: never a channel
        if len(ls) > 2:
            mark(ls, "a parameter dim is a product of more than two factors")
        for pos, leaf in enumerate(ls):
            r = roles.setdefault(leaf.id, {"alone": [], "first": [], "second": [], "leaf": leaf})
            r["alone" if len(ls) == 1 else ("first" if pos == 0 else "second")].append(key)
    for r in roles.values():
        if r["second"] and (r["alone"] or r["first"]):
            mark([r["leaf"]], "a head dim is also used outside its heads")
        if r["second"] and len({member_leaves[k][0].id for k in r["second"]}) > 1:
            mark([r["leaf"]], "a head dim is split into heads in two ways")
    return roles


def _group_of(r: dict, keys: list, member_leaves: dict, modules: dict) -> Group:
    """The group that cuts the leaf of the roles `r`: channels within each head, whole heads, or channels."""
    leaf = r["leaf"]
    if r["second"]:
        heads_leaf = member_leaves[r["second"][0]][0]
        members = [Member(m, d) for m, d in r["second"]]
        kind = "residual" if "residual" in leaf.flags else "qk" if "contracted" in leaf.flags else "v"
        return Group(name="", kind=kind, unit="channel", size=heads_leaf.size * leaf.size, members=members,
                     heads=heads_leaf.size, head_group=str(heads_leaf.id))
    if r["first"]:
        members = [Member(m, d, math.prod(x.size for x in member_leaves[(m, d)][1:])) for m, d in keys]
        return Group(name="", kind="heads", unit="head", size=leaf.size, members=members)
    members = [Member(m, d) for m, d in keys]
    return Group(name="", kind=_channel_kind(leaf, keys, modules), unit="channel", size=leaf.size, members=members)


def _channel_kind(leaf: Atom, keys: list, modules: dict) -> str:
    """What a plain channel group is, from how the forward used its leaf and which layers it cuts."""
    if "residual" in leaf.flags:
        return "residual"
    if "product" in leaf.flags or "contracted" in leaf.flags:
        return "qk"
    if any(d == 0 and isinstance(modules[m], nn.modules.conv._ConvNd) and
           math.prod(modules[m].kernel_size) > 1 for m, d in keys):
        return "stem"
    return "hidden"


def _add_probes(groups: list[Group], group_leaf: dict, rec: Recorder, member_leaves: dict, model: nn.Module) -> None:
    """Where the spike-aware criterion (importance "firing") reads each group: the outputs of the
    neurons whose channel dim is exactly the group's channels, weighted by the layers reading them."""
    modules = dict(model.named_modules())
    sites: dict[tuple[str, int], list[Atom]] = {}
    for name, dims in rec.neuron_outputs:
        for k, d in enumerate(dims):
            ls = leaves(d)
            if ls:
                sites.setdefault((name, k - len(dims)), ls)  # negative: the same dim at any batch rank
    for g in groups:
        leaf = group_leaf[id(g)]
        probes = []
        for (name, k), ls in sites.items():
            ids = tuple(x.id for x in ls)
            if not _site_is_group(g, leaf, ids):
                continue
            readers = tuple(dict.fromkeys(
                m.module for m in g.members if m.dim == 1 and getattr(modules[m.module], "weight", None) is not None
                and modules[m.module].weight.dim() >= 2
                and tuple(x.id for x in member_leaves[(m.module, 1)]) == ids))
            width = math.prod(x.size for x in ls[1:]) if g.unit == "head" else 1
            probes.append(Probe(name, "output", k, readers, width))
        g.probes = probes
        g.probe_reduce = "prod" if g.kind == "qk" and len(probes) > 1 else "sum"


def _site_is_group(g: Group, leaf: int, ids: tuple) -> bool:
    """Is a neuron output dim made of the leaves `ids` exactly the channels of `g` (whose leaf is `leaf`)?"""
    if g.unit == "head":
        return ids[0] == leaf
    if g.heads > 1:
        return len(ids) == 2 and ids[1] == leaf
    return ids == (leaf,)


def _name_groups(groups: list[Group], group_leaf: dict) -> None:
    taken: set[str] = set()
    by_leaf = {}
    residuals = [g for g in groups if g.kind == "residual"]
    for g in groups:
        prefix = _common_prefix([m.module for m in g.members])
        if g.kind == "residual":
            base = "residual" if len(residuals) == 1 else f"residual{residuals.index(g)}"
        elif g.kind in ("heads", "qk", "v") and (g.unit == "head" or g.heads > 1):
            base = f"{prefix}.{g.kind}" if prefix else g.kind
        else:
            outs = [m.module for m in g.members if m.dim == 0]
            base = outs[0] if outs else g.members[0].module
        name, i = base, 2
        while name in taken:
            name, i = f"{base}.{i}", i + 1
        taken.add(name)
        g.name = name
        by_leaf[str(group_leaf[id(g)])] = name
    for g in groups:
        if g.head_group is not None:
            g.head_group = by_leaf.get(g.head_group)


def _cost_rows(rec: Recorder, model: nn.Module) -> list[CostRow]:
    """One row per weight layer, norm and bare parameter of `model` (in module order), then one per
    matrix product of two activations the forward made."""
    rows = []
    for path, mod in model.named_modules():
        params = [(n, p) for n, p in mod._parameters.items() if p is not None]
        if params:
            rows += _module_rows(rec, path, mod, params)
    for i, (where, macs, atoms, srcs) in enumerate(rec.products):
        factors = leaves(atoms)
        prod = math.prod(f.size for f in factors)
        rows.append(CostRow(f"{where}.matmul{i}" if where else f"matmul{i}", "SpikeMatmul" if srcs else "Matmul", (),
                            False, "spikes" if srcs else "real", tuple(f.id for f in factors), macs / prod, srcs))
    return rows


def _module_rows(rec: Recorder, path: str, mod: nn.Module, params: list) -> list[CostRow]:
    """A conv / linear layer's row (its MACs per unit of its in and out factors, and whether its input
    was spikes), a norm's row, or one row per parameter of any other module."""
    if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) and mod.weight is not None:
        calls = rec.calls.get(path, [])
        macs = sum(c[0] for c in calls)
        factors = [*leaves([rec.member_atoms[(path, 0)]]), *leaves([rec.member_atoms[(path, 1)]])] \
            if (path, 0) in rec.member_atoms and (path, 1) in rec.member_atoms else []
        prod = math.prod(f.size for f in factors)
        spikes = calls and all(c[1] for c in calls)
        return [CostRow(path, type(mod).__name__, tuple(mod.weight.shape), mod.bias is not None,
                        "unused" if not calls else "spikes" if spikes else "real",
                        tuple(f.id for f in factors), macs / prod if prod else 0.0)]
    if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.LayerNorm)) and getattr(mod, "weight", None) is not None \
            and mod.weight.dim() == 1 and set(dict(params)) <= {"weight", "bias"}:
        return [CostRow(path, type(mod).__name__, tuple(mod.weight.shape), getattr(mod, "bias", None) is not None,
                        "real")]
    return [CostRow(path, "Parameter", tuple(p.shape) or (1,), False, "real") for _, p in params]


def _config(model: nn.Module, example: torch.Tensor, outs: list, rec: Recorder, key: str, sizes: dict) -> TracedConfig:
    shape = list(example.shape)
    T = getattr(model, "T", None)
    if type(T) is not int:
        T = max(rec.neuron_calls.values(), default=1)
        T = T if T > 1 else 1
    return TracedConfig(model=f"{type(model).__module__}.{type(model).__qualname__}", key=key,
                        in_channels=shape[1] if len(shape) > 1 else 1, img_size=shape[-1] if len(shape) > 2 else 1,
                        num_classes=outs[0].shape[-1] if outs[0].dim() else 1, T=T, sizes=sizes)


def _trial_kept(g: Group, rng: random.Random) -> list[int]:
    """About half of the group's units, at random (per head for per-head groups)."""
    if g.heads > 1:
        d = g.head_dim
        k = max(1, d // 2)
        return sorted(h * d + i for h in range(g.heads) for i in rng.sample(range(d), k))
    return sorted(rng.sample(range(g.size), max(1, g.size // 2)))


def _spec(key, groups, group_leaf, member_leaves, rec, rows, example, cfg) -> TraceSpec:
    used = {leaf for g in groups for m in g.members for leaf in member_leaves[(m.module, m.dim)]}
    members = {(m.module, m.dim): tuple(x.id for x in member_leaves[(m.module, m.dim)])
               for g in groups for m in g.members}
    bindings = []
    for (module, attr), atoms in rec.bindings:
        ls = leaves(atoms)
        b = Binding(module, attr, tuple(x.id for x in ls))
        if any(x in used for x in ls) and b not in bindings:
            bindings.append(b)
    sizes = _named_leaf_sizes(used, rows, members, bindings, member_leaves, rec)
    glf = {g.name: group_leaf[id(g)] for g in groups}
    spec = TraceSpec(key, groups, sizes, glf, members, bindings, rows, example, cfg, {g.name: g.size for g in groups})
    cfg.sizes = {g.name: g.size for g in groups}
    cfg.layers = cost_table(spec, sizes)
    return spec


def _named_leaf_sizes(used: set, rows: list, members: dict, bindings: list, member_leaves: dict,
                      rec: Recorder) -> dict[int, int]:
    """Leaf id -> its dense size, for every leaf the groups, the cost rows, the members and the
    bindings name (in that order)."""
    sizes = {x.id: x.size for x in used}
    for r in rows:
        for f in r.factors:
            sizes.setdefault(f, 1)
    for leaf_ids in members.values():
        for i in leaf_ids:
            sizes.setdefault(i, 1)
    for b in bindings:
        for i in b.leaves:
            sizes.setdefault(i, 1)
    # dense sizes of every leaf named anywhere
    all_leaves = {x.id: x.size for ls in member_leaves.values() for x in ls}
    for atoms in (a for _, a in rec.bindings):
        all_leaves.update({x.id: x.size for x in leaves(atoms)})
    for _, _, atoms, _ in rec.products:
        all_leaves.update({x.id: x.size for x in leaves(atoms)})
    return {i: all_leaves.get(i, n) for i, n in sizes.items()}


def trace(model: nn.Module, example_input: torch.Tensor, verify: bool = True) -> Trace:
    """Find the coupled groups of `model` by recording its forward on `example_input` (a batch, e.g.
    [B, C, H, W] images). Each group found is proven by pruning it alone (verify=False skips that:
    only for exploring; the proof after every prune still runs). A model of no registered family
    becomes a traced model (its `family` is "traced"): spikeprune.groups / prune / measure and the
    policies then work on it. A model of a registered family is only analysed (its family stays)."""
    if not isinstance(model, nn.Module):
        raise SpikepruneError(f"trace takes an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise SpikepruneError("trace needs an example input: a floating-point tensor batch the model takes")
    example = example_input.detach()
    fam = getattr(model, "family", None)
    own_family = isinstance(fam, str) and fam != FAMILY
    if own_family:
        get_family(model)  # a clear error for a model that claims an unregistered family
    rec, outs = _record(model, example)
    groups, group_leaf, member_leaves, unprunable = _candidates(rec, model)
    _name_groups(groups, group_leaf)
    _add_probes(groups, group_leaf, rec, member_leaves, model)
    rows = _cost_rows(rec, model)
    key = uuid.uuid4().hex
    cfg = _config(model, example, outs, rec, key, {})
    spec = _spec(key, groups, group_leaf, member_leaves, rec, rows, example.clone(), cfg)
    if verify:
        rng = random.Random(PROOF_SEED)
        failed = {}
        for g in spec.groups:
            if g.size < 2:
                continue
            try:
                prune_units(model, spec, {g.name: _trial_kept(g, rng)})
            except SpikepruneError as e:
                failed[g.name] = str(e)
        if failed:
            for g in groups:
                if g.name in failed:
                    unprunable += [(m, failed[g.name]) for m in g.layers]
            kept_groups = [g for g in groups if g.name not in failed]
            for g in kept_groups:
                if g.head_group in failed:
                    g.head_group = None
            spec = _spec(key, kept_groups, group_leaf, member_leaves, rec, rows, example.clone(), cfg)
    unprunable = list(dict.fromkeys(unprunable))
    spec.unprunable = list(unprunable)
    if not own_family:
        attach(model, spec)
        remember(model, spec)
    return Trace([_with_sizes(g, model) for g in spec.groups], unprunable, spec)


def _with_sizes(g: Group, model: nn.Module) -> Group:
    g = copy.deepcopy(g)
    modules = dict(model.named_modules())
    seen = {}
    for m in g.members:
        for pname, p in modules[m.module].named_parameters(recurse=False):
            if p.dim() > m.dim:
                seen[f"{m.module}.{pname}"] = p.numel()
    g.params = sum(seen.values())
    g.memory_bytes = 4 * g.params
    return g
