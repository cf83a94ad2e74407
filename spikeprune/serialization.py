"""Saving and loading models: safetensors weights + a plain JSON config, never pickled modules.

A saved model is a folder:
    config.json        {"format": "spikeprune-model", "version": 1, "family": ..., "config": {...}}
    model.safetensors  the state dict
The config spells out every per-layer width, so a pruned model loads with no original checkpoint.
Writes are atomic: everything goes to a temporary sibling folder that is renamed into place.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# reading weights lives in checkpoint_io (below the model registry); re-exported here under the names callers know
from .checkpoint_io import (CONFIG_NAME, WEIGHTS_NAME, check_finite, is_saved_model, read_checkpoint,  # noqa: F401
                            read_safetensors)
from .errors import SpikepruneError
from .models import build_from_config, families, get_family, load_checkpoint_into  # noqa: F401
from .record import PruningRecord
from .validation import check_writable, refuse_symlink  # noqa: F401  (check_writable re-exported: its home before validation.py)

FORMAT = "spikeprune-model"


# Temporary siblings are named .NAME.<pid>-<random>.tmp: the pid tells a later save whether the
# process that wrote one is gone (a killed save), so it can be removed without racing a live writer.
_TMP_SUFFIX, _OLD_SUFFIX = ".tmp", ".old"
# OS errors that mean "this place cannot be written" rather than a bug: reported as one line.
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.EEXIST, errno.ENAMETOOLONG}


_WHY = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
        errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a folder on the way is a file",
        errno.EEXIST: "a folder on the way is a file", errno.ENAMETOOLONG: "the name is too long"}


def _why(e: OSError) -> str:
    return _WHY.get(e.errno) or e.strerror or type(e).__name__


def _unwritable(path: Path, e: OSError) -> SpikepruneError:
    return SpikepruneError(f"cannot write {path}: {_why(e)}; choose an output path you can write to")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except OSError:
        return False
    return True


def clean_interrupted_write(path: str | os.PathLike) -> None:
    """Undo what a save into `path` killed midway left behind (atomic_path calls it before writing):
    `.NAME.old` (the previous copy, moved aside during a folder swap) is put back when NAME is
    missing -- the kill fell between the two renames, so it is the last complete copy -- and deleted
    otherwise; `.NAME.<pid>-*.tmp` temporaries of processes that no longer run are deleted."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    old = parent / f".{path.name}{_OLD_SUFFIX}"
    if os.path.lexists(old):
        if not os.path.lexists(path):
            os.replace(old, path)
        elif old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    prefix = f".{path.name}."
    for tmp in parent.glob(glob.escape(prefix) + "*" + _TMP_SUFFIX):
        tag = tmp.name[len(prefix):-len(_TMP_SUFFIX)]
        pid = tag.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue  # another live process is writing this path right now
        if pid.isdigit() and int(pid) == os.getpid():
            continue  # ours: an enclosing atomic_path of this process
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False):
    """Yield a temporary path next to `path`; on success rename it onto `path`, else delete it.

    is_dir: the temporary is a folder, and an existing folder at `path` is replaced as a whole
    (callers that must not replace a user's folder check first, as save_model does). A file is
    never replaced by a folder nor a folder by a file: that is a SpikepruneError. Leftovers of a
    save killed midway are cleaned first (clean_interrupted_write). An unwritable place (read-only
    folder or file system, no permission, full disk) is a one-line SpikepruneError."""
    path = Path(path)
    if is_dir and path.is_file():
        raise SpikepruneError(f"{path} exists and is a file, not a folder; choose another path or remove the file")
    if not is_dir and path.is_dir():
        raise SpikepruneError(f"{path} exists and is a folder; a file cannot be written there")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_interrupted_write(path)
        prefix = f".{path.name}.{os.getpid()}-"
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=_TMP_SUFFIX, dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=_TMP_SUFFIX, dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())  # mkstemp/mkdtemp make them private
    except OSError as e:
        if e.errno in _UNWRITABLE or isinstance(e, (PermissionError, FileExistsError, NotADirectoryError)):
            raise _unwritable(path, e) from None
        raise
    try:
        yield tmp
        if is_dir and path.exists():
            old = path.with_name(f".{path.name}{_OLD_SUFFIX}")
            os.replace(path, old)  # a kill from here ...
            os.replace(tmp, path)  # ... to here leaves .NAME.old and no NAME: the next save puts it back
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT):
            raise _unwritable(path, e) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# Families whose models config.json alone cannot rebuild (a traced model is the user's own class)
# register how they save what else they need and load back: family -> (save, load, file names).
# spikeprune/builders.py registers the traced family's.
_FOLDER_IO: dict[str, tuple] = {}


def register_folder_io(family: str, save, load, files: tuple[str, ...] = ()) -> None:
    """save(model, meta, folder, builder) adds to config.json's `meta` and writes `files` into the
    folder being written; load(meta, folder, map_location) returns the model, or None to have it
    built from config.json as usual."""
    _FOLDER_IO[family] = (save, load, tuple(files))


def _folder_files() -> set[str]:
    return {CONFIG_NAME, WEIGHTS_NAME} | {f for _, _, files in _FOLDER_IO.values() for f in files}


def _contiguous_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model(model: torch.nn.Module, path: str | os.PathLike, extra: dict | None = None,
               builder: str | None = None) -> Path:
    """Save `model` to folder `path` (config.json + model.safetensors), atomically.

    `path` may be new, an empty folder, or a model folder written by save_model (it is replaced);
    anything else -- a file, a folder holding other files -- is refused, so no user file is lost.
    A traced model also stores `builder`, the function that builds the dense module
    ("my_model.py:build" or "package.module:build"; default: the one it was built from), and its
    example input: load_model calls the builder and replays the pruning record (spikeprune.builders)."""
    path = Path(path)
    if not callable(getattr(model, "config_dict", None)):
        raise SpikepruneError(f"save_model saves spikeprune models (from create_model, load_model or prune); a "
                              f"{type(model).__name__} has no config_dict() to rebuild it from")
    _check_model_target(path)
    meta = {"format": FORMAT, "version": 1, **model.config_dict()}
    if getattr(model, "preset", None):
        meta["preset"] = model.preset
    extra = dict(extra or {})
    if isinstance(getattr(model, "pruning", None), PruningRecord):
        meta["pruning"] = model.pruning.to_dict()  # what was kept of the dense model: inspect and replay read it
    if getattr(model, "weight_precision", None):  # the per-layer precision a quantised model's weights are on
        meta["weight_precision"] = dict(model.weight_precision)
    if extra:
        meta["extra"] = extra
    folder_io = _FOLDER_IO.get(meta.get("family"))
    with atomic_path(path, is_dir=True) as tmp:
        if folder_io is not None:
            folder_io[0](model, meta, tmp, builder)
        write_safetensors(_contiguous_state(model), tmp / WEIGHTS_NAME,
                          metadata={"format": "pt", CONFIG_FINGERPRINT_KEY: config_fingerprint(meta)})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return path


# The weights file records a hash of the architecture in config.json (family, config, pruning
# record) when it is saved: an edit that the tensor shapes cannot show (another head count over the
# same channels) is then caught on load. Files saved before it existed carry none and load as before.
CONFIG_FINGERPRINT_KEY = "spikeprune_config_sha256"


def config_fingerprint(meta: dict) -> str:
    """sha256 of what in a model's config.json defines the architecture and what it descends from."""
    core = {k: meta.get(k) for k in ("family", "config", "pruning")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, its I/O failures raised as OSError (a full disk is ENOSPC: atomic_path
    reports it in one line) instead of a SafetensorError carrying the Rust error's text."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"code: (\d+)", str(e))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        raise
    os.chmod(path, 0o666 & ~_umask())  # as every other file written here, whatever safetensors chose


def _check_model_target(path: Path) -> None:
    """Refuse to replace anything but an empty folder or a folder save_model wrote."""
    refuse_symlink(path, "save_model's folder")
    if path.is_file():
        raise SpikepruneError(f"{path} exists and is a file; save_model writes a folder and will not replace "
                              "a file: choose another path")
    if not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir())
    others = [n for n in entries if n not in _folder_files()]
    ours = not others and (not entries or _is_our_config(path / CONFIG_NAME))
    if not ours:
        shown = ", ".join(others[:4] or entries[:4]) + (", ..." if len(others or entries) > 4 else "")
        raise SpikepruneError(f"{path} already exists and is not a spikeprune model folder (it holds {shown}); "
                              "saving replaces the whole folder, so it was left alone: choose a new folder, "
                              "or empty this one first")


def _is_our_config(p: Path) -> bool:
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors")


def read_config(path: str | os.PathLike) -> dict:
    """The config.json of the model folder `path`, checked to be one save_model wrote."""
    folder = Path(path)
    if not folder.exists():
        raise SpikepruneError(f"model folder {folder} does not exist")
    if folder.is_file():
        if folder.suffix in CHECKPOINT_SUFFIXES or zipfile.is_zipfile(folder):
            raise SpikepruneError(f"{folder} is a checkpoint file, not a saved model folder: load it with "
                                  f"spikeprune.create_model(PRESET, checkpoint_path={str(folder)!r}) "
                                  f"(on the command line: {folder} --model PRESET)")
        raise SpikepruneError(f"{folder} is a file, not a saved spikeprune model folder")
    p = folder / CONFIG_NAME
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise SpikepruneError(f"{path} is not a saved spikeprune model (no {CONFIG_NAME}); "
                              "save one with spikeprune.save_model or `spikeprune train`") from None
    except ValueError as e:  # bad JSON or not UTF-8
        raise SpikepruneError(f"{p} is not valid JSON ({e}); the model folder is damaged") from None
    except OSError as e:
        raise SpikepruneError(f"cannot read {p}: {e.strerror or e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise SpikepruneError(f"{p} is not a spikeprune model config (format={found!r})")
    if not isinstance(meta.get("config"), dict):
        raise SpikepruneError(f"{p} has no 'config' object (the model's architecture); the model folder is damaged "
                              "or was not written by spikeprune.save_model: save the model again")
    if not isinstance(meta.get("family"), str) or not meta["family"]:
        entry = "missing" if "family" not in meta else repr(meta["family"])
        raise SpikepruneError(f"{p} names no model family (its 'family' entry is {entry}; known families: "
                              f"{', '.join(families())}); the model folder is damaged: save the model again")
    return meta


def load_model(path: str | os.PathLike, map_location: str = "cpu") -> torch.nn.Module:
    """Load a model saved by `save_model`: the architecture comes from config.json alone."""
    meta = read_config(path)
    folder_io = _FOLDER_IO.get(meta.get("family"))
    model = folder_io[1](meta, Path(path), map_location) if folder_io is not None else None
    if model is not None:
        return model
    model = build_from_config(meta)
    weights = Path(path) / WEIGHTS_NAME
    state = read_safetensors(weights, map_location)
    _load_exact(model, state, source=str(path))  # shapes first: the more concrete message
    _check_fingerprint(weights, meta, path)
    check_finite(state, f"the model in {path}")
    model.preset = meta.get("preset")
    if meta.get("pruning") is not None:
        model.pruning = PruningRecord.from_dict(meta["pruning"])
        _check_record_fits(model, model.pruning, path)
    if meta.get("weight_precision"):
        if not isinstance(meta["weight_precision"], dict):
            raise SpikepruneError(f"{path}/{CONFIG_NAME}: 'weight_precision' must map layers to precisions")
        model.weight_precision = dict(meta["weight_precision"])
    return model


def _check_fingerprint(weights: Path, meta: dict, folder) -> None:
    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = (f.metadata() or {}).get(CONFIG_FINGERPRINT_KEY)
    except (SafetensorError, OSError):
        return  # read_safetensors has read the file; no metadata to compare
    if saved is not None and saved != config_fingerprint(meta):
        raise SpikepruneError(f"{Path(folder) / CONFIG_NAME} is not the config these weights were saved with (the "
                              "config was edited after saving, or the weights file comes from another model: its family, "
                              "widths, head counts or pruning record differ); restore the pair, or save the model again "
                              "with spikeprune.save_model")


def _check_record_fits(model: torch.nn.Module, record: PruningRecord, folder) -> None:
    """The pruning record in config.json must describe this model: same family, and every group
    keeps the number of units the model has (else inspect, replay and further pruning would read
    widths the weights do not have)."""
    fam = get_family(model)
    if record.family != fam.name:
        raise SpikepruneError(f"{Path(folder) / CONFIG_NAME}: the pruning record is of a {record.family} model, the "
                              f"model is a {fam.name}; the model folder is damaged: save the model again")
    sizes = {g.name: g.size for g in fam.groups(model)}
    kept = record.kept_counts()
    wrong = [f"{g} keeps {kept.get(g)} units in the record but has {n}" for g, n in sizes.items() if kept.get(g) != n]
    wrong += [f"the record names {g}, which the model has not" for g in kept if g not in sizes]
    if wrong:
        raise SpikepruneError(f"{Path(folder) / CONFIG_NAME}: the pruning record disagrees with the model's widths "
                              f"({'; '.join(wrong[:3])}); the model folder is damaged: save the model again")


def _load_exact(model: torch.nn.Module, state: dict, source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise SpikepruneError(
            f"weights in {source} do not match its config: "
            + "; ".join(x for x in [
                f"shape mismatches (file vs config): {', '.join(wrong[:5])}" if wrong else "",
                f"missing: {', '.join(missing[:5])}" if missing else "",
                f"unexpected: {', '.join(unexpected[:5])}" if unexpected else ""] if x))
    model.load_state_dict(state, strict=True)
