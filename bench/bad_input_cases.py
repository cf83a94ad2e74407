"""The bad-input table (issue 10): every way a user can hand spikeprune something wrong, through the
command line and the Python API, with what must happen: one clear line (a SpikepruneError, or exit
code 2 and `spikeprune: error: ...` on stderr, never a traceback), the expected words in it, and
nothing of the user's changed or left behind on disk.

Used by tests/test_bad_inputs.py (one test per row) and bench/bad_inputs.py (the totals: clear
errors / tracebacks / silent wrong / files lost). A row is
    Case(id, kind, make, expect, owner=None, before_work=False)
kind "cli": make(world, tmp) returns the argv of `spikeprune.cli.main`; kind "api": a callable that
should raise SpikepruneError; kind "warn": a callable that should warn (a warning or a stderr line)
and succeed. `expect` is a regular expression the message must match. `before_work`: the refusal
must come before any model forward pass (counted with a global forward hook), i.e. before any
costly work. `owner`: who fixes the row if it still fails (the test marks it xfail, not strict).

The world (World.build) is a set of small files every row may read: a tiny saved model, damaged
copies of it, checkpoints good and bad, data folders; rows never write into it (checked).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

TINY = dict(embed_dim=16, num_heads=2, T=2)  # spikformer-1-32-digits made small: a forward takes milliseconds
PRESET = "spikformer-1-32-digits"
TINY_SET = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
QUICK_PRUNE = ["--data", "digits", "--batch-size", "64", "--latency-repeats", "1", "--measure-images", "16", "--quiet"]
QUICK_TRAIN = ["--data", "digits", "--batch-size", "32", "--max-steps-per-epoch", "1", "--quiet"]


# ------------------------------------------------------------------------------------------------
# The world: input files shared by the rows
# ------------------------------------------------------------------------------------------------
@dataclass
class World:
    root: Path
    model: Path = None           # a saved tiny model folder
    nan_model: Path = None       # the same with a NaN in one weight
    inf_model: Path = None       # ... with an Inf
    no_config: Path = None       # config.json without its "config" object
    no_img_size: Path = None     # config.json whose config lacks img_size
    truncated_weights: Path = None
    ckpt: Path = None            # torch.save(state_dict) of the tiny model
    nan_ckpt: Path = None
    evil_ckpt: Path = None       # a pickle that would run code (never unpickled)
    evil_raw: Path = None        # the same as a plain pickle (protocol 4)
    truncated_ckpt: Path = None
    empty_ckpt: Path = None      # 0 bytes
    empty_dir: Path = None
    bad_cifar: Path = None       # cifar10 folder with garbage batches
    empty_imagefolder: Path = None
    imagefolder_empty_class: Path = None
    readonly: Path | None = None  # a folder nothing can be written in (None: none available here)
    canary: Path = None          # set when a malicious pickle was executed

    @classmethod
    def build(cls, root: Path) -> "World":
        from spikeprune.models import create_model
        from spikeprune.serialization import save_model

        w = cls(root=Path(root))
        r = w.root
        r.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = create_model(PRESET, **TINY).eval()
        w.model = save_model(model, r / "model")
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        w.ckpt = r / "tiny.pth"
        torch.save(sd, w.ckpt)
        first = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() > 1)
        for name, value in (("nan", float("nan")), ("inf", float("inf"))):
            bad = {k: v.clone() for k, v in sd.items()}
            bad[first].view(-1)[0] = value
            broken = create_model(PRESET, **TINY).eval()
            broken.load_state_dict(bad)
            setattr(w, f"{name}_model", save_model(broken, r / f"{name}-model"))
            if name == "nan":
                w.nan_ckpt = r / "nan.pth"
                torch.save(bad, w.nan_ckpt)
        meta = json.loads((w.model / "config.json").read_text())
        w.no_config = _copy_model(w.model, r / "no-config", {k: v for k, v in meta.items() if k != "config"})
        w.no_img_size = _copy_model(w.model, r / "no-img-size",
                                    {**meta, "config": {k: v for k, v in meta["config"].items() if k != "img_size"}})
        w.truncated_weights = _copy_model(w.model, r / "truncated-weights", meta)
        weights = w.truncated_weights / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
        w.canary = r / "code-ran"
        w.evil_ckpt = r / "evil.pth"
        torch.save({"state_dict": sd, "payload": _RunsCode(str(w.canary))}, w.evil_ckpt)
        w.evil_raw = r / "evil.pkl"
        w.evil_raw.write_bytes(pickle.dumps(_RunsCode(str(w.canary)), protocol=4))
        w.truncated_ckpt = r / "truncated.pth"
        w.truncated_ckpt.write_bytes(w.ckpt.read_bytes()[: w.ckpt.stat().st_size // 2])
        w.empty_ckpt = r / "empty.pth"
        w.empty_ckpt.write_bytes(b"")
        w.empty_dir = r / "empty-dir"
        w.empty_dir.mkdir()
        w.bad_cifar = r / "cifar-garbage"
        w.bad_cifar.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (w.bad_cifar / name).write_bytes(b"this is not a pickle" * 10)
        w.empty_imagefolder = r / "imagefolder-empty"
        for split in ("train", "val"):
            (w.empty_imagefolder / split).mkdir(parents=True)
        w.imagefolder_empty_class = r / "imagefolder-empty-class"
        _image_folder(w.imagefolder_empty_class, {"cat": 6, "dog": 6, "empty_class": 0})
        w.readonly = _readonly_folder(r / "read-only")
        return w


class _RunsCode:
    """A payload that creates a file if anything unpickles it without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _copy_model(src: Path, dst: Path, meta: dict) -> Path:
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


def _image_folder(root: Path, per_class: dict[str, int]) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for i_cls, (cls, n) in enumerate(per_class.items()):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (40 * i_cls, 10 * i, 90)).save(d / f"{i}.png")


def _readonly_folder(path: Path) -> Path | None:
    """A folder nothing can be created in: chmod 555 (not enough for root, who writes through
    permission bits; then /sys, where no one may create files), or None."""
    path.mkdir()
    path.chmod(0o555)
    candidates = [path, Path("/sys/kernel")]
    for c in candidates:
        try:
            fd, name = tempfile.mkstemp(dir=c)
        except OSError:
            return c
        os.close(fd)
        os.unlink(name)
    return None


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    kind: str                      # "cli" | "api" | "warn"
    make: Callable                 # (world, tmp) -> argv | callable
    expect: str                    # regex the one-line message must match
    owner: str | None = None       # who fixes it while it still fails (xfail, not strict)
    before_work: bool = False      # must be refused before any forward pass
    needs_readonly: bool = False
    setup: Callable | None = None  # (world, tmp) -> None: files the row's input needs, made before the snapshot
    around: Callable | None = None  # (world, tmp) -> context manager the row runs in (e.g. a full disk)
    may_leave: str | None = None   # regex of paths the row may add (a run folder kept to resume); never a temporary


def _prune(w, tmp, *extra, out=None):
    return ["prune", str(w.model), *QUICK_PRUNE, "-o", str(out or tmp / "run"), *extra]


def _train(w, tmp, *extra, out=None):
    return ["train", PRESET, *TINY_SET, *QUICK_TRAIN, "--epochs", "1", "-o", str(out or tmp / "out"), *extra]


def _finetune(w, tmp, *extra, out=None):
    return ["finetune", str(w.model), *QUICK_TRAIN, "--epochs", "1", "-o", str(out or tmp / "ft"), *extra]


def _user_folder(tmp: Path, name: str = "mine", files: dict | None = None) -> Path:
    d = tmp / name
    d.mkdir()
    for fname, text in (files or {"notes.txt": "the user's own notes"}).items():
        (d / fname).write_text(text)
    return d


def _save_into(target_maker):
    def make(w, tmp):
        from spikeprune.serialization import load_model, save_model

        target = target_maker(w, tmp)
        return lambda: save_model(load_model(w.model), target)
    return make


def _user_file(tmp: Path) -> Path:
    f = tmp / "results.txt"
    f.write_text("a user's file")
    return f


def _forward_with(images_shape):
    def make(w, tmp):
        from spikeprune.serialization import load_model

        model = load_model(w.model).eval()
        return lambda: model(torch.zeros(*images_shape))
    return make


def _evaluate_model_with_nan_logits(w, tmp):
    from spikeprune.serialization import load_model
    from spikeprune.training import evaluate

    model = load_model(w.model).eval()
    model.register_forward_hook(lambda m, i, out: out * float("nan"))  # finite weights, NaN arithmetic
    return lambda: evaluate(model, "digits", split="calib", progress=False)


def _api_call(fn_name, *args, **kwargs):
    """A row calling spikeprune.<fn_name>(*args) where args may be world attribute names ('@model')."""
    def make(w, tmp):
        import importlib

        module, _, name = fn_name.rpartition(".")
        fn = getattr(importlib.import_module(module), name)

        def resolve(a):
            if isinstance(a, str) and a.startswith("@"):
                return getattr(w, a[1:])
            if isinstance(a, str) and a.startswith("%"):  # a path under this row's tmp folder
                return tmp / a[1:]
            return a
        return lambda: fn(*[resolve(a) for a in args], **{k: resolve(v) for k, v in kwargs.items()})
    return make


def _loaded(fn_name, **kwargs):
    """spikeprune.<fn_name>(the NaN model loaded without checks, **kwargs)."""
    def make(w, tmp):
        import importlib

        from spikeprune.models import create_model

        module, _, name = fn_name.rpartition(".")
        fn = getattr(importlib.import_module(module), name)
        model = create_model(PRESET, **TINY).eval()
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        return lambda: fn(model, **kwargs)
    return make


def _copy_model_text(w, tmp, config_text: str) -> Path:
    d = tmp / "damaged"
    d.mkdir()
    (d / "model.safetensors").write_bytes((w.model / "model.safetensors").read_bytes())
    (d / "config.json").write_text(config_text)
    return d


def _evaluate_split(w, split):
    from spikeprune.serialization import load_model
    from spikeprune.training import evaluate

    model = load_model(w.model)
    return lambda: evaluate(model, "digits", split=split, progress=False)


def _prune_api(w, ratios):
    from spikeprune.serialization import load_model
    from spikeprune.surgery import prune

    model = load_model(w.model)
    return lambda: prune(model, ratios)


def _resume_other_architecture(w, tmp):
    from spikeprune.models import create_model
    from spikeprune.training import TrainSettings, train

    out = tmp / "out"
    train(create_model(PRESET, **TINY), "digits", TrainSettings(1, batch_size=32, max_steps_per_epoch=1, augment=False),
          output=out, progress=False)
    return lambda: train(create_model(PRESET, **{**TINY, "embed_dim": 32}), "digits",
                         TrainSettings(2, batch_size=32, max_steps_per_epoch=1), output=out, resume=True, progress=False)


def _empty_class_dataset(w, tmp):
    from spikeprune.data import load_dataset

    return lambda: load_dataset(f"imagefolder:{w.imagefolder_empty_class}", "train", img_size=16)


# --- helpers of the second audit's rows (issue 23) -------------------------------------------------
def _training_leftovers(tmp: Path) -> Path:
    """A folder that looks like a training output but holds the user's files under its names."""
    d = _user_folder(tmp, "out", {"history.json": '{"mine": "the user\'s history"}'})
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "mine.txt").write_text("the user's notes")
    (d / "best").mkdir()
    (d / "best" / "photo.txt").write_text("a photo")
    return d


def _link(tmp: Path, target: Path, name: str = "link") -> Path:
    link = tmp / name
    link.symlink_to(target, target_is_directory=True)
    return link


def _idx_file(path: Path, dims: list[int], body: bytes) -> None:
    ndim = len(dims)
    path.write_bytes(bytes([0, 0, 8, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims) + body)


def _idx_folder(tmp: Path, train_labels: list[int], header_dims: list[int] | None = None) -> Path:
    """mnist:DIR files of 8x8 images; header_dims replaces the train images' declared dimensions."""
    import numpy as np

    d = tmp / "idx"
    d.mkdir()
    rng = np.random.default_rng(0)
    n_train, n_test = len(train_labels), 10
    # an overflowing header declares 2619255648 x 1845099 x 3817, which wraps to 1568 in 64-bit arithmetic:
    # the body has those 1568 bytes, so a check in int64 passes and the reshape fails (the audit's file)
    _idx_file(d / "train-images-idx3-ubyte", header_dims or [n_train, 8, 8],
              rng.integers(0, 255, 1568 if header_dims else n_train * 64, dtype=np.uint8).tobytes())
    _idx_file(d / "train-labels-idx1-ubyte", [n_train], bytes(train_labels))
    _idx_file(d / "t10k-images-idx3-ubyte", [n_test, 8, 8], rng.integers(0, 255, n_test * 64, dtype=np.uint8).tobytes())
    _idx_file(d / "t10k-labels-idx1-ubyte", [n_test], bytes(range(10)))
    return d


@contextlib.contextmanager
def _full_disk(module: str, name: str, error: Callable):
    """Writing through `module.name` fails as a full disk does (`error()` is the exception)."""
    import importlib

    mod = importlib.import_module(module)
    original = getattr(mod, name)

    def fails(*args, **kwargs):
        raise error()
    setattr(mod, name, fails)
    try:
        yield
    finally:
        setattr(mod, name, original)


def _safetensors_full():
    from safetensors import SafetensorError  # the text safetensors gives for ENOSPC

    return SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')


def _enospc():
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _hold_run_lock(w, tmp):
    """Another run holds the lock of tmp/run (flock: the same process on another descriptor counts)."""
    import fcntl

    fd = os.open(tmp / ".run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"process 12345")
    _HELD_LOCKS.append(fd)  # released at the end of the row (run_case)


_HELD_LOCKS: list[int] = []


def _pruned_folder(w, tmp, edit: Callable | None = None, fingerprint: bool = True) -> Path:
    """A saved pruned tiny model; `edit(meta)` changes its config.json afterwards; without
    `fingerprint` the weights carry no config hash (a file saved by an earlier version)."""
    from safetensors.torch import load_file, save_file

    from spikeprune.serialization import load_model, save_model
    from spikeprune.surgery import prune

    d = save_model(prune(load_model(w.model), {"block0.mlp.hidden": 0.5}), tmp / "pruned")
    if not fingerprint:
        weights = d / "model.safetensors"
        save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    if edit is not None:
        meta = json.loads((d / "config.json").read_text())
        edit(meta)
        (d / "config.json").write_text(json.dumps(meta))
    return d


def _edit_kept(meta):
    meta["pruning"]["kept"]["block0.mlp.hidden"] = meta["pruning"]["kept"]["block0.mlp.hidden"][:4]


def _edit_heads(meta):
    meta["config"]["num_heads"] = 4  # 16 channels as 4 heads of 4: the same tensor shapes


def _saved_tiny(tmp: Path, name: str, **overrides) -> Path:
    from spikeprune.models import create_model
    from spikeprune.serialization import save_model

    return save_model(create_model(PRESET, **{**TINY, **overrides}), tmp / name)


def _replay_on_other_weights(w, tmp):
    from spikeprune.models import create_model
    from spikeprune.serialization import load_model
    from spikeprune.surgery import prune

    small = prune(load_model(w.model), {"block0.mlp.hidden": 0.5})
    torch.manual_seed(1)
    other = create_model(PRESET, **TINY).eval()  # the same preset and widths, other weights
    return lambda: prune(other, small.pruning)


def _one_class_idx(w, tmp):
    from spikeprune.data import load_dataset

    folder = _idx_folder(tmp, [3] * 20)
    return lambda: load_dataset(f"mnist:{folder}", "train")


def _train_on_two_images(w, tmp):
    from spikeprune.cli import main

    folder = tmp / "two-images"
    _image_folder(folder, {"a": 1, "b": 1})
    for p in (folder / "val" / "b").iterdir():
        p.unlink()  # val/: one image

    def go():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the empty val/b class is not what this row is about
            warnings.filterwarnings("always", message=".*rests on 1 image")
            rc = main(["train", PRESET, *TINY_SET, "--set", "in_channels=3", "--set", "num_classes=2", "--set",
                       "img_size=16", "--data", f"imagefolder:{folder}", "--batch-size", "1", "--epochs", "1",
                       "--quiet", "-o", str(tmp / "out")])
        assert rc == 0
    return go


CASES: list[Case] = [
    # --- 1. no data loss ------------------------------------------------------------------------
    Case("save_model into a folder holding other files", "api",
         _save_into(lambda w, tmp: _user_folder(tmp)), r"not a spikeprune model folder"),
    Case("save_model into a folder with another tool's config.json", "api",
         _save_into(lambda w, tmp: _user_folder(tmp, files={"config.json": '{"model_type": "bert"}',
                                                            "model.safetensors": "x"})),
         r"not a spikeprune model folder"),
    Case("save_model into a training output folder (history, checkpoint)", "api",
         _save_into(lambda w, tmp: _user_folder(tmp, files={"config.json": json.dumps({"format": "spikeprune-model"}),
                                                            "history.json": "{}"})),
         r"not a spikeprune model folder"),
    Case("save_model onto an existing file", "api", _save_into(lambda w, tmp: _user_file(tmp)), r"is a file"),
    Case("prune --force with a ratio pattern matching no group", "cli",
         lambda w, tmp: _prune(w, tmp, "--force", "--ratio", "block9.mlp.hidden=0.5",
                               out=_user_folder(tmp, "run", {"precious.txt": "kept"})),
         r"matches no group", before_work=True),
    Case("prune --force with --round-to 0", "cli",
         lambda w, tmp: _prune(w, tmp, "--force", "--ratio", "residual=0.25", "--round-to", "0",
                               out=_user_folder(tmp, "run", {"precious.txt": "kept"})),
         r"--round-to", before_work=True),
    Case("train -o onto an existing file", "cli", lambda w, tmp: _train(w, tmp, out=_user_file(tmp)),
         r"exists and is not a folder", before_work=True),
    Case("train --force into a folder with another tool's config.json", "cli",
         lambda w, tmp: _train(w, tmp, "--force", out=_user_folder(tmp, files={"config.json": "{}"})),
         r"did not write", before_work=True),
    # --- 2. no false success --------------------------------------------------------------------
    Case("load_model of a model with a NaN weight", "api", _api_call("spikeprune.serialization.load_model", "@nan_model"),
         r"non-finite weights: \S+ holds 1 NaN"),
    Case("load_model of a model with an Inf weight", "api", _api_call("spikeprune.serialization.load_model", "@inf_model"),
         r"non-finite weights: \S+ holds 1 Inf"),
    Case("evaluate a saved model with a NaN weight", "cli",
         lambda w, tmp: ["evaluate", str(w.nan_model), "--data", "digits", "--quiet"], r"non-finite weights",
         before_work=True),
    Case("reference checkpoint with a NaN weight", "cli",
         lambda w, tmp: ["evaluate", str(w.nan_ckpt), "--model", PRESET, *TINY_SET, "--data", "digits", "--quiet"],
         r"non-finite weights", before_work=True),
    Case("evaluate() of an in-memory model with a NaN weight", "api",
         _loaded("spikeprune.training.evaluate", data="digits", progress=False), r"non-finite weights",
         before_work=True),
    Case("evaluate() of a model computing NaN logits", "api", _evaluate_model_with_nan_logits, r"NaN or Inf logits"),
    Case("measure() of a model with a NaN weight", "api", _loaded("spikeprune.costs.measure", data="digits"),
         r"non-finite weights", before_work=True),
    Case("finetune() of a model with a NaN weight", "api",
         _loaded("spikeprune.training.finetune", data="digits", epochs=1, progress=False), r"non-finite weights",
         before_work=True),
    Case("prune a model with a NaN weight", "cli",
         lambda w, tmp: ["prune", str(w.nan_model), *QUICK_PRUNE, "--uniform", "0.2", "-o", str(tmp / "run")],
         r"NaN or Inf|non-finite", before_work=True),
    Case("training whose loss becomes NaN", "cli",
         lambda w, tmp: _train(w, tmp, "--lr", "1e30", "--max-steps-per-epoch", "4", "--epochs", "2"),
         r"the loss became nan"),
    Case("config.json missing img_size", "cli", lambda w, tmp: ["evaluate", str(w.no_img_size), "--data", "digits"],
         r"img_size", before_work=True),
    Case("model(images) with the wrong image size", "api", _forward_with((2, 1, 20, 20)), r"16|size"),
    Case("model(images) with the wrong channel count", "api", _forward_with((2, 3, 16, 16)),
         r"expected images \[B, 1, 16, 16\], got \[2, 3, 16, 16\]"),
    # --- 3. clear one-line errors before costly work --------------------------------------------
    Case("config.json without its 'config' object", "api",
         _api_call("spikeprune.serialization.load_model", "@no_config"), r"no 'config' object"),
    Case("config.json without 'config' (CLI)", "cli", lambda w, tmp: ["evaluate", str(w.no_config), "--data", "digits"],
         r"no 'config' object"),
    Case("load_model of a .pth file", "api", _api_call("spikeprune.serialization.load_model", "@ckpt"),
         r"checkpoint file, not a saved model folder.*create_model"),
    Case("evaluate a .pth file without --model", "cli", lambda w, tmp: ["evaluate", str(w.ckpt), "--data", "digits"],
         r"--model PRESET"),
    Case("train -o under a read-only folder", "cli", lambda w, tmp: _train(w, tmp, out=w.readonly / "out"),
         r"not writable|read-only|permission", before_work=True, needs_readonly=True),
    Case("finetune -o under a read-only folder", "cli", lambda w, tmp: _finetune(w, tmp, out=w.readonly / "ft"),
         r"not writable|read-only|permission", before_work=True, needs_readonly=True),
    Case("save_model under a read-only folder", "api",
         _save_into(lambda w, tmp: w.readonly / "saved"), r"cannot write|not writable", needs_readonly=True),
    Case("prune -o under a read-only folder", "cli",
         lambda w, tmp: _prune(w, tmp, "--uniform", "0.2", out=w.readonly / "run"),
         r"not writable|read-only|permission", before_work=True,
         needs_readonly=True),
    Case("sensitivity -o under a read-only folder", "cli",
         lambda w, tmp: ["sensitivity", str(w.model), "--data", "digits", "-o", str(w.readonly / "s.csv")],
         r"not writable|read-only|permission", before_work=True,
         needs_readonly=True),
    Case("evaluate --workers -1", "cli", lambda w, tmp: ["evaluate", str(w.model), "--data", "digits", "--workers", "-1"],
         r"workers|-1", before_work=True),
    Case("train --workers -1", "cli", lambda w, tmp: _train(w, tmp, "--workers", "-1"), r"--workers", before_work=True),
    Case("evaluate() with workers=-1", "api",
         _api_call("spikeprune.training.evaluate", torch.nn.Identity(), "digits", workers=-1), r"workers",
         before_work=True),
    Case("prune --workers -1", "cli", lambda w, tmp: _prune(w, tmp, "--uniform", "0.2", "--workers", "-1"),
         r"workers|-1", before_work=True),
    Case("prune: ratio pattern matching no group", "cli", lambda w, tmp: _prune(w, tmp, "--ratio", "nosuch.group=0.5"),
         r"matches no group", before_work=True),
    Case("prune --round-to 0", "cli", lambda w, tmp: _prune(w, tmp, "--uniform", "0.2", "--round-to", "0"),
         r"--round-to", before_work=True),
    Case("sensitivity --round-to 0", "cli",
         lambda w, tmp: ["sensitivity", str(w.model), "--data", "digits", "--round-to", "0", "-o", str(tmp / "s.csv")],
         r"round-to|round_to", before_work=True),
    Case("finetune --epochs 0", "cli", lambda w, tmp: _finetune(w, tmp, "--epochs", "0"), r"--epochs", before_work=True),
    Case("train --epochs 0", "cli", lambda w, tmp: _train(w, tmp, "--epochs", "0"), r"--epochs", before_work=True),
    Case("finetune --kd-weight 2 with a teacher", "cli",
         lambda w, tmp: _finetune(w, tmp, "--teacher", str(w.model), "--kd-weight", "2"), r"--kd-weight",
         before_work=True),
    Case("finetune --label-smoothing 1", "cli", lambda w, tmp: _finetune(w, tmp, "--label-smoothing", "1"),
         r"--label-smoothing", before_work=True),
    Case("finetune --max-steps-per-epoch 0", "cli", lambda w, tmp: _finetune(w, tmp, "--max-steps-per-epoch", "0"),
         r"--max-steps-per-epoch", before_work=True),
    Case("imagefolder with an empty class folder", "warn",
         _empty_class_dataset, r"empty_class"),
    Case("pickle checkpoint that would run code", "cli",
         lambda w, tmp: ["evaluate", str(w.evil_ckpt), "--model", PRESET, *TINY_SET, "--data", "digits"],
         r"refused: this file would run code when unpickled", before_work=True),
    Case("plain pickle (protocol 4) that would run code", "api",
         _api_call("spikeprune.serialization.read_checkpoint", "@evil_raw"),
         r"refused: this file would run code when unpickled"),
    Case("empty folder given as a model", "cli", lambda w, tmp: ["evaluate", str(w.empty_dir), "--data", "digits"],
         r"(?i)empty folder"),
    Case("empty folder given as a checkpoint", "api",
         _api_call("spikeprune.models.create_model", PRESET, checkpoint_path="@empty_dir", **TINY), r"empty folder"),
    # --- more of the same kinds ------------------------------------------------------------------
    Case("measure a saved model with a NaN weight", "cli",
         lambda w, tmp: ["measure", str(w.nan_model), "--data", "digits", "--no-latency"], r"non-finite weights",
         before_work=True),
    Case("evaluate --batch-size 0", "cli", lambda w, tmp: ["evaluate", str(w.model), "--data", "digits",
                                                          "--batch-size", "0"], r"batch.size", before_work=True),
    Case("train --batch-size 0", "cli", lambda w, tmp: _train(w, tmp, "--batch-size", "0"), r"--batch-size",
         before_work=True),
    Case("train --warmup-epochs -1", "cli", lambda w, tmp: _train(w, tmp, "--warmup-epochs", "-1"),
         r"--warmup-epochs", before_work=True),
    Case("train --weight-decay nan", "cli", lambda w, tmp: _train(w, tmp, "--weight-decay", "nan"),
         r"--weight-decay must be a finite number", before_work=True),
    Case("train --max-grad-norm 0", "cli", lambda w, tmp: _train(w, tmp, "--max-grad-norm", "0"),
         r"--max-grad-norm", before_work=True),
    Case("finetune --kd-temperature 0 with a teacher", "cli",
         lambda w, tmp: _finetune(w, tmp, "--teacher", str(w.model), "--kd-temperature", "0"), r"--kd-temperature",
         before_work=True),
    Case("train -o below a file", "cli", lambda w, tmp: _train(w, tmp, out=_user_file(tmp) / "out"), r"is a file",
         before_work=True),
    Case("save_model below a file", "api", _save_into(lambda w, tmp: _user_file(tmp) / "saved"),
         r"is a file|a folder on the way is a file"),
    Case("save_model of a module that is not a spikeprune model", "api",
         _api_call("spikeprune.serialization.save_model", torch.nn.Linear(2, 2), "%saved"), r"config_dict|spikeprune model"),
    Case("write_json onto a folder", "api", _api_call("spikeprune.serialization.write_json", "%mine", {"a": 1}),
         r"is a folder", setup=lambda w, tmp: _user_folder(tmp)),
    Case("prune --ratio without =R", "cli", lambda w, tmp: _prune(w, tmp, "--ratio", "residual"), r"PATTERN=R",
         before_work=True),
    Case("prune --target-saving 1.5", "cli", lambda w, tmp: _prune(w, tmp, "--target-saving", "1.5"),
         r"between 0 and 1", before_work=True),
    Case("prune --memory-budget 8M (ambiguous unit)", "cli", lambda w, tmp: _prune(w, tmp, "--memory-budget", "8M"),
         r"ambiguous", before_work=True),
    Case("prune --kd without fine-tuning", "cli", lambda w, tmp: _prune(w, tmp, "--uniform", "0.2", "--kd"),
         r"--finetune-epochs", before_work=True),
    Case("prune --finetune-epochs -2", "cli", lambda w, tmp: _prune(w, tmp, "--uniform", "0.2", "--finetune-epochs", "-2"),
         r"0 or more|finetune-epochs", before_work=True),
    Case("prune --uniform 1.5", "cli", lambda w, tmp: _prune(w, tmp, "--uniform", "1.5"), r"\[0, 1\)",
         before_work=True),
    Case("sensitivity --ratios 1.5", "cli",
         lambda w, tmp: ["sensitivity", str(w.model), "--data", "digits", "--ratios", "0.2,1.5", "-o", str(tmp / "s.csv")],
         r"\[0, 1\)|outside", before_work=True),
    Case("evaluate --checkpoint with a pickle that would run code", "cli",
         lambda w, tmp: ["evaluate", PRESET, *TINY_SET, "--checkpoint", str(w.evil_ckpt), "--data", "digits"],
         r"refused: this file would run code when unpickled", before_work=True),
    Case("checkpoint of another width", "cli",
         lambda w, tmp: ["evaluate", str(w.ckpt), "--model", PRESET, "--set", "embed_dim=32", "--set", "num_heads=2",
                         "--set", "T=2", "--data", "digits"], r"(?i)shape|match|width", before_work=True),
    Case("--set without =", "cli", lambda w, tmp: ["evaluate", PRESET, "--set", "img_size", "--data", "digits"],
         r"KEY=VALUE", before_work=True),
    Case("--set of an unknown config field", "cli",
         lambda w, tmp: ["evaluate", PRESET, "--set", "nosuch_field=1", "--data", "digits"], r"nosuch_field",
         before_work=True),
    Case("--set img_size to text", "cli", lambda w, tmp: ["evaluate", PRESET, "--set", "img_size=big", "--data", "digits"],
         r"img_size", before_work=True),
    Case("model with 3 input channels on grey digits", "cli",
         lambda w, tmp: ["evaluate", PRESET, *TINY_SET, "--set", "in_channels=3", "--data", "digits", "--random-weights"],
         r"(?i)channel", before_work=True),
    Case("cifar10 without a folder", "cli", lambda w, tmp: ["evaluate", str(w.model), "--data", "cifar10"],
         r"cifar10:DIR|folder|path", before_work=True),
    Case("imagefolder given a file", "cli",
         lambda w, tmp: ["evaluate", str(w.model), "--data", f"imagefolder:{_user_file(tmp)}"], r"not a folder|folder",
         before_work=True),
    Case("config.json that is not JSON", "api", _api_call("spikeprune.serialization.load_model", "%damaged"),
         r"not valid JSON", setup=lambda w, tmp: _copy_model_text(w, tmp, "{not json")),
    Case("config.json of another tool", "api", _api_call("spikeprune.serialization.load_model", "%damaged"),
         r"not a spikeprune model config", setup=lambda w, tmp: _copy_model_text(w, tmp, '{"model_type": "bert"}')),
    Case("config.json of an unknown family", "api", _api_call("spikeprune.serialization.load_model", "%damaged"),
         r"nosuch", setup=lambda w, tmp: _copy_model_text(
             w, tmp, json.dumps({"format": "spikeprune-model", "family": "nosuch", "config": {}}))),
    Case("train() with data of the wrong type", "api",
         _api_call("spikeprune.training.train", torch.nn.Identity(), 123, 1), r"dataset spec"),
    Case("evaluate() of an unknown split", "api", lambda w, tmp: _evaluate_split(w, "nosuch"), r"nosuch|split"),
    Case("prune() with a ratio of 1.5", "api", lambda w, tmp: _prune_api(w, {"block0.mlp.hidden": 1.5}),
         r"\[0, 1\)|ratio"),
    Case("prune() with a pattern matching no group", "api", lambda w, tmp: _prune_api(w, {"nosuch": 0.5}),
         r"matches no group|nosuch"),
    Case("unknown command", "cli", lambda w, tmp: ["prunez"], r"invalid choice"),
    Case("evaluate --split bogus", "cli", lambda w, tmp: ["evaluate", str(w.model), "--split", "bogus"],
         r"invalid choice"),
    Case("measure --n-images 0", "cli", lambda w, tmp: ["measure", str(w.model), "--data", "digits", "--n-images", "0"],
         r"(?i)at least 1|n.images", before_work=True),
    Case("evaluate --device cuda without CUDA", "cli",
         lambda w, tmp: ["evaluate", str(w.model), "--data", "digits", "--device", "cuda"], r"CUDA",
         before_work=True),
    # --- already clear before this issue: kept so they stay so ----------------------------------
    Case("unknown preset (CLI)", "cli", lambda w, tmp: ["evaluate", "spikformer-99-nope", "--data", "digits"],
         r"neither a preset"),
    Case("unknown preset (API)", "api", _api_call("spikeprune.models.create_model", "spikformer-99-nope"),
         r"spikformer-99-nope"),
    Case("unknown dataset", "cli", lambda w, tmp: ["evaluate", str(w.model), "--data", "nosuch"], r"unknown dataset"),
    Case("missing data folder", "cli", lambda w, tmp: ["evaluate", str(w.model), "--data", f"cifar10:{tmp / 'nope'}"],
         r"does not exist"),
    Case("empty data folder", "cli",
         lambda w, tmp: ["evaluate", str(w.model), "--data", f"imagefolder:{w.empty_imagefolder}"],
         r"(?i)no image|empty|no class"),
    Case("corrupt data files", "cli", lambda w, tmp: ["evaluate", str(w.model), "--data", f"cifar10:{w.bad_cifar}"],
         r"(?i)corrupt|not a|cannot read"),
    Case("truncated checkpoint", "cli",
         lambda w, tmp: ["evaluate", str(w.truncated_ckpt), "--model", PRESET, *TINY_SET, "--data", "digits"],
         r"corrupt or truncated"),
    Case("empty (0-byte) checkpoint", "cli",
         lambda w, tmp: ["evaluate", str(w.empty_ckpt), "--model", PRESET, *TINY_SET, "--data", "digits"],
         r"empty \(0 bytes\)"),
    Case("truncated weights in a model folder", "api",
         _api_call("spikeprune.serialization.load_model", "@truncated_weights"), r"corrupt or truncated"),
    Case("missing model folder", "cli", lambda w, tmp: ["evaluate", str(tmp / "no-such-model"), "--data", "digits"],
         r"neither a preset"),
    Case("contradictory constraints", "cli",
         lambda w, tmp: _prune(w, tmp, "--target-saving", "0.5", "--memory-budget", "1kB"), r"contradict",
         before_work=True),
    Case("NaN accuracy limit", "cli", lambda w, tmp: _prune(w, tmp, "--max-acc-drop", "nan"), r"(?i)nan|finite|number", before_work=True),
    Case("NaN learning rate", "cli", lambda w, tmp: _train(w, tmp, "--lr", "nan"), r"--lr must be a finite number",
         before_work=True),
    Case("NaN kd temperature (API)", "api",
         _api_call("spikeprune.training.finetune", torch.nn.Identity(), "digits", 1, kd_temperature=float("nan")),
         r"kd_temperature must be a finite number", before_work=True),
    Case("model trained for other classes", "cli",
         lambda w, tmp: ["evaluate", PRESET, *TINY_SET, "--set", "num_classes=5", "--data", "digits", "--random-weights"], r"num_classes"),
    Case("evaluate --max-batches 0", "cli",
         lambda w, tmp: ["evaluate", str(w.model), "--data", "digits", "--max-batches", "0"], r"max_batches|max-batches",
         before_work=True),
    Case("--set on a saved model", "cli",
         lambda w, tmp: ["evaluate", str(w.model), "--set", "img_size=32", "--data", "digits"], r"--set"),
    Case("finetune with a missing teacher", "cli",
         lambda w, tmp: _finetune(w, tmp, "--teacher", str(tmp / "no-teacher")), r"neither a preset", before_work=True),
    Case("train --resume of a folder with another architecture", "api", _resume_other_architecture,
         r"different architecture"),
    # --- the second audit (issue 23): user files lost ---------------------------------------------
    Case("train -o a folder holding the user's history.json, checkpoint/, best/", "cli",
         lambda w, tmp: _train(w, tmp, out=_training_leftovers(tmp)), r"training run did not write", before_work=True),
    Case("train --force -o a folder holding the user's files under training names", "cli",
         lambda w, tmp: _train(w, tmp, "--force", out=_training_leftovers(tmp)), r"training run did not write.*--force",
         before_work=True),
    Case("finetune -o a folder holding the user's files under training names", "cli",
         lambda w, tmp: _finetune(w, tmp, out=_training_leftovers(tmp)), r"training run did not write",
         before_work=True),
    Case("train --force -o a folder holding the user's model.safetensors alone", "cli",
         lambda w, tmp: _train(w, tmp, "--force", out=_user_folder(tmp, files={"model.safetensors": "weights"})),
         r"did not write \(model.safetensors\)", before_work=True),
    Case("train -o a folder holding one user file", "cli",
         lambda w, tmp: _train(w, tmp, out=_user_folder(tmp)), r"did not write \(notes.txt\)", before_work=True),
    # --- tracebacks -------------------------------------------------------------------------------
    Case("IDX header whose dimensions overflow", "api",
         lambda w, tmp: (lambda f=_idx_folder(tmp, [0] * 20, header_dims=[2619255648, 1845099, 3817]):
                         __import__("spikeprune.data", fromlist=["load_dataset"]).load_dataset(f"mnist:{f}", "train")),
         r"truncated: its header declares 2619255648 x 1845099 x 3817"),
    Case("prune --force -o a symlink to a user folder", "cli",
         lambda w, tmp: _prune(w, tmp, "--force", "--uniform", "0.2", out=_link(tmp, _user_folder(tmp))),
         r"symbolic link", before_work=True),
    Case("prune -o a dangling symlink", "cli",
         lambda w, tmp: _prune(w, tmp, "--uniform", "0.2", out=_link(tmp, tmp / "nowhere")),
         r"symbolic link \(to .*nowhere, which does not exist\)", before_work=True),
    Case("train -o a symlink to a user folder", "cli",
         lambda w, tmp: _train(w, tmp, out=_link(tmp, _user_folder(tmp, "empty", {}))), r"symbolic link",
         before_work=True),
    Case("finetune -o a dangling symlink", "cli",
         lambda w, tmp: _finetune(w, tmp, out=_link(tmp, tmp / "nowhere")), r"symbolic link", before_work=True),
    Case("save_model into a symlink to a folder", "api",
         _save_into(lambda w, tmp: _link(tmp, _user_folder(tmp, "empty", {}))), r"symbolic link"),
    Case("full disk while prune writes the model", "cli",
         lambda w, tmp: _prune(w, tmp, "--uniform", "0.2"), r"no space left on the device",
         around=lambda w, tmp: _full_disk("spikeprune.serialization", "save_file", _safetensors_full),
         may_leave=r"/case[^/]*/run(/|$)"),
    Case("full disk while prune writes summary.json", "cli",
         lambda w, tmp: _prune(w, tmp, "--uniform", "0.2"), r"no space left on device.*free some space",
         around=lambda w, tmp: _full_disk("spikeprune.run", "write_json", _enospc), may_leave=r"/case[^/]*/run(/|$)"),
    Case("full disk while train writes its checkpoint", "cli", lambda w, tmp: _train(w, tmp),
         r"no space left on the device",
         around=lambda w, tmp: _full_disk("spikeprune.serialization", "save_file", _safetensors_full)),
    Case("full disk while finetune writes its history", "cli", lambda w, tmp: _finetune(w, tmp),
         r"no space left on device",
         around=lambda w, tmp: _full_disk("spikeprune.training", "write_json", _enospc), may_leave=r"/case[^/]*/ft(/|$)"),
    Case("full disk while export writes the ONNX file", "cli",
         lambda w, tmp: ["export", str(w.model), "-o", str(tmp / "m.onnx"), "--no-check", "--input", "normalised"],
         r"no space left on (the )?device",
         around=lambda w, tmp: _full_disk("onnx", "save", _enospc)),
    # --- silent wrong -----------------------------------------------------------------------------
    Case("config.json whose pruning record disagrees with the weights (fingerprinted)", "api",
         lambda w, tmp: (lambda d=_pruned_folder(w, tmp, _edit_kept):
                         __import__("spikeprune.serialization", fromlist=["x"]).load_model(d)),
         r"not the config these weights were saved with"),
    Case("config.json whose pruning record disagrees with the weights (no fingerprint)", "api",
         lambda w, tmp: (lambda d=_pruned_folder(w, tmp, _edit_kept, fingerprint=False):
                         __import__("spikeprune.serialization", fromlist=["x"]).load_model(d)),
         r"pruning record disagrees with the model's widths \(block0.mlp.hidden keeps 4 units in the record but has 32"),
    Case("config.json edited to another head count", "cli",
         lambda w, tmp: ["evaluate", str(_pruned_folder(w, tmp, _edit_heads)), "--data", "digits", "--quiet"],
         r"not the config these weights were saved with", before_work=True),
    Case("prune(other model of the same preset, record)", "api", _replay_on_other_weights, r"allow_other_weights=True"),
    Case("two prune runs into the same -o at once", "cli", lambda w, tmp: _prune(w, tmp, "--uniform", "0.2"),
         r"another spikeprune run is writing .*run right now \(process 12345\)", before_work=False,
         setup=_hold_run_lock),
    Case("training on 2 images", "warn", _train_on_two_images, r"rests on 1 image", may_leave=r"/case[^/]*/(out|two-images)"),
    Case("IDX training set of one class", "warn", _one_class_idx, r"no train image of classes 0, 1, 2, 4"),
    Case("prune --walk-drop without --limit-after-finetune", "cli",
         lambda w, tmp: _prune(w, tmp, "--policy", "shrink", "--walk-drop", "5"), r"--walk-drop only applies with "
         r"--limit-after-finetune", before_work=True),
    Case("prune --probe-steps without --limit-after-finetune", "cli",
         lambda w, tmp: _prune(w, tmp, "--policy", "shrink", "--probe-steps", "5"), r"--probe-steps only applies",
         before_work=True),
    # --- weaker messages --------------------------------------------------------------------------
    Case("export -o below a file", "cli",
         lambda w, tmp: ["export", str(w.model), "-o", str(_user_file(tmp) / "m.onnx"), "--no-check", "--input",
                         "normalised"],
         r"results.txt is a file", before_work=True),
    Case("finetune --teacher of another image size", "cli",
         lambda w, tmp: _finetune(w, tmp, "--teacher", str(_saved_tiny(tmp, "teacher", img_size=32))),
         r"the teacher \(--teacher\) does not fit.*img_size 32 \(the model: 16\)", before_work=True),
    Case("config.json without 'family'", "api", _api_call("spikeprune.serialization.load_model", "%damaged"),
         r"names no model family \(its 'family' entry is missing", setup=lambda w, tmp: _copy_model_text(
             w, tmp, json.dumps({k: v for k, v in json.loads((w.model / "config.json").read_text()).items()
                                 if k != "family"}))),
]


# ------------------------------------------------------------------------------------------------
# Running one row
# ------------------------------------------------------------------------------------------------
CATEGORIES = ("clear", "clear, other words", "traceback", "silent wrong", "files lost", "left behind",
              "work before refusal")


@dataclass
class Outcome:
    category: str
    message: str = ""
    detail: str = ""
    seconds: float = 0.0
    forwards: int = 0
    lost: list = field(default_factory=list)
    added: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.category == "clear"


def _snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            try:
                out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            except OSError:
                out[str(p)] = "unreadable"
    return out


@contextlib.contextmanager
def _count_forwards():
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def run_case(case: Case, world: World, tmp: Path) -> Outcome:
    """Run one row in its own empty folder `tmp`; classify what happened."""
    from spikeprune.cli import main
    from spikeprune.errors import SpikepruneError

    tmp.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(world, tmp)
    target = case.make(world, tmp)
    before = _snapshot(tmp, world.root)
    around = case.around(world, tmp) if case.around is not None else contextlib.nullcontext()
    err, out = io.StringIO(), io.StringIO()
    raised, message, rc = None, "", None
    t0 = time.perf_counter()
    with _count_forwards() as forwards, contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), \
            warnings.catch_warnings(record=True) as caught, around:
        warnings.simplefilter("always")
        try:
            if case.kind == "cli":
                try:
                    rc = main([str(a) for a in target])
                except SystemExit as e:  # argparse's own one-line usage errors
                    rc = e.code if isinstance(e.code, int) else 2
            else:
                target()
        except SpikepruneError as e:
            raised, message = "spikeprune", str(e)
        except BaseException as e:  # noqa: BLE001 -- the point is to classify anything
            raised, message = "other", "".join(traceback.format_exception_only(type(e), e)).strip()
            message += "\n" + traceback.format_exc(limit=-3)
    seconds = time.perf_counter() - t0
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())
    after = _snapshot(tmp, world.root)
    stderr = err.getvalue()
    lost = [p for p, h in before.items() if after.get(p) != h]
    added = [p for p in after if p not in before]
    temporaries = [p for p in added if p.endswith((".tmp", ".partial", ".old", ".lock"))]
    if case.may_leave:
        import re

        added = [p for p in added if not re.search(case.may_leave, p)]
    added = sorted(set(added) | set(temporaries))  # a temporary is never what a row may leave
    o = Outcome("", seconds=seconds, forwards=forwards[0], lost=lost, added=added)
    if world.canary.exists():
        o.category, o.detail = "silent wrong", "a pickle's code ran"
        world.canary.unlink()
        return o
    if case.kind == "cli":
        lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error:" in ln]
        o.message = errors[-1] if errors else (lines[-1] if lines else "")
        if raised == "other" or "Traceback" in stderr:
            o.category, o.message = "traceback", message or stderr[-600:]
        elif rc == 0 or rc is None:
            o.category = "silent wrong"
        elif rc == 2 and len(errors) == 1 and (lines[-1] == errors[0]):
            o.category = "clear"
        else:
            o.category, o.detail = "traceback", f"exit code {rc}, stderr: {stderr[-400:]}"
    elif case.kind == "warn":
        said = [str(w_.message) for w_ in caught] + [stderr]
        o.message = " | ".join(s.strip() for s in said if s.strip())
        if raised == "other":
            o.category, o.message = "traceback", message
        elif raised == "spikeprune" and not o.message:
            o.category, o.message = "clear", message
        else:
            o.category = "clear" if o.message else "silent wrong"
    else:
        o.message = message
        if raised == "other":
            o.category = "traceback"
        elif raised is None:
            o.category = "silent wrong"
        elif "\n" in message:
            o.category, o.detail = "traceback", "multi-line error"
        else:
            o.category = "clear"
    if o.category == "clear":
        import re

        if not re.search(case.expect, o.message):
            o.category, o.detail = "clear, other words", f"expected /{case.expect}/"
    if lost:
        o.category, o.detail = "files lost", ", ".join(lost[:3])
    elif added and o.category in ("clear", "clear, other words"):
        o.category, o.detail = "left behind", ", ".join(added[:3])
    elif case.before_work and o.forwards and o.category == "clear":
        o.category, o.detail = "work before refusal", f"{o.forwards} forward passes ran first"
    return o
