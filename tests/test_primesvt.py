"""PrimeSVT: ranking, robust targets, the sequential loop (on synthetic callables), constraints,
resume after a kill, and one end-to-end run through the CLI on a tiny model."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import pytest
import torch

from spikeprune import cli
from spikeprune.errors import SpikepruneError
from spikeprune.coupling import groups
from spikeprune.costs import memory_bytes
from spikeprune.models import create_model
from spikeprune.policies import primesvt as primesvt_module
from spikeprune.policies.primesvt import SequentialCompression, Target, rank_groups, robust_threshold, select_robust
from spikeprune.policy_api import DEFAULT_MAX_ACC_DROP, Constraints, minimum_kept, minimum_memory
from spikeprune.serialization import load_model, save_model
from spikeprune.surgery import prune

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


# ------------------------------------------------------------------------------------------------
# A synthetic world: a "model" is a dict of group widths; memory is linear in the widths and each
# group costs accuracy quadratically in the fraction of its dense width removed.
# ------------------------------------------------------------------------------------------------
@dataclass
class FakeGroup:
    name: str
    memory_bytes: int


class World:
    FIXED = 10_000

    def __init__(self, dense_top1=0.90):
        self.dense = {"big": 100, "mid": 50, "small": 20}
        self.bytes_per_unit = {"big": 1000, "mid": 500, "small": 100}
        self.harm = {"big": 4.5, "mid": 2.0, "small": 0.5}  # points at 100% removed
        self.dense_top1 = dense_top1
        self.accuracy_calls = 0

    def prune(self, model, group, ratio):
        kept = round(model[group] * (1 - ratio))
        if kept < 1:
            raise SpikepruneError(f"ratio {ratio} would remove every channel of {group}")
        out = dict(model)
        out[group] = kept
        return out

    def memory(self, model):
        return self.FIXED + sum(model[g] * self.bytes_per_unit[g] for g in model)

    def accuracy(self, model):
        self.accuracy_calls += 1
        drop = sum(self.harm[g] * (1 - model[g] / self.dense[g]) ** 2 for g in model)
        return self.dense_top1 - drop / 100

    def predicted(self, group):
        return {r: self.harm[group] * r * r for r in GRID}

    def targets(self, names=("big", "mid", "small")):
        return [Target(n, self.predicted(n)) for n in names]

    def loop(self, max_acc_drop=3.0, budget=None, **kw):
        return SequentialCompression(
            prune_fn=self.prune, memory_fn=self.memory, accuracy_fn=self.accuracy,
            size_fn=lambda m, g: m[g], dense_top1=self.dense_top1, dense_bytes=self.memory(self.dense),
            max_acc_drop=max_acc_drop, budget_bytes=budget, log=lambda *_: None, **kw)


class FakeTable:
    """Just what select_robust reads from a SensitivityTable: rows per group."""

    def __init__(self, rows):
        self.rows = rows

    def for_group(self, name):
        return [r for r in self.rows if r["group"] == name]


# ------------------------------------------------------------------------------------------------
# Ranking and robustness
# ------------------------------------------------------------------------------------------------
def test_rank_groups_largest_first_ties_by_name():
    gs = [FakeGroup("b", 10), FakeGroup("a", 10), FakeGroup("c", 500), FakeGroup("d", 1)]
    assert [g.name for g in rank_groups(gs)] == ["c", "a", "b", "d"]


def test_robust_threshold_is_half_the_limit():
    assert robust_threshold(3.0) == 1.5
    assert robust_threshold(0.0) == 0.0
    with pytest.raises(SpikepruneError):
        robust_threshold(3.0, divisor=0)


def test_select_robust_uses_ratios_up_to_half():
    rows = []
    drops = {
        "flat": [0.0, 0.1, 0.2, 0.3, 0.5, 5.0, 9.0, 20.0, 40.0],   # breaks down only past 0.5: robust
        "fragile": [0.2, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],  # 2.0 > 1.5 at ratio 0.2: not robust
        "edge": [1.5, 1.5, 1.5, 1.5, 1.5, 1.6, 3, 4, 5],           # exactly at the threshold: robust
    }
    for g, ds in drops.items():
        rows += [{"group": g, "ratio": r, "acc_drop": d} for r, d in zip(GRID, ds)]
    res = select_robust(FakeTable(rows), ["flat", "fragile", "edge", "absent"], robust_threshold(3.0))
    by = {r.group: r for r in res}
    assert [r.group for r in res] == ["flat", "fragile", "edge", "absent"]  # ranked order kept
    assert by["flat"].robust and by["edge"].robust
    assert not by["fragile"].robust
    # Where it first fails and how bad it gets are two facts, said apart.
    assert by["fragile"].reason == "fails from ratio 0.2 (drop 2.00 > 1.50); worst drop 4.00 at 0.5"
    assert [r for r, _ in by["flat"].checked] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert not by["absent"].robust and "not in the sensitivity table" in by["absent"].reason


def test_select_robust_coarse_grid_uses_smallest_ratio():
    rows = [{"group": "g", "ratio": r, "acc_drop": d} for r, d in [(0.6, 1.0), (0.8, 9.0)]]
    (res,) = select_robust(FakeTable(rows), ["g"], 1.5)
    assert res.robust and res.checked == [(0.6, 1.0)]


# ------------------------------------------------------------------------------------------------
# The sequential loop
# ------------------------------------------------------------------------------------------------
def test_no_memory_target_compresses_every_group_within_the_limit():
    w = World()
    out = w.loop(max_acc_drop=3.0, refine=0).run(dict(w.dense), w.targets())
    assert [s.group for s in out.steps] == ["big", "mid", "small"]  # largest first
    assert out.met and out.shortfall_bytes == 0
    for s in out.steps:
        assert s.acc_drop <= 3.0 + 1e-9
    # big: 4.5 r^2 -> the largest grid ratio within 3 points alone is 0.8 (2.88); mid then has
    # only 0.12 points left: 2 r^2 <= 0.12 -> 0.2 (0.08); small: 0.5 r^2 <= 0.04 -> 0.2 (0.02)
    # -- each the largest *feasible* grid ratio given what is already spent.
    assert [s.ratio for s in out.steps] == [0.8, 0.2, 0.2]
    assert out.calib_top1 == pytest.approx(w.accuracy(out.model))
    assert out.memory_bytes == w.memory(out.model)


def test_refinement_pushes_ratio_between_grid_points():
    w = World()
    plain = w.loop(refine=0).run(dict(w.dense), w.targets(["big"]))
    refined = w.loop(refine=3).run(dict(w.dense), w.targets(["big"]))
    # 4.5 r^2 <= 3 -> r <= 0.8165: the grid stops at 0.8, bisection toward 0.9 gets closer
    assert plain.steps[0].ratio == 0.8
    assert 0.8 < refined.steps[0].ratio < 0.8166
    assert refined.steps[0].acc_drop <= 3.0 and refined.memory_bytes < plain.memory_bytes


def test_stops_as_soon_as_memory_target_met_with_just_enough_ratio():
    w = World()
    dense = w.memory(w.dense)  # 137,000 bytes
    budget = dense - 25_000  # needs 25 units of "big" (1000 B each)
    out = w.loop(budget=budget).run(dict(w.dense), w.targets())
    assert out.met and out.stop_reason == "memory budget met"
    assert len(out.steps) == 1 and out.steps[0].group == "big"
    assert out.steps[0].reason == "smallest ratio meeting the memory budget"
    assert out.memory_bytes <= budget
    assert out.model["big"] == 75  # exactly enough, not the 0.8 the accuracy limit would allow
    assert out.steps[0].memory_saved == pytest.approx(1 - out.memory_bytes / dense)


def test_target_needing_several_groups():
    w = World()
    dense = w.memory(w.dense)
    budget = dense - 84_000  # big alone reaches at most 80 units within 3 points; mid does the rest
    out = w.loop(budget=budget, refine=0).run(dict(w.dense), w.targets())
    assert out.met and [s.group for s in out.steps] == ["big", "mid"]
    assert out.memory_bytes <= budget
    assert all(s.acc_drop <= 3.0 for s in out.steps)


def test_unreachable_target_reports_shortfall():
    w = World()
    dense = w.memory(w.dense)
    budget = 30_000  # would need most of "mid" too, which costs far more than 3 points
    out = w.loop(budget=budget).run(dict(w.dense), w.targets())
    assert not out.met and out.stop_reason == "every robust group visited"
    assert out.shortfall_bytes == out.memory_bytes - budget > 0
    assert out.shortfall_frac == pytest.approx(out.shortfall_bytes / dense)
    assert (w.dense_top1 - out.calib_top1) * 100 <= 3.0 + 1e-9  # best feasible model, not a broken one


def test_zero_limit_and_fragile_group_is_skipped():
    w = World()
    out = w.loop(max_acc_drop=0.0).run(dict(w.dense), w.targets(["mid"]))
    assert out.steps == [] and out.skipped[0]["group"] == "mid"
    assert out.model == w.dense


def test_engine_refusal_and_noop_ratios_are_not_steps():
    w = World()
    w.dense["small"] = 1  # nothing can be removed: every ratio is refused or rounds to zero
    out = w.loop().run(dict(w.dense), w.targets(["small"]))
    assert out.steps == [] and out.skipped and out.skipped[0]["group"] == "small"


def test_ratios_rounding_to_the_same_width_cost_one_pass():
    w = World()
    w.dense = {"big": 4}  # 9 grid ratios, but only widths 3, 2, 1 (0.1 removes nothing, 0.9 everything)
    w.harm["big"] = 100.0  # every candidate breaks the limit, so the search tries them all
    targets = [Target("big", {r: 0.0 for r in GRID})]  # the sensitivity screen lets all through
    out = w.loop(refine=0).run(dict(w.dense), targets)
    assert out.steps == [] and w.accuracy_calls == 3 == out.evaluations


def test_resume_after_kill_gives_same_result_without_redoing_search():
    w = World()
    budget = w.memory(w.dense) - 90_000
    full = w.loop(budget=budget).run(dict(w.dense), w.targets())
    assert len(full.steps) >= 2

    saved = {}

    class Killed(Exception):
        pass

    def hook(prog):
        saved["prog"] = copy.deepcopy(prog)  # what the checkpoint would hold
        if len(prog.visited) == 1:
            raise Killed

    w2 = World()
    with pytest.raises(Killed):
        w2.loop(budget=budget, on_step=hook).run(dict(w2.dense), w2.targets())
    calls_before_kill = w2.accuracy_calls

    w3 = World()
    resumed = w3.loop(budget=budget).run(dict(w3.dense), w3.targets(), start=saved["prog"])
    assert [s.to_dict() for s in resumed.steps] == [s.to_dict() for s in full.steps]
    assert resumed.model == full.model and resumed.memory_bytes == full.memory_bytes
    assert w3.accuracy_calls == w.accuracy_calls - calls_before_kill  # first group not searched again


# ------------------------------------------------------------------------------------------------
# Constraints
# ------------------------------------------------------------------------------------------------
def test_constraints_defaults():
    c = Constraints(None, None, None, None).resolve(dense_bytes=1000, min_bytes=100)
    assert c.max_acc_drop == DEFAULT_MAX_ACC_DROP == 3.0
    assert c.precision == "fp32" and c.budget_bytes is None and c.target_saving is None and c.saving is None
    assert c.dense_bytes == 1000 and c.min_bytes == 100


def test_constraints_saving_and_budget():
    c = Constraints(2, 0.25, None, "int8").resolve(dense_bytes=1_000_000, min_bytes=1000)
    assert c.budget_bytes == 750_000 and c.saving == 0.25
    c = Constraints(2, None, "600kB", "int8").resolve(dense_bytes=1_000_000, min_bytes=1000)
    assert c.budget_bytes == 600_000 and c.saving == pytest.approx(0.4)
    # both, consistent within rounding: the tighter one
    c = Constraints(2, 0.4, "601kB", "int8").resolve(dense_bytes=1_000_000, min_bytes=1000)
    assert c.budget_bytes == 600_000


@pytest.mark.parametrize("args, words", [
    (dict(max_acc_drop=-1), ["--max-acc-drop", "-1"]),
    (dict(max_acc_drop=300), ["points", "3"]),
    (dict(target_saving=1.0), ["--target-saving", "between 0 and 1", "1.0"]),
    (dict(target_saving=0), ["--target-saving"]),
    (dict(target_saving=-0.2), ["--target-saving", "-0.2"]),
    (dict(memory_budget="2MB"), ["2,000,000", "not below the dense", "1,000,000"]),
    (dict(memory_budget="1000kB"), ["not below the dense"]),
    (dict(memory_budget="5kB"), ["5,000", "smallest model", "20,000", "98.00%"]),
    (dict(target_saving=0.99), ["10,000", "smallest model", "20,000"]),
    (dict(target_saving=0.5, memory_budget="700kB"), ["contradict", "500,000", "700,000", "Give only one"]),
    (dict(precision="bf16"), ["fp32, fp16, int8"]),
    (dict(memory_budget="8M"), ["ambiguous"]),
])
def test_constraint_errors_carry_the_numbers(args, words):
    kw = dict(max_acc_drop=3, target_saving=None, memory_budget=None, precision="fp32")
    kw.update(args)
    with pytest.raises(SpikepruneError) as e:
        Constraints(**kw).resolve(dense_bytes=1_000_000, min_bytes=20_000)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ------------------------------------------------------------------------------------------------
# On a real (tiny, untrained) model through a run and the CLI
# ------------------------------------------------------------------------------------------------
FAST = ["--data", "digits", "--ratios", "0.5,0.75", "--latency-repeats", "1", "--quiet"]
STEP_KEYS = {"group", "ratio", "requested_ratio", "calib_top1", "acc_drop", "memory_bytes", "memory_saved", "reason",
             "evaluations", "size_before", "size_after"}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A seeded 1-block D=16 T=2 Spikformer for 16x16 digits, saved as a model folder."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model(create_model("spikformer-1-32-digits", embed_dim=16, num_heads=2, T=2), path)
    return str(path)


@pytest.fixture(scope="module")
def full_run(saved_tiny, tmp_path_factory):
    """One uninterrupted run, no --policy given, a target that needs two steps."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert cli.main(["prune", saved_tiny, *FAST, "--target-saving", "0.8", "-o", str(out)]) == 0
    return out


def test_minimum_memory_is_every_group_at_minimum_width(tiny_model):
    model = tiny_model(embed_dim=16, num_heads=2)
    for round_to in (1, 4):
        tiny = prune(model, minimum_kept(groups(model), round_to))
        sizes = {g.name: g.size for g in groups(tiny)}
        assert sizes["block0.attn.heads"] == 1 and sizes["residual"] == round_to
        for p in ("fp32", "int8"):
            assert minimum_memory(model, p, round_to) == memory_bytes(tiny)[p]
    assert minimum_memory(model, "fp32") < memory_bytes(model)["fp32"]


def test_cli_default_policy_end_to_end(full_run):
    s = json.loads((full_run / "summary.json").read_text())
    assert s["policy"] == "primesvt"  # no --policy: PrimeSVT
    budget = s["constraint_checks"]["budget_bytes"]
    assert budget == math.floor(s["dense"]["memory_bytes"]["fp32"] * (1 - 0.8))
    assert s["constraints_met"] and s["shortfall"] is None
    assert s["pruned"]["memory_bytes"]["fp32"] <= budget and s["memory_saved"] >= 0.8
    steps = s["steps"]
    assert len(steps) >= 2 and all(STEP_KEYS <= set(st) for st in steps)
    assert s["order"] == [st["group"] for st in steps]
    # Largest first: the order follows the ranking by dense fp32 memory.
    rank = [r["group"] for r in s["primesvt"]["ranking"]]
    mem = [r["memory_bytes"] for r in s["primesvt"]["ranking"]]
    assert mem == sorted(mem, reverse=True)
    assert [rank.index(g) for g in s["order"]] == sorted(rank.index(g) for g in s["order"])
    # Memory shrinks step by step, every step within the limit, the last one is the pruned model.
    assert all(a["memory_bytes"] > b["memory_bytes"] for a, b in zip(steps, steps[1:]))
    assert all(st["acc_drop"] <= s["constraints"]["max_acc_drop"] + 1e-9 for st in steps)
    assert steps[-1]["memory_bytes"] == s["pruned"]["memory_bytes"]["fp32"]
    assert steps[-1]["calib_top1"] == s["calib"]["pruned_top1"]
    # What was pruned is the composed record: one prune call per step, against the dense model.
    assert s["removed"] == s["pruning"]["removed"] and set(s["order"]) <= set(s["removed"])
    assert len(s["pruning"]["steps"]) == len(steps)
    assert steps[-1]["size_after"] == s["pruning"]["kept_counts"][steps[-1]["group"]]
    # The trajectory plot exists and the report embeds it, with the PrimeSVT section.
    assert (full_run / "plots" / "primesvt_trajectory.png").stat().st_size > 1000
    report = (full_run / "report.md").read_text()
    assert "plots/primesvt_trajectory.png" in report and "## PrimeSVT" in report and "limit / 2" in report
    assert memory_bytes(load_model(full_run / "model"))["fp32"] == s["pruned"]["memory_bytes"]["fp32"]


def test_resume_after_kill_replays_steps(saved_tiny, full_run, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    args = ["prune", saved_tiny, *FAST, "--target-saving", "0.8", "-o", str(out)]
    real_save = primesvt_module._save_progress

    class Killed(BaseException):  # not an Exception: nothing on the way may swallow it
        pass

    def save_then_die(step, prog):
        real_save(step, prog)
        if len(prog.visited) == 1:
            raise Killed

    monkeypatch.setattr(primesvt_module, "_save_progress", save_then_die)
    with pytest.raises(Killed):
        cli.main(args)
    saved = json.loads((out / "steps" / f"{primesvt_module.CHECKPOINT}.json").read_text())
    assert len(saved["visited"]) == 1 and saved["steps"][0]["kept"]
    assert not (out / "summary.json").exists()

    monkeypatch.setattr(primesvt_module, "_save_progress", real_save)
    assert cli.main(args) == 0
    full, resumed = (json.loads((d / "summary.json").read_text()) for d in (full_run, out))
    assert resumed["resumed"] is True
    assert resumed["steps"] == full["steps"] and resumed["order"] == full["order"]
    assert resumed["pruned"]["memory_bytes"] == full["pruned"]["memory_bytes"]
    assert resumed["pruned"]["top1"] == full["pruned"]["top1"]
    # the first group was replayed from its kept indices, not searched again
    assert resumed["primesvt"]["evaluations"] == sum(st["evaluations"] for st in full["steps"][1:])


def test_cli_reports_shortfall_when_budget_unreachable(saved_tiny, tmp_path):
    """Only the smallest group is analysed, so only it can be compressed: the budget stays out of
    reach and the run says by how much, with constraints_met false."""
    out = tmp_path / "short"
    rc = cli.main(["prune", saved_tiny, *FAST, "--groups", "stem.proj_conv", "--target-saving", "0.5", "-o", str(out)])
    assert rc == cli.EXIT_CONSTRAINTS_NOT_MET  # the run finished, its folder is kept, the exit code says so
    s = json.loads((out / "summary.json").read_text())
    assert not s["constraints_met"] and not s["constraint_checks"]["memory_ok"]
    sf = s["shortfall"]
    assert sf["bytes"] == s["pruned"]["memory_bytes"]["fp32"] - sf["budget_bytes"] > 0
    assert sf["fraction"] == pytest.approx(sf["bytes"] / s["dense"]["memory_bytes"]["fp32"])
    assert s["primesvt"]["stop_reason"] == "every robust group visited"
    assert "over the budget" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, words", [
    (["--memory-budget", "10B"], ["smallest model", "10 bytes"]),
    (["--memory-budget", "1MB"], ["not below the dense", "30,400 bytes"]),
    (["--target-saving", "0.5", "--memory-budget", "20kB"], ["contradict", "15,200", "20,000"]),
    (["--max-acc-drop", "-1"], ["--max-acc-drop", "-1"]),
    (["--target-saving", "1"], ["--target-saving", "between 0 and 1"]),
])
def test_cli_constraint_errors(saved_tiny, tmp_path, capsys, extra, words):
    rc = cli.main(["prune", saved_tiny, *FAST, *extra, "-o", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()  # refused before the run folder was made
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("extra, words", [
    (["--robust-max-ratio", "1.5"], "--robust-max-ratio must be a pruning ratio in (0, 1)"),
    (["--robust-divisor", "0"], "--robust-divisor must be positive"),
    (["--refine-steps", "-1"], "--refine-steps must be 0 or more"),
])
def test_bad_options_are_refused_before_the_run_folder_exists(saved_tiny, tmp_path, capsys, extra, words):
    out = tmp_path / "bad"
    assert cli.main(["prune", saved_tiny, *FAST, *extra, "-o", str(out)]) != 0
    assert words in capsys.readouterr().err
    assert not out.exists()
