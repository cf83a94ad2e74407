"""The `spikeprune` command line. One sub-command per job; `spikeprune COMMAND --help` explains each.

Every command that reads data takes --data NAME[:PATH]; every command that reads a model takes a
MODEL argument: a preset name, a folder written by save_model / train / prune, the word `bundled`
(the shipped MNIST model), or a reference checkpoint file together with --model PRESET.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import SpikepruneError

DATA_HELP = ("dataset as NAME[:PATH]: mnist5k (bundled), digits (bundled), cifar10:DIR, cifar100:DIR "
             "(python-batch format), imagefolder:DIR (with train/ and val/ class folders)")
MODEL_HELP = ("a preset name (see `spikeprune models`), a folder saved by spikeprune, `bundled`, or a "
              "checkpoint file from the reference Spikformer code (then also give --model PRESET)")


# ------------------------------------------------------------------------------------------------
# Shared argument helpers
# ------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model_spec", metavar="MODEL", nargs="?", default="bundled", help=MODEL_HELP + " (default: bundled)")
    p.add_argument("--model", dest="preset", metavar="PRESET", help="architecture preset for a checkpoint file")
    p.add_argument("--checkpoint", metavar="FILE", help="weights to load into the preset (reference or ours)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config field of a preset, e.g. --set num_classes=100 --set img_size=64")


def add_data_args(p: argparse.ArgumentParser, required: bool = False, default: str | None = "mnist5k") -> None:
    p.add_argument("--data", required=required, default=None if required else default, metavar="NAME[:PATH]", help=DATA_HELP)
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default 128)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SpikepruneError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resolve_model(args: argparse.Namespace):
    """Turn MODEL / --model / --checkpoint / --set into a model, with a clear error when they conflict."""
    from .models import create_model, list_models
    from .serialization import is_saved_model, load_model

    spec = getattr(args, "model_spec", None)
    preset, ckpt = args.preset, args.checkpoint
    overrides = _parse_overrides(args.overrides)
    if spec in (None, "bundled") and preset:
        spec = preset
    if spec == "bundled":
        from .bundled import bundled_model

        return bundled_model()
    path = Path(spec)
    if is_saved_model(path):
        if overrides:
            raise SpikepruneError("--set applies to presets, not to saved models")
        return load_model(path)
    if spec in list_models():
        return create_model(spec, checkpoint_path=ckpt, **overrides)
    if path.exists():
        if not preset:
            raise SpikepruneError(f"{spec} looks like a checkpoint file: name its architecture with --model PRESET "
                                  f"(one of {', '.join(list_models())})")
        return create_model(preset, checkpoint_path=path, **overrides)
    raise SpikepruneError(f"{spec!r} is neither a preset ({', '.join(list_models())}), a saved model folder, "
                          "nor an existing checkpoint file")


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def cmd_models(args):
    from .models import create_model, list_models
    from .models.spikformer import PRESETS

    print(f"{'preset':26s} {'layout':9s} {'D':>4s} {'depth':>5s} {'heads':>5s} {'img':>4s} {'params':>12s}")
    for name in list_models():
        c = PRESETS[name]
        n = sum(p.numel() for p in create_model(name).parameters())
        print(f"{name:26s} {c['layout']:9s} {c['embed_dim']:4d} {c['depth']:5d} {c['num_heads']:5d} {c['img_size']:4d} {n:12,d}")
    print("(parameter counts exclude the reference code's unused norm1/norm2 LayerNorms, which are not built)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikeprune",
        description="Structured pruning for Spiking Vision Transformers: train or load a Spikformer, "
                    "measure it, prune whole channels / heads / hidden units, and get back a smaller dense model.",
        epilog="Start with:  spikeprune evaluate bundled --data mnist5k   then   spikeprune prune bundled --data mnist5k -o runs/demo",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("models", help="list the model presets")
    p.set_defaults(func=cmd_models)
    for register in _REGISTRARS:
        register(sub)
    return parser


# Each feature module contributes its sub-commands through a `register_cli(subparsers)` function.
_COMMAND_MODULES = ["train", "measure", "surgery", "sensitivity", "policies"]
_REGISTRARS: list = []


def _load_registrars() -> None:
    from importlib import import_module

    for name in _COMMAND_MODULES:
        try:
            mod = import_module(f"spikeprune.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"spikeprune.{name}":
                continue  # feature not present in this build
            raise
        if hasattr(mod, "register_cli") and mod.register_cli not in _REGISTRARS:  # main() may run many times
            _REGISTRARS.append(mod.register_cli)


def main(argv: list[str] | None = None) -> int:
    _load_registrars()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SpikepruneError as e:
        print(f"spikeprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spikeprune: interrupted; finished outputs are kept, partial ones were not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
