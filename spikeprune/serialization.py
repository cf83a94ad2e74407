"""Saving and loading models: safetensors weights + a plain JSON config, never pickled modules.

A saved model is a folder:
    config.json        {"format": "spikeprune-model", "version": 1, "family": ..., "config": {...}}
    model.safetensors  the state dict
The config spells out every per-layer width, so a pruned model loads with no original checkpoint.
Writes are atomic: everything goes to a temporary sibling folder that is renamed into place.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import SpikepruneError

FORMAT = "spikeprune-model"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False):
    """Yield a temporary path next to `path`; on success rename it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())  # mkstemp/mkdtemp make them private
    try:
        yield tmp
        if is_dir and path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _contiguous_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model(model: torch.nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save `model` to folder `path` (config.json + model.safetensors), atomically."""
    path = Path(path)
    meta = {"format": FORMAT, "version": 1, **model.config_dict()}
    if getattr(model, "preset", None):
        meta["preset"] = model.preset
    extra = dict(extra or {})
    if getattr(model, "pruning", None) and "pruning" not in extra:
        extra["pruning"] = model.pruning  # the dense widths it descends from: `inspect` compares to them
    if extra:
        meta["extra"] = extra
    with atomic_path(path, is_dir=True) as tmp:
        save_file(_contiguous_state(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def is_saved_model(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_config(path: str | os.PathLike) -> dict:
    p = Path(path) / CONFIG_NAME
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise SpikepruneError(f"{path} is not a saved spikeprune model (no {CONFIG_NAME}); "
                              "save one with spikeprune.save_model or `spikeprune train`") from None
    except json.JSONDecodeError as e:
        raise SpikepruneError(f"{p} is not valid JSON ({e}); the model folder is damaged") from None
    if meta.get("format") != FORMAT:
        raise SpikepruneError(f"{p} is not a spikeprune model config (format={meta.get('format')!r})")
    return meta


def load_model(path: str | os.PathLike, map_location: str = "cpu") -> torch.nn.Module:
    """Load a model saved by `save_model`: the architecture comes from config.json alone."""
    from .models import build_from_config

    meta = read_config(path)
    model = build_from_config(meta)
    state = read_safetensors(Path(path) / WEIGHTS_NAME, map_location)
    _load_exact(model, state, source=str(path))
    model.preset = meta.get("preset")
    pruning = (meta.get("extra") or {}).get("pruning")
    if pruning:
        model.pruning = pruning
    return model


def read_safetensors(path: str | os.PathLike, map_location: str = "cpu") -> dict:
    try:
        return load_file(str(path), device=map_location)
    except FileNotFoundError:
        raise SpikepruneError(f"weights file {path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise SpikepruneError(f"weights file {path} is corrupt or truncated ({e}); re-save or re-download it") from None


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


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file without executing code: safetensors, or torch.load(weights_only)."""
    path = Path(path)
    if not path.exists():
        raise SpikepruneError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if is_saved_model(path):
            return read_safetensors(path / WEIGHTS_NAME)
        raise SpikepruneError(f"{path} is a folder but not a saved spikeprune model")
    if path.stat().st_size == 0:
        raise SpikepruneError(f"checkpoint {path} is empty (0 bytes); the file was not fully written")
    with open(path, "rb") as f:
        head = f.read(8)
    is_torch = zipfile.is_zipfile(path) or head[:2] == b"\x80\x02"  # zip archive or legacy pickle
    if path.suffix == ".safetensors" or not is_torch:
        return read_safetensors(path)
    try:
        # timm's CheckpointSaver (used by the reference training scripts) stores `args` as an
        # argparse.Namespace next to the weights: plain data, safe to allow. Nothing else is.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as e:
        msg = str(e)
        if "weights only" in msg.lower() or "weights_only" in msg or "unsupported global" in msg.lower():
            raise SpikepruneError(
                f"checkpoint {path} contains pickled Python objects beyond plain tensors; refusing to "
                "unpickle it (that could run arbitrary code). Re-save it as a state dict "
                "(torch.save(model.state_dict(), ...)) or as safetensors.") from None
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        raise SpikepruneError(f"checkpoint {path} is corrupt or truncated ({first})") from None
    except Exception as e:  # truncated zip, bad pickle stream, ...
        raise SpikepruneError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from None


def load_checkpoint_into(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a checkpoint (ours or the reference code's) into `model`, checking every key and shape."""
    from .models.spikformer import checkpoint_filter_fn

    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise SpikepruneError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    state = checkpoint_filter_fn(state, model)
    model.load_state_dict(state, strict=True)
    return model
