"""The sensitivity table (one row per group and ratio, spikeprune.sensitivity's result) and its
resumable CSV file: a `# spikeprune-sensitivity {json}` header line with the run's fingerprint and
settings, then a CSV header and the rows, appended and flushed as they are computed (a torn last
line from a kill is dropped when read)."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpikepruneError
from .serialization import atomic_path

HEADER_TAG = "# spikeprune-sensitivity"
FORMAT_VERSION = 1
COLUMNS = ["group", "ratio", "kept", "removed", "size", "top1", "acc_drop", "params_saved",
           "memory_saved_bytes", "memory_saved_frac", "start", "cost", "full_cost"]
_INT_COLUMNS = {"kept", "removed", "size", "params_saved", "memory_saved_bytes"}
_STR_COLUMNS = {"group", "start"}


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


__all__ = ["COLUMNS", "FORMAT_VERSION", "HEADER_TAG", "SensitivityTable", "cost_summary"]
