"""Per-group sensitivity analysis (PSViT step 2): what pruning each group *alone* costs and saves.

The papers speak of the sensitivity of each "layer". A Spikformer layer cannot lose output
channels on its own: its outputs are read by other layers (and, for the residual width, by every
block), so the unit that can be pruned is a coupled group (spikeprune.coupling): `residual`,
`stem.stage1..3`, and per block `attn.qk`, `attn.v`, `attn.heads`, `mlp.hidden`. PSViT's "layer"
is our group. For every analysed group and every ratio of a grid, the group alone is pruned
(spikeprune.prune, the run's importance criterion and round_to) and the calibration top-1 is
measured. A row holds:

    group, ratio, kept, removed, size     units after / removed / before (channels, or heads)
    top1                                  calibration top-1 of the pruned model, a fraction
    acc_drop                              (dense top-1 - top1) * 100: points; negative = better
    params_saved, memory_saved_bytes      against the dense model (fp32 bytes)
    memory_saved_frac                     memory_saved_bytes / the dense model's fp32 bytes
    start, cost, full_cost                where the cached run started, and what the row cost
                                          and would have cost without the cache (see "Cost")

Speed: nothing is computed twice. Pruning a group inside block i leaves everything before block i
untouched, so the activations entering block i are the same for every candidate of that group.
One dense pass over the calibration set stores them (and the inputs of the later stem stages, for
the stem and residual groups); a candidate then runs only from its first changed stage to the
head. The residual stream is a sum of spikes (small non-negative integers) and the stem
activations are spikes, so the cache is lossless and small: bits for spikes, uint8 for spike
sums (float16 / float32 only if a model ever produces other values). Batches are cached exactly
as the evaluation loader forms them, so a cached run computes bit for bit what a full forward of
the pruned model computes (checked on the first batch, and by tests/test_sensitivity.py against
`evaluate`). Candidates that keep the same number of units as an earlier ratio of the same group
are the same model: their row is copied, not recomputed; a ratio that removes nothing costs
nothing. Candidates are not stacked into one batch: each has its own widths, so they cannot
share a matmul, and the reuse happens through the cache instead.

Cost, in image-block passes: one image through one dense block = 1. The stem and the head count
as their share of the dense model's MACs (measure.layer_table) against the mean block (on the
bundled 28x28 model the stem is about 4 blocks: full-resolution 3x3 convolutions). `cost` of a row is
what its cached run spent over the whole calibration set; `full_cost` is a full forward of every
image. `SensitivityTable.forward_cost` adds the one dense caching pass and compares with
recomputing everything: one dense evaluation plus a full forward per candidate.

Resumable: with `output`, the file starts with a `# spikeprune-sensitivity {json}` line that
carries the run's fingerprint (model weights hash, data, split, number of images, groups, ratios,
importance, round_to, seed, batch size), then a CSV header; rows are appended and flushed as they
are computed. A rerun with the same settings reuses the rows and computes only the missing ones
(a torn last line from a kill is dropped); a file from a different run is refused, never mixed,
unless force=True. Rows are computed in a fixed order and each candidate's random state is
seeded from (seed, group, ratio), so an interrupted-then-resumed run ends with the same table as
an uninterrupted one.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import Dataset
from tqdm import tqdm

from . import distributed
from .data import dataset_for_model, make_loader
from .errors import SpikepruneError
from .validation import renamed_arguments
from .coupling import groups as model_groups
from .hashing import fingerprint, model_hash
from .importance import CRITERIA, DATA_CRITERIA, scores
from .costs import count_params, layer_table, memory_bytes
from .models import get_family
from .ratios import DEFAULT_SENSITIVITY_RATIOS, parse_ratios
from .serialization import atomic_path
from .stats import resolution_warning
from .surgery import SpikepruneWarning, prune

CACHE_LIMIT_BYTES = 1 << 30  # the dense-pass cache may hold at most this much (1 GiB)
HEADER_TAG = "# spikeprune-sensitivity"
FORMAT_VERSION = 1
COLUMNS = ["group", "ratio", "kept", "removed", "size", "top1", "acc_drop", "params_saved",
           "memory_saved_bytes", "memory_saved_frac", "start", "cost", "full_cost"]
_INT_COLUMNS = {"kept", "removed", "size", "params_saved", "memory_saved_bytes"}
_STR_COLUMNS = {"group", "start"}


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


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
@dataclass
class SensitivityTable:
    """Rows of single-group pruning results on the calibration split (module docstring).

    dense_top1     the dense model's calibration top-1 (fraction)
    rows           one dict per (group, ratio), in analysis order
    forward_cost   image-block passes spent vs recomputing everything (see `cost_summary`)
    meta           the run's settings and fingerprint, dense sizes, per-group sizes
    warnings       e.g. a calibration split too small to resolve a 1-point drop
    """
    dense_top1: float
    rows: list[dict]
    forward_cost: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(r["group"] for r in self.rows))

    @property
    def ratios(self) -> list[float]:
        return sorted({r["ratio"] for r in self.rows})

    def for_group(self, name: str) -> list[dict]:
        """The rows of one group, by increasing ratio."""
        return sorted((r for r in self.rows if r["group"] == name), key=lambda r: r["ratio"])

    def row(self, group: str, ratio: float) -> dict | None:
        return next((r for r in self.rows if r["group"] == group and abs(r["ratio"] - ratio) < 1e-12), None)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the whole table (header line with the meta, then the rows), atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as f:
                f.write(_header_line(self.meta) + "\n")
                w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
                w.writeheader()
                for r in self.rows:
                    w.writerow(_format_row(r))
        return path

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "SensitivityTable":
        meta, rows, _ = _read_csv(Path(path))
        return cls(dense_top1=float(meta["dense_top1"]), rows=rows, meta=meta,
                   forward_cost=cost_summary(meta, rows, spent_this_run=0.0, computed=0),
                   warnings=list(meta.get("warnings", [])))

    def format(self) -> str:
        """A plain-text table: acc_drop (points) per group and ratio, and memory saved per group."""
        ratios = self.ratios
        head = f"{'group':24s} {'size':>6s} " + " ".join(f"{r:>7.2f}" for r in ratios) + f" {'mem@max':>9s}"
        lines = [f"calibration top-1 of the dense model: {self.dense_top1:.2%} "
                 f"(n={self.meta.get('n', '?')}); accuracy drop in points per ratio:", head]
        for g in self.groups:
            rows = {r["ratio"]: r for r in self.for_group(g)}
            cells = " ".join(f"{rows[r]['acc_drop']:7.2f}" if r in rows else f"{'':7s}" for r in ratios)
            last = self.for_group(g)[-1]
            lines.append(f"{g:24s} {last['size']:6d} {cells} {last['memory_saved_frac']:9.2%}")
        fc = self.forward_cost
        if fc:
            lines.append(f"cost: {fc['spent']:,.0f} image-block passes spent, {fc['full_recompute']:,.0f} to recompute "
                         f"everything ({fc['ratio']:.2f}x fewer); stem = {fc['stem_units']:.2f} blocks")
        return "\n".join(lines)


def cost_summary(meta: dict, rows: list[dict], spent_this_run: float, computed: int) -> dict:
    """Forward cost of the table: the dense caching pass plus every row's cached run, against one
    dense evaluation plus a full forward per candidate."""
    n = int(meta.get("n", 0))
    full = float(meta.get("full_units", 0.0)) * n
    spent = full + sum(float(r["cost"]) for r in rows)  # the dense pass is one full forward
    recompute = full * (1 + len(rows))
    return {
        "unit": "image-block passes (one image through one dense block = 1; the stem and the head count as "
                "their share of the dense model's MACs)",
        "stem_units": float(meta.get("stem_units", 0.0)), "full_forward_units": float(meta.get("full_units", 0.0)),
        "n_images": n, "candidates": len(rows),
        "spent": spent, "full_recompute": recompute, "ratio": recompute / spent if spent else float("nan"),
        "spent_this_run": spent_this_run, "rows_computed_this_run": computed, "rows_reused": len(rows) - computed,
    }


# ------------------------------------------------------------------------------------------------
# CSV persistence (resumable)
# ------------------------------------------------------------------------------------------------
def _header_line(meta: dict) -> str:
    return f"{HEADER_TAG} {json.dumps(meta, sort_keys=True)}"


def _format_row(r: dict) -> dict:
    return {k: (repr(float(r[k])) if k not in _INT_COLUMNS | _STR_COLUMNS else r[k]) for k in COLUMNS}


def _parse_row(d: dict) -> dict:
    out = {}
    for k in COLUMNS:
        v = d[k]
        out[k] = v if k in _STR_COLUMNS else int(v) if k in _INT_COLUMNS else float(v)
    return out


def _read_header(path: Path) -> dict:
    with open(path, newline="") as f:
        first = f.readline()
    if not first.startswith(HEADER_TAG + " "):
        raise SpikepruneError(f"{path} is not a spikeprune sensitivity table (its first line is not "
                              f"'{HEADER_TAG} {{...}}'); choose another file or pass --force to overwrite it")
    try:
        return json.loads(first[len(HEADER_TAG) + 1:])
    except json.JSONDecodeError as e:
        raise SpikepruneError(f"{path}: the header line is damaged ({e}); pass --force to start the table again") from None


def _read_csv(path: Path) -> tuple[dict, list[dict], bool]:
    """(meta, rows, torn): rows parsed; a last line cut short by a kill is dropped (torn=True)."""
    if not path.is_file():
        raise SpikepruneError(f"sensitivity table {path} does not exist")
    meta = _read_header(path)
    text = path.read_text()
    body = text.split("\n", 1)[1] if "\n" in text else ""
    lines = body.split("\n")
    torn = bool(lines and lines[-1] != "")  # the last record has no newline: it was being written
    complete = "\n".join(lines[:-1]) if torn else body
    rows = []
    for d in csv.DictReader(io.StringIO(complete)):
        try:
            rows.append(_parse_row(d))
        except (KeyError, TypeError, ValueError):
            raise SpikepruneError(f"{path}: row {len(rows) + 1} is damaged ({d}); pass --force to start again") from None
    return meta, rows, torn


class _RowWriter:
    """Appends rows to the CSV, flushed and fsynced one at a time, so a kill loses at most one."""

    def __init__(self, path: Path, meta: dict, rows: list[dict], rewrite: bool):
        self.path = path
        if rewrite:  # a new file, or an old one whose torn last line must go
            SensitivityTable(meta["dense_top1"], rows, meta=meta).to_csv(path)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n").writerow(_format_row(row))
            f.flush()
            os.fsync(f.fileno())


def _describe_mismatch(old: dict, new: dict) -> str:
    diffs = [f"{k}: {old.get(k)!r} there vs {new.get(k)!r} now" for k in sorted(new)
             if k != "model" and old.get(k) != new.get(k)]
    if old.get("model") != new.get("model"):
        diffs.insert(0, "the model weights differ")
    return "; ".join(diffs[:4]) or "the settings differ"


# ------------------------------------------------------------------------------------------------
# analyze
# ------------------------------------------------------------------------------------------------
def _resolve_groups(model: nn.Module, patterns) -> list:
    all_groups = model_groups(model)
    names = [g.name for g in all_groups]
    pats = [p for p in (patterns.split(",") if isinstance(patterns, str) else list(patterns)) if p]
    if not pats:
        raise SpikepruneError("no groups given to analyse; use '*' for all of them")
    chosen = set()
    for p in pats:
        hits = fnmatch.filter(names, p)
        if not hits:
            raise SpikepruneError(f"--groups {p!r} matches no group of this model; groups are: {', '.join(names)}")
        chosen.update(hits)
    return [g for g in all_groups if g.name in chosen]


def _calib_dataset(model, data, split: str):
    if isinstance(data, str):
        return dataset_for_model(data, model, split)
    if isinstance(data, Dataset):
        return data
    raise SpikepruneError(f"sensitivity needs a dataset spec (e.g. 'mnist5k') or a Dataset, got {type(data).__name__}")


def _table_meta(model: nn.Module, cache: DenseCache, fp: str, fields: dict, chosen: list) -> dict:
    """The header of a table: fingerprint and settings, the dense model's figures, the cost units."""
    stem = sum(m for name, m in zip(cache.names, cache.stage_macs) if name.startswith("stem"))
    warn = resolution_warning(cache.n, cache.dense_top1)
    return {"fingerprint": fp, "fields": fields, "dense_top1": cache.dense_top1, "n": cache.n,
            "dense_params": int(count_params(model)), "dense_memory_bytes": int(memory_bytes(model)["fp32"]),
            "stage_names": cache.names, "stage_macs": cache.stage_macs, "stem_units": stem / cache.unit_macs,
            "full_units": cache.units_from(0), "group_sizes": {g.name: g.size for g in chosen},
            "warnings": [warn] if warn else []}


def _existing_rows(path: Path | None, fp: str, fields: dict, force: bool, log: Callable) -> tuple[dict | None, dict, bool]:
    """(header meta, rows by (group, ratio), torn last line) of a table this run may resume.

    A table of another run (another fingerprint) or a file that is no table is refused, never
    mixed with this run's rows; with force it is started again."""
    if path is None or not path.exists():
        return None, {}, False
    try:
        meta, rows, torn = _read_csv(path)
        if meta.get("fingerprint") != fp:
            raise SpikepruneError(
                f"{path} holds the sensitivity table of a different run "
                f"({_describe_mismatch(meta.get('fields', {}), fields)}); refusing to mix rows. Choose another "
                "file, or pass --force (force=True) to start it again")
        return meta, {(r["group"], r["ratio"]): r for r in rows}, torn
    except SpikepruneError:
        if not force:
            raise
        log(f"sensitivity: --force: starting {path} again")
        return None, {}, False


def _row_seed(seed: int, group: str, ratio: float) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(f"{group}@{ratio!r}".encode())) % (2**63)


@renamed_arguments(out_csv="output")
def analyze(model: nn.Module, data, groups="*", ratios: Sequence[float] = DEFAULT_SENSITIVITY_RATIOS, importance: str = "l2",
            split: str = "calib", batch_size: int = 128, output: str | os.PathLike | None = None, seed: int = 0,
            device: str = "cpu", progress: bool = True, round_to: int = 1, force: bool = False,
            calib_batches: int = 4, cache_limit_bytes: int = CACHE_LIMIT_BYTES,
            on_row: Callable[[dict], None] | None = None, log: Callable[[str], None] = _log) -> SensitivityTable:
    """Prune each group of `groups` alone at each ratio and measure the calibration top-1.

    model       the dense model (left untouched; evaluated in eval mode)
    data        a dataset spec ("mnist5k", "cifar10:DIR", ...; its `split` is used) or a Dataset
    groups      glob pattern(s), comma-separated string or list ("*": every group)
    ratios      fractions to remove, each in [0, 1)
    importance  the engine's criterion name (l2, l1, bn, taylor, random, firing); the scores are
                computed once per group on the dense model (taylor / firing read `calib_batches`
                batches of the data)
    output      resumable CSV (module docstring); force=True replaces a table of another run
    on_row      called with each row once it is on disk (tests use it to simulate a kill)
    Returns a SensitivityTable; `table.warnings` holds the small-calibration-split warning.
    """
    ratios = parse_ratios(ratios)
    if importance not in CRITERIA:
        raise SpikepruneError(f"unknown importance {importance!r}; choose one of {', '.join(CRITERIA)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpikepruneError(f"batch size must be a positive integer, got {batch_size!r}")
    was_training = model.training
    model.eval()
    try:
        model = model.to(device)
        chosen = _resolve_groups(model, groups)
        ds = _calib_dataset(model, data, split)
        fields = {"version": FORMAT_VERSION, "model": model_hash(model),
                  "data": getattr(ds, "name", str(data)), "split": getattr(ds, "split", split), "n": len(ds),
                  "groups": [g.name for g in chosen], "ratios": list(ratios), "importance": importance,
                  "round_to": round_to, "seed": seed, "batch_size": batch_size,
                  "calib_batches": calib_batches if importance in DATA_CRITERIA else None}
        fp = fingerprint(fields)

        path = Path(output) if output is not None else None
        old_meta, done, torn = distributed.from_main(  # rank 0 reads the table; every process gets it
            lambda: _existing_rows(path, fp, fields, force, log), "reading the sensitivity table")
        todo = [(g, r) for g in chosen for r in ratios if (g.name, r) not in done]

        meta = dict(old_meta) if old_meta else {}
        computed, spent = 0, 0.0
        rows_by_key = dict(done)
        if todo:
            loader = make_loader(ds, batch_size, shuffle=False)
            points = {start_stage(g.name, model) for g, _ in todo}
            cache = DenseCache(model, loader, points, device, cache_limit_bytes, progress, log)
            spent += cache.units_from(0) * cache.n
            new_meta = _table_meta(model, cache, fp, fields, chosen)
            if old_meta and old_meta.get("dense_top1") != cache.dense_top1:
                log(f"sensitivity: warning: the dense calibration top-1 is {cache.dense_top1} now but {old_meta['dense_top1']} "
                    f"in {path}; the computation is not bit-reproducible here (e.g. another thread count)")
            meta = {**new_meta, **({"dense_top1": old_meta["dense_top1"]} if old_meta else {})}
            writer = (_RowWriter(path, meta, list(done.values()), rewrite=(old_meta is None or torn))
                      if path and distributed.is_main() else None)
            if done:
                log(f"sensitivity: resuming {path}: {len(done)} rows reused, {len(todo)} to compute")

            need_data = importance in DATA_CRITERIA
            score_map = scores(model, importance, ds if need_data else None, names=sorted({g.name for g, _ in todo}),
                               batches=calib_batches, batch_size=min(batch_size, 64), seed=seed, progress=False)
            bar = None
            if progress:
                bar = tqdm(total=len(chosen) * len(ratios), initial=len(done), desc="sensitivity", leave=True)
            dense_top1 = meta["dense_top1"]

            def received(row):  # a row another process computed (several processes)
                if writer:
                    writer.append(row)
                if bar:
                    bar.update(1)

            # several processes: each computes whole groups (a ratio may copy a smaller one's row)
            share = distributed.share_by_group(
                todo, lambda c: c[0].name, lambda c: cache.units_from(cache.best_point(start_stage(c[0].name, model))),
                lambda c: (c[0].name, c[1]), rows_by_key, received, "exchanging sensitivity rows")
            for g, r in share:
                torch.manual_seed(_row_seed(seed, g.name, r))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SpikepruneWarning)  # a clamped ratio shows in kept/removed
                    pruned = prune(model, {g.name: r}, importance={g.name: score_map[g.name]}, round_to=round_to).eval()
                kept = pruned.pruning.kept_counts()[g.name]
                start = start_stage(g.name, model)
                point = cache.best_point(start)
                twin = next((x for x in rows_by_key.values() if x["group"] == g.name and x["kept"] == kept), None)
                if kept == g.size:
                    top1, cost = dense_top1, 0.0  # nothing removed: the dense model itself
                elif twin is not None:
                    top1, cost = twin["top1"], 0.0  # the same kept count: the same model
                else:
                    top1 = cache.accuracy(pruned, start)
                    cost = cache.units_from(point) * cache.n
                pm = int(memory_bytes(pruned)["fp32"])
                row = {"group": g.name, "ratio": r, "kept": kept, "removed": g.size - kept, "size": g.size,
                       "top1": top1, "acc_drop": round((dense_top1 - top1) * 100, 6),
                       "params_saved": meta["dense_params"] - int(count_params(pruned)),
                       "memory_saved_bytes": meta["dense_memory_bytes"] - pm,
                       "memory_saved_frac": round((meta["dense_memory_bytes"] - pm) / meta["dense_memory_bytes"], 8),
                       "start": cache.names[point], "cost": round(cost, 4),
                       "full_cost": round(cache.units_from(0) * cache.n, 4)}
                rows_by_key[(g.name, r)] = row
                spent += cost
                computed += 1
                if writer:
                    writer.append(row)
                if bar:
                    bar.update(1)
                if on_row:
                    on_row(row)
            if bar:
                bar.close()
            if distributed.active():  # every row of the run, and the file in the one-process order
                computed = len(todo)
                spent = cache.units_from(0) * cache.n + sum(rows_by_key[(g.name, r)]["cost"] for g, r in todo)
                if writer:
                    SensitivityTable(meta["dense_top1"], [rows_by_key[(g.name, r)] for g in chosen for r in ratios],
                                     meta=meta).to_csv(path)
            if cache.nbytes():
                log(f"sensitivity: cached {cache.nbytes() / 2**20:.1f} MiB of activations for {cache.n} images")
        rows = [rows_by_key[(g.name, r)] for g in chosen for r in ratios]
        table = SensitivityTable(dense_top1=float(meta["dense_top1"]), rows=rows, meta=meta,
                                 forward_cost=cost_summary(meta, rows, spent, computed),
                                 warnings=list(meta.get("warnings", [])))
        for w in table.warnings:
            log(f"sensitivity: warning: {w}")
        return table
    finally:
        model.train(was_training)
