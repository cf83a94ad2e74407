"""BatchNorm folding, the input normalisation folded in front of the graph, and the float64 proof
that folding keeps the model's function (see spikeprune.deploy for the whole export)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data import NORMALISATION
from ..errors import SpikepruneError
from ..models import get_family
from ..neuron import plain_ops
from ..quantise import apply_plan

INPUTS = ("raw", "normalised")  # what the file's `images` input takes


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


class RawInput(nn.Module):
    """`model` behind its input normalisation: forward(pixels in [0, 1]) = model((pixels - mean) / std).
    Exported, this is a Sub and a Div in front of the graph (not folded into the first conv: its
    zero padding is zero in normalised units, which raw pixels cannot express)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        c = model.cfg.in_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, images):
        return self.model((images - self.mean) / self.std)


def resolve_normalisation(normalisation, data, in_channels: int) -> tuple[tuple, tuple, str] | None:
    """(mean, std, where from) of the model's input normalisation, or None when nothing says it:
    `normalisation` (a dataset name such as "mnist5k", or (mean, std)) first, else the check
    data's (a dataset spec, or a Dataset with mean / std)."""
    if normalisation is not None:
        if isinstance(normalisation, str):
            kind = normalisation.split(":", 1)[0]
            if kind not in NORMALISATION:
                raise SpikepruneError(f"no normalisation is known for {normalisation!r}; give a dataset name "
                                      f"({', '.join(NORMALISATION)}) or (mean, std)")
            mean, std = NORMALISATION[kind]
            where = f"the {kind} normalisation"
        else:
            try:
                mean, std = (tuple(float(v) for v in part) for part in normalisation)
            except (TypeError, ValueError):
                raise SpikepruneError(f"normalisation is a dataset name or (mean, std) per channel, got "
                                      f"{normalisation!r}") from None
            where = "the normalisation given"
    elif isinstance(data, str):
        kind = data.split(":", 1)[0]
        if kind not in NORMALISATION:
            return None
        mean, std = NORMALISATION[kind]
        where = f"the {kind} normalisation (from the check data)"
    elif hasattr(data, "mean") and hasattr(data, "std") and isinstance(data.mean, torch.Tensor):
        mean, std = tuple(data.mean.flatten().tolist()), tuple(data.std.flatten().tolist())
        where = f"the {getattr(data, 'name', 'check data')} normalisation (from the check data)"
    else:
        return None
    if len(mean) != in_channels or len(std) != in_channels:
        raise SpikepruneError(f"the normalisation has {len(mean)} channel(s) but the model takes {in_channels}")
    if any(not (s > 0) for s in std):
        raise SpikepruneError(f"the normalisation's std must be positive, got {std}")
    return tuple(mean), tuple(std), where


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


def export_reference(model: nn.Module, plan: dict[str, str]) -> nn.Module:
    """The PyTorch model a file written at `plan` computes, BatchNorm folded: the int8 / int4 layers
    put on their grid first (per-channel symmetric rounding commutes with folding, so the folded
    weights stay on it and the file's rounding of them is exact), then folded, then the fp16 layers
    rounded (their rounding does not commute with folding, so it is done after, as the file does)."""
    ints = {name: (p if p in ("int8", "int4") else "fp32") for name, p in plan.items()}
    on_grid = apply_plan(copy.deepcopy(model).eval(), ints)
    folded, _, _ = fold_batchnorm(on_grid)
    folded = apply_plan(folded, plan)
    if set(plan.values()) == {"fp16"}:  # the file then stores every parameter as float16 (graph.reduce_precision)
        with torch.no_grad():
            for p in folded.parameters():
                p.copy_(p.to(torch.float16).to(p.dtype))
    return folded.eval()
