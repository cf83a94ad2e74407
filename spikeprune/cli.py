"""The `spikeprune` command line. One sub-command per job; `spikeprune COMMAND --help` explains each.

Every command that reads data takes --data NAME[:PATH]; every command that reads a model takes a
MODEL argument: a preset name, a folder written by save_model / train / prune, the word `bundled`
(the shipped MNIST model), or a reference checkpoint file together with --model PRESET.

This is the edge of the package: the commands parse options, build the library's objects (a
RunSettings for `prune`) and print; nothing below imports this module, except the train / measure
modules' own `register_cli` hooks, which read the shared argument helpers when the parser is built.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import torch

from .bundled import bundled_model
from . import distributed
from .errors import SpikepruneError
from . import deploy
from .importance import CRITERIA
from .inspect import format_report, inspect_model
from .costs import format_report as format_measure_report, measure
from .models import create_model, list_models, preset_summary
from .policy_api import DEFAULT_MAX_ACC_DROP, PRECISIONS, Constraints, get_policy, policies
from .ratios import DEFAULT_SENSITIVITY_RATIOS, UNIFORM_GRID, parse_ratios
from .report import format_summary_table
from .run import LATENCY_REPEATS, MEASURE_IMAGES, RunSettings, check_writable, run
from .sensitivity import analyze
from .serialization import is_saved_model, load_model
from .training import check_output_folder, check_training_settings, evaluate, finetune, train

DATA_HELP = ("dataset as NAME[:PATH]: mnist5k (bundled), digits (bundled), fashion-mnist[:DIR] and mnist:DIR (the "
             "original IDX files; `make data` brings Fashion-MNIST), cifar10:DIR, cifar100:DIR (python-batch "
             "format), imagefolder:DIR (with train/ and val/ class folders)")
MODEL_HELP = ("a preset name (see `spikeprune models`), a folder saved by spikeprune, `bundled` (or "
              "bundled:sdt-1-64-mnist), or a "
              "checkpoint file from the reference training code (then also give --model PRESET)")


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


def add_data_args(p: argparse.ArgumentParser, required: bool = False, default: str | None = "mnist5k") -> None:
    p.add_argument("--data", required=required, default=None if required else default, metavar="NAME[:PATH]", help=DATA_HELP)
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default 128)")
    p.add_argument("--workers", type=_count(0), default=0, help="data-loading worker processes (default 0)")


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
    spec = getattr(args, "model_spec", None)
    preset, ckpt = args.preset, args.checkpoint
    overrides = _parse_overrides(args.overrides)
    if spec in (None, "bundled") and preset:
        spec = preset
    if spec == "bundled":
        return bundled_model()
    if spec and spec.startswith("bundled:"):  # another shipped model, e.g. bundled:sdt-1-64-mnist
        return bundled_model(spec.split(":", 1)[1])
    path = Path(spec)
    if is_saved_model(path):
        if overrides:
            raise SpikepruneError("--set applies to presets, not to saved models")
        return load_model(path)
    if spec in list_models():
        return create_model(spec, checkpoint_path=ckpt, **overrides)
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


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def cmd_models(args):
    print(f"{'preset':26s} {'family':10s} {'params':>12s}  description")
    for name in list_models():
        p = preset_summary(name)
        print(f"{name:26s} {p['family']:10s} {p['params']:12,d}  {p['description']}")


def cmd_inspect(args) -> int:
    model = resolve_model(args)  # load_model restores the pruning record (the dense widths)
    report = inspect_model(model)
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0


def register_inspect(sub) -> None:
    q = sub.add_parser("inspect", help="per-layer widths of a (pruned) model beside the dense ones, params, memory, MACs",
                       description="Show a model's groups (with the state-dict layers each one cuts) and layers with "
                                   "their current and dense widths, and its parameters, memory and MACs against the "
                                   "dense model's.")
    add_model_args(q)
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=cmd_inspect)


def cmd_sensitivity(args) -> int:
    ratios = parse_ratios(args.ratios)
    check_writable(args.output, folder=False)  # before minutes of analysis, not after
    model = resolve_model(args).eval()
    table = analyze(model, args.data, groups=args.groups, ratios=ratios, importance=args.importance,
                    batch_size=args.batch_size, out_csv=args.output, seed=args.seed, device=args.device,
                    round_to=args.round_to, force=args.force, calib_batches=args.calib_batches, progress=True)
    if args.json:
        print_json({"dense_top1": table.dense_top1, "forward_cost": table.forward_cost,
                    "warnings": table.warnings, "rows": table.rows})
    else:
        print(table.format())
        print(f"wrote {args.output}")
    return 0


def register_sensitivity(sub) -> None:
    grid = ",".join(f"{r:g}" for r in DEFAULT_SENSITIVITY_RATIOS)
    p = sub.add_parser(
        "sensitivity", help="accuracy drop and memory saved when each prunable group alone is pruned",
        description="PSViT's per-layer sensitivity analysis on the calibration split: every group (the papers' "
                    "'layer'; `spikeprune inspect MODEL` lists them) is pruned alone at each ratio and the "
                    "calibration top-1 measured. Rows go to a resumable CSV: rerun the same command after an "
                    "interruption and it continues.")
    add_model_args(p)
    add_data_args(p)
    add_device_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE.csv", help="the table (resumed if it exists)")
    p.add_argument("--ratios", default=grid, help=f"fractions to remove, in [0, 1) (default {grid})")
    p.add_argument("--groups", default="*", metavar="PATTERN",
                   help="glob pattern(s) of the groups to analyse, comma-separated (default '*', all)")
    p.add_argument("--importance", default="l2", choices=CRITERIA, help="unit ranking (default l2, the seeds')")
    p.add_argument("--round-to", type=_count(1), default=1, metavar="N",
                   help="round kept channel counts up to a multiple of N")
    p.add_argument("--calib-batches", type=_count(1), default=4, metavar="N",
                   help="calibration batches for taylor / firing")
    p.add_argument("--seed", type=int, default=0, help="seed (random importance, ties)")
    p.add_argument("--force", action="store_true", help="replace a table written by a different run")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_sensitivity)


# ------------------------------------------------------------------------------------------------
# spikeprune prune
# ------------------------------------------------------------------------------------------------
_POLICY_ARG_DESTS: dict[str, list[str]] = {}


def _default_policy(args) -> str:
    if getattr(args, "uniform", None) is not None:
        return "uniform"
    if getattr(args, "ratio", None):
        return "groups"
    return "primesvt"


def _parse_caps(items) -> dict | None:
    caps = {}
    for item in items or []:
        split, sep, value = item.partition("=")
        try:
            caps[split] = int(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SpikepruneError(f"--max-images expects SPLIT=N (split train, calib or test), e.g. calib=200; got {item!r}")
    return caps or None


def settings_from_args(args) -> RunSettings:
    """The RunSettings `spikeprune prune` runs with (every check happens when it is built)."""
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
    return RunSettings(
        data=args.data, output=args.output, policy=name,
        constraints=Constraints(args.max_acc_drop, args.target_saving, args.memory_budget, args.precision),
        importance=args.importance, round_to=args.round_to, ratios=args.ratios, uniform_ratios=args.uniform_ratios,
        groups=args.groups, batch_size=args.batch_size, workers=args.workers, device=args.device, seed=args.seed,
        calib_batches=args.calib_batches, finetune_epochs=args.finetune_epochs, kd=args.kd, kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature, finetune_lr=args.finetune_lr,
        finetune_batch_size=args.finetune_batch_size, limit_after_finetune=args.limit_after_finetune,
        options={d: getattr(args, d, None) for d in _POLICY_ARG_DESTS.get(name, [])},
        max_images=_parse_caps(args.max_images), measure_images=args.measure_images,
        latency_repeats=args.latency_repeats, model_spec=args.model_spec, force=args.force, progress=not args.quiet)


def cmd_prune(args) -> int:
    settings = settings_from_args(args)  # every setting checked before the model is even loaded
    summary = run(settings, resolve_model(args).eval())
    print(format_summary_table(summary))
    print(f"report: {Path(args.output) / 'report.md'}")
    return 0


def register_prune(sub) -> None:
    """Add `spikeprune prune` with the common options and every policy's own."""
    known = policies()
    p = sub.add_parser(
        "prune", help=f"prune a model with a policy ({', '.join(sorted(known))}; default primesvt) into a run folder",
        description="Prune whole channels / heads of a model under an accuracy limit (and optionally a memory "
                    "target), optionally fine-tune, and write RUN/: model/ (load it as MODEL), summary.json, "
                    "report.md (read this first), plots/, sensitivity.csv. Decisions use the calibration split, "
                    "final figures the test split. Rerunning the same command resumes an interrupted run.",
        epilog="examples:\n  spikeprune prune bundled --data mnist5k --policy psvit --max-acc-drop 3 -o runs/psvit\n"
               "  spikeprune prune bundled --data mnist5k --uniform 0.3 -o runs/u30",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    add_device_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="RUN", help="run folder (resumed if it holds this run)")
    p.add_argument("--force", action="store_true",
                   help="replace a folder that holds something else (the same run is always resumed, not replaced)")
    p.add_argument("--policy", default=None, choices=sorted(known),
                   help="how ratios are chosen (default: uniform with --uniform, groups with --ratio, else primesvt)")
    c = p.add_argument_group("constraints")
    c.add_argument("--max-acc-drop", type=float, default=None, metavar="POINTS",
                   help=f"most top-1 points to lose against the dense model, on the calibration split (default "
                        f"{DEFAULT_MAX_ACC_DROP:g})")
    c.add_argument("--target-saving", type=float, default=None, metavar="F",
                   help="fraction of the dense model's memory to save, in (0, 1)")
    c.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="memory budget: bytes, or kB/MB/GB (powers of 1000) or KiB/MiB/GiB (powers of 1024), e.g. 8MB")
    c.add_argument("--precision", default="fp32", choices=PRECISIONS, help="precision the memory is counted at")
    e = p.add_argument_group("pruning")
    e.add_argument("--importance", default="l2", choices=CRITERIA,
                   help="unit ranking: l2 (default, the seeds'), l1, bn, taylor, random, firing (spike-aware)")
    e.add_argument("--round-to", type=int, default=1, metavar="N", help="round kept channel counts up to a multiple of N")
    e.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_SENSITIVITY_RATIOS),
                   help="ratio grid of the sensitivity analysis (default %(default)s)")
    e.add_argument("--uniform-ratios", default=",".join(f"{r:g}" for r in UNIFORM_GRID),
                   help="ratio grid of the uniform sweep (default %(default)s)")
    e.add_argument("--groups", default="*", metavar="PATTERN", help="groups the sensitivity analysis covers (default all)")
    e.add_argument("--calib-batches", type=int, default=4, metavar="N", help="calibration batches for taylor / firing")
    e.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    e.add_argument("--max-images", action="append", default=[], metavar="SPLIT=N",
                   help="use at most N images of a split (train, calib, test; repeatable), stratified by class")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--finetune-epochs", type=int, default=0, metavar="N", help="fine-tune the pruned model (default 0: no)")
    f.add_argument("--kd", action="store_true", help="distil from the dense model while fine-tuning")
    f.add_argument("--kd-weight", type=float, default=0.5, help="weight of the distillation term (default 0.5)")
    f.add_argument("--kd-temperature", type=float, default=4.0, help="distillation temperature (default 4)")
    f.add_argument("--finetune-lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    f.add_argument("--finetune-batch-size", type=int, default=64, metavar="N", help="training batch size (default 64)")
    f.add_argument("--limit-after-finetune", action="store_true",
                   help="hold --max-acc-drop on the fine-tuned model (what you deploy), not on the pruned one; the "
                        "policy then prunes further and checks its choice with short distillation (needs "
                        "--finetune-epochs; policy shrink)")
    o = p.add_argument_group("output")
    o.add_argument("--latency-repeats", type=int, default=LATENCY_REPEATS, metavar="N",
                   help="timed repeats per latency figure (default %(default)s)")
    o.add_argument("--measure-images", type=int, default=MEASURE_IMAGES, metavar="N",
                   help="test images whose firing rates give SOPs and energy (default %(default)s)")
    o.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
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
def _add_training_args(p: argparse.ArgumentParser, lr: float, warmup: float, smoothing: float) -> None:
    p.add_argument("--data", default="mnist5k", metavar="NAME[:PATH]", help=DATA_HELP + " (default mnist5k)")
    p.add_argument("--epochs", type=int, required=True, help="passes over the training split")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="output folder: the model (OUT is loadable as MODEL), history.json, checkpoint/ for --resume")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate of AdamW (default {lr:g})")
    p.add_argument("--batch-size", type=int, default=64,
                   help="training batch size (default 64); under torchrun the global batch, split between the processes")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (equals a one-process run)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup-epochs", type=float, default=warmup,
                   help=f"epochs of linear learning-rate warm-up before the cosine decay (default {warmup:g})")
    p.add_argument("--label-smoothing", type=float, default=smoothing,
                   help=f"label smoothing of the cross-entropy, 0..1 (default {smoothing:g})")
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip gradients to this norm (default: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same weights on the CPU (default 0)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train without data augmentation")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads while training (default: torch's, {torch.get_num_threads()} here); the same "
                        "--seed gives the same weights only at the same thread count and CPU type")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut each epoch short (quick trials)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in OUT")
    p.add_argument("--force", action="store_true", help="replace a finished or different run in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_arg(p)


def _training_kwargs(args) -> dict:
    return dict(lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                batch_size=args.batch_size, label_smoothing=args.label_smoothing, device=args.device, amp=args.amp,
                seed=args.seed, out_dir=args.out, resume=args.resume, overwrite=args.force,
                max_grad_norm=args.max_grad_norm, progress=not args.quiet, augment=args.augment, workers=args.workers,
                max_steps_per_epoch=args.max_steps_per_epoch, sync_bn=args.sync_bn,
                threads=args.threads)


def _model_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("model_spec", metavar="MODEL", help=f"{what}: " + MODEL_HELP)
    add_model_args(p, positional=False)


def _resolve_seeded(args):
    torch.manual_seed(args.seed)  # the initial weights of a preset depend on it
    return resolve_model(args)


def _describe_model(model, spec: str) -> str:
    n = sum(p.numel() for p in model.parameters())
    preset = getattr(model, "preset", None)
    return f"{spec} ({preset + ', ' if preset and preset != spec else ''}{n:,} parameters)"


def _check_cli_training(args, distil: bool) -> None:
    """The cheap checks of a train / finetune command line, before any model, data or evaluation."""
    check_training_settings(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                            warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                            label_smoothing=args.label_smoothing,
                            kd_weight=args.kd_weight if distil else 0.5,
                            kd_temperature=args.kd_temperature if distil else 4.0,
                            max_grad_norm=args.max_grad_norm, workers=args.workers,
                            max_steps_per_epoch=args.max_steps_per_epoch, seed=args.seed, threads=args.threads,
                            cli=True)
    check_output_folder(args.out, resume=args.resume, overwrite=args.force)


def cmd_train(args) -> int:
    _check_cli_training(args, distil=False)
    model = _resolve_seeded(args)
    model, history = train(model, args.data, args.epochs, **_training_kwargs(args))
    test = evaluate(model, args.data, split="test", device=args.device, progress=not args.quiet)
    last = history[-1] if history else {}
    calib = f"calib top-1 {last['calib_top1']:.2%}, " if last.get("calib_top1") is not None else ""
    print(f"trained {_describe_model(model, args.model_spec)} for {len(history)} epochs on {args.data}: "
          f"{calib}test top-1 {test['top1']:.2%}, test top-5 {test['top5']:.2%}")
    print(f"saved to {args.out}  (try: spikeprune evaluate {args.out} --data {args.data})")
    _print_best(args.out, history)
    return 0


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
    model = resolve_model(args)
    m = evaluate(model, args.data, split=args.split, batch_size=args.batch_size, device=args.device,
                 max_batches=args.max_batches, progress=not args.quiet, workers=args.workers)
    k = min(5, model.cfg.num_classes) if hasattr(model, "cfg") else 5
    if args.json:
        print_json({"model": args.model_spec, "data": args.data, "split": args.split, **m, "top5_k": k})
        return 0
    rows = [("model", _describe_model(model, args.model_spec)), ("data", f"{args.data}, split {args.split}"),
            ("images", f"{m['n']}"), ("top-1", f"{m['top1']:.2%}"), (f"top-{k}", f"{m['top5']:.2%}"),
            ("loss", f"{m['loss']:.4f}")]
    for name, value in rows:
        print(f"{name:8s} {value}")
    return 0


def cmd_finetune(args) -> int:
    _check_cli_training(args, distil=bool(args.teacher))
    model = _resolve_seeded(args)
    teacher = None
    if args.teacher:
        teacher = resolve_model(argparse.Namespace(model_spec=args.teacher, preset=None, checkpoint=None, overrides=[]))
    progress = not args.quiet

    def accuracy(m):
        return {s: evaluate(m, args.data, split=s, device=args.device, progress=progress)["top1"]
                for s in ("calib", "test")}

    before = accuracy(model)
    model, history = finetune(model, args.data, args.epochs, teacher=teacher, kd_weight=args.kd_weight,
                              kd_temperature=args.kd_temperature, **_training_kwargs(args))
    after = accuracy(model)
    if args.json:
        print_json({"model": args.model_spec, "data": args.data, "teacher": args.teacher, "out": args.out,
                    "before": before, "after": after, "history": history})
        return 0
    print(f"fine-tuned {_describe_model(model, args.model_spec)} for {args.epochs} epochs on {args.data}"
          + (f" with distillation from {args.teacher} (weight {args.kd_weight:g}, T {args.kd_temperature:g})"
             if teacher is not None else ""))
    print(f"{'':8s} {'calib top-1':>12s} {'test top-1':>11s}")
    for name, acc in (("before", before), ("after", after)):
        print(f"{name:8s} {acc['calib']:12.2%} {acc['test']:11.2%}")
    print(f"saved to {args.out}")
    _print_best(args.out, history)
    return 0


def register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (a preset from scratch, or continue a saved one)",
        description="Train a model with AdamW (warm-up + cosine schedule), label smoothing, augmentation, "
                    "and a checkpoint after every epoch. The calib split is measured each epoch; the test split "
                    "once at the end. Same --seed, same weights (CPU).",
        epilog="example: spikeprune train spikformer-2-128-mnist --data mnist5k --epochs 12 -o runs/mnist")
    _model_args(p, "what to train (a preset starts from random weights)")
    _add_training_args(p, lr=5e-4, warmup=1.0, smoothing=0.1)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate", help="accuracy (top-1, top-5) and loss of a model on a dataset split",
        description="Measure a model's top-1 / top-5 accuracy and mean cross-entropy on one split.",
        epilog="example: spikeprune evaluate runs/mnist --data mnist5k --split test --json")
    add_model_args(p)
    add_data_args(p)
    add_device_arg(p)
    p.add_argument("--split", default="test", choices=["train", "calib", "test"],
                   help="test (default) for final figures; calib is what pruning decisions use")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (a quick look)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "finetune", help="fine-tune a (pruned) model, optionally distilling from the dense one",
        description="Fine-tune a model with a low learning rate; with --teacher the loss mixes knowledge "
                    "distillation on logits (KL at temperature T, weight --kd-weight) with cross-entropy. "
                    "Prints calib and test top-1 before and after.",
        epilog="example: spikeprune finetune runs/pruned --teacher bundled --data mnist5k --epochs 2 -o runs/ft")
    _model_args(p, "the model to fine-tune")
    p.add_argument("--teacher", metavar="MODEL", default=None,
                   help="distil from this model (a saved folder, a preset, or `bundled`); default: no distillation")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the distillation term, 0..1 (default 0.5)")
    p.add_argument("--kd-temperature", type=float, default=4.0,
                   help="softmax temperature T for distillation (default 4)")
    p.add_argument("--json", action="store_true", help="print before/after accuracy as one JSON object")
    _add_training_args(p, lr=1e-4, warmup=0.0, smoothing=0.1)
    p.set_defaults(func=cmd_finetune)


# ------------------------------------------------------------------------------------------------
# spikeprune measure
# ------------------------------------------------------------------------------------------------
def cmd_measure(args) -> int:
    model = resolve_model(args)
    report = measure(model, data=args.data, device=args.device, n_images=args.n_images, batch_size=args.batch_size,
                     latency=not args.no_latency, latency_batch=args.latency_batch, repeats=args.repeats,
                     warmup=args.warmup, split=args.split)
    if args.json:
        print_json(report)
    else:
        print(format_measure_report(report))
    return 0


def register_measure(subparsers) -> None:
    p = subparsers.add_parser(
        "measure", help="parameters, memory, MACs, SOPs, energy and latency, per layer and in total",
        description="Measure a model: parameters and weight memory (fp32/fp16/int8), MACs per image, and with "
                    "--data the firing rates behind synaptic operations (SOPs) and the energy estimate "
                    "(E_MAC 4.6 pJ, E_AC 0.9 pJ), plus the median forward latency. Definitions are printed "
                    "under the table.")
    add_model_args(p)
    add_data_args(p, default=None)
    add_device_arg(p)
    p.add_argument("--split", default="test", choices=["train", "calib", "test"],
                   help="which split of --data gives the firing rates (default test)")
    p.add_argument("--n-images", type=int, default=256, help="images used for firing rates (default 256)")
    p.add_argument("--latency-batch", type=int, default=1, help="batch size of the timed forwards (default 1)")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards; the median is reported (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards before timing (default 3)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_measure)


# ------------------------------------------------------------------------------------------------
# export (spikeprune.deploy)
# ------------------------------------------------------------------------------------------------
def _points(text: str) -> float:
    """An argparse type: a finite, non-negative number of top-1 points (NaN is refused here, not at the gate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of top-1 points, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        raise argparse.ArgumentTypeError(f"a finite, non-negative number of top-1 points, got {text!r}")
    return value


def register_export(sub) -> None:
    """`spikeprune export MODEL -o FILE ...`."""
    p = sub.add_parser(
        "export", help="write the model as an ONNX file (BatchNorm folded, LIF unrolled, fp32 / fp16 / int8 / int4 "
                       "weights, raw-pixel input) and check it",
        description="Export a model (dense or pruned, any family) to ONNX: BatchNorm folded into the layer before "
                    "it, the LIF unrolled over T as plain ops, T fixed, batch size dynamic, the input normalisation "
                    "in the graph (the file takes raw pixels in [0, 1]). Unless --no-check, ONNX Runtime is compared "
                    "with PyTorch (the fake-quantised model for reduced precision) on the calibration split of --data "
                    "(predicted classes, spike decisions, a float64 comparison) before the file is moved into place; "
                    "a reduced-precision file that loses more than --max-drop points of top-1 is refused.")
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write, e.g. model.onnx")
    p.add_argument("--format", default="onnx", choices=deploy.FORMATS, help="file format (default onnx)")
    p.add_argument("--precision", default=None, choices=deploy.PRECISIONS,
                   help="weights: fp32, fp16 (Cast), int8 or int4 per output channel (DequantizeLinear; int4 packed, "
                        "opset 21) (default: the plan a quantised model carries, else fp32)")
    p.add_argument("--ends", default=None, choices=deploy.PRECISIONS,
                   help="precision of the first conv and the head (default: int8 under --precision int4, else as "
                        "--precision)")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset ({deploy.MIN_OPSET['fp32']}-{deploy.MAX_OPSET}, int8 from "
                        f"{deploy.MIN_OPSET['int8']}, int4 from {deploy.MIN_OPSET['int4']}; default "
                        f"{deploy.DEFAULT_OPSET}, {deploy.INT4_OPSET} with int4 weights)")
    p.add_argument("--batch", type=_count(1), default=None, metavar="N",
                   help="a fixed batch size: a graph about half as large (no shape arithmetic), that runs at N "
                        "images only (default: dynamic)")
    p.add_argument("--input", default="raw", choices=deploy.INPUTS,
                   help="what the file takes: raw pixels in [0, 1] (the normalisation in the graph) or images "
                        "normalised by the caller, as before (default raw)")
    p.add_argument("--normalisation", default=None, metavar="DATASET",
                   help="the dataset whose mean / std the model was trained with (default: that of --data)")
    p.add_argument("--data", default=None, metavar="NAME[:PATH]",
                   help="dataset whose calibration split the check runs on (default: random images, no accuracy)")
    p.add_argument("--check-images", type=_count(1), default=deploy.CHECK_IMAGES,
                   help=f"images checked (default {deploy.CHECK_IMAGES})")
    p.add_argument("--check-split", default="calib", choices=("calib", "test"),
                   help="the split of --data the check runs on (default calib)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime check")
    p.add_argument("--max-drop", type=_points, default=deploy.INT8_MAX_DROP,
                   help=f"top-1 points a reduced-precision file may lose against fp32, counted in images "
                        f"(default {deploy.INT8_MAX_DROP:g})")
    p.add_argument("--keep-inaccurate", action="store_true",
                   help="keep a reduced-precision file whose top-1 falls more than --max-drop below fp32 (with a warning)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    model = resolve_model(args)
    report = deploy.export(model, args.output, format=args.format, precision=args.precision, opset=args.opset,
                           check=not args.no_check, data=args.data, overwrite=args.force, max_drop=args.max_drop,
                           keep_inaccurate=args.keep_inaccurate, check_images=args.check_images,
                           verbose=not args.json, input=args.input, normalisation=args.normalisation, ends=args.ends,
                           check_split=args.check_split, batch=args.batch)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikeprune",
        description="Structured pruning for Spiking Vision Transformers: train or load a Spikformer or SDT, "
                    "measure it, prune whole channels / heads / hidden units, and get back a smaller dense model.",
        epilog="Start with:  spikeprune evaluate bundled --data mnist5k   then   spikeprune prune bundled --data mnist5k -o runs/demo",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("models", help="list the model presets")
    p.set_defaults(func=cmd_models)
    for register in _REGISTRARS:
        register(sub)
    return parser


# The commands, in the order `spikeprune --help` lists them. train / measure keep their parsers
# beside their code; the others are defined above.
_REGISTRARS = [register_train, register_measure, register_inspect, register_sensitivity, register_prune,
               register_export]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with distributed.launched(args):  # under torchrun: one of N processes (spikeprune.distributed)
            return int(args.func(args) or 0)
    except SpikepruneError as e:
        print(f"spikeprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spikeprune: interrupted; finished outputs are kept, partial ones were not written", file=sys.stderr)
        return 130


def entry_point() -> NoReturn:
    """The `spikeprune` command (and `python -m spikeprune`): main(), then exit with its code."""
    try:
        code = main()
    except Exception:  # a bug, not a SpikepruneError: main() reports those
        if not distributed.joined_a_group():
            raise
        traceback.print_exc()  # what the interpreter would print; exit_with skips its shutdown
        code = 1
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
