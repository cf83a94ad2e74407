"""One place for the checks every entry point shares: the CLI, the Python API and the run.

Each check raises a one-line SpikepruneError naming the setting as the caller calls it (`--lr` on
the command line, `lr` in Python), so a bad value reads the same wherever it comes from:

    whole(name, value, minimum)          a whole number >= minimum (bool refused)
    number(name, value, low, high, ...)  a finite number in a range (NaN / Inf refused)
    device(value)                        cpu, cuda or cuda:N
    precision(value)                     fp32, fp16 or int8 (PRECISIONS)
    max_images(value, name)              None (no cap) or a positive whole number of images
    check_finite(weights, source)        no NaN / Inf in a state dict or a model
    check_writable(path, what, folder)   the place an output goes can be written, tried before any work
    drop_within(dense, top1, n, limit)   an accuracy gate: compares counts of images, never floats

FinetuneSettings is the fine-tuning a run does after pruning, as one checked object: the run builds
it from its settings (RunSettings.finetuning) and hands it on whole, to its own fine-tuning step
and to the policies that fine-tune while they search, so no layer copies its fields one by one.

`renamed_arguments` keeps an old keyword working for one version, with a FutureWarning naming the
new one (issue 23's one grammar: output, force, progress, max_images).

This module sits at the bottom of the layers (it imports only errors, numpy and torch), so every other
module may use it.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import SpikepruneError

PRECISIONS = ("fp32", "fp16", "int8")
SPLITS = ("train", "calib", "test")
REMOVED_IN = "0.4"  # the version in which deprecated spellings stop working


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------
def whole(name: str, value, minimum: int = 0) -> int:
    """`value` as an int if it is a whole number >= minimum (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        hint = "; use 0 to load data in the main process" if name.endswith("workers") else ""
        raise SpikepruneError(f"{name} must be a whole number >= {minimum}, got {value!r}{hint}")
    return int(value)


def number(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> float:
    """`value` as a float if it is a finite number within [low, high] (open ends when asked)."""
    bad = isinstance(value, bool)
    try:
        x = float(value)
    except (TypeError, ValueError):
        bad = True
        x = math.nan
    if isinstance(value, str):  # "3" from a config file is fine; a CLI flag arrives parsed already
        bad = bad or not value.strip()
    bad = bad or not math.isfinite(x)
    if not bad and low is not None:
        bad = x <= low if low_open else x < low
    if not bad and high is not None:
        bad = x >= high if high_open else x > high
    if bad:
        if low is not None and high is not None:
            span = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f" {'>' if low_open else '>='} {low:g}"
        else:
            span = ""
        raise SpikepruneError(f"{name} must be a finite number{span}, got {value!r}")
    return x


def device(value, name: str = "--device") -> str:
    """cpu, cuda or cuda:N (a torch.device is accepted too); availability is checked where it is used."""
    text = str(value) if isinstance(value, torch.device) else value
    if isinstance(text, str):
        kind, sep, index = text.partition(":")
        if (kind == "cpu" and not sep) or (kind == "cuda" and (not sep or index.isdigit())):
            return text
    raise SpikepruneError(f"{name} must be cpu, cuda or cuda:N (N a GPU number), got {value!r}")


def precision(value, name: str = "--precision") -> str:
    if value not in PRECISIONS:
        raise SpikepruneError(f"{name} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def max_images(value, name: str = "max_images") -> int | None:
    """None (no cap) or a positive whole number of images."""
    if value is None:
        return None
    try:
        return whole(name, value, 1)
    except SpikepruneError:
        raise SpikepruneError(f"{name} must be a positive whole number of images (or None for all), "
                              f"got {value!r}") from None


def max_images_per_split(value, keys=SPLITS, name: str = "max_images") -> dict | None:
    """A dict of image caps by split (e.g. {"calib": 200}); None or {} means no cap."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - set(keys):
        raise SpikepruneError(f"{name} must be a dict with keys among {', '.join(keys)} (e.g. {{'calib': 200}}), "
                              f"got {value!r}")
    caps = {k: max_images(v, f"{name}[{k!r}]") for k, v in value.items() if v is not None}
    return caps or None


def parse_max_images(items, keys=SPLITS) -> dict | None:
    """The CLI's repeatable `--max-images SPLIT=N` into a dict of caps."""
    caps = {}
    for item in items or []:
        split, sep, text = str(item).partition("=")
        try:
            value = int(text)
        except ValueError:
            sep = ""
        if not sep or split not in keys:
            raise SpikepruneError(f"--max-images expects SPLIT=N with SPLIT one of {', '.join(keys)}, e.g. "
                                  f"{keys[-1]}=200; got {item!r}")
        caps[split] = max_images(value, f"--max-images {split}")
    return caps or None


def drop_within(dense_top1: float, top1: float, images: int, max_drop_points: float) -> bool:
    """True when `top1` is at most `max_drop_points` points of top-1 below `dense_top1`, both
    measured on the same `images` images. Compared as counts of images, exactly: 377 of 500 right
    against 382 is a drop of exactly 1 point, within a 1-point limit, although 100 * (382/500 -
    377/500) is 1.0000000000000009 in floats. The limit is read as written (0.1 is 1/10)."""
    n = whole("images", images, 1)
    dense_hits, hits = round(float(dense_top1) * n), round(float(top1) * n)
    return 100 * (dense_hits - hits) <= Fraction(repr(float(max_drop_points))) * n


# ------------------------------------------------------------------------------------------------
# Models and places
# ------------------------------------------------------------------------------------------------
def check_finite(weights, source: str) -> None:
    """Refuse weights holding NaN or Inf (a state dict or a model's parameters and buffers), naming
    the first bad tensor: such a model evaluates to nonsense without any error of its own."""
    tensors = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            what = " and ".join(x for x in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if x)
            raise SpikepruneError(f"{source} has non-finite weights: {name} holds {what} of {t.numel()} values "
                                  "(a diverged training run?); use an earlier checkpoint or retrain")


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_writable(path: str | os.PathLike, what: str = "output", folder: bool | None = None) -> Path:
    """Raise a one-line SpikepruneError unless `path` (a file or folder about to be written, existing
    or not) can be written; returns it as a Path. folder=True: `path` is a folder to create or fill
    (an existing file there is refused); folder=False: a file (an existing folder is refused);
    None: either. Tried by creating and removing a temporary file, since permission bits miss
    read-only mounts and what root may not do. Call it before any costly work; it leaves nothing."""
    path = Path(path)
    if folder is True and path.exists() and not path.is_dir():
        raise SpikepruneError(f"{path} exists and is not a folder; choose another output folder")
    if folder is False and path.is_dir():
        raise SpikepruneError(f"{path} is a folder; give a file name")
    where = path if path.is_dir() else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise SpikepruneError(f"cannot write {what} {path}: {where} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".spikeprune-write-check.", suffix=".tmp", dir=where)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise SpikepruneError(f"cannot write {what} {path}: {where} is not writable ({_why(e)}: a read-only folder "
                              "or file system?); choose an output path you can write to") from None
    if folder is False and path.exists() and not os.access(path, os.W_OK):
        raise SpikepruneError(f"cannot write {path}: the file is read-only; choose another output")
    return path


# ------------------------------------------------------------------------------------------------
# Fine-tuning settings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneSettings:
    """How a pruned model is fine-tuned, checked when built: `epochs` passes at peak learning rate
    `lr` (no warm-up, cosine decay), `batch_size` images a step, with distillation from the dense
    model when `kd` (weight `kd_weight` of the soft term, temperature `kd_temperature`); `threads`:
    torch's CPU threads while training (None: as set), recorded since it changes the weights.

    RunSettings builds one (`RunSettings.finetuning`, None without fine-tuning); a policy that
    fine-tunes while it searches reads the same object, and `train_kwargs()` is what
    spikeprune.training.finetune takes from it."""
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 64
    kd: bool = False
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    threads: int | None = None

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)  # frozen: checked values are set once, here
        set_("epochs", whole("--finetune-epochs", self.epochs, 1))
        set_("lr", number("--finetune-lr", self.lr, 0, low_open=True))
        set_("batch_size", whole("--finetune-batch-size", self.batch_size, 1))
        set_("kd", bool(self.kd))
        set_("kd_weight", number("--kd-weight", self.kd_weight, 0, 1))
        set_("kd_temperature", number("--kd-temperature", self.kd_temperature, 0, low_open=True))
        if self.threads is not None:
            set_("threads", whole("--threads", self.threads, 1))

    def to_dict(self) -> dict:
        """As summary.json lists them (the distillation fields None without kd; threads only when set,
        so that the fingerprints of runs made before it existed stay the same)."""
        d = asdict(self)
        if not self.kd:
            d["kd_weight"] = d["kd_temperature"] = None
        if self.threads is None:
            d.pop("threads")
        return {k: d[k] for k in ("epochs", "kd", "kd_weight", "kd_temperature", "lr", "batch_size", "threads")
                if k in d}

    def train_kwargs(self) -> dict:
        """The keyword arguments of spikeprune.training.finetune (besides the teacher) these settings mean."""
        return {"kd_weight": self.kd_weight, "kd_temperature": self.kd_temperature, "lr": self.lr,
                "batch_size": self.batch_size, "threads": self.threads}


# ------------------------------------------------------------------------------------------------
# Renamed arguments
# ------------------------------------------------------------------------------------------------
def deprecation(old: str, new: str) -> str:
    return f"{old} is deprecated and stops working in spikeprune {REMOVED_IN}; use {new}"


def renamed_arguments(**old_to_new: str):
    """Decorator: keyword `old` still works as `new` for one version, with a FutureWarning (shown by
    default, unlike DeprecationWarning); giving both is an error."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise SpikepruneError(f"{fn.__name__}() got both {new}= and its old name {old}=; give {new}=")
                    warnings.warn(deprecation(f"{fn.__name__}({old}=...)", f"{new}="), FutureWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        wrapper.renamed_arguments = dict(old_to_new)
        return wrapper
    return decorate


__all__ = ["PRECISIONS", "REMOVED_IN", "SPLITS", "FinetuneSettings", "check_finite", "check_writable", "deprecation",
           "device", "drop_within", "max_images", "max_images_per_split", "number", "parse_max_images", "precision",
           "renamed_arguments", "whole"]
