"""A user's own model by reference, and how a traced model saves and loads back.

A builder reference names a function that returns the dense module:

    path/to/my_model.py:build      a Python file (imported under a private module name)
    my_package.models:build        an importable module

**Importing a file or module runs its code**, exactly as `python my_model.py` would: give only
references to code you trust. The function is called with no arguments; it may build the module
and load its own weights, or spikeprune loads a checkpoint into it (`load_user_model(ref,
checkpoint=...)`, read by checkpoint_io, which runs no pickled code).

A traced model is the user's class, so config.json cannot rebuild it alone. save_model writes, next
to the weights and the pruning record, the builder reference and the example input the model was
traced on (example_input.safetensors); load_model calls the builder, traces the module it returns
on that input, replays the pruning record and loads the saved weights: the same model, bit for bit.
No module is pickled. A traced model saved without a builder (one built by the user's own code and
not given `builder=`) loads only in the process that traced it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint_io import WEIGHTS_NAME, check_finite, read_checkpoint, read_safetensors
from .errors import SpikepruneError
from .record import PruningRecord
from .serialization import _load_exact, register_folder_io
from .surgery import prune
from .tracing import trace
from .tracing_spec import FAMILY, spec_of

BUILDER_ATTR = "spikeprune_builder"  # the reference a module was built from (set by build_user_model)
EXAMPLE_NAME = "example_input.safetensors"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_builder_ref(spec) -> bool:
    """Whether `spec` reads as `file.py:function` or `package.module:function`."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    where, _, name = spec.rpartition(":")
    return name.isidentifier() and (where.endswith(".py") or bool(_DOTTED.match(where)))


def resolve_builder(ref: str):
    """(the function `ref` names, its canonical reference: a file's absolute path). Imports the file
    or module, which runs its code."""
    if not is_builder_ref(ref):
        raise SpikepruneError(f"{ref!r} is not a builder reference: write path/to/file.py:function or "
                              "package.module:function (a function that returns the nn.Module)")
    where, _, name = ref.rpartition(":")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise SpikepruneError(f"builder file {where} does not exist")
        # one private module name per file, so two files called model.py do not replace each other
        mod_name = "spikeprune_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
        canonical = f"{path}:{name}"
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise SpikepruneError(f"cannot import module {where!r} of builder {ref!r} ({e})") from None
        canonical = ref
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SpikepruneError(f"{where} has no function {name!r}" if fn is None else
                              f"{where}:{name} is a {type(fn).__name__}, not a function that returns the model")
    return fn, canonical


def _state_dict_of(obj, source: str) -> dict:
    """The state dict inside a checkpoint: a plain one, or the usual wrappers ('state_dict', 'model',
    'model_state_dict'), with DistributedDataParallel's 'module.' prefix removed."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise SpikepruneError(f"checkpoint {source} holds no state dict (keys: {', '.join(list(obj)[:6])})")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise SpikepruneError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def build_user_model(ref: str, checkpoint=None) -> nn.Module:
    """Call the builder `ref` names (this runs the user's code) and, with `checkpoint`, load its weights,
    every key and shape checked. The module remembers `ref`, so save_model can store it."""
    fn, canonical = resolve_builder(ref)
    model = fn()
    if not isinstance(model, nn.Module):
        raise SpikepruneError(f"builder {ref} returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        state = _state_dict_of(read_checkpoint(checkpoint), str(checkpoint))
        check_finite(state, f"checkpoint {checkpoint}")
        _load_exact(model, state, source=str(checkpoint))
    model.__dict__[BUILDER_ATTR] = canonical
    return model


def load_user_model(ref: str, example_input: torch.Tensor, checkpoint=None) -> nn.Module:
    """The builder's module with its checkpoint, traced on `example_input`: a model spikeprune prunes."""
    model = build_user_model(ref, checkpoint).eval()
    trace(model, example_input)
    return model


def _save(model: nn.Module, meta: dict, folder: Path, builder: str | None) -> None:
    save_file({"example_input": spec_of(model).example_input.detach().contiguous().cpu()}, str(folder / EXAMPLE_NAME))
    ref = builder or model.__dict__.get(BUILDER_ATTR)
    if not ref:  # loadable only in the process that traced it (tracing_spec keeps the dense structure)
        return
    if not is_builder_ref(ref):
        raise SpikepruneError(f"builder={ref!r} is not a builder reference: write path/to/file.py:function or "
                              "package.module:function")
    where, _, name = ref.rpartition(":")
    meta["builder"] = f"{Path(where).expanduser().resolve()}:{name}" if where.endswith(".py") else ref


def _load(meta: dict, folder: Path, map_location: str) -> nn.Module | None:
    ref = meta.get("builder")
    if ref is None:  # saved without a builder: only the process that traced it can rebuild it (None: as usual)
        return None
    if not isinstance(ref, str):
        raise SpikepruneError(f"{folder / 'config.json'} has a damaged builder reference ({ref!r})")
    example = read_safetensors(folder / EXAMPLE_NAME).get("example_input")
    if example is None:
        raise SpikepruneError(f"{folder / EXAMPLE_NAME} holds no example_input; the model folder is damaged")
    dense = load_user_model(ref, example)
    model, record = dense, None
    if meta.get("pruning") is not None:
        record = PruningRecord.from_dict(meta["pruning"])
        dense_sizes = {g.name: g.size for g in spec_of(dense).groups}
        if record.dense_sizes != dense_sizes:
            changed = sorted(set(record.dense_sizes) ^ set(dense_sizes)
                             | {g for g in dense_sizes if record.dense_sizes.get(g, dense_sizes[g]) != dense_sizes[g]})
            raise SpikepruneError(f"builder {ref} no longer builds the dense model the one in {folder} was pruned "
                                  f"from: its traced groups differ in {', '.join(changed[:5])}")
        # the record names the trace it was made on; this process traced the builder's module anew
        record.dense_config = dense.config_dict()
        # the replay gives the pruned shapes; the saved weights are loaded into them below, so the
        # builder's fresh weights need not be the dense model's the record was made from
        model = prune(dense, record, allow_other_weights=True) if record.pruned else dense
    saved, now = meta["config"].get("sizes"), model.config_dict()["config"]["sizes"]
    if saved != now:
        changed = [g for g in sorted(set(saved or {}) | set(now)) if (saved or {}).get(g) != now.get(g)]
        raise SpikepruneError(f"builder {ref} no longer builds the model saved in {folder}: the traced widths "
                              f"differ in {', '.join(changed[:5])}")
    state = read_safetensors(folder / WEIGHTS_NAME, map_location)
    _load_exact(model, state, source=str(folder))
    check_finite(state, f"the model in {folder}")
    if record is not None:
        model.pruning = record
    return model


register_folder_io(FAMILY, _save, _load, files=(EXAMPLE_NAME,))
