"""A pruning run: one settings object, one run folder, the same steps for every policy.

    import spikeprune as sp
    summary = sp.prune_run(sp.bundled_model(), "mnist5k", "runs/mine", policy="psvit", max_acc_drop=3)
    # or: run(RunSettings(data="mnist5k", output="runs/mine", policy="psvit"), model)

`spikeprune prune` (cli.py), `spikeprune.prune_run` and the benchmark all build a RunSettings and
call run(). RunSettings checks every field when it is built; run() checks what needs the model
(constraints against its memory, group and ratio patterns, the data, the output folder) -- all of
it before anything is written or deleted. Then:

  1. RUN/run.json records the run's fingerprint (the model's weights and every setting that
     changes the result). A folder holding another run, or a run of an older format, is refused
     (force=True replaces it); the same command again resumes: finished steps are read back.
  2. The policy runs (spikeprune.policy_api): fn(ctx) -> PolicyResult(model, info); what was pruned
     is model.pruning, the PruningRecord against the dense model.
  3. Optional fine-tuning of the pruned model (train.finetune; distillation from the dense model
     with kd), checkpointed per epoch under RUN/steps/finetune/.
  4. Measurements of dense / pruned / fine-tuned (measure.measure) and their top-1 on the *test*
     split. Decisions only ever use the calibration split.
  5. RUN/model/ (the final model: fine-tuned when asked), then RUN/summary.json, RUN/report.md and
     RUN/plots/*.png. The model is written before the summary, and a summary about to be replaced
     is removed first, so a kill at any moment never leaves a summary describing a missing model;
     a later session removes the temporary copies a killed one left behind.

Wall time counts every session of the run, killed ones included: it is saved with every
checkpoint and log line (at most every few seconds).
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .policies import BUILTIN as BUILTIN_POLICIES  # noqa: F401  (importing them registers the built-in policies)
from . import distributed
from .errors import SpikepruneError
from .coupling import groups as model_groups
from .hashing import fingerprint, model_hash
from .importance import get as get_importance
from .costs import deployed_memory_bytes, interleaved_latency, measure
from .policy_api import Constraints, PolicyResult, PolicySpec, PruneContext, get_policy, policies
from .ratios import DEFAULT_SENSITIVITY_RATIOS, UNIFORM_GRID, parse_ratios
from .record import PruningRecord
from .report import plot_tradeoff, write_report
from .serialization import is_saved_model, load_model, save_model, write_json
from .stats import resolution_warning
from .surgery import record_of
from .training import evaluate, finetune
from .validation import (FinetuneSettings, check_finite, check_writable, drop_within, max_images_per_split, number,
                         whole)
from .validation import device as check_device, renamed_arguments

RUN_FORMAT = "spikeprune-run"
RUN_VERSION = 2  # 2: typed pruning record, one settings object (version 1 folders are refused)
MEASURE_IMAGES = 256  # test images whose firing rates give SOPs and energy
LATENCY_REPEATS = 10  # modest: a demo must stay quick; the benchmark measures latency properly
SPLITS = ("train", "calib", "test")
ELAPSED_EVERY_S = 2.0  # how often the wall time is saved at most
_UNHASHED = ("output", "force", "progress", "model_spec", "device", "workers", "shared_steps", "threads")
# Steps a run may take from another run of the same model, data and measuring settings (the
# benchmark computes them once for all policies), copied when the run starts, and the settings they
# depend on. That run's sensitivity.csv is copied only when the policy asks for a table
# (PruneContext.sensitivity), so that runs of policies that never read one report none.
SHAREABLE_STEPS = ("steps/dense_calib.json", "steps/measure_dense.json", "steps/uniform_sweep.json")
_SHARED_FIELDS = ("model", "data", "max_images", "importance", "round_to", "seed", "batch_size", "calib_batches",
                  "uniform_ratios", "measure_images", "latency_repeats")


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@dataclass
class RunSettings:
    """Every setting of a pruning run; each field is checked when the object is built.

    Fields mirror `spikeprune prune`'s options (the module docstring says what a run does):
    constraints (a Constraints), the sensitivity grid `ratios`, the uniform sweep grid
    `uniform_ratios`, `groups` (pattern of the groups the sensitivity analysis covers), `options`
    (the policy's own options, e.g. {"uniform": 0.3} or {"ratio": ["residual=0.25"]}), `max_images`
    (image caps per split, e.g. {"calib": 200, "test": 300}: they reach the policy, the sensitivity
    analysis, fine-tuning and measuring alike), `model_spec` (a label for the report),
    `shared_steps` (a run folder of the same model, data and measuring settings whose shareable
    finished steps -- SHAREABLE_STEPS, and the sensitivity table when the policy reads one -- a new
    run copies instead of recomputing: the benchmark computes them once for every policy),
    `threads` (torch's CPU threads for the whole run; None: as set). output, force, progress,
    model_spec, device, workers and shared_steps do not change the result and are not part of the
    fingerprint; threads changes fine-tuned weights, so it enters it through `finetuning` (the
    fine-tuning settings as one FinetuneSettings, None without fine-tuning).
    """
    data: str
    output: str | Path
    policy: str = "primesvt"
    constraints: Constraints = field(default_factory=Constraints)
    importance: str = "l2"
    round_to: int = 1
    ratios: tuple = DEFAULT_SENSITIVITY_RATIOS
    uniform_ratios: tuple = UNIFORM_GRID
    groups: str = "*"
    batch_size: int = 128
    workers: int = 0
    device: str = "cpu"
    seed: int = 0
    calib_batches: int = 4
    finetune_epochs: int = 0
    kd: bool = False
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64
    options: dict = field(default_factory=dict)
    max_images: dict | None = None
    measure_images: int = MEASURE_IMAGES
    latency_repeats: int = LATENCY_REPEATS
    model_spec: str | None = None
    force: bool = False
    progress: bool = True
    shared_steps: str | Path | None = None
    limit_after_finetune: bool = False
    threads: int | None = None

    def __post_init__(self):
        if not isinstance(self.data, str) or not self.data.strip():
            raise SpikepruneError(f"data must be a dataset spec NAME[:PATH] (e.g. mnist5k), got {self.data!r}")
        if self.output is None or not str(self.output).strip():
            raise SpikepruneError("an output run folder is needed (-o RUN)")
        self.output = Path(self.output)
        get_policy(self.policy)
        if isinstance(self.constraints, dict):
            self.constraints = Constraints(**self.constraints)
        if not isinstance(self.constraints, Constraints):
            raise SpikepruneError(f"constraints must be a spikeprune Constraints, got {type(self.constraints).__name__}")
        crit = get_importance(self.importance)  # a registered name or object; unknown: the names are listed
        try:
            registered = get_importance(crit.name) is crit
        except SpikepruneError:
            registered = False
        if not registered:
            raise SpikepruneError(f"importance {crit!r} is not registered; register it with "
                                  "spikeprune.importance.register_importance so that the run can record it by name")
        self.importance = crit.name  # a name: what run.json and the fingerprint record
        self.round_to = whole("--round-to", self.round_to, 1)
        self.ratios = parse_ratios(self.ratios, "--ratios")
        self.uniform_ratios = parse_ratios(self.uniform_ratios, "--uniform-ratios")
        if not isinstance(self.groups, str) or not [p for p in self.groups.split(",") if p.strip()]:
            raise SpikepruneError(f"--groups must be glob pattern(s), e.g. '*' or 'block*.mlp.hidden', got {self.groups!r}")
        self.batch_size = whole("--batch-size", self.batch_size, 1)
        self.workers = whole("--workers", self.workers, 0)
        self.device = check_device(self.device)
        self.seed = whole("--seed", self.seed, 0)
        self.calib_batches = whole("--calib-batches", self.calib_batches, 1)
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise SpikepruneError(f"--finetune-epochs must be 0 or more, got {self.finetune_epochs!r}")
        if self.threads is not None:
            self.threads = whole("--threads", self.threads, 1)
        if self.kd and self.finetune_epochs == 0:
            raise SpikepruneError("--kd distils during fine-tuning: give --finetune-epochs N (N >= 1) as well")
        self.kd = bool(self.kd)
        self.limit_after_finetune = bool(self.limit_after_finetune)
        if self.limit_after_finetune:
            if self.finetune_epochs == 0:
                raise SpikepruneError("--limit-after-finetune holds the accuracy limit on the fine-tuned model: give "
                                      "--finetune-epochs N (N >= 1) as well")
            if not get_policy(self.policy).after_finetune:
                able = sorted(n for n, p in policies().items() if p.after_finetune)
                raise SpikepruneError(f"--limit-after-finetune: the {self.policy} policy chooses its model by the "
                                      f"accuracy before fine-tuning; use --policy {' or '.join(able) or '(none)'}")
        # Checked whether or not fine-tuning is asked for (a bad value is a mistake either way).
        self.kd_weight = number("--kd-weight", self.kd_weight, 0, 1)
        self.kd_temperature = number("--kd-temperature", self.kd_temperature, 0, low_open=True)
        self.finetune_lr = number("--finetune-lr", self.finetune_lr, 0, low_open=True)
        self.finetune_batch_size = whole("--finetune-batch-size", self.finetune_batch_size, 1)
        if not isinstance(self.options, dict):
            raise SpikepruneError(f"options must be a dict of the policy's own options, got {type(self.options).__name__}")
        self.options = {k: v for k, v in self.options.items() if v is not None and v != []}
        self.max_images = max_images_per_split(self.max_images, SPLITS)
        self.measure_images = whole("measure_images", self.measure_images, 1)
        self.latency_repeats = whole("--latency-repeats", self.latency_repeats, 1)
        self.force, self.progress = bool(self.force), bool(self.progress)
        if self.shared_steps is not None:
            self.shared_steps = Path(self.shared_steps)
            if not (self.shared_steps / "run.json").is_file():
                raise SpikepruneError(f"shared_steps {self.shared_steps} is not a run folder (no run.json)")

    @property
    def finetuning(self) -> FinetuneSettings | None:
        """The run's fine-tuning as one object (what the fine-tuning step and the policies read), or
        None without fine-tuning."""
        if not self.finetune_epochs:
            return None
        return FinetuneSettings(epochs=self.finetune_epochs, lr=self.finetune_lr, batch_size=self.finetune_batch_size,
                                kd=self.kd, kd_weight=self.kd_weight, kd_temperature=self.kd_temperature,
                                threads=self.threads)

    @property
    def finetune(self) -> dict | None:
        """The fine-tuning settings as summary.json lists them, or None without fine-tuning."""
        f = self.finetuning
        return None if f is None else f.to_dict()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(output=str(self.output), constraints=self.constraints.user_dict(), ratios=list(self.ratios),
                 uniform_ratios=list(self.uniform_ratios), options=_jsonable(self.options),
                 shared_steps=None if self.shared_steps is None else str(self.shared_steps))
        return d

    def fingerprint_fields(self) -> dict:
        """The settings that change the result (what run.json's fingerprint hashes, with the model)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED}
        for k in ("kd", "kd_weight", "kd_temperature", "finetune_lr", "finetune_batch_size", "finetune_epochs"):
            d.pop(k)
        d["finetune"] = self.finetune
        if not d["limit_after_finetune"]:
            d.pop("limit_after_finetune")  # runs made before the setting existed keep their fingerprint
        d["run_version"] = RUN_VERSION
        return d


# ------------------------------------------------------------------------------------------------
# Checks before anything is written
# ------------------------------------------------------------------------------------------------
def _check_groups_pattern(model: nn.Module, patterns: str) -> None:
    names = [g.name for g in model_groups(model)]
    for p in (p.strip() for p in patterns.split(",")):
        if p and not fnmatch.filter(names, p):
            raise SpikepruneError(f"--groups {p!r} matches no group of this model; groups are: {', '.join(names)}")


def _check(settings: RunSettings, model: nn.Module, spec: PolicySpec) -> PruneContext:
    """Every check that needs the model or the data; returns the run's context (which resolves
    the constraints against the dense model). Nothing is written."""
    check_finite(model, "the model to prune")
    check_writable(settings.output, "run folder", folder=True)
    ctx = PruneContext(model, settings)
    _check_groups_pattern(model, settings.groups)
    if spec.check:
        spec.check(settings.options, model)
    for split in ("calib", "test") + (("train",) if settings.finetune_epochs else ()):
        ds = ctx.dataset(split, augment=split == "train")
        if len(ds) == 0:
            raise SpikepruneError(f"the {split} split of {settings.data} is empty; nothing to prune against")
    return ctx


# ------------------------------------------------------------------------------------------------
# The run folder
# ------------------------------------------------------------------------------------------------
def _prepare_run_dir(out: Path, fp: str, fields: dict, force: bool) -> bool:
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


def _remove_leftovers(out: Path) -> list[str]:
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


def _check_shared_steps(source: Path, fields: dict) -> None:
    """The run in `source` must be of the same model and data, measured the same way, for its
    steps to be reused (sensitivity.csv also checks its own fingerprint when it is read)."""
    try:
        theirs = json.loads((source / "run.json").read_text()).get("settings", {})
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise SpikepruneError(f"shared_steps {source}: cannot read its run.json ({e})") from None
    differ = [k for k in _SHARED_FIELDS if theirs.get(k) != fields.get(k)]
    if differ:
        raise SpikepruneError(f"shared_steps {source} is a run of other settings ({', '.join(differ)} differ); its "
                              "steps cannot be reused here")


def _copy_shared_steps(source: Path, out: Path) -> list[str]:
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


class _Clock:
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


def _jsonable(obj):
    """Drop what JSON cannot hold (callables) so that info can be checkpointed."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj if not callable(v)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# ------------------------------------------------------------------------------------------------
# The steps
# ------------------------------------------------------------------------------------------------
def _render_plots(ctx: PruneContext, plots) -> tuple[list[dict], list[str]]:
    """Draw the policy's (filename, draw[, caption]) plots into RUN/plots: (file + caption of each
    drawn plot, a line for each that failed)."""
    if not distributed.is_main():  # rank 0 draws
        return [], []
    out, failed = [], []
    for item in plots or []:
        if isinstance(item, dict):
            out.append({"file": item["file"], "caption": item.get("caption", "")})
            continue
        filename, draw, *rest = item
        try:
            draw(ctx.plot_path(filename))
            out.append({"file": f"plots/{filename}", "caption": rest[0] if rest else ""})
        except Exception as e:  # a plot must never cost the run its result; the report says it is missing
            failed.append(f"this run has no plot {filename}: drawing it failed ({type(e).__name__}: {e})")
            ctx.log(f"warning: {failed[-1]}")
    return out, failed


def _run_policy(ctx: PruneContext, spec: PolicySpec) -> tuple[nn.Module, dict]:
    """Steps 1-2: the policy's pruned model and what it said (info, calibration top-1, plots that
    failed), read back when a previous session finished them."""
    pruned, saved = ctx.load_checkpoint("policy_model"), ctx.load_checkpoint("policy")
    if pruned is not None and saved is not None:
        return pruned, saved
    t0, passes0, images0 = time.perf_counter(), ctx.evaluations, ctx.images_evaluated
    ctx.log(f"policy {spec.name}: dense calibration top-1 {ctx.dense_calib_top1:.2%}, limit "
            f"{ctx.constraints.max_acc_drop:g} points")
    result = spec.fn(ctx)
    if not isinstance(result, PolicyResult):
        raise SpikepruneError(f"internal: policy {spec.name} returned {type(result).__name__}, not a PolicyResult")
    pruned = result.model
    if pruned is ctx.model:  # the policy kept the dense model: the run's copy carries the (empty) record
        pruned = copy.deepcopy(pruned)
    pruned.pruning = record_of(pruned)
    pruned.eval()
    info = dict(result.info)
    info["plots"], failed = _render_plots(ctx, info.get("plots"))
    calib = info.pop("calib_top1", None)
    calib = float(calib) if calib is not None else ctx.calib_top1(pruned)
    saved = {"info": _jsonable(info), "plot_problems": failed, "calib_top1": calib,
             "cost": {"policy_wall_s": time.perf_counter() - t0, "policy_calib_passes": ctx.evaluations - passes0,
                      "policy_calib_images": ctx.images_evaluated - images0}}
    ctx.checkpoint("policy_model", pruned)
    ctx.checkpoint("policy", saved)
    return pruned, saved


def _finetune(ctx: PruneContext, pruned: nn.Module) -> nn.Module:
    """Step 3: fine-tune a copy of the pruned model (distilling from the dense one with kd);
    train() checkpoints every epoch under RUN/steps/finetune, so an interrupted run resumes."""
    done = ctx.load_checkpoint("finetuned_model")
    if done is not None:
        return done
    s, f = ctx.settings, ctx.settings.finetuning
    ctx.log(f"fine-tuning for {f.epochs} epoch{'s' if f.epochs != 1 else ''}"
            + (" with distillation from the dense model" if f.kd else ""))
    t0 = time.perf_counter()
    caps = s.max_images or {}
    # Without caps the spec goes to train() as it always did; with caps the capped splits do.
    data, val = ((ctx.dataset("train", augment=True), ctx.calib) if caps.get("train") or caps.get("calib")
                 else (ctx.data, None))
    model, history = finetune(
        copy.deepcopy(pruned), data, f.epochs, teacher=ctx.model if f.kd else None, val_data=val,
        device=ctx.device, seed=ctx.seed, workers=ctx.workers, output=ctx.run_dir / "steps" / "finetune",
        resume=True, progress=ctx.progress, **f.train_kwargs())
    model.eval()
    model.pruning = pruned.pruning  # fine-tuning changes weights, not what was pruned
    ctx.checkpoint("finetune_history", {"history": _jsonable(history), "wall_s": time.perf_counter() - t0})
    ctx.checkpoint("finetuned_model", model)
    return model


def _measure_model(ctx: PruneContext, model: nn.Module, name: str) -> dict:
    """Test top-1 and measure.measure totals, checkpointed per model."""
    saved = ctx.load_checkpoint(f"measure_{name}")
    if saved is not None:
        return saved
    s = ctx.settings
    ctx.log(f"measuring the {name} model on the test split")
    test = ctx.dataset("test")
    acc = evaluate(model, test, split="test", batch_size=ctx.batch_size, device=ctx.device, progress=ctx.progress,
                   workers=ctx.workers)
    if not math.isfinite(float(acc["loss"])):
        raise SpikepruneError(f"the {name} model gives a {acc['loss']} loss on the test split: its outputs are not "
                              "finite (NaN / Inf); no figures are reported for a broken model")
    m = distributed.from_main(lambda: measure(  # rank 0 measures; the others wait; latency: _latency
        model, data=test, device=ctx.device, max_images=min(s.measure_images, len(test)), batch_size=64,
        latency=False), f"measuring the {name} model")
    t = m["total"]
    out = {"top1": acc["top1"], "top5": acc["top5"], "params": int(t["params"]),
           "memory_bytes": {k: int(v) for k, v in t["memory_bytes"].items()},
           "deployed_bytes": {k: int(v) for k, v in deployed_memory_bytes(model).items() if k != "params"},
           "macs": int(t["macs"]), "sops": t.get("sops"), "energy_mj": t.get("energy_mj"),
           "latency_ms": t.get("latency_ms")}
    ctx.checkpoint(f"measure_{name}", out)
    return out


def _latency(ctx: PruneContext, models: dict) -> dict:
    """The models' forward latency (batch 1), timed interleaved so that the machine's load hits each
    alike (costs.interleaved_latency), with its spread and a verdict on its reliability; once per
    run (checkpointed), by rank 0 while the others wait."""
    saved = ctx.load_checkpoint("latency")
    if saved is not None:
        return saved
    cfg, dev = ctx.model.cfg, torch.device(ctx.device)
    ctx.log("timing " + ", ".join(models) + " interleaved")
    x = torch.rand(1, cfg.in_channels, cfg.img_size, cfg.img_size, device=dev)
    on_device = {name: m.to(dev).eval() for name, m in models.items()}
    saved = distributed.from_main(lambda: interleaved_latency(on_device, x, ctx.settings.latency_repeats, warmup=2),
                                  "timing the models")
    ctx.checkpoint("latency", saved)
    return saved


def _calib_once(ctx: PruneContext, model: nn.Module, step: str) -> float:
    saved = ctx.load_checkpoint(step)
    if saved is None:
        saved = {"top1": ctx.calib_top1(model)}
        ctx.checkpoint(step, saved)
    return float(saved["top1"])


def _checks(ctx: PruneContext, figures: dict, pruned_calib: float, finetuned_calib: float | None = None) -> dict:
    """Were the constraints met? Judged where the decisions were made: the pruned model's calibration
    drop (the fine-tuned model's with --limit-after-finetune), and its memory at the constraints'
    precision. Test drops are given beside them."""
    c = ctx.constraints
    dense_mem, mem = figures["dense"]["memory_bytes"][c.precision], figures["pruned"]["memory_bytes"][c.precision]
    judged = finetuned_calib if ctx.settings.limit_after_finetune else pruned_calib
    drop = (ctx.dense_calib_top1 - judged) * 100
    ok = drop_within(ctx.dense_calib_top1, judged, len(ctx.calib), c.max_acc_drop)  # in images, not floats
    checks = {"acc_drop_calib": drop, "acc_ok": ok,
              "limit_judged_on": "fine-tuned model" if ctx.settings.limit_after_finetune else "pruned model",
              "acc_drop_test": (figures["dense"]["top1"] - figures["pruned"]["top1"]) * 100,
              "memory_bytes": mem, "budget_bytes": c.budget_bytes,
              "memory_ok": c.budget_bytes is None or mem <= c.budget_bytes,
              "memory_saved": 1 - mem / dense_mem if dense_mem else 0.0}
    if figures["finetuned"] is not None:
        checks["acc_drop_test_finetuned"] = (figures["dense"]["top1"] - figures["finetuned"]["top1"]) * 100
    return checks


def _warnings(ctx: PruneContext, table, checks: dict) -> list[str]:
    out = list(table.warnings) if table is not None else []
    if table is None:
        w = resolution_warning(len(ctx.calib), ctx.dense_calib_top1)
        out += [w] if w else []
    if checks["acc_ok"] and checks["acc_drop_test"] > ctx.constraints.max_acc_drop:
        out.append(f"the pruned model is within the limit on the calibration split ({checks['acc_drop_calib']:.2f} "
                   f"points) but not on the test split ({checks['acc_drop_test']:.2f} points): the calibration split "
                   "is a noisy stand-in for the test distribution")
    return out


def _widths(record: PruningRecord, final: nn.Module) -> list[dict]:
    """Per group: the dense width and the final one, from the pruning record."""
    units = {g.name: g.unit for g in model_groups(final)}
    kept = record.kept_counts()
    return [{"group": name, "unit": units.get(name, "channel"), "before": size, "after": kept[name]}
            for name, size in record.dense_sizes.items()]


def _write_final_model(out: Path, final: nn.Module) -> None:
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


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------
def run(settings: RunSettings, model: nn.Module) -> dict:
    """Run settings.policy on `model`, fill the run folder settings.output, return the summary.

    Every check runs before the run folder is touched. Every decision uses the calibration split;
    dense / pruned / fine-tuned top-1 in the summary are on the test split (fractions). With
    settings.threads, torch uses that many CPU threads for the run (the count before is restored)."""
    if not isinstance(settings, RunSettings):
        raise SpikepruneError(f"run() takes a RunSettings, got {type(settings).__name__}")
    if not isinstance(model, nn.Module):
        raise SpikepruneError(f"run() takes a model (torch.nn.Module), got {type(model).__name__}")
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, model)
    finally:
        torch.set_num_threads(previous_threads)


def _run(settings: RunSettings, model: nn.Module) -> dict:
    s, out = settings, settings.output
    spec = get_policy(s.policy)
    model = model.eval()
    ctx = _check(s, model, spec)
    fields = {"model": model_hash(model), **s.fingerprint_fields()}
    if s.shared_steps:
        _check_shared_steps(s.shared_steps, fields)
    resumed = distributed.from_main(  # the run folder is rank 0's; the other processes follow what it found
        lambda: _prepare_run_dir(out, fingerprint(fields), fields, s.force), "opening the run folder")
    shared = _copy_shared_steps(s.shared_steps, out) if s.shared_steps and not resumed and distributed.is_main() else []
    leftovers = _remove_leftovers(out) if distributed.is_main() else []
    clock = _Clock(out)
    ctx.on_progress = clock.tick
    if resumed:
        ctx.log(f"resuming the run in {out}: finished steps are reused"
                + (f" (removed {len(leftovers)} temporary copies a killed session left)" if leftovers else ""))
    if shared:
        ctx.log(f"reusing {', '.join(shared)} from {s.shared_steps}")
    torch.manual_seed(s.seed)

    pruned, outcome = _run_policy(ctx, spec)  # 1-2
    clock.save()
    finetuned = _finetune(ctx, pruned) if s.finetune_epochs else None  # 3
    clock.save()
    t_measure = time.perf_counter()
    figures = {name: _measure_model(ctx, m, name) if m is not None else None
               for name, m in (("dense", ctx.model), ("pruned", pruned), ("finetuned", finetuned))}  # 4
    final = finetuned if finetuned is not None else pruned
    latency = _latency(ctx, {name: m for name, m in (("dense", ctx.model), ("pruned", pruned),
                                                     ("finetuned", finetuned)) if m is not None})
    for name, timed in latency["models"].items():
        figures[name] = {**figures[name], **timed, "latency_reliable": latency["reliable"]}
    measure_wall = time.perf_counter() - t_measure

    # 5. Outcome, summary, model, report.
    pruned_calib = float(outcome["calib_top1"])
    finetuned_calib = _calib_once(ctx, finetuned, "finetuned_calib") if finetuned is not None else None
    checks = _checks(ctx, figures, pruned_calib, finetuned_calib)
    ft_saved = (ctx.load_checkpoint("finetune_history") or {}) if s.finetune_epochs else {}
    table = ctx.sensitivity_if_computed()
    record = record_of(pruned)
    summary = {
        "policy": s.policy, "model": s.model_spec, "data": s.data,
        "dense": figures["dense"], "pruned": figures["pruned"], "finetuned": figures["finetuned"],
        "memory_saved": checks["memory_saved"],
        "constraints": ctx.constraints.to_dict(),
        "constraints_met": bool(checks["acc_ok"] and checks["memory_ok"]),
        "constraint_checks": checks,
        "calib": {"n": len(ctx.calib), "dense_top1": ctx.dense_calib_top1, "pruned_top1": pruned_calib,
                  "finetuned_top1": finetuned_calib},
        "top1": {"calib": pruned_calib, "test": figures["pruned"]["top1"]},
        "pruning": record.to_dict(),
        "removed": record.removed_fractions(),
        "notes": record.notes,
        "widths": _widths(record, final),
        "importance": s.importance, "round_to": s.round_to, "seed": s.seed, "finetune": s.finetune,
        "finetune_history": ft_saved.get("history") if s.finetune_epochs else None,
        "settings": s.to_dict(),
        # Where the time went: the policy's search and fine-tuning as they ran (saved with their
        # steps, so a rerun reports the same), measuring in this session (0 when read back).
        "cost": {**outcome["cost"], "finetune_wall_s": ft_saved.get("wall_s"), "measure_wall_s": measure_wall},
        "forward_cost": {"calib_evaluations_this_run": ctx.evaluations, "calib_images_this_run": ctx.images_evaluated,
                         "sensitivity": table.forward_cost if table is not None else None},
        "latency": latency,
        "warnings": _warnings(ctx, table, checks) + (
            [] if latency["reliable"] else [f"latency figures are unreliable ({'; '.join(latency['why'])}): "
                                            "compare them only after a rerun on an idle machine"]),
        "resumed": resumed,
    }
    info = outcome["info"]
    for k, v in info.items():
        if k != "report_sections":
            summary[f"policy_{k}" if k in summary else k] = v  # never replace the run's own keys
    if not distributed.is_main():  # rank 0 plots and writes the run folder; the others return its summary
        return distributed.from_main(lambda: None, "writing the run folder")
    problems = list(outcome.get("plot_problems") or [])
    try:
        plot_tradeoff(ctx.plot_path("accuracy_memory.png"), summary, info.get("tradeoff") or {},
                      ctx.constraints.max_acc_drop)
        summary["plots"] = [{"file": "plots/accuracy_memory.png", "caption": "calibration top-1 against memory saved"},
                            *summary.get("plots", [])]
    except Exception as e:  # a plot must never cost the run its result; the report says it is missing
        problems.append(f"this run has no plot accuracy_memory.png: drawing it failed ({type(e).__name__}: {e})")
        ctx.log(f"warning: {problems[-1]}")
    summary["warnings"] += problems + ctx.problems
    summary["wall_time_s"] = round(clock.elapsed(), 2)
    summary = _jsonable(summary)
    _write_final_model(out, final)
    write_json(out / "summary.json", summary)
    write_report(out, summary, info.get("report_sections") or [], table)
    clock.save(complete=True, seconds=summary["wall_time_s"])  # what summary.json says, for later reruns
    ctx.log(f"wrote {out / 'model'}, {out / 'summary.json'} and {out / 'report.md'}")
    return distributed.from_main(lambda: summary, "writing the run folder")


_CONSTRAINT_KEYS = ("max_acc_drop", "target_saving", "memory_budget", "precision")


@renamed_arguments(out="output")
def prune_run(model: nn.Module, data: str, output: str | Path, **settings) -> dict:
    """Prune `model` with a policy into the run folder `output` and return the summary (summary.json).

    settings: any RunSettings field (policy="psvit", finetune_epochs=1, kd=True, ...), and the
    limits max_acc_drop / target_saving / memory_budget / precision (or constraints=Constraints(...)).
    Example: sp.prune_run(sp.bundled_model(), "mnist5k", "runs/mine", max_acc_drop=3, target_saving=0.5)
    """
    limits = {k: settings.pop(k) for k in _CONSTRAINT_KEYS if k in settings}
    if limits and "constraints" in settings:
        raise SpikepruneError(f"give either constraints=Constraints(...) or {', '.join(limits)}, not both")
    known = {f.name for f in dataclasses.fields(RunSettings)} - {"data", "output"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SpikepruneError(f"prune_run() got unknown setting(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known | set(_CONSTRAINT_KEYS)))}")
    if "constraints" not in settings:
        settings["constraints"] = Constraints(**limits)
    return run(RunSettings(data=data, output=output, **settings), model)


__all__ = ["LATENCY_REPEATS", "MEASURE_IMAGES", "RUN_FORMAT", "RUN_VERSION", "RunSettings", "check_writable",
           "prune_run", "run"]
