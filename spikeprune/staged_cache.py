"""The staged forward and its lossless activation cache: what makes the sensitivity analysis cheap.

Pruning a group inside block i leaves everything before block i untouched, so the activations
entering block i are the same for every candidate of that group. One dense pass over the
calibration set stores them (and the inputs of the later stem stages); a candidate then runs only
from its first changed stage to the head (DenseCache.accuracy). Spikes and spike sums are stored
losslessly in the smallest form (Packed): bits, uint8, float16 or as they are. Batches are cached
as the evaluation loader forms them, so a cached run computes bit for bit what a full forward of
the pruned model computes (checked on the first batch). spikeprune.sensitivity (the analysis) and
spikeprune.sensitivity_table (its table and file) build on it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from .costs import layer_table
from .errors import SpikepruneError
from .models import get_family

CACHE_LIMIT_BYTES = 1 << 30  # the dense-pass cache may hold at most this much (1 GiB)


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# The forward pass cut into stages (the model family declares them): a run can start at any
# stage's input. Stage 0 takes the images, the last one returns the logits; `_check_staged`
# verifies on real data that running all stages equals model(images) exactly. A family without a
# staged forward is one stage, "model" (correct, only slower: every candidate runs from the image).
# ------------------------------------------------------------------------------------------------
def stage_names(model: nn.Module) -> list[str]:
    fam = get_family(model)
    return fam.stages(model) if fam.staged else ["model"]


def run_stage(model: nn.Module, s: int, x: torch.Tensor) -> torch.Tensor:
    """Stage `s` of `model` on its input x (images for stage 0, logits out of the last)."""
    fam = get_family(model)
    return fam.run_stage(model, s, x) if fam.staged else model(x)


def run_from(model: nn.Module, start: int, x: torch.Tensor) -> torch.Tensor:
    """Logits of `model` computed from the input `x` of stage `start` onwards."""
    fam = get_family(model)
    if not fam.staged:
        return model(x)
    for s in range(start, len(fam.stages(model))):
        x = fam.run_stage(model, s, x)
    return x


def start_stage(group: str, model: nn.Module) -> int:
    """The first stage a group changes: where a candidate of that group must start running."""
    fam = get_family(model)
    return fam.first_stage(model, group) if fam.staged else 0


# ------------------------------------------------------------------------------------------------
# The lossless activation cache
# ------------------------------------------------------------------------------------------------
class Packed:
    """One cached tensor, stored in the smallest lossless form: bits, uint8, float16 or as is."""

    def __init__(self, x: torch.Tensor):
        x = x.detach().cpu()
        self.shape, self.dtype = tuple(x.shape), x.dtype
        if not x.is_floating_point():
            self.kind, self.data = "raw", x.clone()
        elif bool(((x == 0) | (x == 1)).all()):  # spikes
            self.kind = "bits"
            self.data = np.packbits(x.to(torch.uint8).numpy().reshape(-1))
        elif bool((x == x.round()).all()) and float(x.min()) >= 0 and float(x.max()) <= 255:  # spike sums
            self.kind, self.data = "uint8", x.to(torch.uint8)
        elif torch.equal(x.half().to(x.dtype), x):
            self.kind, self.data = "fp16", x.half()
        else:
            self.kind, self.data = "raw", x.clone()

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) if isinstance(self.data, np.ndarray) else self.data.numel() * self.data.element_size()

    def unpack(self, device: str | torch.device = "cpu") -> torch.Tensor:
        if self.kind == "bits":
            n = int(np.prod(self.shape))
            bits = np.unpackbits(self.data, count=n)
            return torch.from_numpy(bits).to(device=device, dtype=self.dtype).view(self.shape)
        return self.data.to(device=device, dtype=self.dtype).contiguous()


@dataclass
class _Batch:
    labels: torch.Tensor
    inputs: dict = field(default_factory=dict)  # stage index -> Packed input of that stage


class DenseCache:
    """One dense pass over the calibration loader: labels, dense top-1, per-stage MACs, and the
    inputs of the stages candidates start from (within `limit_bytes`)."""

    def __init__(self, model: nn.Module, loader, points: set[int], device: str = "cpu",
                 limit_bytes: int = CACHE_LIMIT_BYTES, progress: bool = True, log: Callable = _log):
        self.model, self.loader, self.device = model, loader, device
        self.names = stage_names(model)
        self.batches: list[_Batch] = []
        self.stage_macs: list[float] = [0.0] * len(self.names)
        self.points: set[int] = set(points) | {0}
        self.n, correct = 0, 0
        n_batches = len(loader)
        it = loader
        if progress:
            it = tqdm(loader, total=n_batches, desc="sensitivity: dense pass", leave=False)
        with torch.no_grad():
            for bi, (images, labels) in enumerate(it):
                images = images.to(device)
                if bi == 0:
                    self._check_staged(images)
                    self.stage_macs = _stage_macs(model, images[:1])
                b = _Batch(torch.as_tensor(labels).cpu())
                x = images
                for s in range(len(self.names)):
                    if s in self.points:
                        b.inputs[s] = Packed(x)
                    x = run_stage(model, s, x)
                if bi == 0:
                    self._fit_budget(b, n_batches, limit_bytes, log)
                    b.inputs = {s: v for s, v in b.inputs.items() if s in self.points}
                correct += int((x.argmax(1).cpu() == b.labels).sum())
                self.n += len(b.labels)
                self.batches.append(b)
        if self.n == 0:
            raise SpikepruneError("the calibration data is empty; nothing to measure sensitivity on")
        self.dense_top1 = correct / self.n

    def _check_staged(self, images: torch.Tensor) -> None:
        """The staged forward must equal the model's own forward bit for bit, or caching is unsound."""
        fam = get_family(self.model)
        if not fam.staged:
            self.points = {0}
            return
        if not torch.equal(run_from(self.model, 0, images), self.model(images)):
            raise SpikepruneError(f"the staged forward of the {fam.name} family (its run_stage) does not equal the "
                                  "model's forward; the sensitivity cache would be unsound, so fix run_stage")

    def _fit_budget(self, first: _Batch, n_batches: int, limit: int, log: Callable) -> None:
        """Drop cache points until the estimate fits `limit`: the images first (the loader can
        serve them again), then stem activations, then block inputs from the shallowest (a deeper
        block's cache saves more per candidate)."""
        est = {s: p.nbytes * n_batches for s, p in first.inputs.items()}
        order = sorted(self.points, key=lambda s: (s != 0, s))
        dropped = []
        while sum(est[s] for s in self.points) > limit and order:
            s = order.pop(0)
            self.points.discard(s)
            dropped.append(self.names[s])
        if dropped:
            log(f"sensitivity: activation cache limited to {limit / 2**20:.0f} MiB; not caching the inputs of "
                f"{', '.join(dropped)} (those candidates run from an earlier point)")

    def nbytes(self) -> int:
        return sum(p.nbytes for b in self.batches for p in b.inputs.values())

    def best_point(self, start: int) -> int:
        """The deepest cached stage input at or before `start` (0, the image, when nothing is)."""
        return max((p for p in self.points if p <= start), default=0)

    def accuracy(self, model: nn.Module, start: int) -> float:
        """Calibration top-1 of `model` (which must equal the dense one before stage `start`)."""
        p = self.best_point(start)
        correct = 0
        with torch.no_grad():
            if p in self.points:
                batches = ((run_from(model, p, b.inputs[p].unpack(self.device)), b.labels) for b in self.batches)
            else:  # images not cached: read them again, in the same batches
                batches = ((run_from(model, 0, images.to(self.device)), torch.as_tensor(labels))
                           for images, labels in self.loader)
            for logits, labels in batches:
                if not bool(torch.isfinite(logits).all()):  # an argmax over NaN would still "classify"
                    raise SpikepruneError("a pruned candidate produced non-finite logits on the calibration data; "
                                          "its accuracy cannot be measured")
                correct += int((logits.argmax(1).cpu() == labels).sum())
        return correct / self.n

    # Cost accounting, in image-block passes (module docstring)
    @property
    def unit_macs(self) -> float:
        blocks = [m for name, m in zip(self.names, self.stage_macs) if name.startswith("block.")]
        return (sum(blocks) / len(blocks)) if blocks and sum(blocks) > 0 else max(sum(self.stage_macs), 1.0)

    def units_from(self, point: int) -> float:
        """Image-block passes of one image run from stage `point` to the end."""
        return sum(self.stage_macs[point:]) / self.unit_macs


class _LayerTrace(TorchFunctionMode):
    """Which layers of the cost table run: weight layers seen through their weights (however
    forward applies them), other modules (e.g. a LIF) through module calls."""

    def __init__(self, by_storage: dict[int, str]):
        super().__init__()
        self.by_storage, self.seen = by_storage, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, F.conv1d, F.conv2d, F.conv3d):
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if w is not None and w.untyped_storage().data_ptr() in self.by_storage:
                self.seen.add(self.by_storage[w.untyped_storage().data_ptr()])
        return func(*args, **kwargs)


def _stage_macs(model: nn.Module, image: torch.Tensor) -> list[float]:
    """MACs per image of each stage (measure.layer_table's definition), each layer attributed to
    the stage in which it runs, traced on one image: a weight layer by its weights, a weightless
    product by the modules its input rate comes from."""
    names = stage_names(model)
    table = layer_table(model)
    modules = dict(model.named_modules())
    by_storage = {modules[r.name].weight.untyped_storage().data_ptr(): r.name for r in table if r.weight_shape}
    called: set[str] = set()
    name_of = {m: n for n, m in modules.items()}
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, _i, _o: called.add(name_of.get(m, "")))
    stage_of: dict[str, int] = {}
    try:
        x = image
        for s in range(len(names)):
            called.clear()
            with _LayerTrace(by_storage) as trace:
                x = run_stage(model, s, x)
            for layer in trace.seen | called:
                stage_of.setdefault(layer, s)
    finally:
        handle.remove()
    macs = [0.0] * len(names)
    for r in table:
        source = r.rate_from[0] if r.rate_from else r.name
        macs[stage_of.get(source, 0)] += r.macs
    return macs


__all__ = ["CACHE_LIMIT_BYTES", "DenseCache", "Packed", "run_from", "run_stage", "stage_names", "start_stage"]
