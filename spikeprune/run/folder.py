"""The run folder RUN: its run.json (format, version, fingerprint; resume or refuse), the lock that
keeps two runs out of one folder, the temporary copies a killed session left, the steps another run
shares, the wall time over every session, and RUN/model/.

Everything here is written by rank 0 only (the run calls it through distributed.from_main or on the
main process).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..errors import SpikepruneError
from ..hashing import model_hash
from ..serialization import is_saved_model, load_model, save_model, write_json

RUN_FORMAT = "spikeprune-run"
RUN_VERSION = 2  # 2: typed pruning record, one settings object (version 1 folders are refused)
ELAPSED_EVERY_S = 2.0  # how often the wall time is saved at most
# Steps a run may take from another run of the same model, data and measuring settings (the
# benchmark computes them once for all policies), copied when the run starts, and the settings they
# depend on. That run's sensitivity.csv is copied only when the policy asks for a table
# (PruneContext.sensitivity), so that runs of policies that never read one report none.
SHAREABLE_STEPS = ("steps/dense_calib.json", "steps/measure_dense.json", "steps/uniform_sweep.json")
SHARED_FIELDS = ("model", "data", "max_images", "importance", "round_to", "seed", "batch_size", "calib_batches",
                 "uniform_ratios", "measure_images", "latency_repeats")


def prepare_run_dir(out: Path, fp: str, fields: dict, force: bool) -> bool:
    """Create RUN or check it holds this run; returns True when resuming."""
    run_json = out / "run.json"
    if out.is_dir() and any(out.iterdir()):
        same = False
        if run_json.is_file():
            try:
                old = json.loads(run_json.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = {}
            old = old if isinstance(old, dict) else {}
            version = old.get("version")
            if old.get("format") == RUN_FORMAT and version != RUN_VERSION:
                if not force:
                    raise SpikepruneError(
                        f"{out} holds a run written by another spikeprune version (run format {version}, this one "
                        f"writes {RUN_VERSION}: the pruning record and the run settings changed, so its steps cannot "
                        "be reused); choose another -o, or add --force to replace it")
            else:
                same = old.get("format") == RUN_FORMAT and old.get("fingerprint") == fp
                if not same and not force:
                    before = old.get("settings", {}) if isinstance(old.get("settings"), dict) else {}
                    diffs = [f"{k}: {before.get(k)!r} there vs {v!r} now" for k, v in fields.items() if before.get(k) != v]
                    raise SpikepruneError(
                        f"{out} holds a different run ({'; '.join(diffs[:4]) or 'another format'}); choose another -o, "
                        "or add --force to replace it")
        elif not force:
            raise SpikepruneError(f"{out} exists, is not empty and is not a spikeprune run folder; choose another -o "
                                  "or add --force to replace it")
        if same:
            return True
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_json, {"format": RUN_FORMAT, "version": RUN_VERSION, "fingerprint": fp, "settings": fields,
                          "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return False


class RunLock:
    """An exclusive lock on the run folder RUN while a run writes it, so two runs given the same -o at
    once cannot mix their steps, model and report: the second is refused with one line. The lock is
    flock() on the sibling file .RUN.lock (a sibling, since --force replaces RUN itself); the kernel
    drops it when the process dies, so a killed run never leaves the folder locked."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.lock"
        self.fd = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise SpikepruneError(f"another spikeprune run is writing {self.path.parent / self.path.name[1:-5]} "
                                      f"right now ({holder}); wait for it to finish, or choose another -o") from None
            try:  # the holder before us may have removed the file it locked: lock the one at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then retries on a new file
            os.close(self.fd)
            self.fd = None


def remove_leftovers(out: Path) -> list[str]:
    """Remove the temporary copies (.NAME.*.tmp, .NAME.old) an earlier, killed session left in the
    run folder; the steps they belonged to are redone or were already finished."""
    removed = []
    for folder in (out, out / "steps", out / "plots"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(str(p.relative_to(out)))
    return removed


def check_shared_steps(source: Path, fields: dict) -> None:
    """The run in `source` must be of the same model and data, measured the same way, for its
    steps to be reused (sensitivity.csv also checks its own fingerprint when it is read)."""
    try:
        theirs = json.loads((source / "run.json").read_text()).get("settings", {})
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise SpikepruneError(f"shared_steps {source}: cannot read its run.json ({e})") from None
    differ = [k for k in SHARED_FIELDS if theirs.get(k) != fields.get(k)]
    if differ:
        raise SpikepruneError(f"shared_steps {source} is a run of other settings ({', '.join(differ)} differ); its "
                              "steps cannot be reused here")


def copy_shared_steps(source: Path, out: Path) -> list[str]:
    """Copy the shareable finished steps of the run in `source` into the new run `out`, never over
    a file the run already has."""
    copied = []
    for rel in SHAREABLE_STEPS:
        src, dst = source / rel, out / rel
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(rel)
    return copied


class Clock:
    """The run's wall time over all its sessions, saved to RUN/steps/elapsed.json as it goes."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "steps" / "elapsed.json"
        self.start = time.perf_counter()
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.before, self.complete = float(saved.get("seconds", 0.0)), bool(saved.get("complete", False))
        self.last_save = 0.0

    def elapsed(self) -> float:
        return self.before if self.complete else self.before + time.perf_counter() - self.start

    def save(self, complete: bool = False, seconds: float | None = None) -> None:
        if not distributed.is_main():  # the run folder is rank 0's
            return
        if self.complete and not complete:
            return  # a finished run keeps the time its summary states
        write_json(self.path, {"seconds": self.elapsed() if seconds is None else seconds,
                               "complete": complete or self.complete})
        self.last_save = time.perf_counter()

    def tick(self) -> None:
        if time.perf_counter() - self.last_save >= ELAPSED_EVERY_S:
            self.save()


def jsonable(obj):
    """Drop what JSON cannot hold (callables) so that info can be checkpointed."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj if not callable(v)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def write_final_model(out: Path, final: nn.Module) -> None:
    """RUN/model/, unless it already holds these weights. A summary and report about to be replaced
    go first, so no summary ever describes a model that is not there."""
    target = out / "model"
    if is_saved_model(target):
        try:
            if model_hash(load_model(target)) == model_hash(final):
                return
        except SpikepruneError:
            pass  # damaged: written again below
    for stale in ("summary.json", "report.md"):
        (out / stale).unlink(missing_ok=True)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    save_model(final, target)
