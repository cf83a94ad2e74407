"""The `spikeprune` command line. One sub-command per job; `spikeprune COMMAND --help` explains each.

Every command that reads a model takes a MODEL argument: a preset name, a folder written by
save_model / train / prune, the word `bundled` (the shipped MNIST model), or a reference checkpoint
file together with --model PRESET. Every command speaks one grammar, listed once in GRAMMAR below
(tests/test_cli_grammar.py walks every parser against it; docs/cli.md explains it):

    -o/--output, --force            every command that writes
    --json                          every command that prints results (top-1 in percent, limits in points)
    --quiet, --threads, --device    every command (models: --quiet only; it runs no model)
    --data, --batch-size, --workers, --max-images SPLIT=N     every command that reads data
    --model, --checkpoint, --set    every command that builds a model (+ --random-weights where a
                                    trained model is implied)

Exit codes: 0 done; 2 refused (a one-line error: bad input, or a check that failed); 3 a prune run
finished but its constraints are not met (the run folder is kept); 130 interrupted; 1 a bug.

This is the edge of the package: the commands parse options, build the library's objects (a
RunSettings for `prune`) and print; nothing below imports this module.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from . import __version__, distributed
from .builders import is_builder_ref, load_user_model
from .bundled import ASSETS, BUNDLED_NAME, bundled_model, bundled_names
from .costs import format_report as format_measure_report, measure
from .data import DEFAULT_SIZE, dataset_for_model, load_dataset, parse_spec
from .deploy import (CHECK_IMAGES, DEFAULT_OPSET, FORMATS, INT4_OPSET, INPUTS, INT8_MAX_DROP, MAX_OPSET, MIN_OPSET,
                     PRECISIONS as WEIGHT_PRECISIONS, TIME_LOOPS, export, format_export_report)
from .errors import SpikepruneError
from .data_install import register_cli as register_data
from .importance import CRITERIA
from .inspect import format_report, inspect_model
from .models import create_model, list_models, preset_summary
from .policy_api import DEFAULT_MAX_ACC_DROP, Constraints, get_policy, policies
from .ratios import DEFAULT_SENSITIVITY_RATIOS, UNIFORM_GRID, parse_ratios
from .report import format_summary_table, plural
from .run import LATENCY_REPEATS, MEASURE_IMAGES, RunSettings, run
from .sensitivity import analyze
from .serialization import CONFIG_NAME, is_saved_model, load_model
from .stats import few_images_warning
from .training import (TrainSettings, check_output_folder, check_teacher_fits, check_training_settings, evaluate,
                       finetune, train)
from .validation import PRECISIONS, SPLITS, check_writable, deprecation, device as check_device, parse_max_images

DEFAULT_DATA = "mnist5k"  # what a model that records no data set is run on
EXIT_OK, EXIT_BUG, EXIT_REFUSED, EXIT_CONSTRAINTS_NOT_MET, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

DATA_HELP = ("dataset as NAME[:PATH]: mnist5k (bundled), digits (bundled), fashion-mnist[:DIR] and mnist:DIR (the "
             "original IDX files; `spikeprune data fashion-mnist` installs Fashion-MNIST), cifar10:DIR, cifar100:DIR "
             "(python-batch format), imagefolder:DIR (with train/ and val/ class folders)")
MODEL_HELP = ("a preset name (see `spikeprune models`), a folder saved by spikeprune, `bundled` (or "
              "bundled:sdt-1-64-mnist), a "
              "checkpoint file from the reference training code (then also give --model PRESET), or your own "
              "model as path/to/my_model.py:build or package.module:build, a function that returns the nn.Module "
              "(--checkpoint loads its weights; it is traced on two images of --data). Reading a Python file or "
              "module RUNS ITS CODE: give only code you trust")


# ------------------------------------------------------------------------------------------------
# The grammar, listed once
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grammar:
    """What a sub-command does, which decides the shared flags it must take, and its own flags."""
    kinds: frozenset  # among KIND_FLAGS
    own: tuple = ()


KIND_FLAGS = {
    "any": ("-h", "--help", "--quiet"),
    "runs": ("--threads", "--device"),                              # runs a model
    "model": ("--model", "--checkpoint", "--set"),                   # builds a model from MODEL
    "trained": ("--random-weights",),                                # ... that must be trained
    "data": ("--data", "--batch-size", "--workers", "--max-images"),  # reads a data set
    "writes": ("-o", "--output", "--force"),
    "prints": ("--json",),
}
_TRAINING = ("--epochs", "--lr", "--sync-bn", "--weight-decay", "--warmup-epochs", "--label-smoothing",
             "--max-grad-norm", "--seed", "--no-augment", "--no-amp", "--max-steps-per-epoch", "--resume")
GRAMMAR = {
    "models": Grammar(frozenset({"any", "prints"})),
    "train": Grammar(frozenset({"any", "runs", "model", "data", "writes", "prints"}), _TRAINING),
    "evaluate": Grammar(frozenset({"any", "runs", "model", "trained", "data", "prints"}), ("--split",)),
    "finetune": Grammar(frozenset({"any", "runs", "model", "trained", "data", "writes", "prints"}),
                        _TRAINING + ("--teacher", "--kd-weight", "--kd-temperature")),
    "measure": Grammar(frozenset({"any", "runs", "model", "data", "prints"}),
                       ("--split", "--latency-batch", "--latency-repeats", "--latency-warmup", "--no-latency")),
    # inspect reads no data, but a builder reference (my_model.py:build) is traced on --data's images
    "inspect": Grammar(frozenset({"any", "runs", "model", "prints"}), ("--data",)),
    "sensitivity": Grammar(frozenset({"any", "runs", "model", "trained", "data", "writes", "prints"}),
                           ("--ratios", "--groups", "--importance", "--round-to", "--calib-batches", "--seed")),
    # prune also takes the options each registered policy declares (PolicySpec.add_args), checked
    # against these words by the same test.
    "prune": Grammar(frozenset({"any", "runs", "model", "trained", "data", "writes", "prints"}),
                     ("--policy", "--max-acc-drop", "--target-saving", "--memory-budget", "--precision", "--importance",
                      "--round-to", "--ratios", "--uniform-ratios", "--groups", "--calib-batches", "--seed",
                      "--finetune-epochs", "--kd", "--kd-weight", "--kd-temperature", "--finetune-lr",
                      "--finetune-batch-size", "--limit-after-finetune", "--latency-repeats")),
    "export": Grammar(frozenset({"any", "runs", "model", "trained", "data", "writes", "prints"}),
                      ("--format", "--precision", "--ends", "--opset", "--batch", "--time-loop", "--input",
                       "--normalisation", "--check-split", "--no-check", "--max-drop", "--keep-inaccurate")),
    "data": Grammar(frozenset({"any", "writes"}), ("--from",)),  # installs a data set; runs no model
}
# Old spellings: they work for one version with a warning (validation.REMOVED_IN says which).
DEPRECATED = {
    "train": {"--out": "-o/--output"},
    "finetune": {"--out": "-o/--output"},
    "evaluate": {"--max-batches": "--max-images SPLIT=N"},
    "measure": {"--n-images": "--max-images SPLIT=N", "--repeats": "--latency-repeats", "--warmup": "--latency-warmup"},
    "prune": {"--measure-images": "--max-images firing=N"},
    "export": {"--check-images": "--max-images calib=N"},
}


def grammar_flags(command: str) -> tuple[set, set]:
    """(the shared flags `command` must take, every flag it may take besides its deprecated ones)."""
    g = GRAMMAR[command]
    shared = {f for kind in g.kinds for f in KIND_FLAGS[kind]}
    return shared, shared | set(g.own)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the text already names it); a default of
    None reads "none" (the option's help says what that means)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (text == argparse.SUPPRESS or "default" in text or action.required or not action.option_strings
                or action.nargs == 0 or action.default is argparse.SUPPRESS):
            return text
        return text + (" (default: none)" if action.default is None else " (default: %(default)s)")


class _Deprecated(argparse.Action):
    """An old spelling: stores its value where the command reads it and warns on stderr."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"spikeprune: warning: {deprecation(option_string, self.new)}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated(p: argparse.ArgumentParser, command: str, flag: str, dest: str, **kwargs) -> None:
    p.add_argument(flag, dest=dest, action=_Deprecated, new=DEPRECATED[command][flag], help=argparse.SUPPRESS,
                   default=argparse.SUPPRESS if dest in ("output",) else None, **kwargs)


def _count(minimum: int):
    """An argparse type: a whole number >= minimum, with a one-line error otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value
    return parse


def _device_type(text: str) -> str:
    try:
        return check_device(text)
    except SpikepruneError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--device ", "")) from None


def add_common_args(p: argparse.ArgumentParser, runs: bool = True) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars and no notes on stderr (errors still show)")
    if runs:
        p.add_argument("--threads", type=_count(1), default=None,
                       help=f"CPU threads torch uses (default: torch's, {torch.get_num_threads()} here); the same "
                            "--seed gives the same weights only at the same thread count and CPU type")
        add_device_arg(p)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device_type, default="cpu", metavar="{cpu,cuda,cuda:N}", help="where to run")


def add_json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON object (top-1 in percent)")


def add_output_args(p: argparse.ArgumentParser, metavar: str, what: str, force_help: str) -> None:
    # Not required=True for argparse: an old spelling (--out) may give it; the command checks.
    p.add_argument("-o", "--output", metavar=metavar, default=None, help=f"{what} (required)")
    p.add_argument("--force", action="store_true", help=force_help)


def add_model_args(p: argparse.ArgumentParser, positional: bool = True, trained: bool = False) -> None:
    if positional:
        p.add_argument("model_spec", metavar="MODEL", nargs="?", default="bundled", help=MODEL_HELP + " (default: bundled)")
    p.add_argument("--model", dest="preset", metavar="PRESET", help="architecture preset for a checkpoint file "
                   "(default: none)")
    p.add_argument("--checkpoint", metavar="FILE", help="weights to load into the preset, reference or ours, or "
                   "into the module a builder function returns (default: none: a preset has random weights)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config field of a preset, e.g. --set num_classes=100 --set img_size=64 "
                        "(default: none)")
    if trained:
        p.add_argument("--random-weights", action="store_true",
                       help="accept a preset without trained weights (its top-1 is chance); refused otherwise")


def add_data_args(p: argparse.ArgumentParser, splits: str | None = None, default: str | None = DEFAULT_DATA,
                  default_text: str | None = None, batch_size: int = 128,
                  batch_help: str = "evaluation batch size") -> None:
    """--data (default `default`, described as `default_text`), --batch-size, --workers, and with
    `splits` (the splits the command reads, for the help) --max-images SPLIT=N."""
    p.add_argument("--data", default=default, metavar="NAME[:PATH]",
                   help=f"{DATA_HELP} (default: {default_text or default})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)  # checked by the command
    p.add_argument("--workers", type=_count(0), default=0, help="data-loading worker processes")
    if splits:
        p.add_argument("--max-images", action="append", default=[], metavar="SPLIT=N",
                       help=f"use at most N images of a split ({splits}; repeatable), stratified by class "
                            "(default: all)")


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


def note(args, text: str) -> None:
    """A line for the person at the terminal (stderr), unless --quiet."""
    if not getattr(args, "quiet", False):
        print(f"spikeprune: {text}", file=sys.stderr)


def _require_output(args, command: str) -> None:
    if getattr(args, "output", None) in (None, ""):
        raise SpikepruneError(f"spikeprune {command} needs -o/--output")


# ------------------------------------------------------------------------------------------------
# MODEL, and the data set it was trained on
# ------------------------------------------------------------------------------------------------
def _model_folder(spec: str | None) -> Path | None:
    """The saved model folder MODEL names (bundled ones included), or None."""
    if spec == "bundled":
        return ASSETS / BUNDLED_NAME
    if spec and spec.startswith("bundled:"):
        return ASSETS / spec.split(":", 1)[1]
    if spec and spec in bundled_names() and spec in list_models():
        return ASSETS / spec  # a preset with a shipped namesake: that is the data set it is meant for
    return Path(spec) if spec and is_saved_model(Path(spec)) else None


def recorded_data(spec: str | None) -> str | None:
    """The data set a model folder records (config.json's extra.data, written by train and prune;
    for a run's model/, the run's settings), if it is a dataset spec; else None."""
    folder = _model_folder(spec)
    if folder is None:
        return None
    found = None
    try:
        found = json.loads((folder / CONFIG_NAME).read_text()).get("extra", {}).get("data")
        if found is None and (folder.parent / "run.json").is_file():
            found = json.loads((folder.parent / "run.json").read_text()).get("settings", {}).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(found, str):
        return None
    found = re.sub(r":(train|calib|test) \(\d+ images\)$", "", found)  # train() on a capped split records this
    try:
        parse_spec(found)
    except SpikepruneError:
        return None
    return found


def resolve_model(args: argparse.Namespace, trained: bool | None = None):
    """Turn MODEL / --model / --checkpoint / --set into a model, with a clear error when they
    conflict. A preset without --checkpoint has random weights: said on stderr, and refused where a
    trained model is implied (`trained`: the command has --random-weights) unless that is given."""
    spec = getattr(args, "model_spec", None)
    preset, ckpt = args.preset, args.checkpoint
    overrides = _parse_overrides(args.overrides)
    if trained is None:
        trained = hasattr(args, "random_weights")
    if spec in (None, "bundled") and preset:
        spec = preset
    if spec == "bundled":
        return bundled_model()
    if spec and spec.startswith("bundled:"):  # another shipped model, e.g. bundled:sdt-1-64-mnist
        return bundled_model(spec.split(":", 1)[1])
    if is_builder_ref(spec):  # the user's own module: their function builds it (running their code)
        if args.preset or overrides:
            raise SpikepruneError(f"--model and --set apply to presets; {spec} builds its own model")
        return load_user_model(spec, _example_input(args, spec), checkpoint=ckpt)
    path = Path(spec)
    if is_saved_model(path):
        if overrides:
            raise SpikepruneError("--set applies to presets, not to saved models")
        return load_model(path)
    if spec in list_models():
        model = create_model(spec, checkpoint_path=ckpt, **overrides)  # bad --set / --checkpoint: said first
        if ckpt is None:
            _random_weights(args, spec, trained)
        return model
    if path.is_dir():  # neither a saved model nor a checkpoint file
        what = "an empty folder" if not any(path.iterdir()) else "a folder without a config.json"
        raise SpikepruneError(f"{spec} is {what}, not a saved spikeprune model; give a folder written by "
                              "spikeprune (train / prune / save_model), a preset, or a checkpoint file with --model")
    if path.exists():
        if not preset:
            raise SpikepruneError(f"{spec} looks like a checkpoint file: name its architecture with --model PRESET "
                                  f"(one of {', '.join(list_models())})")
        return create_model(preset, checkpoint_path=path, **overrides)
    raise SpikepruneError(f"{spec!r} is neither a preset ({', '.join(list_models())}), a saved model folder, "
                          "nor an existing checkpoint file")


def _random_weights(args, preset: str, trained: bool) -> None:
    shipped = f"; its trained weights ship as bundled:{preset}" if preset in bundled_names() else ""
    if trained and not getattr(args, "random_weights", False):
        raise SpikepruneError(f"{preset} is a preset: an architecture with random weights (top-1 near chance){shipped}. "
                              "Give a trained model, --checkpoint FILE, or --random-weights to use random weights")
    note(args, f"{preset}: a preset with random weights (no trained weights loaded){shipped}")


def choose_data(args, model) -> str:
    """--data, or else the data set the model records (a note says so), or else mnist5k. A --data
    whose images are of another size than the model's, or of other channels / classes, is an error
    (dataset_for_model checks the last two)."""
    spec = getattr(args, "model_spec", None) or getattr(args, "preset", None)
    recorded = recorded_data(spec)
    if args.data is None:
        if recorded:
            note(args, f"data: {recorded}, the data set the model records (give --data to choose another)")
        return recorded or DEFAULT_DATA
    name, _ = parse_spec(args.data)
    size, model_size = DEFAULT_SIZE.get(name), getattr(getattr(model, "cfg", None), "img_size", None)
    # imagefolder images are resized to any size on purpose; the others have one native size.
    if name != "imagefolder" and size and model_size and size != model_size:
        dataset_for_model(args.data, model, "test", max_images=1)  # a missing or damaged folder, other channels
        # or classes are said first
        on = f" (it was trained on {recorded})" if recorded else ""
        raise SpikepruneError(f"{args.data} has {size}x{size} images but the model takes {model_size}x{model_size}"
                              f"{on}; give data of the model's size" + (f", e.g. --data {recorded}" if recorded else ""))
    return args.data


def _weights_word(args) -> str:
    random = getattr(args, "model_spec", None) in list_models() and args.checkpoint is None
    return "random" if random else "trained"


def _describe_model(model, spec: str, weights: str = "trained") -> str:
    n = sum(p.numel() for p in model.parameters())
    preset = getattr(model, "preset", None)
    return (f"{spec} ({preset + ', ' if preset and preset != spec else ''}{'random weights, ' if weights == 'random' else ''}"
            f"{n:,} parameters)")


def _example_input(args: argparse.Namespace, spec: str) -> torch.Tensor:
    """Two images of the command's --data: what a builder's module is traced on."""
    data = getattr(args, "data", None)
    if not data:
        raise SpikepruneError(f"{spec} is traced on two images of the data set it is meant for: give --data NAME[:PATH]")
    images = load_dataset(data, split="calib")
    return torch.stack([images[i][0] for i in range(min(2, len(images)))])


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def pct(fraction: float | None) -> float | None:
    """Top-1 as the CLI reports it everywhere: percent."""
    return None if fraction is None else 100.0 * float(fraction)


def _caps(args, keys=SPLITS) -> dict:
    return parse_max_images(getattr(args, "max_images", None), keys) or {}


# ------------------------------------------------------------------------------------------------
# models, inspect
# ------------------------------------------------------------------------------------------------
def cmd_models(args) -> int:
    shipped = set(bundled_names())
    rows = [{**preset_summary(name), "weights": f"bundled:{name}" if name in shipped else "random"}
            for name in list_models()]
    if args.json:
        print_json(rows)
        return EXIT_OK
    print(f"{'preset':26s} {'family':10s} {'params':>12s}  {'weights':32s} description")
    for r in rows:
        print(f"{r['name']:26s} {r['family']:10s} {r['params']:12,d}  {r['weights']:32s} {r['description']}")
    if not args.quiet:
        print("\nA preset is an architecture with random weights; `bundled:NAME` loads the trained ones that ship "
              "with spikeprune, --checkpoint FILE loads yours.")
    return EXIT_OK


def register_models(sub) -> None:
    p = sub.add_parser("models", help="list the model presets (and which ship with trained weights)",
                       description="List the model presets: family, parameters, and whether trained weights ship "
                                   "with spikeprune (bundled:NAME) or the preset has random weights only.",
                       formatter_class=HelpFormatter)
    add_common_args(p, runs=False)
    add_json_arg(p, "the presets")
    p.set_defaults(func=cmd_models)


def cmd_inspect(args) -> int:
    model = resolve_model(args)  # load_model restores the pruning record (the dense widths)
    report = inspect_model(model)
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return EXIT_OK


def register_inspect(sub) -> None:
    q = sub.add_parser("inspect", help="per-layer widths of a (pruned) model beside the dense ones, params, memory, MACs",
                       description="Show a model's groups (with the state-dict layers each one cuts) and layers with "
                                   "their current and dense widths, and its parameters, memory and MACs against the "
                                   "dense model's.", formatter_class=HelpFormatter)
    add_model_args(q)
    add_common_args(q)
    add_json_arg(q, "the report")
    q.add_argument("--data", metavar="NAME[:PATH]", help="with MODEL a builder reference (my_model.py:build): the "
                   "data set whose images it is traced on")
    q.set_defaults(func=cmd_inspect)


# ------------------------------------------------------------------------------------------------
# sensitivity
# ------------------------------------------------------------------------------------------------
def cmd_sensitivity(args) -> int:
    _require_output(args, "sensitivity")
    ratios = parse_ratios(args.ratios)
    caps = _caps(args, ("calib",))
    check_writable(args.output, "the table", folder=False)  # before minutes of analysis, not after
    model = resolve_model(args).eval()
    data = choose_data(args, model)
    if caps:
        data = dataset_for_model(data, model, "calib", max_images=caps["calib"])
    table = analyze(model, data, groups=args.groups, ratios=ratios, importance=args.importance,
                    batch_size=args.batch_size, output=args.output, seed=args.seed, device=args.device,
                    round_to=args.round_to, force=args.force, calib_batches=args.calib_batches,
                    progress=not args.quiet)
    if args.json:
        rows = [{**{k: v for k, v in r.items() if k != "top1"}, "top1_pct": pct(r["top1"])} for r in table.rows]
        print_json({"dense_top1_pct": pct(table.dense_top1), "forward_cost": table.forward_cost,
                    "warnings": table.warnings, "rows": rows, "output": str(args.output)})
    else:
        print(table.format())
        print(f"wrote {args.output}")
    return EXIT_OK


def register_sensitivity(sub) -> None:
    grid = ",".join(f"{r:g}" for r in DEFAULT_SENSITIVITY_RATIOS)
    p = sub.add_parser(
        "sensitivity", help="accuracy drop and memory saved when each prunable group alone is pruned",
        description="PSViT's per-layer sensitivity analysis on the calibration split: every group (the papers' "
                    "'layer'; `spikeprune inspect MODEL` lists them) is pruned alone at each ratio and the "
                    "calibration top-1 measured. Rows go to a resumable CSV: rerun the same command after an "
                    "interruption and it continues.", formatter_class=HelpFormatter)
    add_model_args(p, trained=True)
    add_data_args(p, "calib", None, f"the one the model records, else {DEFAULT_DATA}")
    add_common_args(p)
    add_output_args(p, "FILE.csv", "the table (resumed if it exists)", "replace a table written by a different run")
    add_json_arg(p, "the table")
    p.add_argument("--ratios", default=grid, help="fractions to remove, in [0, 1)")
    p.add_argument("--groups", default="*", metavar="PATTERN",
                   help="glob pattern(s) of the groups to analyse, comma-separated ('*': all)")
    p.add_argument("--importance", default="l2", choices=CRITERIA, help="unit ranking (l2: the seeds')")
    p.add_argument("--round-to", type=_count(1), default=1, metavar="N",
                   help="round kept channel counts up to a multiple of N")
    p.add_argument("--calib-batches", type=_count(1), default=4, metavar="N",
                   help="calibration batches for taylor / firing")
    p.add_argument("--seed", type=int, default=0, help="seed (random importance, ties)")
    p.set_defaults(func=cmd_sensitivity)


# ------------------------------------------------------------------------------------------------
# spikeprune prune
# ------------------------------------------------------------------------------------------------
_POLICY_ARG_DESTS: dict[str, list[str]] = {}
PRUNE_CAP_KEYS = SPLITS + ("firing",)


def _default_policy(args) -> str:
    if getattr(args, "uniform", None) is not None:
        return "uniform"
    if getattr(args, "ratio", None):
        return "groups"
    return "primesvt"


def settings_from_args(args, data: str | None = None) -> RunSettings:
    """The RunSettings `spikeprune prune` runs with (every check happens when it is built)."""
    _require_output(args, "prune")
    name = args.policy or _default_policy(args)
    get_policy(name)
    # A policy's own options must not be given to another policy: say so rather than ignore them.
    for other, dests in _POLICY_ARG_DESTS.items():
        if other == name:
            continue
        for d in dests:
            if getattr(args, d, None) not in (None, [], False):
                raise SpikepruneError(f"--{d.replace('_', '-')} belongs to the {other} policy, not {name}; "
                                      f"drop it or use --policy {other}")
    caps = _caps(args, PRUNE_CAP_KEYS)
    if args.legacy_measure_images is not None:
        caps.setdefault("firing", args.legacy_measure_images)
    firing = caps.pop("firing", MEASURE_IMAGES)
    return RunSettings(
        data=data or args.data or DEFAULT_DATA, output=args.output, policy=name,
        constraints=Constraints(args.max_acc_drop, args.target_saving, args.memory_budget, args.precision),
        importance=args.importance, round_to=args.round_to, ratios=args.ratios, uniform_ratios=args.uniform_ratios,
        groups=args.groups, batch_size=args.batch_size, workers=args.workers, device=args.device, seed=args.seed,
        calib_batches=args.calib_batches, finetune_epochs=args.finetune_epochs, kd=args.kd, kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature, finetune_lr=args.finetune_lr,
        finetune_batch_size=args.finetune_batch_size, limit_after_finetune=args.limit_after_finetune,
        options={d: getattr(args, d, None) for d in _POLICY_ARG_DESTS.get(name, [])},
        max_images=caps or None, measure_images=firing, threads=args.threads,
        latency_repeats=args.latency_repeats, model_spec=args.model_spec, force=args.force, progress=not args.quiet)


def cmd_prune(args) -> int:
    settings_from_args(args)  # every setting checked before the model is even loaded
    model = resolve_model(args).eval()
    settings = settings_from_args(args, choose_data(args, model))
    summary = run(settings, model)
    met = bool(summary["constraints_met"])
    code = EXIT_OK if met else EXIT_CONSTRAINTS_NOT_MET
    if args.json:
        k = summary["constraint_checks"]
        print_json({"output": str(args.output), "constraints_met": met, "exit_code": code,
                    "acc_drop_calib_points": k["acc_drop_calib"], "max_acc_drop_points": summary["constraints"]["max_acc_drop"],
                    "memory_saved_pct": pct(summary["memory_saved"]),
                    "test_top1_pct": {n: pct((summary.get(n) or {}).get("top1")) for n in ("dense", "pruned", "finetuned")},
                    "calib_top1_pct": {"dense": pct(summary["calib"]["dense_top1"]),
                                       "pruned": pct(summary["calib"]["pruned_top1"]),
                                       "finetuned": pct(summary["calib"]["finetuned_top1"])},
                    "report": str(Path(args.output) / "report.md"), "summary": str(Path(args.output) / "summary.json")})
    else:
        print(format_summary_table(summary))
        print(f"report: {Path(args.output) / 'report.md'}")
    if not met:
        print(f"spikeprune: constraints NOT met (exit code {code}); the run folder {args.output} is kept: its "
              "report says which constraint failed", file=sys.stderr)
    return code


def register_prune(sub) -> None:
    """Add `spikeprune prune` with the common options and every policy's own."""
    known = policies()
    p = sub.add_parser(
        "prune", help=f"prune a model with a policy ({', '.join(sorted(known))}; default primesvt) into a run folder",
        description="Prune whole channels / heads of a model under an accuracy limit (and optionally a memory "
                    "target), optionally fine-tune, and write RUN/: model/ (load it as MODEL), summary.json, "
                    "report.md (read this first), plots/, sensitivity.csv. Decisions use the calibration split, "
                    "final figures the test split. Rerunning the same command resumes an interrupted run. "
                    f"Exit code {EXIT_CONSTRAINTS_NOT_MET}: the run finished but its constraints are not met "
                    "(the folder is kept).",
        epilog="examples:\n  spikeprune prune bundled --data mnist5k --policy psvit --max-acc-drop 3 -o runs/psvit\n"
               "  spikeprune prune bundled --data mnist5k --uniform 0.3 -o runs/u30",
        formatter_class=HelpFormatter)
    add_model_args(p, trained=True)
    add_data_args(p, "train, calib, test; firing=N: test images whose firing rates give SOPs and energy, default "
                     f"{MEASURE_IMAGES}", None, f"the one the model records, else {DEFAULT_DATA}")
    add_common_args(p)
    add_output_args(p, "RUN", "run folder (resumed if it holds this run)",
                    "replace a folder that holds something else (the same run is always resumed, not replaced)")
    add_json_arg(p, "the outcome")
    p.add_argument("--policy", default=None, choices=sorted(known),
                   help="how ratios are chosen (default: uniform with --uniform, groups with --ratio, else primesvt)")
    c = p.add_argument_group("constraints")
    c.add_argument("--max-acc-drop", type=float, default=None, metavar="POINTS",
                   help=f"most top-1 points to lose against the dense model, on the calibration split (default "
                        f"{DEFAULT_MAX_ACC_DROP:g})")
    c.add_argument("--target-saving", type=float, default=None, metavar="F",
                   help="fraction of the dense model's memory to save, in (0, 1) (default: none)")
    c.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="memory budget: bytes, or kB/MB/GB (powers of 1000) or KiB/MiB/GiB (powers of 1024), e.g. 8MB "
                        "(default: none)")
    c.add_argument("--precision", default="fp32", choices=PRECISIONS, help="precision the memory is counted at")
    e = p.add_argument_group("pruning")
    e.add_argument("--importance", default="l2", choices=CRITERIA,
                   help="unit ranking: l2 (the seeds'), l1, bn, taylor, random, firing (spike-aware)")
    e.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="round kept channel counts up to a multiple of N")
    e.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_SENSITIVITY_RATIOS),
                   help="ratio grid of the sensitivity analysis")
    e.add_argument("--uniform-ratios", default=",".join(f"{r:g}" for r in UNIFORM_GRID),
                   help="ratio grid of the uniform sweep")
    e.add_argument("--groups", default="*", metavar="PATTERN", help="groups the sensitivity analysis covers ('*': all)")
    e.add_argument("--calib-batches", type=int, default=4, metavar="N", help="calibration batches for taylor / firing")
    e.add_argument("--seed", type=int, default=0, help="seed")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--finetune-epochs", type=int, default=0, metavar="N", help="fine-tune the pruned model (0: no)")
    f.add_argument("--kd", action="store_true", help="distil from the dense model while fine-tuning")
    f.add_argument("--kd-weight", type=float, default=0.5, help="weight of the distillation term")
    f.add_argument("--kd-temperature", type=float, default=4.0, help="distillation temperature")
    f.add_argument("--finetune-lr", type=float, default=1e-4, help="peak learning rate")
    f.add_argument("--finetune-batch-size", type=int, default=64, metavar="N", help="training batch size")
    f.add_argument("--limit-after-finetune", action="store_true",
                   help="hold --max-acc-drop on the fine-tuned model (what you deploy), not on the pruned one; the "
                        "policy then prunes further and checks its choice with short distillation (needs "
                        "--finetune-epochs; policy shrink)")
    o = p.add_argument_group("measuring")
    o.add_argument("--latency-repeats", type=int, default=LATENCY_REPEATS, metavar="N",
                   help="timed repeats per latency figure")
    add_deprecated(p, "prune", "--measure-images", "legacy_measure_images", type=_count(1))
    for spec in known.values():
        if spec.add_args:
            g = p.add_argument_group(f"{spec.name} policy", spec.help)
            before = {a.dest for a in p._actions}
            spec.add_args(g)
            _POLICY_ARG_DESTS[spec.name] = [a.dest for a in p._actions if a.dest not in before]
    p.set_defaults(func=cmd_prune)


# ------------------------------------------------------------------------------------------------
# spikeprune train / evaluate / finetune
# ------------------------------------------------------------------------------------------------
def _add_training_args(p: argparse.ArgumentParser, command: str, lr: float, warmup: float, smoothing: float) -> None:
    add_data_args(p, "train, calib, test", None, f"the one the model records, else {DEFAULT_DATA}", batch_size=64,
                  batch_help="training batch size; under torchrun the global batch, split between the processes")
    p.add_argument("--epochs", type=int, required=True, help="passes over the training split")
    add_output_args(p, "OUT", "output folder: the model (OUT is loadable as MODEL), history.json, checkpoint/ for "
                              "--resume", "replace a finished or different run in OUT")
    add_deprecated(p, command, "--out", "output")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate of AdamW")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (equals a one-process run)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--warmup-epochs", type=float, default=warmup,
                   help="epochs of linear learning-rate warm-up before the cosine decay")
    p.add_argument("--label-smoothing", type=float, default=smoothing, help="label smoothing of the cross-entropy, 0..1")
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip gradients to this norm (default: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same weights on the CPU")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train without data augmentation")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    p.add_argument("--max-steps-per-epoch", type=int, default=None,
                   help="cut each epoch short, for quick trials (default: whole epochs)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in OUT")
    add_common_args(p)


def _training_kwargs(args) -> dict:
    return dict(lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                batch_size=args.batch_size, label_smoothing=args.label_smoothing, device=args.device, amp=args.amp,
                seed=args.seed, output=args.output, resume=args.resume, force=args.force,
                max_grad_norm=args.max_grad_norm, progress=not args.quiet, augment=args.augment, workers=args.workers,
                max_steps_per_epoch=args.max_steps_per_epoch, sync_bn=args.sync_bn,
                threads=args.threads)


def _training_data(args, model, data: str) -> tuple:
    """(data, val_data) for train(): the spec itself, or capped splits with --max-images."""
    caps = _caps(args)
    if not caps.get("train") and not caps.get("calib"):
        return data, None
    return (dataset_for_model(data, model, "train", augment=args.augment, max_images=caps.get("train")),
            dataset_for_model(data, model, "calib", max_images=caps.get("calib")))


def _model_args(p: argparse.ArgumentParser, what: str, trained: bool = False) -> None:
    p.add_argument("model_spec", metavar="MODEL", help=f"{what}: " + MODEL_HELP)
    add_model_args(p, positional=False, trained=trained)


def _resolve_seeded(args):
    torch.manual_seed(args.seed)  # the initial weights of a preset depend on it
    return resolve_model(args)


def _check_cli_training(args, command: str, distil: bool) -> None:
    """The cheap checks of a train / finetune command line, before any model, data or evaluation."""
    _require_output(args, command)
    check_training_settings(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                            warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                            label_smoothing=args.label_smoothing,
                            kd_weight=args.kd_weight if distil else 0.5,
                            kd_temperature=args.kd_temperature if distil else 4.0,
                            max_grad_norm=args.max_grad_norm, workers=args.workers,
                            max_steps_per_epoch=args.max_steps_per_epoch, seed=args.seed, threads=args.threads,
                            cli=True)
    _caps(args)
    check_output_folder(args.output, resume=args.resume, force=args.force)


def _test_top1(args, model, data: str) -> dict:
    return evaluate(model, data, split="test", device=args.device, progress=not args.quiet,
                    max_images=_caps(args).get("test"))


def cmd_train(args) -> int:
    _check_cli_training(args, "train", distil=False)
    model = _resolve_seeded(args)
    data = choose_data(args, model)
    train_data, val = _training_data(args, model, data)
    recipe, how = TrainSettings.split(args.epochs, **_training_kwargs(args))
    model, history = train(model, train_data, recipe, val_data=val, **how)
    test = _test_top1(args, model, data)
    _warn_few_images("the test top-1", test)
    last = history[-1] if history else {}
    if args.json:
        print_json({"model": args.model_spec, "data": data, "output": str(args.output), "epochs": len(history),
                    "calib_top1_pct": pct(last.get("calib_top1")), "test_top1_pct": pct(test["top1"]),
                    "test_top5_pct": pct(test["top5"]), "test_images": test["n"], "history": history})
        return EXIT_OK
    calib = f"calib top-1 {last['calib_top1']:.2%}, " if last.get("calib_top1") is not None else ""
    print(f"trained {_describe_model(model, args.model_spec)} for {plural(len(history), 'epoch')} on {data}: "
          f"{calib}test top-1 {test['top1']:.2%} of {test['n']} images, test top-5 {test['top5']:.2%}")
    print(f"saved to {args.output}  (try: spikeprune evaluate {args.output})")
    _print_best(args.output, history)
    return EXIT_OK


def _warn_few_images(what: str, m: dict) -> None:
    text = few_images_warning(what, m["n"], m["top1"])
    if text:
        warnings.warn(text, stacklevel=2)


def _print_best(out, history: list[dict]) -> None:
    """Name OUT/best when an earlier epoch did better on the calibration split than the last one."""
    scored = [h for h in history if h.get("calib_top1") is not None]
    if not scored:
        return
    top = max(scored, key=lambda h: h["calib_top1"])
    # (a run resumed from a version without OUT/best has none until its next best epoch)
    if top["calib_top1"] > scored[-1]["calib_top1"] and (Path(out) / "best").is_dir():
        print(f"epoch {top['epoch']} had the best calibration top-1 ({top['calib_top1']:.2%} against "
              f"{scored[-1]['calib_top1']:.2%} last): its model is {Path(out) / 'best'}")


def cmd_evaluate(args) -> int:
    caps = _caps(args)
    if set(caps) - {args.split}:
        raise SpikepruneError(f"evaluate reads the {args.split} split only; give --max-images {args.split}=N")
    model = resolve_model(args)
    data = choose_data(args, model)
    max_batches = args.legacy_max_batches
    m = evaluate(model, data, split=args.split, batch_size=args.batch_size, device=args.device,
                 max_batches=max_batches, max_images=caps.get(args.split), progress=not args.quiet,
                 workers=args.workers)
    _warn_few_images(f"the {args.split} top-1", m)
    k = min(5, model.cfg.num_classes) if hasattr(model, "cfg") else 5
    weights = _weights_word(args)
    if args.json:
        print_json({"model": args.model_spec, "weights": weights, "data": data, "split": args.split,
                    "top1_pct": pct(m["top1"]), "top5_pct": pct(m["top5"]), "top5_k": k, "loss": m["loss"],
                    "images": m["n"]})
        return EXIT_OK
    rows = [("model", _describe_model(model, args.model_spec, weights)), ("data", f"{data}, split {args.split}"),
            ("images", f"{m['n']}"), ("top-1", f"{m['top1']:.2%}"), (f"top-{k}", f"{m['top5']:.2%}"),
            ("loss", f"{m['loss']:.4f}")]
    for name, value in rows:
        print(f"{name:8s} {value}")
    return EXIT_OK


def cmd_finetune(args) -> int:
    _check_cli_training(args, "finetune", distil=bool(args.teacher))
    model = _resolve_seeded(args)
    data = choose_data(args, model)
    teacher = None
    if args.teacher:
        teacher = resolve_model(argparse.Namespace(model_spec=args.teacher, preset=None, checkpoint=None, overrides=[],
                                                   quiet=args.quiet), trained=True)
        check_teacher_fits(teacher, model)  # before the "before" figures are measured
    progress, caps = not args.quiet, _caps(args)

    def accuracy(m):
        return {s: evaluate(m, data, split=s, device=args.device, progress=progress, max_images=caps.get(s))
                for s in ("calib", "test")}

    before = {s: m["top1"] for s, m in accuracy(model).items()}
    train_data, val = _training_data(args, model, data)
    model, history = finetune(model, train_data, args.epochs, teacher=teacher, kd_weight=args.kd_weight,
                              kd_temperature=args.kd_temperature, val_data=val, **_training_kwargs(args))
    after = accuracy(model)
    _warn_few_images("the test top-1 after fine-tuning", after["test"])
    after = {s: m["top1"] for s, m in after.items()}
    if args.json:
        print_json({"model": args.model_spec, "data": data, "teacher": args.teacher, "output": str(args.output),
                    "before_top1_pct": {s: pct(v) for s, v in before.items()},
                    "after_top1_pct": {s: pct(v) for s, v in after.items()}, "history": history})
        return EXIT_OK
    print(f"fine-tuned {_describe_model(model, args.model_spec)} for {plural(args.epochs, 'epoch')} on {data}"
          + (f" with distillation from {args.teacher} (weight {args.kd_weight:g}, T {args.kd_temperature:g})"
             if teacher is not None else ""))
    print(f"{'':8s} {'calib top-1':>12s} {'test top-1':>11s}")
    for name, acc in (("before", before), ("after", after)):
        print(f"{name:8s} {acc['calib']:12.2%} {acc['test']:11.2%}")
    print(f"saved to {args.output}")
    _print_best(args.output, history)
    return EXIT_OK


def register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (a preset from scratch, or continue a saved one)",
        description="Train a model with AdamW (warm-up + cosine schedule), label smoothing, augmentation, "
                    "and a checkpoint after every epoch. The calib split is measured each epoch; the test split "
                    "once at the end. Same --seed, same weights (CPU).",
        epilog="example: spikeprune train spikformer-2-128-mnist --data mnist5k --epochs 12 -o runs/mnist",
        formatter_class=HelpFormatter)
    _model_args(p, "what to train (a preset starts from random weights)")
    _add_training_args(p, "train", lr=5e-4, warmup=1.0, smoothing=0.1)
    add_json_arg(p, "the result and history")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate", help="accuracy (top-1, top-5) and loss of a model on a dataset split",
        description="Measure a model's top-1 / top-5 accuracy and mean cross-entropy on one split. Without --data, "
                    "a model that records its data set (the bundled ones, train / prune outputs) is evaluated on it.",
        epilog="example: spikeprune evaluate runs/mnist --split test --json", formatter_class=HelpFormatter)
    add_model_args(p, trained=True)
    add_data_args(p, "the --split one", None, f"the one the model records, else {DEFAULT_DATA}")
    add_common_args(p)
    p.add_argument("--split", default="test", choices=list(SPLITS),
                   help="test for final figures; calib is what pruning decisions use")
    add_json_arg(p, "the metrics")
    add_deprecated(p, "evaluate", "--max-batches", "legacy_max_batches", type=_count(1))
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "finetune", help="fine-tune a (pruned) model, optionally distilling from the dense one",
        description="Fine-tune a model with a low learning rate; with --teacher the loss mixes knowledge "
                    "distillation on logits (KL at temperature T, weight --kd-weight) with cross-entropy. "
                    "Prints calib and test top-1 before and after.",
        epilog="example: spikeprune finetune runs/pruned --teacher bundled --data mnist5k --epochs 2 -o runs/ft",
        formatter_class=HelpFormatter)
    _model_args(p, "the model to fine-tune", trained=True)
    p.add_argument("--teacher", metavar="MODEL", default=None,
                   help="distil from this model (a saved folder, a preset, or `bundled`) (default: no distillation)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the distillation term, 0..1")
    p.add_argument("--kd-temperature", type=float, default=4.0, help="softmax temperature T for distillation")
    add_json_arg(p, "before/after accuracy")
    _add_training_args(p, "finetune", lr=1e-4, warmup=0.0, smoothing=0.1)
    p.set_defaults(func=cmd_finetune)


# ------------------------------------------------------------------------------------------------
# spikeprune measure
# ------------------------------------------------------------------------------------------------
MEASURE_FIRING_IMAGES = 256


def cmd_measure(args) -> int:
    caps = _caps(args, SPLITS + ("firing",))
    if set(caps) - {args.split, "firing"}:
        raise SpikepruneError(f"measure reads the {args.split} split only; give --max-images {args.split}=N")
    if args.legacy_n_images is not None:
        caps.setdefault("firing", args.legacy_n_images)
    n = min(caps.get(args.split, MEASURE_FIRING_IMAGES), caps.get("firing", MEASURE_FIRING_IMAGES))
    repeats = args.legacy_repeats if args.legacy_repeats is not None else args.latency_repeats
    warmup = args.legacy_warmup if args.legacy_warmup is not None else args.latency_warmup
    model = resolve_model(args)
    data = choose_data(args, model) if args.data is not None else None  # None: no firing rates
    report = measure(model, data=data, device=args.device, max_images=n, batch_size=args.batch_size,
                     latency=not args.no_latency, latency_batch=args.latency_batch, repeats=repeats,
                     warmup=warmup, split=args.split)
    if args.json:
        print_json(report)
    else:
        print(format_measure_report(report))
    return EXIT_OK


def register_measure(subparsers) -> None:
    p = subparsers.add_parser(
        "measure", help="parameters, memory, MACs, SOPs, energy and latency, per layer and in total",
        description="Measure a model: parameters and weight memory (fp32/fp16/int8), MACs per image, and with "
                    "--data the firing rates behind synaptic operations (SOPs) and the energy estimate "
                    "(E_MAC 4.6 pJ, E_AC 0.9 pJ), plus the median forward latency. Definitions are printed "
                    "under the table.", formatter_class=HelpFormatter)
    add_model_args(p)
    add_data_args(p, f"the --split one, or firing=N; default {MEASURE_FIRING_IMAGES} images give the firing rates",
                  None, "none: no firing rates, SOPs or energy", batch_size=64, batch_help="batch size of the firing-rate pass")
    add_common_args(p)
    p.add_argument("--split", default="test", choices=list(SPLITS), help="which split of --data gives the firing rates")
    p.add_argument("--latency-batch", type=int, default=1, help="batch size of the timed forwards")
    p.add_argument("--latency-repeats", type=_count(1), default=20, help="timed forwards; the median is reported")
    p.add_argument("--latency-warmup", type=_count(0), default=3, help="untimed forwards before timing")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    add_json_arg(p, "the report")
    add_deprecated(p, "measure", "--n-images", "legacy_n_images", type=_count(1))
    add_deprecated(p, "measure", "--repeats", "legacy_repeats", type=_count(1))
    add_deprecated(p, "measure", "--warmup", "legacy_warmup", type=_count(0))
    p.set_defaults(func=cmd_measure)


# ------------------------------------------------------------------------------------------------
# spikeprune export
# ------------------------------------------------------------------------------------------------
EXPORT_HELP = ("write the model as an ONNX file (BatchNorm folded, LIF unrolled or in one Loop, fp32 / fp16 / int8 / "
               "int4 weights, raw-pixel input) and check it")


def _points(text: str) -> float:
    """An argparse type: a finite, non-negative number of top-1 points (NaN is refused here, not at the gate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of top-1 points, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        raise argparse.ArgumentTypeError(f"a finite, non-negative number of top-1 points, got {text!r}")
    return value


def cmd_export(args) -> int:
    _require_output(args, "export")
    caps = _caps(args, ("calib", "test"))
    if args.legacy_check_images is not None:
        caps.setdefault(args.check_split, args.legacy_check_images)
    model = resolve_model(args)
    data = choose_data(args, model) if args.data is not None else None  # None: random images, no accuracy
    report = export(model, args.output, format=args.format, precision=args.precision, opset=args.opset,
                           check=not args.no_check, data=data, force=args.force, max_drop=args.max_drop,
                           keep_inaccurate=args.keep_inaccurate, max_images=caps.get(args.check_split, CHECK_IMAGES),
                           progress=False, input=args.input, normalisation=args.normalisation, ends=args.ends,
                           check_split=args.check_split, batch=args.batch, time_loop=args.time_loop)
    if args.json:
        print_json(report)
    else:
        print(format_export_report(report))
    return EXIT_OK


def register_export(sub) -> None:
    p = sub.add_parser(
        "export", help=EXPORT_HELP,
        description="Export a model (dense or pruned, any family) to ONNX: BatchNorm folded into the layer before "
                    "it, the LIF unrolled over T as plain ops (or one time step as an ONNX Loop's body, --time-loop "
                    "loop), T fixed, batch size dynamic, the input normalisation in the graph (the file takes raw "
                    "pixels in [0, 1]). Unless --no-check, ONNX Runtime is compared "
                    "with PyTorch (the fake-quantised model for reduced precision) on the calibration split of --data "
                    "(predicted classes, spike decisions, a float64 comparison) before the file is moved into place; "
                    "a reduced-precision file that loses more than --max-drop points of top-1 is refused.",
        formatter_class=HelpFormatter)
    add_model_args(p, trained=True)
    add_data_args(p, f"calib (or test, with --check-split test): images the check runs on, default {CHECK_IMAGES}",
                  None, "random images: the function is checked, not accuracy")
    add_common_args(p)
    add_output_args(p, "FILE", "the file to write, e.g. model.onnx", "replace FILE if it exists")
    add_json_arg(p, "the report")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="file format")
    p.add_argument("--precision", default=None, choices=WEIGHT_PRECISIONS,
                   help="weights: fp32, fp16 (Cast), int8 or int4 per output channel (DequantizeLinear; int4 packed, "
                        "opset 21) (default: the plan a quantised model carries, else fp32)")
    p.add_argument("--ends", default=None, choices=WEIGHT_PRECISIONS,
                   help="precision of the first conv and the head (default: int8 under --precision int4, else as "
                        "--precision)")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset ({MIN_OPSET['fp32']}-{MAX_OPSET}, int8 from {MIN_OPSET['int8']}, int4 from "
                        f"{MIN_OPSET['int4']}; default {DEFAULT_OPSET}, {INT4_OPSET} with int4 weights)")
    p.add_argument("--batch", type=_count(1), default=None, metavar="N",
                   help="a fixed batch size: a graph about half as large (no shape arithmetic), that runs at N "
                        "images only (default: dynamic)")
    p.add_argument("--time-loop", default="unrolled", choices=TIME_LOOPS,
                   help="the T time steps written out one after another (unrolled), or one time step written once "
                        "as the body of an ONNX Loop with the neurons' membranes carried (loop: a graph that does not "
                        "grow with T; the built-in families, not a traced module; see docs/deployment.md)")
    p.add_argument("--input", default="raw", choices=INPUTS,
                   help="what the file takes: raw pixels in [0, 1] (the normalisation in the graph) or images "
                        "normalised by the caller")
    p.add_argument("--normalisation", default=None, metavar="DATASET",
                   help="the dataset whose mean / std the model was trained with (default: that of --data)")
    p.add_argument("--check-split", default="calib", choices=("calib", "test"), help="the split of --data the check runs on")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime check")
    p.add_argument("--max-drop", type=_points, default=INT8_MAX_DROP,
                   help="top-1 points a reduced-precision file may lose against fp32, counted in images")
    p.add_argument("--keep-inaccurate", action="store_true",
                   help="keep a reduced-precision file whose top-1 falls more than --max-drop below fp32 (with a warning)")
    add_deprecated(p, "export", "--check-images", "legacy_check_images", type=_count(1))
    p.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------------------------
# The parser and the entry point
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikeprune",
        description="Structured pruning for Spiking Vision Transformers: train or load a Spikformer or SDT, "
                    "measure it, prune whole channels / heads / hidden units, and get back a smaller dense model.",
        epilog="Start with:  spikeprune evaluate bundled   then   spikeprune prune bundled -o runs/demo\n"
               f"Exit codes: {EXIT_OK} done, {EXIT_REFUSED} refused (one-line error), {EXIT_CONSTRAINTS_NOT_MET} prune "
               f"finished with its constraints not met (run folder kept), {EXIT_INTERRUPTED} interrupted, "
               f"{EXIT_BUG} a bug.", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"spikeprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _REGISTRARS:
        register(sub)
    return parser


# The commands, in the order `spikeprune --help` lists them.
_REGISTRARS = [register_models, register_train, register_measure, register_inspect, register_sensitivity,
               register_prune, register_export,
               register_data]  # spikeprune data fashion-mnist (data_install.py)


def subcommand_parsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """Each sub-command's parser by name (what the grammar test walks)."""
    parser = parser or build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_REFUSED
    previous_threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        with distributed.launched(args), _one_line_warnings():  # under torchrun: one of N processes
            return int(args.func(args) or 0)
    except SpikepruneError as e:
        distributed.report_error(f"spikeprune: error: {e}", e)
        return EXIT_REFUSED
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        distributed.report_error(f"spikeprune: error: {os.strerror(e.errno).lower()}{where}; free some space (or "
                                 "choose an output on another disk) and run the command again: finished outputs "
                                 "are kept, partial ones were not written", e)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("spikeprune: interrupted; finished outputs are kept, partial ones were not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        torch.set_num_threads(previous_threads)


@contextlib.contextmanager
def _one_line_warnings():
    """Warnings shown as `spikeprune: warning: MESSAGE`, without the Python file, line and source
    line that follow it by default (they name our code, not the user's input)."""
    def one_line(message, category, filename, lineno, line=None):
        return f"spikeprune: warning: {message}\n"

    before = warnings.formatwarning
    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = before


def entry_point() -> NoReturn:
    """The `spikeprune` command (and `python -m spikeprune`): main(), then exit with its code."""
    try:
        code = main()
    except Exception:  # a bug, not a SpikepruneError: main() reports those
        if not distributed.joined_a_group():
            raise
        traceback.print_exc()  # what the interpreter would print; exit_with skips its shutdown
        code = EXIT_BUG
    exit_with(code)


def exit_with(code: int) -> NoReturn:
    """Exit the process with `code`, skipping interpreter shutdown if it joined a process group."""
    if distributed.joined_a_group():
        # The gloo process group outlives destroy_process_group() (building DistributedDataParallel
        # leaves references to it behind in torch 2.13), so its worker threads run into interpreter
        # shutdown; one that drops a finished all-reduce then needs the GIL, and the process aborts
        # ("terminate called without an active exception") after the command succeeded: 2 torchrun
        # fine-tunes in 79 here, and one in CI. Every output is written and every collective done
        # by now, so leave without the shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
