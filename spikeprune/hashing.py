"""Fingerprints: what identifies a model's weights and a run's settings, so a resumed run or a
cached table is never mixed with another one."""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def model_hash(model: nn.Module) -> str:
    """sha256 of the model's config and every state-dict tensor (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    cfg = model.config_dict() if hasattr(model, "config_dict") else {"class": type(model).__name__}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(fields: dict) -> str:
    """A short stable hash of JSON-able settings (key order does not matter)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
