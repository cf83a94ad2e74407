"""Pruning ratios: the grids the analyses sweep, parsing them from the command line, and the
uniform ratio map (the same ratio for every channel group)."""
from __future__ import annotations

import fnmatch

from torch import nn

from .errors import SpikepruneError
from .coupling import groups as model_groups

DEFAULT_SENSITIVITY_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)  # 5 points: enough for a curve, cheap enough for the demo
UNIFORM_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the uniform sweep's ratios


def parse_ratios(value, what: str = "--ratios") -> tuple[float, ...]:
    """A ratio grid from "0.1,0.3,0.5" or a sequence: sorted, unique, every value in [0, 1)."""
    items = [s for s in value.replace(" ", "").split(",") if s] if isinstance(value, str) else list(value)
    if not items:
        raise SpikepruneError(f"{what} is empty; give fractions to remove, e.g. 0.1,0.3,0.5")
    out = []
    for s in items:
        try:
            r = float(s)
        except (TypeError, ValueError):
            raise SpikepruneError(f"{what}: {s!r} is not a number; give fractions in [0, 1), e.g. 0.1,0.3,0.5") from None
        if not (0.0 <= r < 1.0):  # also refuses NaN
            raise SpikepruneError(f"{what}: {s} is outside [0, 1); a ratio is the fraction of a group's units to "
                                  "remove (1 would remove all of them)")
        out.append(r)
    return tuple(sorted(set(out)))


def uniform_ratio_map(model: nn.Module, ratio: float, skip=()) -> dict[str, float]:
    """The same ratio for every channel group: PSViT's step 1, "uniform channel-wise filter
    pruning", prunes every layer's output filters by one ratio, and every Conv / Linear output
    belongs to exactly one channel group (unit "channel", whatever the family calls its kinds).
    Groups of whole heads are left out: the per-head channel groups already thin every head, and
    removing heads as well would prune twice."""
    skip = list(skip)
    names = [g.name for g in model_groups(model) if g.unit == "channel"]
    for pat in skip:
        if not fnmatch.filter(names, pat):
            raise SpikepruneError(f"--skip {pat!r} matches no channel group; groups are: {', '.join(names[:10])} ...")
    return {n: ratio for n in names if not any(fnmatch.fnmatch(n, pat) for pat in skip)}
