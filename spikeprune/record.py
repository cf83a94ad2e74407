"""The pruning record: what was pruned, as plain data, against the dense model.

Every model that `spikeprune.prune` returns carries one as `model.pruning`:

    family         the model family
    dense_config   the dense model's config_dict(): the widths it descends from
    dense_preset   the dense model's preset name, when it had one
    dense_sizes    every group's unit count in the dense model
    dense_hash     sha256 of the dense model's config and weights (hashing.model_hash), so a replay
                   on a model with other weights is caught; None in records written before it
    kept           group -> sorted indices of the kept units, against the *dense* model; only the
                   groups that lost units (any other group kept all of its units)
    steps          one entry per prune call: importance, round_to, what was asked, notes

Successive prune calls compose the record: the second call's indices refer to the model it was
given, and are mapped back through the first call's kept lists, so a record always answers
"which dense units survive". For per-head channel groups (qk, v) the kept channels are those of
the kept heads only: removing a head removes its channels. `spikeprune.prune(dense, record)`
replays a record on the dense model and rebuilds the same model bit for bit; save_model writes the
record into config.json and load_model restores it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .errors import SpikepruneError

RECORD_FORMAT = 1


@dataclass
class PruningRecord:
    family: str
    dense_config: dict
    dense_sizes: dict[str, int]
    kept: dict[str, list[int]] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    dense_preset: str | None = None
    dense_hash: str | None = None

    # -- reading ------------------------------------------------------------------------------
    def kept_units(self, group: str) -> list[int]:
        """Indices (against the dense model) of the units of `group` that the model keeps."""
        if group not in self.dense_sizes:
            raise SpikepruneError(f"the pruning record has no group {group!r}; its groups are: "
                                  f"{', '.join(self.dense_sizes)}")
        return list(self.kept[group]) if group in self.kept else list(range(self.dense_sizes[group]))

    def kept_counts(self) -> dict[str, int]:
        """Units kept per group, for every group."""
        return {g: len(self.kept[g]) if g in self.kept else n for g, n in self.dense_sizes.items()}

    def removed_fractions(self) -> dict[str, float]:
        """Fraction of the dense units removed, for every group that lost some."""
        return {g: round(1 - len(idx) / self.dense_sizes[g], 6) for g, idx in self.kept.items()}

    @property
    def notes(self) -> list[str]:
        return [n for s in self.steps for n in s.get("notes", [])]

    @property
    def pruned(self) -> bool:
        return bool(self.kept)

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def identity(cls, family: str, config: dict, sizes: dict[str, int], preset: str | None = None,
                 dense_hash: str | None = None) -> "PruningRecord":
        """The record of a model that was never pruned: it is its own dense model."""
        return cls(family=family, dense_config=copy.deepcopy(config), dense_sizes=dict(sizes), dense_preset=preset,
                   dense_hash=dense_hash)

    def compose(self, kept_now: dict[str, list[int]], step: dict) -> "PruningRecord":
        """The record after one more prune call. `kept_now` holds, for every group, the kept unit
        indices against the model this record describes (the input of that call)."""
        counts = self.kept_counts()
        kept = {}
        for g, n_dense in self.dense_sizes.items():
            idx = kept_now.get(g)
            before = self.kept_units(g)
            if idx is None:
                mapped = before
            else:
                if idx and (min(idx) < 0 or max(idx) >= counts[g]):
                    raise SpikepruneError(f"internal: kept indices of {g} exceed its {counts[g]} units")
                mapped = [before[i] for i in sorted(idx)]
            if len(mapped) < n_dense:
                kept[g] = mapped
        return PruningRecord(self.family, copy.deepcopy(self.dense_config), dict(self.dense_sizes), kept,
                             [*copy.deepcopy(self.steps), step], self.dense_preset, self.dense_hash)

    def copy(self) -> "PruningRecord":
        return copy.deepcopy(self)

    # -- plain data -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": RECORD_FORMAT, "family": self.family, "dense_preset": self.dense_preset,
                "dense_hash": self.dense_hash,
                "dense_config": copy.deepcopy(self.dense_config), "dense_sizes": dict(self.dense_sizes),
                "kept": {g: list(v) for g, v in self.kept.items()}, "removed": self.removed_fractions(),
                "kept_counts": self.kept_counts(), "steps": copy.deepcopy(self.steps)}

    @classmethod
    def from_dict(cls, d: dict) -> "PruningRecord":
        """Read a record written by to_dict (the derived `removed` / `kept_counts` are recomputed)."""
        if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
            raise SpikepruneError("this pruning record is not in the format this spikeprune version writes "
                                  f"(format {d.get('format') if isinstance(d, dict) else None!r}, expected {RECORD_FORMAT})")
        try:
            sizes = {str(g): int(n) for g, n in d["dense_sizes"].items()}
            kept = {str(g): [int(i) for i in v] for g, v in d.get("kept", {}).items()}
            rec = cls(family=str(d["family"]), dense_config=dict(d["dense_config"]), dense_sizes=sizes, kept=kept,
                      steps=list(d.get("steps", [])), dense_preset=d.get("dense_preset"),
                      dense_hash=d.get("dense_hash"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SpikepruneError(f"the pruning record is damaged ({type(e).__name__}: {e})") from None
        for g, idx in rec.kept.items():
            n = rec.dense_sizes.get(g)
            if n is None or not idx or idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n:
                raise SpikepruneError(f"the pruning record is damaged: the kept units of {g!r} are not sorted, "
                                      f"unique indices below its dense size {n}")
        return rec
