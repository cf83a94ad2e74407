"""Reading weights from disk without running code: safetensors files, spikeprune model folders,
and torch checkpoints (torch.load with weights_only, plus the reference code's argparse args).

This sits below the model registry (which loads reference checkpoints into presets) and below
serialization (which saves and loads whole model folders); it knows no model.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import SpikepruneError
from .validation import check_finite  # noqa: F401  (re-exported: models/ and serialization read it here)

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def is_saved_model(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_safetensors(path: str | os.PathLike, map_location: str = "cpu") -> dict:
    try:
        return load_file(str(path), device=map_location)
    except FileNotFoundError:
        raise SpikepruneError(f"weights file {path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise SpikepruneError(f"weights file {path} is corrupt or truncated ({e}); re-save or re-download it") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file without executing code: safetensors, or torch.load(weights_only)."""
    path = Path(path)
    if not path.exists():
        raise SpikepruneError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if is_saved_model(path):
            return read_safetensors(path / WEIGHTS_NAME)
        if not any(path.iterdir()):
            raise SpikepruneError(f"{path} is an empty folder, not a checkpoint file or a saved spikeprune model")
        raise SpikepruneError(f"{path} is a folder but not a saved spikeprune model (no {CONFIG_NAME}), "
                              "and a checkpoint must be a file")
    if path.stat().st_size == 0:
        raise SpikepruneError(f"checkpoint {path} is empty (0 bytes); the file was not fully written")
    with open(path, "rb") as f:
        head = f.read(_PICKLE_SCAN_BYTES)
    is_torch = zipfile.is_zipfile(path) or _starts_with_pickle(head)  # torch's zip archive, legacy or plain pickle
    if path.suffix == ".safetensors" or not is_torch:
        return read_safetensors(path)
    try:
        # timm's CheckpointSaver (used by the reference training scripts) stores `args` as an
        # argparse.Namespace next to the weights: plain data, safe to allow. Nothing else is.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: the errors below say it all
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as e:
        msg = str(e)
        refused = _unsupported_global(msg)
        calls = [refused] if refused else None
        if calls is None and not zipfile.is_zipfile(path):
            calls = _pickle_calls(path)  # a plain pickle torch could not place: what would it run?
            if calls == []:
                raise SpikepruneError(f"checkpoint {path} is a plain Python pickle, not a torch checkpoint; save "
                                      "the weights with torch.save(model.state_dict(), ...) or as safetensors") from None
        if calls:
            raise SpikepruneError(
                f"checkpoint {path} refused: this file would run code when unpickled (it calls {calls[0]}); only "
                "plain tensors are read. If you trust its source, re-save it as a state dict "
                "(torch.save(model.state_dict(), ...)) or as safetensors") from None
        if "weights only" in msg.lower() or "weights_only" in msg:
            raise SpikepruneError(f"checkpoint {path} refused: this file would run code when unpickled (it holds "
                                  "objects beyond plain tensors); re-save it as a state dict or as safetensors") from None
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        raise SpikepruneError(f"checkpoint {path} is corrupt or truncated ({first})") from None
    except Exception as e:  # truncated zip, bad pickle stream, ...
        raise SpikepruneError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})") from None


_PICKLE_SCAN_BYTES = 1 << 16


def _starts_with_pickle(head: bytes) -> bool:
    """Whether `head` begins with a pickle: protocol 2+ has a PROTO header; protocols 0-1 have none,
    so the opcodes are read (pickletools only parses, it never executes) up to STOP."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    try:
        ops = [op.name for op, _, _ in pickletools.genops(io.BytesIO(head))]
    except Exception:  # not a pickle, or longer than the bytes read
        return False
    return len(ops) > 1 and ops[-1] == "STOP"


def _pickle_calls(path: Path) -> list[str] | None:
    """The callables the first pickle in `path` imports (read with pickletools, which never executes
    anything), or None when it is not a readable pickle."""
    calls, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    calls.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    calls.append(".".join(strings[-2:]) if len(strings) >= 2 else "a global")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:
        return calls or None
    return calls


def _unsupported_global(msg: str) -> str | None:
    """The callable torch's weights-only unpickler refused, from its message ("GLOBAL os.system ...")."""
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    return m.group(1) if m else None
