"""What every family file needs and would otherwise write again: strict config reading, the
pooled image-size rule, and matching a foreign checkpoint's tensors against a model."""
from __future__ import annotations

import copy
from dataclasses import fields

import torch
from torch import nn

from ..errors import SpikepruneError

WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")  # where training scripts keep the weights


def strict_config(cls, d: dict, family: str):
    """`cls(**d)` for a saved config that must spell out every field: an unknown or a missing one is
    an error, never a default (a default img_size would evaluate at the wrong size, silently)."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise SpikepruneError(f"unknown {family} config fields: {unknown}")
    missing = [k for k in known if k not in d]
    if missing:
        raise SpikepruneError(f"the {family} config lacks {', '.join(missing)}: a saved config must spell out "
                              "every field (re-save the model with spikeprune)")
    return cls(**copy.deepcopy(d))


def check_pooled_size(img_size: int, pool_after: list[bool], what: str) -> None:
    """A stem that max-pools k times (3x3, stride 2, padding 1) takes sizes divisible by 2^k."""
    stride = 2 ** sum(pool_after)
    if img_size % stride:
        ok = [s for s in (28, 32, 64, 96, 128, 160, 192, 224, 256) if s % stride == 0]
        raise SpikepruneError(f"image size {img_size} cannot be taken: this {what} stem pools {sum(pool_after)} "
                              f"times, so the size must be a multiple of {stride} (e.g. {ok[:4]})")


def pooled_tokens(img_size: int, pool_after: list[bool]) -> int:
    side = img_size // 2 ** sum(pool_after)
    return side * side


def strip_module(state: dict) -> dict:
    """Tensors only (no `args`, epoch, ...), with DataParallel's `module.` prefix removed."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def fit_state(out: dict, model: nn.Module, family: str, hint: str = "") -> dict:
    """`out` if its names and shapes are exactly the model's; else an error naming the first
    mismatched keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in out]
    unexpected = [k for k in out if k not in expected]
    wrong = [(k, tuple(out[k].shape), tuple(expected[k].shape))
             for k in expected if k in out and out[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        lines = []
        if wrong:
            lines.append("shape mismatches (checkpoint vs model): " + "; ".join(
                f"{k} {list(a)} vs {list(b)}" for k, a, b in wrong[:5]))
        if missing:
            lines.append(f"missing from checkpoint ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"not in the model ({len(unexpected)}): {', '.join(unexpected[:5])}")
        raise SpikepruneError(
            f"checkpoint does not fit this {family} model -- " + " | ".join(lines) + "." + hint
            + " Check the preset (and overrides such as num_classes or img_size) matches the training run.")
    return out
