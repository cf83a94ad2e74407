"""The run folder and `spikeprune prune`: one command, one output layout, for every policy.

    spikeprune prune MODEL --data NAME[:PATH] [--policy NAME] [--max-acc-drop 3] [--target-saving F |
        --memory-budget SIZE] [--precision fp32|fp16|int8] [--finetune-epochs N [--kd]] -o RUN

A policy decides *what* to prune; this module does everything around it, the same way for all:

  1. RUN/run.json records the run's fingerprint (model weights, data, policy, constraints and
     every setting that changes the result). A folder holding another run is refused (--force
     replaces it); the same command again resumes: finished steps are read back, not redone.
  2. The policy runs: `fn(ctx: PruneContext) -> PolicyResult(model, ratios, info)`. The context
     gives it the dense model, the constraints, calibration accuracy, the sensitivity table
     (computed once, RUN/sensitivity.csv, resumable), pruning with the run's importance /
     round_to, step checkpoints for resuming long searches, and a log.
  3. Optional fine-tuning of the pruned model (train.finetune; knowledge distillation from the
     dense model with --kd), checkpointed per epoch under RUN/steps/finetune/.
  4. Measurements of dense / pruned / fine-tuned (measure.measure: params, memory, MACs, SOPs,
     energy, latency) and their top-1 on the *test* split. Decisions only ever use the
     calibration split; the test split is read here, once per model, for the final figures.
  5. RUN/model/ (the final model: fine-tuned when asked), RUN/summary.json (atomic),
     RUN/report.md and RUN/plots/*.png (report.py).

Registering a policy:

    @register_policy("mine", add_args=lambda g: g.add_argument("--my-knob", type=float), help="...")
    def mine(ctx: PruneContext) -> PolicyResult:
        ...
        return PolicyResult(model, ratios, info)

`add_args` adds the policy's own options to the prune command (they reach it as
ctx.options["my_knob"]). `info` (JSON-able) is merged into summary.json at the top level (it may
not replace the pipeline's own keys), with these keys read specially:
  info["plots"]            a list of (filename, draw) or (filename, draw, caption): draw(path)
                           writes a PNG; the pipeline calls it into RUN/plots/ right after the
                           policy returns, embeds it in the report, and keeps only the file name
                           (so a resumed run does not need the callable again)
  info["report_sections"]  a list of (title, markdown) pairs appended to report.md
  info["tradeoff"]         {series name: [[memory_saved_fraction, calib_top1], ...]}: points
                           drawn on the accuracy-against-memory plot beside dense and pruned
  info["calib_top1"]       the pruned model's calibration top-1 if the policy measured it
                           (saves a pass)

Constraints (ctx.constraints): max_acc_drop in points of top-1 against the dense model on the same
split (default 3), target_saving (fraction of the dense memory) or memory_budget (bytes), at
precision fp32 / fp16 / int8. The policy decides how it uses them; the pipeline checks the outcome
(constraints_met: the pruned model's calibration drop within the limit and its memory within the
budget, the split decisions were made on; test figures are reported beside them).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import SpikepruneError
from .sensitivity import DEFAULT_RATIOS, SensitivityTable, analyze, model_hash, parse_ratios, resolution_warning

DEFAULT_MAX_ACC_DROP = 3.0  # points: the seed papers' "within 3%"
PRECISIONS = ("fp32", "fp16", "int8")
UNIFORM_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RUN_FORMAT = "spikeprune-run"
MEASURE_IMAGES = 256  # test images whose firing rates give SOPs and energy
LATENCY_REPEATS = 10  # modest: a demo must stay quick; the benchmark measures latency properly


# ------------------------------------------------------------------------------------------------
# Constraints, results, registry
# ------------------------------------------------------------------------------------------------
@dataclass
class Constraints:
    """The user's limits. max_acc_drop: points of top-1; target_saving: fraction of the dense
    model's memory to save; memory_budget: bytes; both memory targets at `precision`."""
    max_acc_drop: float = DEFAULT_MAX_ACC_DROP
    target_saving: float | None = None
    memory_budget: int | None = None
    precision: str = "fp32"

    def to_dict(self) -> dict:
        return asdict(self)

    def budget_bytes(self, dense_bytes: int) -> int | None:
        """The memory budget in bytes at `precision` (the tighter one if both targets are given)."""
        budgets = [b for b in (self.memory_budget,
                               None if self.target_saving is None else int(math.floor(dense_bytes * (1 - self.target_saving))))
                   if b is not None]
        return min(budgets) if budgets else None


def make_constraints(max_acc_drop=None, target_saving=None, memory_budget=None, precision="fp32") -> Constraints:
    """Check the constraints on their own (each policy checks them against the model)."""
    from .units import parse_bytes

    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise SpikepruneError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    L = DEFAULT_MAX_ACC_DROP if max_acc_drop is None else max_acc_drop
    try:
        L = float(L)
    except (TypeError, ValueError):
        raise SpikepruneError(f"--max-acc-drop must be a number of top-1 points, got {max_acc_drop!r}") from None
    if not math.isfinite(L) or L < 0:
        raise SpikepruneError(f"--max-acc-drop must be a non-negative number of top-1 points (3 = at most 3 points "
                              f"below the dense model), got {max_acc_drop}")
    if L > 100:
        raise SpikepruneError(f"--max-acc-drop is in points of top-1 (0-100), got {L:g}")
    if target_saving is not None:
        target_saving = float(target_saving)
        if not (0 < target_saving < 1):
            raise SpikepruneError(f"--target-saving is a fraction of the dense model's memory strictly between 0 and 1 "
                                  f"(0.25 = save a quarter), got {target_saving:g}")
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    return Constraints(L, target_saving, budget, precision)


@dataclass
class PolicyResult:
    """What a policy hands back: the pruned model, the ratios it applied (group -> ratio or kept
    indices), and `info` for summary.json and the report (module docstring)."""
    model: nn.Module
    ratios: dict
    info: dict = field(default_factory=dict)


@dataclass
class PolicySpec:
    name: str
    fn: Callable
    add_args: Callable | None
    help: str
    check: Callable | None = None  # check(options) raises SpikepruneError before any work is done


_POLICIES: dict[str, PolicySpec] = {}


def register_policy(name: str, add_args: Callable | None = None, help: str = "", check: Callable | None = None):
    """Decorator: `fn(ctx) -> PolicyResult` becomes `spikeprune prune --policy NAME`.

    add_args(argument_group) adds the policy's own options; check(options) validates them before the
    run folder is touched (so a typo never leaves a half-made run behind)."""
    def deco(fn):
        _POLICIES[name] = PolicySpec(name, fn, add_args, help or (fn.__doc__ or "").strip().split("\n")[0], check)
        return fn
    return deco


def policies() -> dict[str, PolicySpec]:
    """Every registered policy (importing spikeprune.policies registers the built-in ones)."""
    from . import policies as _builtin  # noqa: F401  (registers uniform, groups, psvit, primesvt)

    return dict(_POLICIES)


def get_policy(name: str) -> PolicySpec:
    known = policies()
    if name not in known:
        raise SpikepruneError(f"unknown policy {name!r}; choose one of {', '.join(sorted(known))}")
    return known[name]


# ------------------------------------------------------------------------------------------------
# The context a policy works in
# ------------------------------------------------------------------------------------------------
class PruneContext:
    """Everything a policy needs, with the run folder behind it (see the module docstring).

    Attributes: model (dense, eval), data (spec), importance, round_to, constraints, device, seed,
    run_dir, batch_size, ratios (sensitivity grid), uniform_ratios (sweep grid), groups (pattern
    of the groups to analyse), calib_batches, options (policy-specific CLI options), progress.
    Counters: evaluations / images_evaluated (calibration passes run through calib_top1).
    """

    def __init__(self, model: nn.Module, data: str, run_dir: str | Path, *, importance: str = "l2",
                 round_to: int = 1, constraints: Constraints | None = None, device: str = "cpu", seed: int = 0,
                 batch_size: int = 128, ratios=DEFAULT_RATIOS, uniform_ratios=UNIFORM_RATIOS, groups: str = "*",
                 calib_batches: int = 4, options: dict | None = None, progress: bool = True,
                 log_file: str | Path | None = None):
        self.model = model.eval()
        self.data = data
        self.run_dir = Path(run_dir)
        self.importance, self.round_to = importance, round_to
        self.constraints = constraints or Constraints()
        self.device, self.seed, self.batch_size = device, seed, batch_size
        self.ratios, self.uniform_ratios = parse_ratios(ratios), parse_ratios(uniform_ratios, "--uniform-ratios")
        self.groups, self.calib_batches = groups, calib_batches
        self.options = dict(options or {})
        self.progress = progress
        self.log_file = Path(log_file) if log_file else self.run_dir / "log.txt"
        self.evaluations, self.images_evaluated = 0, 0
        self._calib = None
        self._dense_top1: float | None = None
        self._table: SensitivityTable | None = None
        self._dense_scores: dict | None = None

    # data and accuracy --------------------------------------------------------------------------
    @property
    def calib(self):
        """The calibration split (Dataset) at the model's image size."""
        if self._calib is None:
            from .data import dataset_for_model

            self._calib = dataset_for_model(self.data, self.model, "calib")
        return self._calib

    def calib_top1(self, model: nn.Module) -> float:
        """Top-1 of `model` on the calibration split (a fraction); counted in the run's cost."""
        from .train import evaluate

        r = evaluate(model, self.calib, split="calib", batch_size=self.batch_size, device=self.device, progress=False)
        self.evaluations += 1
        self.images_evaluated += int(r["n"])
        return float(r["top1"])

    @property
    def dense_calib_top1(self) -> float:
        if self._dense_top1 is None:
            saved = self.load_checkpoint("dense_calib")
            if saved is None:
                saved = {"top1": self.calib_top1(self.model)}
                self.checkpoint("dense_calib", saved)
            self._dense_top1 = float(saved["top1"])
        return self._dense_top1

    def acc_drop(self, top1: float) -> float:
        """Points of calibration top-1 lost against the dense model."""
        return (self.dense_calib_top1 - top1) * 100.0

    def within_limit(self, top1: float) -> bool:
        return self.acc_drop(top1) <= self.constraints.max_acc_drop + 1e-9

    # pruning and memory -------------------------------------------------------------------------
    def score_kwargs(self) -> dict:
        """How the run scores channels: calibration data (for taylor / firing), batches and seed."""
        from .importance import DATA_CRITERIA

        return dict(data=self.calib if self.importance in DATA_CRITERIA else None, batches=self.calib_batches,
                    batch_size=min(self.batch_size, 64), seed=self.seed)

    def dense_scores(self) -> dict:
        """Importance scores of every group of the dense model, computed once per run: every policy
        and every candidate ranks the dense model's units the same way (taylor / firing cost a data pass)."""
        from .importance import scores

        if self._dense_scores is None:
            kw = self.score_kwargs()
            self._dense_scores = scores(self.model, self.importance, kw.pop("data"), **kw)
        return self._dense_scores

    def prune(self, ratios: dict, model: nn.Module | None = None) -> nn.Module:
        """spikeprune.prune with the run's importance and round_to (the dense model's scores come
        from dense_scores)."""
        from .surgery import prune

        if model is None or model is self.model:
            return prune(self.model, ratios, importance=self.dense_scores(), round_to=self.round_to).eval()
        return prune(model, ratios, importance=self.importance, round_to=self.round_to, **self.score_kwargs()).eval()

    def memory(self, model: nn.Module, precision: str | None = None) -> int:
        """Weight memory of `model` in bytes at `precision` (default: the constraints')."""
        from .measure import memory_bytes

        return int(memory_bytes(model)[precision or self.constraints.precision])

    @property
    def dense_memory(self) -> int:
        return self.memory(self.model)

    @property
    def budget_bytes(self) -> int | None:
        return self.constraints.budget_bytes(self.dense_memory)

    # sensitivity ------------------------------------------------------------------------------
    def sensitivity(self) -> SensitivityTable:
        """The per-group sensitivity table on the calibration split, computed once per run and
        kept in RUN/sensitivity.csv (an interrupted analysis resumes from its rows)."""
        if self._table is None:
            self.log("sensitivity analysis: each group pruned alone at "
                     f"{', '.join(f'{r:g}' for r in self.ratios)}")
            self._table = analyze(self.model, self.calib, groups=self.groups, ratios=self.ratios,
                                  importance=self.importance, batch_size=self.batch_size,
                                  out_csv=self.run_dir / "sensitivity.csv", seed=self.seed, device=self.device,
                                  progress=self.progress, round_to=self.round_to, calib_batches=self.calib_batches,
                                  log=self.log)
            fc = self._table.forward_cost
            self.log(f"sensitivity: {fc['candidates']} candidates, {fc['spent']:,.0f} image-block passes spent vs "
                     f"{fc['full_recompute']:,.0f} recomputing everything ({fc['ratio']:.2f}x fewer)")
        return self._table

    # resuming ---------------------------------------------------------------------------------
    def _step_path(self, name: str) -> Path:
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise SpikepruneError(f"checkpoint step names are plain words, got {name!r}")
        return self.run_dir / "steps" / name

    def checkpoint(self, step: str, obj) -> None:
        """Keep the outcome of a finished step: a model (saved as a model folder) or JSON data."""
        from .serialization import save_model, write_json

        p = self._step_path(step)
        if isinstance(obj, nn.Module):
            save_model(obj, p)  # keeps the model's pruning record (the dense widths) too
        else:
            write_json(p.with_suffix(".json"), obj)

    def load_checkpoint(self, step: str):
        """What `checkpoint(step, ...)` stored, or None when the step has not finished."""
        from .serialization import is_saved_model, load_model

        p = self._step_path(step)
        if is_saved_model(p):
            return load_model(p).eval()
        j = p.with_suffix(".json")
        if j.is_file():
            return json.loads(j.read_text())
        return None

    def plot_path(self, filename: str) -> Path:
        p = self.run_dir / "plots" / filename
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log(self, msg: str) -> None:
        """A progress line on stderr (above any progress bar) and in RUN/log.txt."""
        if self.progress:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        try:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------
# The run folder
# ------------------------------------------------------------------------------------------------
def _prepare_run_dir(out: Path, fp: str, settings: dict, force: bool) -> bool:
    """Create RUN or check it holds this run; returns True when resuming."""
    run_json = out / "run.json"
    if out.exists() and not out.is_dir():
        raise SpikepruneError(f"{out} exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()):
        same = False
        if run_json.is_file():
            try:
                old = json.loads(run_json.read_text())
                same = old.get("format") == RUN_FORMAT and old.get("fingerprint") == fp
            except json.JSONDecodeError:
                old = {}
            if not same and not force:
                diffs = [f"{k}: {old.get('settings', {}).get(k)!r} there vs {v!r} now"
                         for k, v in settings.items() if old.get("settings", {}).get(k) != v]
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
    from .serialization import write_json

    write_json(run_json, {"format": RUN_FORMAT, "version": 1, "fingerprint": fp, "settings": settings,
                          "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return False


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
    return str(obj)


def _render_plots(ctx: PruneContext, plots) -> list[dict]:
    """Draw the policy's (filename, draw[, caption]) plots into RUN/plots; keep file + caption."""
    out = []
    for item in plots or []:
        if isinstance(item, dict):
            out.append({"file": item["file"], "caption": item.get("caption", "")})
            continue
        filename, draw, *rest = item
        path = ctx.plot_path(filename)
        try:
            draw(path)
            out.append({"file": f"plots/{filename}", "caption": rest[0] if rest else ""})
        except Exception as e:  # a plot must never cost the run its result
            ctx.log(f"warning: plot {filename} failed ({type(e).__name__}: {e})")
    return out


def _measure_model(ctx: PruneContext, model: nn.Module, name: str, measure_images: int, repeats: int) -> dict:
    """Test top-1 and measure.measure totals, checkpointed per model."""
    saved = ctx.load_checkpoint(f"measure_{name}")
    if saved is not None:
        return saved
    from .data import dataset_for_model
    from .measure import measure
    from .train import evaluate

    ctx.log(f"measuring the {name} model on the test split")
    test = dataset_for_model(ctx.data, model, "test")
    acc = evaluate(model, test, split="test", batch_size=ctx.batch_size, device=ctx.device, progress=ctx.progress)
    m = measure(model, data=test, device=ctx.device, n_images=min(measure_images, len(test)), batch_size=64,
                latency=True, latency_batch=1, repeats=repeats, warmup=2)
    t = m["total"]
    out = {"top1": acc["top1"], "top5": acc["top5"], "params": int(t["params"]),
           "memory_bytes": {k: int(v) for k, v in t["memory_bytes"].items()},
           "macs": int(t["macs"]), "sops": t.get("sops"), "energy_mj": t.get("energy_mj"),
           "latency_ms": t.get("latency_ms")}
    ctx.checkpoint(f"measure_{name}", out)
    return out


def _group_widths(dense: nn.Module, final: nn.Module) -> list[dict]:
    from .groups import groups

    after = {g.name: g for g in groups(final)}
    rows = []
    for g in groups(dense):
        a = after.get(g.name)
        rows.append({"group": g.name, "unit": g.unit, "before": g.size, "after": a.size if a else None,
                     "params_before": g.params, "params_after": a.params if a else None})
    return rows


def _run_policy(ctx: PruneContext, spec: PolicySpec) -> tuple[nn.Module, dict]:
    """Steps 1-2: the policy's pruned model and its record (ratios, info, calibration top-1),
    read back when a previous session finished them."""
    pruned, record = ctx.load_checkpoint("policy_model"), ctx.load_checkpoint("policy")
    if pruned is not None and record is not None:
        return pruned, record
    ctx.log(f"policy {spec.name}: dense calibration top-1 {ctx.dense_calib_top1:.2%}, limit "
            f"{ctx.constraints.max_acc_drop:g} points")
    result = spec.fn(ctx)
    if not isinstance(result, PolicyResult):
        raise SpikepruneError(f"internal: policy {spec.name} returned {type(result).__name__}, not a PolicyResult")
    pruned = result.model.eval()
    info = dict(result.info)
    info["plots"] = _render_plots(ctx, info.get("plots"))
    calib = info.pop("calib_top1", None)
    record = {"ratios": _jsonable(result.ratios), "info": _jsonable(info),
              "calib_top1": float(calib) if calib is not None else ctx.calib_top1(pruned)}
    ctx.checkpoint("policy_model", pruned)
    ctx.checkpoint("policy", record)
    return pruned, record


def _finetune(ctx: PruneContext, pruned: nn.Module, ft: dict) -> nn.Module:
    """Step 3: fine-tune a copy of the pruned model (distilling from the dense one with kd);
    train() checkpoints every epoch under RUN/steps/finetune, so an interrupted run resumes."""
    done = ctx.load_checkpoint("finetuned_model")
    if done is not None:
        return done
    from .train import finetune

    ctx.log(f"fine-tuning for {ft['epochs']} epoch{'s' if ft['epochs'] != 1 else ''}"
            + (" with distillation from the dense model" if ft["kd"] else ""))
    model, history = finetune(
        copy.deepcopy(pruned), ctx.data, ft["epochs"], teacher=ctx.model if ft["kd"] else None,
        kd_weight=ft["kd_weight"] or 0.5, kd_temperature=ft["kd_temperature"] or 4.0, lr=ft["lr"],
        batch_size=ft["batch_size"], device=ctx.device, seed=ctx.seed, out_dir=ctx.run_dir / "steps" / "finetune",
        resume=True, progress=ctx.progress)
    model.eval()
    model.pruning = getattr(pruned, "pruning", None)  # the pruning record travels with the weights
    ctx.checkpoint("finetune_history", {"history": _jsonable(history)})
    ctx.checkpoint("finetuned_model", model)
    return model


def _calib_once(ctx: PruneContext, model: nn.Module, step: str) -> float:
    saved = ctx.load_checkpoint(step)
    if saved is None:
        saved = {"top1": ctx.calib_top1(model)}
        ctx.checkpoint(step, saved)
    return float(saved["top1"])


def _checks(ctx: PruneContext, figures: dict, pruned_calib: float) -> dict:
    """Were the constraints met? Judged where the decisions were made: the pruned model's calibration
    drop, and its memory at the constraints' precision. Test drops are given beside them."""
    c = ctx.constraints
    dense_mem, mem = figures["dense"]["memory_bytes"][c.precision], figures["pruned"]["memory_bytes"][c.precision]
    budget = c.budget_bytes(dense_mem)
    drop = (ctx.dense_calib_top1 - pruned_calib) * 100
    checks = {"acc_drop_calib": drop, "acc_ok": drop <= c.max_acc_drop + 1e-9,
              "acc_drop_test": (figures["dense"]["top1"] - figures["pruned"]["top1"]) * 100,
              "memory_bytes": mem, "budget_bytes": budget, "memory_ok": budget is None or mem <= budget,
              "memory_saved": 1 - mem / dense_mem if dense_mem else 0.0}
    if figures["finetuned"] is not None:
        checks["acc_drop_test_finetuned"] = (figures["dense"]["top1"] - figures["finetuned"]["top1"]) * 100
    return checks


def _warnings(ctx: PruneContext, table: SensitivityTable | None, checks: dict) -> list[str]:
    out = list(table.warnings) if table is not None else []
    if table is None:
        w = resolution_warning(len(ctx.calib), ctx.dense_calib_top1)
        out += [w] if w else []
    if checks["acc_ok"] and checks["acc_drop_test"] > ctx.constraints.max_acc_drop:
        out.append(f"the pruned model is within the limit on the calibration split ({checks['acc_drop_calib']:.2f} "
                   f"points) but not on the test split ({checks['acc_drop_test']:.2f} points): the calibration split "
                   "is a noisy stand-in for the test distribution")
    return out


def run(model: nn.Module, data: str, out: str | Path, policy: str = "psvit", *, max_acc_drop: float | None = None,
        target_saving: float | None = None, memory_budget=None, precision: str = "fp32", importance: str = "l2",
        round_to: int = 1, finetune_epochs: int = 0, kd: bool = False, kd_weight: float = 0.5,
        kd_temperature: float = 4.0, finetune_lr: float = 1e-4, finetune_batch_size: int = 64,
        ratios=DEFAULT_RATIOS, uniform_ratios=UNIFORM_RATIOS, groups: str = "*", batch_size: int = 128,
        device: str = "cpu", seed: int = 0, calib_batches: int = 4, force: bool = False, progress: bool = True,
        options: dict | None = None, model_spec: str | None = None, measure_images: int = MEASURE_IMAGES,
        latency_repeats: int = LATENCY_REPEATS) -> dict:
    """Run `policy` on `model` with `data`, fill the run folder `out`, and return the summary.

    See the module docstring for the steps and the layout. Every decision uses the calibration
    split; dense / pruned / fine-tuned top-1 in the summary are on the test split (fractions).
    Everything is checked before the run folder is touched.
    """
    t_start = time.perf_counter()
    spec = get_policy(policy)
    constraints = make_constraints(max_acc_drop, target_saving, memory_budget, precision)
    ratios, uniform_ratios = parse_ratios(ratios), parse_ratios(uniform_ratios, "--uniform-ratios")
    if finetune_epochs < 0:
        raise SpikepruneError(f"--finetune-epochs must be 0 or more, got {finetune_epochs}")
    if kd and finetune_epochs == 0:
        raise SpikepruneError("--kd distils during fine-tuning: give --finetune-epochs N (N >= 1) as well")
    if batch_size < 1:
        raise SpikepruneError(f"--batch-size must be at least 1, got {batch_size}")
    options = {k: v for k, v in (options or {}).items() if v is not None and v != []}
    if spec.check:
        spec.check(options)
    model = model.eval()
    ft = {"epochs": finetune_epochs, "kd": kd, "kd_weight": kd_weight if kd else None,
          "kd_temperature": kd_temperature if kd else None, "lr": finetune_lr,
          "batch_size": finetune_batch_size} if finetune_epochs else None
    settings = {"model": model_hash(model), "model_spec": model_spec, "data": data, "policy": policy,
                "constraints": constraints.to_dict(), "importance": importance, "round_to": round_to,
                "ratios": list(ratios), "uniform_ratios": list(uniform_ratios), "groups": groups,
                "batch_size": batch_size, "seed": seed, "calib_batches": calib_batches, "finetune": ft,
                "options": _jsonable(options)}
    fp = hashlib.sha256(json.dumps({k: v for k, v in settings.items() if k != "model_spec"},
                                   sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out)
    resumed = _prepare_run_dir(out, fp, settings, force)
    ctx = PruneContext(model, data, out, importance=importance, round_to=round_to, constraints=constraints,
                       device=device, seed=seed, batch_size=batch_size, ratios=ratios, uniform_ratios=uniform_ratios,
                       groups=groups, calib_batches=calib_batches, options=options, progress=progress)
    if resumed:
        ctx.log(f"resuming the run in {out}: finished steps are reused")
    torch.manual_seed(seed)

    # Wall time adds up over the sessions of an interrupted run; rerunning a finished run reports it.
    state = ctx.load_checkpoint("elapsed") or {"seconds": 0.0, "complete": False}

    def elapsed() -> float:
        return state["seconds"] + (0.0 if state.get("complete") else time.perf_counter() - t_start)

    def save_elapsed(seconds: float | None = None, complete: bool = False) -> None:
        ctx.checkpoint("elapsed", {"seconds": elapsed() if seconds is None else seconds,
                                   "complete": complete or bool(state.get("complete"))})

    pruned, record = _run_policy(ctx, spec)  # 1-2
    save_elapsed()
    finetuned = _finetune(ctx, pruned, ft) if ft else None  # 3
    save_elapsed()
    figures = {name: _measure_model(ctx, m, name, measure_images, latency_repeats) if m is not None else None
               for name, m in (("dense", ctx.model), ("pruned", pruned), ("finetuned", finetuned))}  # 4
    final = finetuned if finetuned is not None else pruned

    # 5. Outcome, summary, model, report.
    pruned_calib = float(record["calib_top1"])
    checks = _checks(ctx, figures, pruned_calib)
    table = ctx._table  # the policy's, or the one an earlier session of this run wrote
    if table is None and (out / "sensitivity.csv").is_file():
        table = SensitivityTable.from_csv(out / "sensitivity.csv")
    rec = getattr(pruned, "pruning", None) or {}
    summary = {
        "policy": policy, "model": model_spec, "data": data,
        "dense": figures["dense"], "pruned": figures["pruned"], "finetuned": figures["finetuned"],
        "memory_saved": checks["memory_saved"],
        "constraints": constraints.to_dict(),
        "constraints_met": bool(checks["acc_ok"] and checks["memory_ok"]),
        "constraint_checks": checks,
        "calib": {"n": len(ctx.calib), "dense_top1": ctx.dense_calib_top1, "pruned_top1": pruned_calib,
                  "finetuned_top1": _calib_once(ctx, finetuned, "finetuned_calib") if finetuned is not None else None},
        "top1": {"calib": pruned_calib, "test": figures["pruned"]["top1"]},
        "ratios": record["ratios"],
        "removed": rec.get("removed", {}), "kept": rec.get("kept", {}), "notes": rec.get("notes", []),
        "widths": _group_widths(ctx.model, final),
        "importance": importance, "round_to": round_to, "seed": seed, "finetune": ft,
        "finetune_history": (ctx.load_checkpoint("finetune_history") or {}).get("history") if ft else None,
        "forward_cost": {"calib_evaluations_this_run": ctx.evaluations, "calib_images_this_run": ctx.images_evaluated,
                         "sensitivity": table.forward_cost if table is not None else None},
        "warnings": _warnings(ctx, table, checks),
        "resumed": resumed,
    }
    info = record["info"]
    for k, v in info.items():
        if k != "report_sections":
            summary[f"policy_{k}" if k in summary else k] = v  # never replace the pipeline's own keys
    summary["wall_time_s"] = round(elapsed(), 2)

    from .report import plot_tradeoff, write_report
    from .serialization import save_model, write_json

    try:
        plot_tradeoff(ctx.plot_path("accuracy_memory.png"), summary, info.get("tradeoff") or {}, constraints.max_acc_drop)
        summary["plots"] = [{"file": "plots/accuracy_memory.png", "caption": "calibration top-1 against memory saved"},
                            *summary.get("plots", [])]
    except Exception as e:  # a plot must never cost the run its result
        ctx.log(f"warning: the accuracy/memory plot failed ({type(e).__name__}: {e})")
    summary = _jsonable(summary)
    save_model(final, out / "model")
    write_json(out / "summary.json", summary)
    write_report(out, summary, info.get("report_sections") or [], table)
    save_elapsed(seconds=summary["wall_time_s"], complete=True)  # what summary.json says, for later reruns
    ctx.log(f"wrote {out / 'model'}, {out / 'summary.json'} and {out / 'report.md'}")
    return summary


# ------------------------------------------------------------------------------------------------
# CLI: spikeprune prune (registered through spikeprune.policies.register_cli)
# ------------------------------------------------------------------------------------------------
_POLICY_ARG_DESTS: dict[str, list[str]] = {}


def _default_policy(args) -> str:
    if getattr(args, "uniform", None) is not None:
        return "uniform"
    if getattr(args, "ratio", None):
        return "groups"
    known = policies()
    return "primesvt" if "primesvt" in known else "psvit"


def cmd_prune(args) -> int:
    from .cli import resolve_model
    from .report import format_summary_table

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
    options = {d: getattr(args, d, None) for d in _POLICY_ARG_DESTS.get(name, [])}
    model = resolve_model(args).eval()
    summary = run(model, args.data, args.output, name, max_acc_drop=args.max_acc_drop,
                  target_saving=args.target_saving, memory_budget=args.memory_budget, precision=args.precision,
                  importance=args.importance, round_to=args.round_to, finetune_epochs=args.finetune_epochs,
                  kd=args.kd, kd_weight=args.kd_weight, kd_temperature=args.kd_temperature,
                  finetune_lr=args.finetune_lr, ratios=args.ratios, uniform_ratios=args.uniform_ratios,
                  groups=args.groups, batch_size=args.batch_size, device=args.device, seed=args.seed,
                  calib_batches=args.calib_batches, force=args.force, progress=not args.quiet,
                  options=options, model_spec=args.model_spec, latency_repeats=args.latency_repeats)
    print(format_summary_table(summary))
    print(f"report: {Path(args.output) / 'report.md'}")
    return 0


def register_prune_cli(sub) -> None:
    """Add `spikeprune prune` with the common options and every policy's own."""
    from .cli import add_data_args, add_device_arg, add_model_args
    from .importance import CRITERIA

    known = policies()
    p = sub.add_parser(
        "prune", help=f"prune a model with a policy ({', '.join(sorted(known))}; default primesvt) into a run folder",
        description="Prune whole channels / heads of a Spikformer under an accuracy limit (and optionally a memory "
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
    e.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                   help="ratio grid of the sensitivity analysis (default %(default)s)")
    e.add_argument("--uniform-ratios", default=",".join(f"{r:g}" for r in UNIFORM_RATIOS),
                   help="ratio grid of the uniform sweep (default %(default)s)")
    e.add_argument("--groups", default="*", metavar="PATTERN", help="groups the sensitivity analysis covers (default all)")
    e.add_argument("--calib-batches", type=int, default=4, metavar="N", help="calibration batches for taylor / firing")
    e.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--finetune-epochs", type=int, default=0, metavar="N", help="fine-tune the pruned model (default 0: no)")
    f.add_argument("--kd", action="store_true", help="distil from the dense model while fine-tuning")
    f.add_argument("--kd-weight", type=float, default=0.5, help="weight of the distillation term (default 0.5)")
    f.add_argument("--kd-temperature", type=float, default=4.0, help="distillation temperature (default 4)")
    f.add_argument("--finetune-lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    o = p.add_argument_group("output")
    o.add_argument("--latency-repeats", type=int, default=LATENCY_REPEATS, metavar="N",
                   help="timed repeats per latency figure (default %(default)s)")
    o.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    for spec in known.values():
        if spec.add_args:
            g = p.add_argument_group(f"{spec.name} policy", spec.help)
            before = {a.dest for a in p._actions}
            spec.add_args(g)
            _POLICY_ARG_DESTS[spec.name] = [a.dest for a in p._actions if a.dest not in before]
    p.set_defaults(func=cmd_prune)
