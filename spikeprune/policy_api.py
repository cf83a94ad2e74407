"""The policy API: what a pruning policy receives, what it returns, and how it is registered.

A policy decides *what* to prune; spikeprune.run does everything around it (run folder, resume,
fine-tuning, measuring, report), the same way for every policy:

    @register_policy("mine", options=[Option("my_knob", float, 0.5, "how much", valid=lambda r: 0 <= r < 1,
                                             must="a ratio in [0, 1)")], help="...")
    def mine(ctx: PruneContext) -> PolicyResult:
        model = ctx.prune({"block*.mlp.hidden": ctx.option("my_knob")})
        return PolicyResult(model, {"calib_top1": ctx.calib_top1(model)})

What was pruned is `model.pruning`, the typed PruningRecord every `spikeprune.prune` call attaches
(successive calls compose it), so a policy never describes its choice in a second way. A policy
declares its own options (`options=[Option("my_knob", float, 0.5, "help", valid=..., must=...)]`):
they are added to `spikeprune prune`, checked before the run folder is touched, and read as
ctx.option("my_knob"); `check(options, model)` adds checks that need the model. docs/policy-toolkit.md
has a worked example.

The toolkit every policy uses (no policy keeps its own copy):
  ctx.resumable(step, key, fresh)   a step's JSON state, back after a kill when saved under the same key
  ctx.replay(steps, apply, label)   the dense model with saved steps applied again, checked by memory
  ctx.cut(model, group, ratio)      cut one group by the run's importance: (model, kept indices);
                                    ctx.keep(model, group, kept) replays it; ctx.unit_scores ranks
  bisect / largest_within           the bisection searches (largest k within the limit, ...)
  ctx.evaluate(model, images)       loss / top-1 / n on the calibration split or a sample of it
                                    (ctx.sample), sharded under torchrun, counted in the run's cost
  plot_trajectory(path, points,..)  memory against calibration top-1 after each step
  ctx.finetuning                    the run's fine-tuning as one object (None without) `info` (JSON-able) is
merged into summary.json at the top level (it never replaces the run's own keys), with these keys
read specially:
  info["plots"]            [(filename, draw) or (filename, draw, caption)]: draw(path) writes a PNG;
                           the run draws it into RUN/plots/ right after the policy returns and embeds
                           it in the report (a plot that fails is named in the report's warnings)
  info["report_sections"]  [(title, markdown)] appended to report.md
  info["tradeoff"]         {series: [[memory_saved_fraction, calib_top1], ...]} for the
                           accuracy-against-memory plot
  info["calib_top1"]       the pruned model's calibration top-1 if the policy measured it

Constraints: one type for every policy. The user's limits (max_acc_drop in points of top-1
against the dense model on the same split, default 3; target_saving, a fraction of the dense
memory, or memory_budget in bytes; at precision fp32 / fp16 / int8) are checked on their own when
built and against the model once its dense memory is known (`Constraints.resolve`): a budget at or
above the dense model, below the smallest model pruning can reach, or a saving and a budget that
disagree are refused with the numbers, whichever policy runs. `ctx.constraints` is always the
resolved object.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .data import dataset_for_model
from .errors import SpikepruneError
from .coupling import groups as model_groups
from .importance import needs_data, scores
from .costs import budget_bytes
from .models import get_family
from .plots import FIGSIZE, label_points, limit_line, new_figure, save_figure
from .sensitivity import SensitivityTable, analyze
from .serialization import atomic_path, is_saved_model, load_model, save_model, write_json
from .surgery import SpikepruneWarning, plan
from .surgery import prune as surgery_prune
from .training import evaluate
from .units import format_bytes, parse_bytes
from .validation import PRECISIONS, drop_within

DEFAULT_MAX_ACC_DROP = 3.0  # points: the seed papers' "within 3%"
CONSISTENCY_TOLERANCE = 0.005  # of the dense size: --target-saving and --memory-budget may differ by rounding


# ------------------------------------------------------------------------------------------------
# Constraints
# ------------------------------------------------------------------------------------------------
@dataclass
class Constraints:
    """The user's limits, checked on construction; `resolve` checks them against the model.

    max_acc_drop   points of top-1 the pruned model may lose against the dense model
    target_saving  fraction of the dense memory to save, in (0, 1), or None
    memory_budget  bytes (an int, or a string such as "8MB" / "2MiB"), or None
    precision      fp32 | fp16 | int8 (parameters) or file-fp32 ... file-int4 (the exported file's
                   weight bytes, spikeprune.precision): what the memory is counted at
    Set by resolve (None before): dense_bytes, min_bytes (every group at its minimum width),
    budget_bytes (the one budget the targets amount to, or None without a memory target).
    """
    max_acc_drop: float | None = None
    target_saving: float | None = None
    memory_budget: int | str | None = None
    precision: str = "fp32"
    dense_bytes: int | None = None
    min_bytes: int | None = None
    budget_bytes: int | None = None

    def __post_init__(self):
        precision = self.precision or "fp32"
        if precision not in PRECISIONS:
            raise SpikepruneError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        given = self.max_acc_drop
        L = DEFAULT_MAX_ACC_DROP if given is None else given
        try:
            L = float(L)
        except (TypeError, ValueError):
            raise SpikepruneError(f"--max-acc-drop must be a number of top-1 points, got {given!r}") from None
        if not math.isfinite(L) or L < 0:
            raise SpikepruneError(f"--max-acc-drop must be a non-negative number of top-1 points (3 = at most 3 points "
                                  f"below the dense model), got {given}")
        if L > 100:
            raise SpikepruneError(f"--max-acc-drop is in points of top-1 (0-100), got {L:g}; did you mean {L / 100:g}?")
        self.max_acc_drop = L
        if self.target_saving is not None:
            s = self.target_saving
            try:
                s = float(s)
            except (TypeError, ValueError):
                raise SpikepruneError(f"--target-saving must be a fraction, got {self.target_saving!r}") from None
            if not (0 < s < 1):  # also refuses NaN
                raise SpikepruneError(f"--target-saving is a fraction of the dense model's memory strictly between 0 "
                                      f"and 1 (0.25 = save a quarter), got {self.target_saving}")
            self.target_saving = s
        if self.memory_budget is not None:
            self.memory_budget = parse_bytes(self.memory_budget)

    @property
    def resolved(self) -> bool:
        return self.dense_bytes is not None

    @property
    def saving(self) -> float | None:
        """The fraction of the dense memory the budget amounts to (resolved constraints only)."""
        if self.budget_bytes is None or not self.dense_bytes:
            return None
        return 1 - self.budget_bytes / self.dense_bytes

    def user_dict(self) -> dict:
        """The limits as the user gave them (what a run's fingerprint hashes)."""
        return {"max_acc_drop": self.max_acc_drop, "target_saving": self.target_saving,
                "memory_budget": self.memory_budget, "precision": self.precision}

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve(self, dense_bytes: int, min_bytes: int) -> "Constraints":
        """These constraints against a model: dense_bytes and min_bytes at `precision`. Refuses
        contradictions with the numbers; both targets given and consistent: the tighter budget."""
        dense_bytes, min_bytes = int(dense_bytes), int(min_bytes)
        p = self.precision
        dense = f"{dense_bytes:,} bytes ({format_bytes(dense_bytes)})"
        small = f"{min_bytes:,} bytes ({format_bytes(min_bytes)})"
        from_saving = None if self.target_saving is None else int(math.floor(dense_bytes * (1 - self.target_saving)))
        budget = self.memory_budget
        if budget is not None and from_saving is not None:
            gap = abs(budget - from_saving)
            if gap > CONSISTENCY_TOLERANCE * dense_bytes:
                raise SpikepruneError(
                    f"--target-saving {self.target_saving:g} and --memory-budget {budget:,} bytes contradict each "
                    f"other: the dense model is {dense} at {p}, so a saving of {self.target_saving:.2%} means a budget "
                    f"of {from_saving:,} bytes, but the budget given is {budget:,} bytes ({gap:,} bytes apart). "
                    "Give only one of them.")
        budget = min((b for b in (budget, from_saving) if b is not None), default=None)
        if budget is not None:
            if budget >= dense_bytes:
                raise SpikepruneError(
                    f"memory budget {budget:,} bytes ({format_bytes(budget)}) is not below the dense model's {dense} "
                    f"at {p}: there is nothing to prune for it. Give a smaller budget, or a lower --precision.")
            if budget < min_bytes:
                raise SpikepruneError(
                    f"memory budget {budget:,} bytes ({format_bytes(budget)}) is below the smallest model pruning can "
                    f"reach: {small} at {p} with every group at its minimum width (dense: {dense}, so at most "
                    f"{1 - min_bytes / dense_bytes:.2%} can be saved). Raise the budget or use a lower --precision.")
        return replace(self, dense_bytes=dense_bytes, min_bytes=min_bytes, budget_bytes=budget)


def minimum_kept(groups_, round_to: int = 1) -> dict[str, list[int]]:
    """Kept indices that leave every group at its minimum width: one head; one unit (or round_to,
    as the engine rounds up) per group, or per kept head for the per-head channel groups (only
    head 0 survives when the group's heads are a group of their own)."""
    kept = {}
    for g in groups_:
        if g.unit == "head":
            kept[g.name] = [0]
        elif g.heads > 1:
            d = g.head_dim
            heads = [0] if g.head_group else range(g.heads)
            kept[g.name] = [h * d + i for h in heads for i in range(min(d, round_to))]
        else:
            kept[g.name] = list(range(min(g.size, round_to)))
    return kept


def minimum_memory(model: nn.Module, precision: str, round_to: int = 1) -> int:
    """Memory at `precision` of the smallest model pruning can reach: every group at its minimum
    width. Built on the meta device (shapes only, no weights copied)."""
    counts = {name: len(idx) for name, idx in minimum_kept(model_groups(model), round_to).items()}
    with torch.device("meta"):
        tiny = get_family(model).resize(model, counts)
    return budget_bytes(tiny, precision)


# ------------------------------------------------------------------------------------------------
# Result and registry
# ------------------------------------------------------------------------------------------------
@dataclass
class PolicyResult:
    """What a policy hands back: the pruned model (what was pruned is `model.pruning`) and `info`
    for summary.json and the report (module docstring)."""
    model: nn.Module
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """One option of a policy, declared with it: `spikeprune prune --NAME-WITH-DASHES VALUE`, read by
    the policy as ctx.option("name"). Every declared option is checked (type, then `valid`) when the
    run checks its settings, before the run folder is touched.

    kind     float, int or str: what the value is converted to
    default  the value when the option is not given (None: not given means None)
    valid    value -> bool; a value for which it is false is refused: "--flag must be `must`, got V"
    many     the option may be given several times (a list, default [])
    """
    name: str
    kind: type
    default: Any = None
    help: str = ""
    valid: Callable[[Any], bool] | None = None
    must: str = ""
    many: bool = False
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_to(self, parser) -> None:
        """Add the option to an argparse parser or argument group (default None: "not given")."""
        if "default" in self.help:  # the help says it in its own words
            shown = ""
        elif self.default is None or self.many:
            shown = " (default: none)"
        else:
            shown = f" (default {self.default:g})" if isinstance(self.default, float) else f" (default {self.default})"
        kw = dict(action="append", default=[]) if self.many else dict(type=self.kind, default=None)
        parser.add_argument(self.flag, metavar=self.metavar or {int: "N", float: "F"}.get(self.kind, "VALUE"),
                            help=self.help + shown, **kw)

    def value(self, given):
        """The checked value of the option as given (None: the default)."""
        if self.many:
            return [self._one(v) for v in (given or [])]
        return self.default if given is None else self._one(given)

    def _one(self, v):
        try:
            x = self.kind(v)
        except (TypeError, ValueError):
            raise SpikepruneError(f"{self.flag} must be {self.must or self.kind.__name__}, got {v!r}") from None
        if self.kind is int and isinstance(v, float) and v != x:
            raise SpikepruneError(f"{self.flag} must be a whole number, got {v!r}")
        if self.kind is float and not math.isfinite(x) or (self.valid is not None and not self.valid(x)):
            raise SpikepruneError(f"{self.flag} must be {self.must or 'a finite number'}, got {v!r}")
        return x


@dataclass
class PolicySpec:
    name: str
    fn: Callable
    add_args: Callable | None
    help: str
    check: Callable | None = None  # check(options, model) raises SpikepruneError before any work is done
    after_finetune: bool = False  # it can hold the accuracy limit on the fine-tuned model (--limit-after-finetune)
    options: tuple[Option, ...] = ()  # declared options: added to the command, checked by `check`

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise SpikepruneError(f"internal: the {self.name} policy declares no option {name!r}")

    def values(self, given: dict) -> dict:
        """Every declared option's checked value (default when not given)."""
        return {o.name: o.value(given.get(o.name)) for o in self.options}


_POLICIES: dict[str, PolicySpec] = {}


def register_policy(name: str, add_args: Callable | None = None, help: str = "", check: Callable | None = None,
                    after_finetune: bool = False, options: Sequence[Option] = ()):
    """Decorator: `fn(ctx) -> PolicyResult` becomes `spikeprune prune --policy NAME`.

    options: the policy's own options (Option objects): added to `spikeprune prune`, checked before
    the run folder is touched, read as ctx.option(name). check(options, dense_model) adds checks
    that need the model (run after the declared ones); add_args(argument_group) adds options by hand
    (an older way; they are then the policy's to check in `check`).
    after_finetune: the policy reads ctx.limit_after_finetune and, when it is set, chooses a model
    whose calibration top-1 *after the run's fine-tuning* is meant to hold the limit."""
    options = tuple(options)

    def add_all(g) -> None:
        for o in options:
            o.add_to(g)
        if add_args:
            add_args(g)

    def check_all(given: dict, model) -> None:
        for o in options:
            o.value(given.get(o.name))
        if check:
            check(given, model)

    def deco(fn):
        _POLICIES[name] = PolicySpec(name, fn, add_all if options else add_args,
                                     help or (fn.__doc__ or "").strip().split("\n")[0],
                                     check_all if options else check, after_finetune, options)
        return fn
    return deco


def unregister_policy(name: str) -> None:
    """Remove a registered policy (tests register throw-away ones)."""
    _POLICIES.pop(name, None)


def policies() -> dict[str, PolicySpec]:
    """Every registered policy. The built-in ones register when spikeprune.policies is imported
    (spikeprune.run, which every entry point uses, imports it)."""
    return dict(_POLICIES)


def get_policy(name: str) -> PolicySpec:
    if name not in _POLICIES:
        raise SpikepruneError(f"unknown policy {name!r}; choose one of {', '.join(sorted(_POLICIES))}")
    return _POLICIES[name]


# ------------------------------------------------------------------------------------------------
# The context a policy works in
# ------------------------------------------------------------------------------------------------
class PruneContext:
    """Everything a policy needs, with the run folder (settings.output) behind it.

    Attributes: model (dense, eval), settings (the RunSettings), data (spec), run_dir, importance,
    round_to, constraints (resolved against the dense model), device, seed, batch_size, ratios
    (sensitivity grid), uniform_ratios (sweep grid), groups (pattern of the groups to analyse),
    calib_batches, options (the policy's own options as given; ctx.option(name) checks them), finetuning
    (the run's fine-tuning, one object, or None), progress, problems (what the run report must
    say went wrong without stopping the run, e.g. a log that could not be written).
    Counters: evaluations / images_evaluated (calibration passes run through calib_top1).
    on_progress: called after every checkpoint and log line (the run persists its wall time there).
    """

    def __init__(self, model: nn.Module, settings):
        """settings: a spikeprune.run.RunSettings (the run layer sits above this module)."""
        self.model = model.eval()
        self.settings = settings
        s = settings
        self.data, self.run_dir = s.data, Path(s.output)
        self.importance, self.round_to = s.importance, s.round_to
        self.device, self.seed, self.batch_size, self.workers = s.device, s.seed, s.batch_size, s.workers
        self.ratios, self.uniform_ratios = tuple(s.ratios), tuple(s.uniform_ratios)
        self.groups, self.calib_batches = s.groups, s.calib_batches
        self.options = dict(s.options)
        self.limit_after_finetune = s.limit_after_finetune  # the limit holds after the run's fine-tuning
        self.finetuning = s.finetuning  # the run's fine-tuning as one object (None without): what probes copy
        self.progress = s.progress
        self.log_file = self.run_dir / "log.txt"
        c = s.constraints
        self.constraints = c if c.resolved else c.resolve(
            self.memory(model, c.precision), minimum_memory(model, c.precision, s.round_to))
        self.evaluations, self.images_evaluated = 0, 0
        self.problems: list[str] = []
        self.on_progress: Callable[[], None] | None = None
        self._datasets: dict[str, object] = {}
        self._dense_top1: float | None = None
        self._table: SensitivityTable | None = None
        self._dense_scores: dict | None = None
        self._log_failed = False
        self._as_policy: str | None = None  # set on a step context made by as_policy

    def option(self, name: str):
        """The checked value of one of the running policy's declared options (its default when not given)."""
        return get_policy(self._as_policy or self.settings.policy).option(name).value(self.options.get(name))

    def as_policy(self, name: str) -> "PruneContext":
        """This context for another registered policy run as one step of the running one (bitshrink
        walks its widths with shrink): the same model, data, constraints, run folder, checkpoints and
        log; ctx.option reads that policy's declared options (its defaults where the run gave none).
        The step's counters are its own: add them back with `absorb`."""
        get_policy(name)  # an unknown name is refused here, not deep inside the step
        step = copy.copy(self)
        step._as_policy = name
        return step

    def absorb(self, step: "PruneContext") -> None:
        """Take over the evaluation counters of a step context made by as_policy."""
        self.evaluations, self.images_evaluated = step.evaluations, step.images_evaluated

    # data and accuracy --------------------------------------------------------------------------
    def dataset(self, split: str, augment: bool = False):
        """A split at the model's image size, capped by settings.max_images[split] when set."""
        key = (split, augment)
        if key not in self._datasets:
            cap = (self.settings.max_images or {}).get(split)
            self._datasets[key] = dataset_for_model(self.data, self.model, split, augment=augment, max_images=cap)
        return self._datasets[key]

    @property
    def calib(self):
        """The calibration split (Dataset) at the model's image size."""
        return self.dataset("calib")

    def evaluate(self, model: nn.Module, images=None) -> dict:
        """{"loss", "top1", "n"} of `model` on `images` (a Dataset: the calibration split, the default,
        or a part of it from `sample`). Sharded over the processes under torchrun (each evaluates its
        share of the batches, the sums are exact), and counted in the run's cost (evaluations,
        images_evaluated). A non-finite loss is an error: a model that computes NaN is never scored."""
        r = evaluate(model, self.calib if images is None else images, split="calib", batch_size=self.batch_size,
                     device=self.device, progress=False, workers=self.workers)
        if not math.isfinite(float(r["loss"])):
            raise SpikepruneError(
                f"a model evaluated during pruning gives a {r['loss']} loss on the calibration split: its outputs are "
                "not finite (NaN / Inf weights or activations); nothing was chosen from it")
        self.evaluations += 1
        self.images_evaluated += int(r["n"])
        return {"loss": float(r["loss"]), "top1": float(r["top1"]), "n": int(r["n"])}

    def calib_top1(self, model: nn.Module, images=None) -> float:
        """Top-1 of `model` on the calibration split (or on `images`, a part of it), a fraction; see evaluate."""
        return self.evaluate(model, images)["top1"]

    def sample(self, split: str, n: int, seed: int, images=None):
        """`n` images of a split (or of `images`, a Dataset), a fixed random subset in index order, or
        all of them when there are no more than n: a Dataset for evaluate, or for batches()."""
        data = self.dataset(split) if images is None else images
        total = len(data)
        if n >= total:
            return torch.utils.data.Subset(data, list(range(total)))
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.Subset(data, sorted(torch.randperm(total, generator=g)[:n].tolist()))

    @staticmethod
    def batches(images, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`images` (a Dataset) read once into (images, labels) batches, in order: for a pass repeated
        many times on the same images (BatchNorm re-estimation), where reading them again would cost."""
        out = []
        for i in range(0, len(images), batch_size):
            items = [images[j] for j in range(i, min(i + batch_size, len(images)))]
            out.append((torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])))
        return out

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
        """Is a calibration top-1 within the limit? Counted in images (validation.drop_within)."""
        return drop_within(self.dense_calib_top1, top1, len(self.calib), self.constraints.max_acc_drop)

    # pruning and memory -------------------------------------------------------------------------
    def score_kwargs(self) -> dict:
        """How the run scores units: calibration data (for the data-driven criteria), batches, seed."""
        return dict(data=self.calib if needs_data(self.importance) else None, batches=self.calib_batches,
                    batch_size=min(self.batch_size, 64), seed=self.seed)

    def dense_scores(self) -> dict:
        """Importance scores of every group of the dense model, computed once per run: every policy
        and every candidate ranks the dense model's units the same way (data criteria cost a pass)."""
        if self._dense_scores is None:
            kw = self.score_kwargs()
            self._dense_scores = scores(self.model, self.importance, kw.pop("data"), **kw)
        return self._dense_scores

    def prune(self, ratios: dict, model: nn.Module | None = None) -> nn.Module:
        """spikeprune.prune with the run's importance and round_to (the dense model's scores come
        from dense_scores). The result's `pruning` record is against the dense model."""
        if model is None or model is self.model:
            return surgery_prune(self.model, ratios, importance=self.dense_scores(), round_to=self.round_to).eval()
        return surgery_prune(model, ratios, importance=self.importance, round_to=self.round_to,
                             **self.score_kwargs()).eval()

    def unit_scores(self, model: nn.Module, group: str) -> torch.Tensor:
        """The run's importance scores of one group's units on `model` (the dense model's come from
        dense_scores, computed once)."""
        if model is self.model:
            return self.dense_scores()[group]
        kw = self.score_kwargs()
        return scores(model, self.importance, kw.pop("data"), names=[group], **kw)[group]

    def cut(self, model: nn.Module, group: str, ratio: float, unit_scores=None) -> tuple[nn.Module, list[int]]:
        """Cut one group: `model` with `ratio` of `group`'s current units removed, the lowest-scored
        first (unit_scores: the group's scores on `model`, default unit_scores(model, group)), and the
        kept unit indices (what replays the cut exactly, with keep). A ratio that would empty the group
        keeps its minimum quietly (the caller sees the real width); a ratio the engine refuses raises
        SpikepruneError."""
        s = self.unit_scores(model, group) if unit_scores is None else unit_scores
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpikepruneWarning)
            kept = list(plan(model, {group: ratio}, importance={group: s}, round_to=self.round_to).kept[group])
        return self.keep(model, group, kept), kept

    def keep(self, model: nn.Module, group: str, kept) -> nn.Module:
        """`model` with only the `kept` units of `group` (indices into its current width)."""
        return surgery_prune(model, {group: list(kept)}, round_to=self.round_to).eval()

    def memory(self, model: nn.Module, precision: str | None = None) -> int:
        """Weight memory of `model` in bytes at `precision` (default: the constraints')."""
        return budget_bytes(model, precision or self.constraints.precision)

    @property
    def dense_memory(self) -> int:
        return self.constraints.dense_bytes

    @property
    def budget_bytes(self) -> int | None:
        return self.constraints.budget_bytes

    # sensitivity ------------------------------------------------------------------------------
    def sensitivity(self) -> SensitivityTable:
        """The per-group sensitivity table on the calibration split, computed once per run and
        kept in RUN/sensitivity.csv (an interrupted analysis resumes from its rows)."""
        if self._table is None:
            self._take_shared_table()
            self.log("sensitivity analysis: each group pruned alone at "
                     f"{', '.join(f'{r:g}' for r in self.ratios)}")
            self._table = analyze(self.model, self.calib, groups=self.groups, ratios=self.ratios,
                                  importance=self.importance, batch_size=self.batch_size,
                                  output=self.run_dir / "sensitivity.csv", seed=self.seed, device=self.device,
                                  progress=self.progress, round_to=self.round_to, calib_batches=self.calib_batches,
                                  log=self.log)
            fc = self._table.forward_cost
            self.log(f"sensitivity: {fc['candidates']} candidates, {fc['spent']:,.0f} image-block passes spent vs "
                     f"{fc['full_recompute']:,.0f} recomputing everything ({fc['ratio']:.2f}x fewer)")
        return self._table

    def _take_shared_table(self) -> None:
        """A run given shared_steps (the benchmark's shared run, vetted by spikeprune.run) copies
        that run's table in when its policy first asks for one; analyze() then finds it finished.
        Copied here, not with the other shared steps, so that the run of a policy that never reads
        a table reports none."""
        source = getattr(self.settings, "shared_steps", None)
        if source is None or not distributed.is_main():  # rank 0 reads the table for every process
            return
        src, dst = Path(source) / "sensitivity.csv", self.run_dir / "sensitivity.csv"
        if src.is_file() and not dst.exists():
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
            self.log(f"reusing sensitivity.csv from {source}")

    def sensitivity_if_computed(self) -> SensitivityTable | None:
        """The table this run computed, or the one an earlier session of it wrote; None if neither."""
        if self._table is None and (self.run_dir / "sensitivity.csv").is_file():
            self._table = SensitivityTable.from_csv(self.run_dir / "sensitivity.csv")
        return self._table

    # resuming ---------------------------------------------------------------------------------
    def _step_path(self, name: str) -> Path:
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise SpikepruneError(f"checkpoint step names are plain words, got {name!r}")
        return self.run_dir / "steps" / name

    def checkpoint(self, step: str, obj) -> None:
        """Keep the outcome of a finished step: a model (saved as a model folder, with its pruning
        record) or JSON data."""
        p = self._step_path(step)
        if not distributed.is_main():  # the run folder is rank 0's
            return
        if isinstance(obj, nn.Module):
            save_model(obj, p)
        else:
            write_json(p.with_suffix(".json"), obj)
        if self.on_progress:
            self.on_progress()

    def load_checkpoint(self, step: str):
        """What `checkpoint(step, ...)` stored, or None when the step has not finished."""
        p = self._step_path(step)

        def read():  # by rank 0, whose run folder it is; every process gets what it found
            if is_saved_model(p):
                return load_model(p).eval()
            j = p.with_suffix(".json")
            return json.loads(j.read_text()) if j.is_file() else None
        return distributed.from_main(read, f"reading the finished step {step}")

    def resumable(self, step: str, key, fresh: dict, key_field: str = "key") -> "ResumableStep":
        """A resumable step: its state (a JSON dict) as saved under RUN/steps/STEP.json when it was
        saved with the same `key` (everything that decides the step's result), else {key_field: key,
        **fresh}. The policy updates `.state` and calls `.save()` after each unit of work."""
        return ResumableStep(self, step, key, fresh, key_field)

    def replay(self, steps: Sequence, apply: Callable, label: str) -> nn.Module | None:
        """The dense model with saved steps applied again in order (apply(model, step) -> model), each
        checked against the memory it gave (step.memory_bytes); None, said in the log, when one does
        not give it (the step's search then starts afresh)."""
        model = self.model
        for st in steps:
            model = apply(model, st)
            if self.memory(model) != st.memory_bytes:
                self.log(f"{label}: replaying {st.group} did not give the saved size; starting afresh")
                return None
        return model

    def plot_path(self, filename: str) -> Path:
        p = self.run_dir / "plots" / filename
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log(self, msg: str) -> None:
        """A progress line on stderr (above any progress bar) and in RUN/log.txt. A log that cannot
        be written is said once, on stderr and in the run report, and the run goes on."""
        if self.progress:
            tqdm.write(msg, file=sys.stderr)
        if not self._log_failed and distributed.is_main():  # RUN/log.txt is rank 0's
            try:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_file, "a") as f:
                    f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
            except OSError as e:
                self._log_failed = True
                problem = f"this run has no complete log: writing {self.log_file} failed ({type(e).__name__}: {e})"
                self.problems.append(problem)
                print(f"spikeprune: warning: {problem}", file=sys.stderr)
        if self.on_progress:
            self.on_progress()



class ResumableStep:
    """A policy's step that survives a killed run (PruneContext.resumable)."""

    def __init__(self, ctx: PruneContext, name: str, key, fresh: dict, key_field: str = "key"):
        self.ctx, self.name = ctx, name
        saved = ctx.load_checkpoint(name)
        self.resumed = bool(saved) and isinstance(saved, dict) and saved.get(key_field) == key
        if saved and not self.resumed:
            ctx.log(f"{name}: the saved progress belongs to other settings; starting afresh")
        self.state: dict = saved if self.resumed else {key_field: key, **json.loads(json.dumps(fresh))}

    def save(self) -> None:
        self.ctx.checkpoint(self.name, self.state)


# ------------------------------------------------------------------------------------------------
# Searches and the trajectory plot every policy shares
# ------------------------------------------------------------------------------------------------
def bisect(lo, hi, ok: Callable[[Any], bool], *, steps: int | None = None, tol: float | None = None):
    """Bisection between `lo`, where ok holds, and `hi`, where it does not (neither is asked): halve
    until hi - lo <= tol (integers: 1; floats: 0 unless given) or after `steps` halvings. Returns the
    last (lo, hi). Integers bisect at (lo + hi) // 2, floats at (lo + hi) / 2."""
    integer = isinstance(lo, int) and isinstance(hi, int)
    tol = (1 if integer else 0.0) if tol is None else tol
    done = 0
    while hi - lo > tol and (steps is None or done < steps):
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
        done += 1
    return lo, hi


def largest_within(n: int, within: Callable[[int], bool]) -> int:
    """The largest k in 0..n with within(k) true: n itself when it is, else by bisection over k
    (k = 0, the dense model, is taken to be within; a cost that grows with k is assumed, so the
    answer is a boundary: within at k, not at k + 1)."""
    if n == 0 or within(n):
        return n
    return bisect(0, n, within)[0]


@dataclass
class TrajectoryPoint:
    """One point of a policy's trajectory: the model after a step."""
    memory_bytes: int
    calib_top1: float
    label: str


def plot_trajectory(path, points: Sequence[TrajectoryPoint], *, dense_bytes: int, dense_top1: float,
                    max_acc_drop: float, budget_bytes: int | None, precision: str, title: str,
                    series: str = "after each step", color: str = "tab:blue", key_title: str = "step") -> None:
    """Memory against calibration top-1 after each step of a policy, with the accuracy limit and the
    memory budget; the points are numbered where a number fits and listed in a key beside the axes
    (plots.label_points), so no label overprints another or leaves the figure."""
    fig, ax = new_figure(figsize=(FIGSIZE[0] + 1.5, FIGSIZE[1] + 0.8))
    xs = [dense_bytes / 1e6] + [p.memory_bytes / 1e6 for p in points]
    ys = [100 * dense_top1] + [100 * p.calib_top1 for p in points]
    ax.plot(xs, ys, "o-", color=color, ms=5 if len(points) <= 20 else 4, lw=1.2, label=series)
    ax.plot(xs[:1], ys[:1], "k*", ms=13, label="dense")
    limit_line(ax, 100 * dense_top1 - max_acc_drop, f"accuracy limit (-{max_acc_drop:g} pts)")
    if budget_bytes is not None:
        ax.axvline(budget_bytes / 1e6, color="tab:green", ls="--", lw=1,
                   label=f"memory budget ({format_bytes(budget_bytes)})")
    ax.invert_xaxis()  # compression proceeds to the right
    ax.set_xlabel(f"model memory at {precision} (MB, 10^6 bytes)")
    ax.set_ylabel("calibration top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title)
    label_points(ax, xs[1:], ys[1:], [p.label for p in points], key_title=key_title)
    save_figure(fig, path)

__all__ = ["DEFAULT_MAX_ACC_DROP", "PRECISIONS", "Constraints", "Option", "PolicyResult", "PolicySpec", "PruneContext",
           "ResumableStep", "TrajectoryPoint", "bisect", "get_policy", "largest_within", "minimum_kept",
           "minimum_memory", "plot_trajectory", "policies", "register_policy", "unregister_policy"]
