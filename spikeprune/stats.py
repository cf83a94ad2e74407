"""How far a top-1 measured on n images can be trusted.

The top-1 on n images is a binomial proportion with standard error sqrt(p (1 - p) / n). Two
figures closer than two standard errors of their difference cannot be told apart; a drop smaller
than one standard error cannot be told from which images happened to be drawn.
"""
from __future__ import annotations

import math


def top1_standard_error(top1: float, n: int) -> float:
    """Standard error of a top-1 (a fraction) measured on n images, as a fraction. An accuracy of
    exactly 0 or 1 still has counting noise: the variance is at least 1 / n."""
    p = min(max(float(top1), 0.0), 1.0)
    n = max(int(n), 1)
    return math.sqrt(max(p * (1 - p), 1.0 / n) / n)


def differ(a: float, b: float, n_a: int, n_b: int | None = None) -> bool:
    """Do top-1 figures a and b (fractions, on n_a and n_b images) differ by more than two standard
    errors of their difference?"""
    n_b = n_a if n_b is None else n_b
    se = math.hypot(top1_standard_error(a, n_a), top1_standard_error(b, n_b))
    return abs(a - b) > 2 * se


def calib_resolution(n: int, top1: float, points: float = 1.0) -> dict:
    """Can `n` calibration images resolve a drop of `points` top-1 points at accuracy `top1`?

    The split resolves the drop when se <= points / 100 and n >= 100 / points (below that one image
    already moves the accuracy by more than the drop); the images needed are
    max(100 / points, p (1 - p) / (points / 100)^2).
    """
    p = min(max(float(top1), 0.0), 1.0)
    var = max(p * (1 - p), 1.0 / max(n, 1))
    se = math.sqrt(var / max(n, 1))
    step = points / 100.0
    need = int(math.ceil(max(1.0 / step, var / step ** 2) - 1e-6))  # the tolerance absorbs float noise
    return {"n": int(n), "top1": p, "se_points": se * 100, "image_points": 100.0 / max(n, 1),
            "needed": need, "ok": n >= need}


def resolution_warning(n: int, top1: float, points: float = 1.0) -> str | None:
    """The warning text (with the numbers) when `n` images cannot resolve a `points` drop, else None."""
    r = calib_resolution(n, top1, points)
    if r["ok"]:
        return None
    return (f"the calibration split has only {n} images: at a top-1 of {r['top1']:.1%} the standard error of a "
            f"top-1 estimate is {r['se_points']:.2f} points and one image is {r['image_points']:.2f} points, so a "
            f"{points:g}-point drop cannot be told from noise; about {r['needed']:,} images would resolve it. "
            "Decisions on this split are noisy: use a larger calibration split if you can.")


FEW_IMAGES_SE = 0.05  # a top-1 whose standard error exceeds 5 points is flagged where it is printed


def few_images_warning(what: str, n: int, top1: float) -> str | None:
    """The warning text when a top-1 (`what`, e.g. "the test top-1") on `n` images is too noisy to
    mean much (standard error above FEW_IMAGES_SE), else None."""
    se = top1_standard_error(top1, n)
    if se <= FEW_IMAGES_SE:
        return None
    return (f"{what} {top1:.2%} rests on {n} image{'s' if n != 1 else ''} only (standard error {100 * se:.1f} "
            "points): it says little about the model; use more images")
