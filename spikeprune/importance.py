"""Importance criteria: one score per unit (channel or head) of a coupled group; low scores go first.

Criteria, by name:
  l2      the seeds' criterion: L2 norm of the group's filter weights (Conv / Linear slices --
          output filters *and* the input columns that read them; BatchNorm is left to `bn`).
  l1      the same with absolute sums.
  bn      |gamma| of the group's BatchNorm entries (network-slimming style).
  taylor  first-order Taylor: sum over the group's parameter slices of |w * dL/dw|, with the
          gradient of the cross-entropy averaged over a few calibration batches (needs data).
  random  seeded uniform scores: a floor for comparisons.
  firing  ours, spike-aware (needs data): how much signal a unit actually sends downstream,
          mean |activation| of the unit on calibration data times the L2 norm of the weight
          columns that read it. A channel that never fires scores exactly 0, whatever its
          weights, because it contributes nothing downstream. Where nothing reads a unit
          through weights (q and k meet in the attention product) the rates of q and k are
          multiplied: silent in either means no contribution.

How a group combines its members (every criterion but random): each member slice (or probe)
gives a raw score per unit; each member's scores are divided by their own mean, so a big layer
(rpe_conv, D*D*9) does not drown a small one (the head), and every coupled layer gets an equal
say; the normalised scores are summed over members. For l2 the raw score is the squared norm and
the sum is square-rooted at the end: the group score is a normalised group L2 norm, as in
Torch-Pruning's GroupMagnitudeImportance. A member whose scores are all zero adds zeros.
For the `heads` group one unit covers head_dim channels of each member; their scores are summed.
"""
from __future__ import annotations

import zlib
from typing import Iterable, Iterator

import torch
from torch import nn
import torch.nn.functional as F

from .errors import SpikepruneError
from .groups import Group, Member, groups as model_groups

CRITERIA = ("l2", "l1", "bn", "taylor", "random", "firing")
DATA_CRITERIA = ("taylor", "firing")
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def score(model: nn.Module, group_name: str, criterion: str = "l2", data=None, **kw) -> torch.Tensor:
    """Scores [group.size] (float64, CPU) of one group's units; see `scores` for the arguments."""
    return scores(model, criterion, data, names=[group_name], **kw)[group_name]


def scores(model: nn.Module, criterion: str = "l2", data=None, names: Iterable[str] | None = None,
           batches: int = 4, batch_size: int = 32, seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Scores of every group (or of `names`) under `criterion`, one data pass for all of them.

    data: calibration data for taylor / firing -- a dataset spec string (its "calib" split is
    used), a Dataset, a DataLoader (or any iterable of (images, labels) batches), an
    (images, labels) pair of tensors, or (firing only) a tensor of images. `batches` batches of
    `batch_size` are read.
    """
    if criterion not in CRITERIA:
        raise SpikepruneError(f"unknown importance criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    all_groups = {g.name: g for g in model_groups(model)}
    names = list(all_groups) if names is None else list(names)
    unknown = [n for n in names if n not in all_groups]
    if unknown:
        raise SpikepruneError(f"unknown group(s) {unknown}; this model has: {_short_list(all_groups)}")
    chosen = [all_groups[n] for n in names]
    if criterion in DATA_CRITERIA and data is None:
        raise SpikepruneError(
            f"the {criterion!r} criterion needs calibration data: pass data= (a dataset spec such as "
            "'mnist5k', a Dataset or a DataLoader), or --data on the command line; or use l2, l1, bn or random")

    if criterion == "random":
        return {g.name: _random(g, seed) for g in chosen}
    modules = dict(model.named_modules())
    if criterion == "firing":
        acts = _mean_activations(model, chosen, data, batches, batch_size, progress)
        return {g.name: _firing(g, modules, acts) for g in chosen}
    grads = _taylor_grads(model, chosen, data, batches, batch_size, progress) if criterion == "taylor" else None
    return {g.name: _magnitude(g, modules, criterion, grads) for g in chosen}


def _short_list(groups: dict) -> str:
    names = list(groups)
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


# ------------------------------------------------------------------------------------------------
# Weight-based criteria (l2, l1, bn, taylor)
# ------------------------------------------------------------------------------------------------
def _per_channel(t: torch.Tensor, dim: int, how: str) -> torch.Tensor:
    """Reduce every slice of `t` along `dim` to one number: squared L2 norm or L1 norm.

    Reduced in the tensor's own dtype (no float64 copy of a 2.4M-weight layer: that made scoring
    spikformer-8-512 take seconds), then returned as float64 for the group arithmetic."""
    others = [d for d in range(t.dim()) if d != dim]
    t = t.detach()
    if not others:
        r = t.abs() if how == "abs" else t * t
    else:
        r = torch.linalg.vector_norm(t, ord=1 if how == "abs" else 2, dim=others)
        r = r if how == "abs" else r * r
    return r.to(torch.float64).cpu()


def _to_units(r: torch.Tensor, g: Group, m: Member) -> torch.Tensor:
    """Channel scores of a member -> unit scores (a head covers unit_width channels)."""
    return r.view(g.size, m.unit_width).sum(1) if m.unit_width > 1 else r


def _member_raw(m: Member, module: nn.Module, criterion: str, grads: dict | None) -> torch.Tensor | None:
    if criterion in ("l2", "l1"):
        if not isinstance(module, _WEIGHTED):
            return None
        return _per_channel(module.weight, m.dim, "sq" if criterion == "l2" else "abs")
    if criterion == "bn":
        return module.weight.detach().abs().to(torch.float64) if isinstance(module, _BN) and module.affine else None
    # taylor: every parameter slice of the member, |w * g| summed per channel
    total = None
    for pname, p in module.named_parameters(recurse=False):
        if p.dim() <= m.dim:
            continue  # a bias has no input dim
        g = grads.get(p)
        if g is None:
            continue
        r = _per_channel(p.detach() * g, m.dim, "abs")
        total = r if total is None else total + r
    return total


def _normalised_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros_like(parts[0])
    for r in parts:
        mean = r.mean()
        out += r / mean if mean > 0 else r
    return out


def _magnitude(g: Group, modules: dict, criterion: str, grads: dict | None) -> torch.Tensor:
    parts = []
    for m in g.members:
        r = _member_raw(m, modules[m.module], criterion, grads)
        if r is not None:
            parts.append(_to_units(r, g, m))
    if not parts:
        raise SpikepruneError(f"criterion {criterion!r} finds nothing to score in group {g.name} "
                              f"(layers {g.layers}); pick another criterion")
    s = _normalised_sum(parts)
    return s.sqrt() if criterion == "l2" else s


def _random(g: Group, seed: int) -> torch.Tensor:
    # The group name joins the seed so that groups of equal size do not get equal rankings.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(g.name.encode()))
    return torch.rand(g.size, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Calibration data
# ------------------------------------------------------------------------------------------------
def calibration_batches(model: nn.Module, data, batches: int, batch_size: int,
                        need_labels: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield up to `batches` (images, labels) on the model's device and dtype, from any data form."""
    p = next(model.parameters())
    if isinstance(data, torch.Tensor):
        if need_labels:
            raise SpikepruneError("a tensor of images has no labels; taylor needs (images, labels) or a dataset")
        source = ((data[i:i + batch_size], None) for i in range(0, len(data), batch_size))
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        source = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    else:
        from torch.utils.data import DataLoader, Dataset

        if isinstance(data, str):
            from .data import dataset_for_model

            data = dataset_for_model(data, model, "calib")
        if isinstance(data, Dataset):
            from .data import make_loader

            data = make_loader(data, batch_size, shuffle=False)
        if not isinstance(data, (DataLoader, Iterable)):
            raise SpikepruneError(f"cannot read calibration data from a {type(data).__name__}; pass a dataset "
                                  "spec, a Dataset, a DataLoader or (images, labels) tensors")
        source = ((b[0], b[1]) if isinstance(b, (tuple, list)) else (b, None) for b in data)
    n = 0
    for images, labels in source:  # (names unlike x / y above: the generators read those lazily)
        if n >= batches:
            break
        yield images.to(p.device, p.dtype), (None if labels is None else torch.as_tensor(labels).to(p.device))
        n += 1
    if n == 0:
        raise SpikepruneError("the calibration data is empty")


def _progress(it, total: int, desc: str, on: bool):
    if not on:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


def _taylor_grads(model, chosen, data, batches, batch_size, progress) -> dict:
    """Mean gradient of the cross-entropy over the calibration batches, for the groups' params.

    Uses autograd.grad, so the model's own .grad fields are left alone; eval mode, so the
    BatchNorm running statistics are not updated either."""
    modules = dict(model.named_modules())
    params = list({id(p): p for g in chosen for m in g.members
                   for p in modules[m.module].parameters(recurse=False) if p.requires_grad}.values())
    if not params:
        raise SpikepruneError("taylor needs parameters with requires_grad=True in the groups scored")
    was_training = model.training
    model.eval()
    total = [torch.zeros_like(p) for p in params]
    n = 0
    try:
        for x, y in _progress(calibration_batches(model, data, batches, batch_size, True), batches, "taylor", progress):
            if y is None:
                raise SpikepruneError("taylor needs labelled calibration data (images, labels)")
            loss = F.cross_entropy(model(x), y)
            for acc, gr in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if gr is not None:
                    acc += gr
            n += 1
    finally:
        model.train(was_training)
    return {p: t / n for p, t in zip(params, total)}


def _mean_activations(model, chosen, data, batches, batch_size, progress) -> dict:
    """Mean |activation| per channel at every probe of the chosen groups, over calibration data."""
    modules = dict(model.named_modules())
    sites = {(p.module, p.side, p.channel_dim) for g in chosen for p in g.probes}
    sums: dict = {}
    counts: dict = {}

    def record(key, t):
        t = t.detach().abs().to(torch.float64).movedim(key[2], -1)
        c = t.shape[-1]
        s = t.reshape(-1, c).sum(0)
        sums[key] = sums[key] + s if key in sums else s
        counts[key] = counts.get(key, 0) + t.numel() // c

    handles = []
    for key in sites:
        mod = modules[key[0]]
        if key[1] == "input":
            handles.append(mod.register_forward_pre_hook(lambda _m, args, key=key: record(key, args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda _m, _a, out, key=key: record(key, out)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in _progress(calibration_batches(model, data, batches, batch_size, False), batches, "firing", progress):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: (sums[k] / counts[k]).cpu() for k in sums}


def _column_norms(module: nn.Module) -> torch.Tensor:
    """L2 norm of each input column of a Conv / Linear weight (over outputs and kernel)."""
    w = module.weight.detach().to(torch.float64)
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).cpu()


def _firing(g: Group, modules: dict, acts: dict) -> torch.Tensor:
    parts = []
    for p in g.probes:
        r = acts[(p.module, p.side, p.channel_dim)].clone()
        if p.weights:
            r *= torch.stack([_column_norms(modules[w]) ** 2 for w in p.weights]).sum(0).sqrt()
        parts.append(r.view(-1, p.unit_width).sum(1) if p.unit_width > 1 else r)
    if g.probe_reduce == "prod":
        out = parts[0]
        for r in parts[1:]:
            out = out * r
        return out
    return _normalised_sum(parts)
