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

import fnmatch
import os
import warnings
import zlib
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from . import distributed
from .data import dataset_for_model, make_loader
from .errors import SpikepruneError
from .validation import renamed_arguments
from .coupling import groups as model_groups
from .hashing import fingerprint, model_hash
from .importance import CRITERIA, DATA_CRITERIA, scores
from .costs import count_params, memory_bytes
from .ratios import DEFAULT_SENSITIVITY_RATIOS, parse_ratios
from .stats import resolution_warning
from .surgery import SpikepruneWarning, prune
# The table and the staged cache live in modules of their own; their names stay importable from here.
from .sensitivity_table import (COLUMNS, FORMAT_VERSION, HEADER_TAG, SensitivityTable,  # noqa: F401
                                _describe_mismatch, _read_csv, _RowWriter, cost_summary)
from .staged_cache import (CACHE_LIMIT_BYTES, DenseCache, Packed, _log, run_from, run_stage,  # noqa: F401
                           stage_names, start_stage)


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
    ratios = _checked(ratios, importance, batch_size)
    was_training = model.training
    model.eval()
    try:
        model = model.to(device)
        chosen = _resolve_groups(model, groups)
        ds = _calib_dataset(model, data, split)
        fields = {"version": FORMAT_VERSION, "model": model_hash(model), "data": getattr(ds, "name", str(data)),
                  "split": getattr(ds, "split", split), "n": len(ds), "groups": _names(chosen), "ratios": list(ratios),
                  "importance": importance, "round_to": round_to, "seed": seed, "batch_size": batch_size,
                  "calib_batches": _data_batches(importance, calib_batches)}
        fp = fingerprint(fields)  # what a resumed table must have been made with
        path = Path(output) if output is not None else None
        old_meta, done, torn = distributed.from_main(  # rank 0 reads the table; every process gets it
            lambda: _existing_rows(path, fp, fields, force, log), "reading the sensitivity table")
        todo = [(g, r) for g in chosen for r in ratios if (g.name, r) not in done]
        meta, rows_by_key, spent, computed = (dict(old_meta) if old_meta else {}), dict(done), 0.0, 0
        if todo:
            loader = make_loader(ds, batch_size, shuffle=False)
            cache = DenseCache(model, loader, {start_stage(g.name, model) for g, _ in todo}, device,
                               cache_limit_bytes, progress, log)
            meta = _resumed_meta(_table_meta(model, cache, fp, fields, chosen), old_meta, path, log)
            writer = _writer(path, meta, done, rewrite=old_meta is None or torn)
            if done:
                log(f"sensitivity: resuming {path}: {len(done)} rows reused, {len(todo)} to compute")
            score_map = scores(model, importance, ds if _data_batches(importance, 1) else None,
                               names=sorted({g.name for g, _ in todo}), batches=calib_batches,
                               batch_size=min(batch_size, 64), seed=seed, progress=False)
            bar = tqdm(total=len(chosen) * len(ratios), initial=len(done), desc="sensitivity", leave=True,
                       disable=not progress)
            rows = _Rows(model, cache, meta, score_map, rows_by_key, writer, seed, round_to, on_row,
                         bar if progress else None)
            spent, computed = rows.compute(todo)
            if writer and distributed.active():  # the file in the one-process order
                SensitivityTable(meta["dense_top1"], [rows_by_key[(g.name, r)] for g in chosen for r in ratios],
                                 meta=meta).to_csv(path)
            if cache.nbytes():
                log(f"sensitivity: cached {cache.nbytes() / 2**20:.1f} MiB of activations for {cache.n} images")
        return _table(meta, [rows_by_key[(g.name, r)] for g in chosen for r in ratios], spent, computed, log)
    finally:
        model.train(was_training)


def _table(meta: dict, rows: list[dict], spent: float, computed: int, log: Callable) -> SensitivityTable:
    table = SensitivityTable(dense_top1=float(meta["dense_top1"]), rows=rows, meta=meta,
                             forward_cost=cost_summary(meta, rows, spent, computed),
                             warnings=list(meta.get("warnings", [])))
    for w in table.warnings:
        log(f"sensitivity: warning: {w}")
    return table


def _names(groups_: list) -> list[str]:
    return [g.name for g in groups_]


def _checked(ratios, importance: str, batch_size) -> tuple[float, ...]:
    """The ratio grid, after the cheap checks of analyze()'s arguments."""
    ratios = parse_ratios(ratios)
    if importance not in CRITERIA:
        raise SpikepruneError(f"unknown importance {importance!r}; choose one of {', '.join(CRITERIA)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpikepruneError(f"batch size must be a positive integer, got {batch_size!r}")
    return ratios


def _data_batches(importance: str, calib_batches: int) -> int | None:
    """How many batches the criterion reads (None: it reads no data)."""
    return calib_batches if importance in DATA_CRITERIA else None


def _writer(path: Path | None, meta: dict, done: dict, rewrite: bool):
    """What appends the rows to the table's file (rank 0's), or None without a file."""
    return _RowWriter(path, meta, list(done.values()), rewrite=rewrite) if path and distributed.is_main() else None


def _resumed_meta(new_meta: dict, old_meta: dict | None, path, log: Callable) -> dict:
    """The header of a table this run computes rows for: a resumed table keeps its dense top-1."""
    if not old_meta:
        return new_meta
    if old_meta.get("dense_top1") != new_meta["dense_top1"]:
        log(f"sensitivity: warning: the dense calibration top-1 is {new_meta['dense_top1']} now but "
            f"{old_meta['dense_top1']} in {path}; the computation is not bit-reproducible here (e.g. another thread "
            "count)")
    return {**new_meta, "dense_top1": old_meta["dense_top1"]}


class _Rows:
    """The rows this run computes: each candidate pruned from the dense model and measured from the
    cache (or copied from an equal one), written and reported as it is done."""

    def __init__(self, model, cache: DenseCache, meta: dict, score_map: dict, rows_by_key: dict, writer,
                 seed: int, round_to: int, on_row, bar):
        self.model, self.cache, self.meta, self.score_map = model, cache, meta, score_map
        self.rows_by_key, self.writer, self.seed, self.round_to = rows_by_key, writer, seed, round_to
        self.on_row, self.bar = on_row, bar

    def compute(self, todo: list) -> tuple[float, int]:
        """Compute this process's share of `todo`; returns (image-block passes spent, rows computed)."""
        cache, model = self.cache, self.model
        spent, computed = cache.units_from(0) * cache.n, 0

        def received(row):  # a row another process computed (several processes)
            self._written(row)

        # several processes: each computes whole groups (a ratio may copy a smaller one's row)
        share = distributed.share_by_group(
            todo, lambda c: c[0].name, lambda c: cache.units_from(cache.best_point(start_stage(c[0].name, model))),
            lambda c: (c[0].name, c[1]), self.rows_by_key, received, "exchanging sensitivity rows")
        for g, r in share:
            row, cost = self.row(g, r)
            self.rows_by_key[(g.name, r)] = row
            spent += cost
            computed += 1
            self._written(row)
            if self.on_row:
                self.on_row(row)
        if self.bar:
            self.bar.close()
        if distributed.active():  # every row of the run, wherever it was computed
            computed = len(todo)
            spent = cache.units_from(0) * cache.n + sum(self.rows_by_key[(g.name, r)]["cost"] for g, r in todo)
        return spent, computed

    def _written(self, row: dict) -> None:
        if self.writer:
            self.writer.append(row)
        if self.bar:
            self.bar.update(1)

    def row(self, g, r: float) -> tuple[dict, float]:
        """Group `g` alone pruned at ratio `r`, measured from its first changed stage: (row, its cost)."""
        cache, meta = self.cache, self.meta
        torch.manual_seed(_row_seed(self.seed, g.name, r))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpikepruneWarning)  # a clamped ratio shows in kept/removed
            pruned = prune(self.model, {g.name: r}, importance={g.name: self.score_map[g.name]},
                           round_to=self.round_to).eval()
        kept = pruned.pruning.kept_counts()[g.name]
        start = start_stage(g.name, self.model)
        point = cache.best_point(start)
        twin = next((x for x in self.rows_by_key.values() if x["group"] == g.name and x["kept"] == kept), None)
        dense_top1 = meta["dense_top1"]
        if kept == g.size:
            top1, cost = dense_top1, 0.0  # nothing removed: the dense model itself
        elif twin is not None:
            top1, cost = twin["top1"], 0.0  # the same kept count: the same model
        else:
            top1 = cache.accuracy(pruned, start)
            cost = cache.units_from(point) * cache.n
        pm = int(memory_bytes(pruned)["fp32"])
        return {"group": g.name, "ratio": r, "kept": kept, "removed": g.size - kept, "size": g.size,
                "top1": top1, "acc_drop": round((dense_top1 - top1) * 100, 6),
                "params_saved": meta["dense_params"] - int(count_params(pruned)),
                "memory_saved_bytes": meta["dense_memory_bytes"] - pm,
                "memory_saved_frac": round((meta["dense_memory_bytes"] - pm) / meta["dense_memory_bytes"], 8),
                "start": cache.names[point], "cost": round(cost, 4),
                "full_cost": round(cache.units_from(0) * cache.n, 4)}, cost


__all__ = ["CACHE_LIMIT_BYTES", "COLUMNS", "DenseCache", "FORMAT_VERSION", "HEADER_TAG", "Packed", "SensitivityTable",
           "analyze", "cost_summary", "run_from", "run_stage", "stage_names", "start_stage"]
