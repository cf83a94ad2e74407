"""Every pruning policy side by side on one model: memory saved, accuracy, speed and cost (issue 6).

    python bench/policies.py --quick                 # reduced protocol (fewer ratios and images)
    python bench/policies.py --update-readme         # full protocol on the bundled model and mnist5k
    python bench/policies.py --model spikformer-8-512 --checkpoint FILE --data imagefolder:PATH \\
        --device cuda --max-calib 5000 --max-test 10000 --out bench/results/imagenet

Not a test (tests/test_bench_policies.py runs a tiny configuration of it); bench/README.md says what
every column means. One process, one model, one dataset, one machine:

1. Shared work is computed once, by an ordinary run (WORK/shared/<importance>/) of a policy the
   benchmark registers while it runs, "bench-shared-work" (shared_work below: the same code the
   policies call, each step timed): the dense calibration top-1, the uniform sweep, the sensitivity
   analysis, and (as in every run) the dense model's test figures. Every policy run takes them from
   there (RunSettings.shared_steps: spikeprune.run copies the finished steps into a new run after
   checking the two runs agree on the model, data, caps, importance and the rest), and the part it
   reads is *charged* to it (SHARED_READS):
     dense calibration top-1   every policy
     uniform sweep             uniform, psvit (PSViT's step 1)
     sensitivity analysis      psvit, primesvt
   The random floor ranks by importance `random`, so it has its own shared run (dense only).
2. For each accuracy limit (--limits, default 1 and 3 points, calibration split) and no memory
   target, every policy runs through the same entry point as `spikeprune prune --policy NAME`:
   spikeprune.run.run(RunSettings(...), model), one run folder each (WORK/<policy>-L<limit>/,
   with its report.md, summary.json and model/). Fine-tuning (--finetune-epochs, --kd) is a
   setting of that run, the same for every policy, and the run measures the final model on the
   test split. The policies: uniform (largest sweep ratio within the limit), psvit, primesvt,
   global (policies/global_l2.py), shrink (ours, policies/shrink.py: it reads no shared table and
   pays for its own BatchNorm re-estimation and screening passes), and random: the `groups` policy with importance `random` at
   the per-group widths of PrimeSVT's result at that limit, read from its pruning record -- a
   floor at PrimeSVT's memory.
3. Latency: one interleaved timer over the dense model and every final model: each repeat times
   one forward of every model (the order rotated between repeats), so slow spells of a shared
   machine hit all models alike; the median per model; speedup = dense median / model median.
4. Frontier: for each memory target (--targets), every policy runs with target_saving T under the
   --frontier-limit (default: the largest limit), no fine-tuning; the model it chose on the
   calibration split is measured on the test split. Plot: test top-1 against memory saved.
5. OUT/policies.json, OUT/policies.md, OUT/frontier.png (and, with --update-readme, the table in
   bench/README.md), with the exact command, the machine and the date. Every test top-1 comes with
   its standard error (spikeprune.stats), and a line under each table names the policies whose
   test top-1 differ by less than two standard errors.

Image caps (--max-train / --max-calib / --max-test) are a setting of every run (RunSettings.max_images,
spikeprune.data's stratified max_images), so the policy, the sensitivity analysis, fine-tuning and
measuring all see the same capped splits.

Resume: WORK (default runs/bench-policies/<settings hash>) keeps every run folder; the same command
again resumes each run where it stopped (spikeprune.run's own resume) and recomputes only what is
missing. Latency is always measured afresh, in one session, so that every model is timed under the
same conditions.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spikeprune.errors import SpikepruneError  # noqa: E402
from spikeprune.units import format_bytes, format_count, format_percent  # noqa: E402

FORMAT = "spikeprune-bench-policies"
VERSION = 2  # 2: every policy through spikeprune.run; removed fractions from the pruning record; standard errors
MAIN_POLICIES = ("uniform", "psvit", "primesvt", "global", "shrink", "random")
RANDOM = "random"  # the floor: not a registered policy but the `groups` policy with random importance
LABELS = {"uniform": "uniform", "psvit": "PSViT", "primesvt": "PrimeSVT", "global": "global L2",
          "shrink": "shrink (ours)", "random": "random @ PrimeSVT memory"}
SHARED = ("dense_calib", "uniform_sweep", "sensitivity")  # the shared work, in the order it is computed
# What each built-in policy reads of the shared work (and is charged for). A policy added with
# register_policy may read anything: it gets all of it.
SHARED_READS = {"uniform": ("dense_calib", "uniform_sweep"), "psvit": SHARED, "primesvt": ("dense_calib", "sensitivity"),
                "global": ("dense_calib",), "shrink": ("dense_calib",), RANDOM: ("dense_calib",)}
README_START, README_END = "<!-- bench-policies:start -->", "<!-- bench-policies:end -->"

# Settings whose default differs between the full protocol and --quick (None in argparse = not given).
FULL = dict(limits="1,3", targets="0.1,0.2,0.3,0.4,0.5", ratios="0.1,0.3,0.5,0.7,0.9",
            uniform_ratios="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", finetune_epochs=1, max_train=None,
            max_calib=None, max_test=None, measure_images=256, latency_repeats=30, out="bench/results")
QUICK = dict(limits="1,3", targets="0.2,0.4", ratios="0.25,0.5,0.75", uniform_ratios="0.2,0.4,0.6,0.8",
             finetune_epochs=1, max_train=500, max_calib=250, max_test=300, measure_images=128, latency_repeats=10,
             out="bench/results/quick")


def log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[bench] {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from spikeprune import importance
    from spikeprune.cli import add_data_args, add_device_arg, add_model_args

    p = argparse.ArgumentParser(
        prog="bench/policies.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run dense, uniform, PSViT, PrimeSVT, global L2, shrink (ours) and random-at-PrimeSVT's-memory on one model and "
                    "dataset: memory, accuracy (calibration-chosen, test-measured, before and after the same "
                    "fine-tuning), SOPs, energy, interleaved latency, cost, and a memory/accuracy frontier.",
        epilog="defaults marked 'full / quick' differ with --quick. See bench/README.md.")
    add_model_args(p)
    add_data_args(p)
    add_device_arg(p)
    p.add_argument("--quick", action="store_true", help="the reduced protocol (about 10 minutes on 2 idle cores)")
    g = p.add_argument_group("protocol")
    g.add_argument("--policies", default=",".join(MAIN_POLICIES),
                   help="registered policy names, comma-separated; 'random' is the floor at PrimeSVT's memory "
                        "(needs primesvt). Default %(default)s")
    g.add_argument("--limits", default=None, help=f"accuracy limits in points (full / quick: {FULL['limits']})")
    g.add_argument("--targets", default=None,
                   help=f"frontier memory targets, fractions saved (full: {FULL['targets']} / quick: {QUICK['targets']})")
    g.add_argument("--frontier-limit", type=float, default=None, metavar="POINTS",
                   help="accuracy limit of the frontier runs (default: the largest of --limits; 100 = none)")
    g.add_argument("--no-frontier", action="store_true", help="skip the frontier")
    g.add_argument("--frontier-finetune", action="store_true",
                   help="fine-tune every frontier model with the common budget, so the frontier compares the "
                        "policies' choices at equal memory after fine-tuning (costs a fine-tuning per point)")
    g.add_argument("--ratios", default=None, help=f"sensitivity grid (full: {FULL['ratios']} / quick: {QUICK['ratios']})")
    g.add_argument("--uniform-ratios", default=None,
                   help=f"uniform sweep grid (full: {FULL['uniform_ratios']} / quick: {QUICK['uniform_ratios']})")
    g.add_argument("--importance", default="l2", metavar="NAME",
                   help=f"channel ranking of every policy, a registered criterion ({', '.join(importance.names())}; "
                        "default l2)")
    g.add_argument("--round-to", type=int, default=1, metavar="N", help="round kept widths up to a multiple of N")
    g.add_argument("--calib-batches", type=int, default=4, metavar="N", help="calibration batches for taylor / firing")
    g.add_argument("--seed", type=int, default=0)
    f = p.add_argument_group("fine-tuning (the same budget for every policy)")
    f.add_argument("--finetune-epochs", type=int, default=None, metavar="N", help="epochs (full / quick: 1; 0 = none)")
    f.add_argument("--kd", action="store_true", help="distil from the dense model while fine-tuning")
    f.add_argument("--kd-weight", type=float, default=0.5)
    f.add_argument("--kd-temperature", type=float, default=4.0)
    f.add_argument("--finetune-lr", type=float, default=1e-4)
    f.add_argument("--finetune-batch-size", type=int, default=64)
    c = p.add_argument_group("image caps (reduced runs; a stratified subset of each split, spikeprune.data max_images)")
    c.add_argument("--max-train", type=int, default=None, metavar="N", help="train images (full: all / quick: 500)")
    c.add_argument("--max-calib", type=int, default=None, metavar="N", help="calibration images (full: all / quick: 250)")
    c.add_argument("--max-test", type=int, default=None, metavar="N", help="test images (full: all / quick: 300)")
    m = p.add_argument_group("measurement and output")
    m.add_argument("--measure-images", type=int, default=None, metavar="N",
                   help="test images whose firing rates give SOPs and energy (full 256 / quick 128)")
    m.add_argument("--latency-repeats", type=int, default=None, metavar="N", help="interleaved repeats (full 30 / quick 10)")
    m.add_argument("--latency-batches", default="1,8", help="batch sizes timed (default %(default)s)")
    m.add_argument("--latency-warmup", type=int, default=3, metavar="N")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument("--out", default=None, help="results folder (full: bench/results / quick: bench/results/quick)")
    m.add_argument("--work", default=None, help="run folders (default runs/bench-policies/<settings hash>)")
    m.add_argument("--update-readme", action="store_true", help="write the results table into bench/README.md")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _floats(text: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise SpikepruneError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not out:
        raise SpikepruneError(f"{what} is empty")
    return out


def resolve_settings(args) -> dict:
    """The run's settings: explicit options, else the full or --quick defaults; checked."""
    from spikeprune import importance
    from spikeprune.policy_api import Constraints, get_policy
    from spikeprune.ratios import parse_ratios

    base = QUICK if args.quick else FULL
    pick = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    policies = [x for x in args.policies.replace(" ", "").split(",") if x]
    if not policies:
        raise SpikepruneError("--policies is empty")
    for name in policies:
        if name != RANDOM:
            get_policy(name)  # an unknown name fails here, with the list of known ones
    if RANDOM in policies and "primesvt" not in policies:
        raise SpikepruneError("'random' prunes at PrimeSVT's widths: add primesvt to --policies")
    if len(set(policies)) != len(policies):
        raise SpikepruneError(f"--policies names a policy twice: {args.policies}")
    policies = [x for x in policies if x != RANDOM] + ([RANDOM] if RANDOM in policies else [])  # after primesvt
    importance.get(args.importance)  # an unknown criterion fails here, with the registered names
    limits = sorted(set(_floats(pick["limits"], "--limits")))
    for L in limits:
        Constraints(L)  # the run's own checks, before any work
    targets = sorted(set(_floats(pick["targets"], "--targets")))
    for t in targets:
        Constraints(limits[-1], target_saving=t)
    frontier_limit = args.frontier_limit if args.frontier_limit is not None else limits[-1]
    Constraints(frontier_limit)
    for k in ("max_train", "max_calib", "max_test"):
        if pick[k] is not None and pick[k] < 1:
            raise SpikepruneError(f"--{k.replace('_', '-')} must be at least 1, got {pick[k]}")
    if pick["finetune_epochs"] < 0:
        raise SpikepruneError(f"--finetune-epochs must be 0 or more, got {pick['finetune_epochs']}")
    if args.frontier_finetune and (pick["finetune_epochs"] == 0 or args.no_frontier):
        raise SpikepruneError("--frontier-finetune fine-tunes the frontier models: give --finetune-epochs N (N >= 1) "
                              "and leave out --no-frontier")
    if args.kd and pick["finetune_epochs"] == 0:
        raise SpikepruneError("--kd distils during fine-tuning: give --finetune-epochs N (N >= 1) as well")
    if pick["latency_repeats"] < 1 or pick["measure_images"] < 1 or args.latency_warmup < 0:
        raise SpikepruneError("--latency-repeats and --measure-images must be at least 1, --latency-warmup >= 0")
    batches = [int(b) for b in _floats(args.latency_batches, "--latency-batches")]
    if min(batches) < 1:
        raise SpikepruneError(f"--latency-batches must be positive, got {args.latency_batches}")
    return {
        "model": args.preset if args.preset and args.model_spec in (None, "bundled") else args.model_spec,
        "checkpoint": args.checkpoint,
        "overrides": list(args.overrides), "data": args.data, "device": args.device, "quick": bool(args.quick),
        "policies": policies, "limits": limits, "targets": [] if args.no_frontier else targets,
        "frontier_limit": float(frontier_limit),
        # only when set, so the work folders of earlier benchmarks keep their settings hash
        **({"frontier_finetune": True} if args.frontier_finetune else {}),
        "ratios": list(parse_ratios(pick["ratios"], "--ratios")),
        "uniform_ratios": list(parse_ratios(pick["uniform_ratios"], "--uniform-ratios")),
        "importance": args.importance, "round_to": args.round_to, "calib_batches": args.calib_batches,
        "seed": args.seed, "batch_size": args.batch_size,
        "finetune": {"epochs": pick["finetune_epochs"], "kd": bool(args.kd),
                     "kd_weight": args.kd_weight if args.kd else None,
                     "kd_temperature": args.kd_temperature if args.kd else None,
                     "lr": args.finetune_lr, "batch_size": args.finetune_batch_size},
        "caps": {"train": pick["max_train"], "calib": pick["max_calib"], "test": pick["max_test"]},
        "measure_images": pick["measure_images"],
        "latency": {"batches": batches, "repeats": pick["latency_repeats"], "warmup": args.latency_warmup},
        "out": pick["out"],
    }


# ------------------------------------------------------------------------------------------------
# Runs: every policy through spikeprune.run, the entry point of `spikeprune prune`
# ------------------------------------------------------------------------------------------------
SHARED_POLICY = "bench-shared-work"  # registered by the benchmark while it runs (shared_work below)
TIMING_STEP = "shared_work_timing"  # WORK/shared/<importance>/steps/shared_work_timing.json


def shared_work(ctx):
    """The benchmark's shared work as a policy, so that it is an ordinary run folder the other runs
    can take their shared steps from (RunSettings.shared_steps): the steps named in
    ctx.options["steps"] (dense_calib, uniform_sweep, sensitivity; computed by the same code the
    policies call), each timed. It prunes nothing: the result is the dense model."""
    from spikeprune.policies.uniform import uniform_sweep
    from spikeprune.policy_api import PolicyResult

    # The run computed (and checkpointed) the dense calibration top-1 before calling the policy, so
    # its cost is measured on a pass of its own here; the figure the runs read is the checkpointed one.
    jobs = {"dense_calib": lambda: ctx.calib_top1(ctx.model), "uniform_sweep": lambda: uniform_sweep(ctx),
            "sensitivity": ctx.sensitivity}
    # A step finished in an earlier session of a resumed benchmark is read back from the run's cache
    # at no cost; its first measurement is the one to charge, kept beside the run's other steps.
    first = ctx.load_checkpoint(TIMING_STEP) or {}
    timed = {}
    for name in ctx.options["steps"].split(","):
        n0, t0 = ctx.images_evaluated, time.perf_counter()
        out = jobs[name]()
        entry = {"wall_s": time.perf_counter() - t0, "calib_images": ctx.images_evaluated - n0}
        if name == "dense_calib":
            entry["top1"] = ctx.dense_calib_top1
        if name == "sensitivity":
            fc = out.forward_cost
            entry["forward_cost"] = {k: v for k, v in fc.items() if k != "unit"}
            # image-block passes -> whole-model forwards of one image, the unit of every other count
            entry["calib_images"] = fc["spent"] / fc["full_forward_units"] if fc["full_forward_units"] else 0.0
        if name in first:
            entry = {**first[name], "reused": True}
        timed[name] = entry
        ctx.checkpoint(TIMING_STEP, {**first, **timed})  # after each step: a session may stop in the next
    return PolicyResult(ctx.model, {"shared_work": timed, "calib_top1": ctx.dense_calib_top1})


def _check_shared_steps(options: dict, model) -> None:
    steps = str(options.get("steps") or "").split(",")
    if not steps or set(steps) - set(SHARED) or steps != sorted(steps, key=SHARED.index):
        raise SpikepruneError(f"{SHARED_POLICY} needs options['steps'], names among {', '.join(SHARED)} in that "
                              f"order; got {options.get('steps')!r}")


class Bench:
    def __init__(self, S: dict, model, work: Path, progress: bool, split_sizes: dict):
        self.S, self.model, self.work, self.progress = S, model, work, progress
        self.split_sizes = split_sizes
        self.shared: dict = {}
        self.dense: dict | None = None
        self.caps = {k: v for k, v in S["caps"].items() if v is not None} or None

    def settings(self, output: Path, policy: str, constraints, finetune: bool, importance: str | None = None,
                 options: dict | None = None, shared_steps: Path | None = None):
        """The RunSettings of one run: the benchmark's settings, as `spikeprune prune` would get them."""
        from spikeprune.run import RunSettings

        S, F = self.S, self.S["finetune"]
        ft = dict(finetune_epochs=F["epochs"], kd=F["kd"], kd_weight=F["kd_weight"] or 0.5,
                  kd_temperature=F["kd_temperature"] or 4.0, finetune_lr=F["lr"],
                  finetune_batch_size=F["batch_size"]) if finetune and F["epochs"] else {}
        return RunSettings(data=S["data"], output=output, policy=policy, constraints=constraints,
                           importance=importance or S["importance"], round_to=S["round_to"], ratios=S["ratios"],
                           uniform_ratios=S["uniform_ratios"], batch_size=S["batch_size"], device=S["device"],
                           seed=S["seed"], calib_batches=S["calib_batches"], options=options or {},
                           max_images=self.caps, measure_images=S["measure_images"], model_spec=S["model"],
                           progress=self.progress, shared_steps=shared_steps, **ft)

    # shared work ------------------------------------------------------------------------------
    def reads(self, policy: str) -> tuple[str, ...]:
        return SHARED_READS.get(policy, SHARED)

    def importance_of(self, policy: str) -> str:
        return "random" if policy == RANDOM else self.S["importance"]

    def shared_run(self, importance: str) -> Path:
        """WORK/shared/<importance>: the run holding the shared steps for runs ranking by `importance`
        (shared_steps must agree on it). It computes what the policies of that importance read; the
        random floor's own holds only the dense calibration top-1 (and the dense measurements)."""
        from spikeprune.policy_api import Constraints
        from spikeprune.run import run

        users = [p for p in self.S["policies"] if self.importance_of(p) == importance]
        steps = [k for k in SHARED if any(k in self.reads(p) for p in users)]
        folder = self.work / "shared" / importance
        log(f"shared work ({', '.join(steps)}), importance {importance}: {folder}")
        summary = run(self.settings(folder, SHARED_POLICY, Constraints(self.S["limits"][-1]), finetune=False,
                                    importance=importance, options={"steps": ",".join(steps)}), self.model)
        if importance == self.S["importance"] or not self.shared:
            self.shared.update({k: v for k, v in summary["shared_work"].items() if k not in self.shared})
        if self.dense is None:
            d = summary["dense"]
            self.dense = {"test": {"top1": d["top1"], "top5": d.get("top5"), "n": self.split_sizes["test"]},
                          "calib_top1": summary["shared_work"]["dense_calib"]["top1"], "params": d["params"],
                          "macs": d["macs"], "memory_bytes": d["memory_bytes"], "sops": d.get("sops"),
                          "energy_mj": d.get("energy_mj")}
        return folder

    def shared_cost(self, policy: str) -> dict:
        items = [k for k in self.reads(policy) if k in self.shared]
        return {"used": items, "wall_s": sum(self.shared[k]["wall_s"] for k in items),
                "calib_images": sum(self.shared[k]["calib_images"] for k in items)}

    # one run ------------------------------------------------------------------------------------
    def run_policy(self, name: str, policy: str, constraints, main: bool, shared: Path, primesvt_record=None) -> dict:
        """Run `policy` (or the random floor at `primesvt_record`'s widths) with spikeprune.run in
        WORK/name, its shared steps taken from the run folder `shared`; `main` runs are fine-tuned.
        Returns the benchmark's record of the run, with its pruning record under "_record" (not
        saved in JSON)."""
        from spikeprune.record import PruningRecord
        from spikeprune.run import run

        run_dir = self.work / name
        importance, options, registered = self.importance_of(policy), {}, policy
        if policy == RANDOM:
            registered = "groups"
            ratios = floor_ratios(self.model, primesvt_record)
            # PrimeSVT kept the dense model: so does the floor (every group at ratio 0).
            options = {"ratio": [f"{g}={r!r}" for g, r in ratios.items()] or ["*=0"]}
        log(f"{name}: {LABELS.get(policy, policy)}, limit {constraints.max_acc_drop:g} points"
            + (f", target {constraints.target_saving:.0%} saved" if constraints.target_saving else ""))
        settings = self.settings(run_dir, registered, constraints, finetune=main, importance=importance,
                                 options=options, shared_steps=shared)
        summary = run(settings, self.model)
        record = PruningRecord.from_dict(summary["pruning"])
        if policy == RANDOM and record.kept_counts() != primesvt_record.kept_counts():
            raise SpikepruneError(f"internal: the random floor kept {record.kept_counts()}, PrimeSVT "
                                  f"{primesvt_record.kept_counts()}; floor_ratios no longer matches the engine's rounding")
        return {**self.record(name, policy, constraints, summary, record, run_dir), "_record": record}

    def record(self, name: str, policy: str, constraints, summary: dict, record, run_dir: Path) -> dict:
        """The benchmark's figures of one finished run, read from its summary."""
        dense, pruned, ft = summary["dense"], summary["pruned"], summary.get("finetuned")
        checks, cost = summary["constraint_checks"], summary["cost"]
        n_test = self.split_sizes["test"]
        shared = self.shared_cost(policy)
        mem, dense_mem = pruned["memory_bytes"], dense["memory_bytes"]
        rec = {
            "name": name, "policy": policy, "limit": constraints.max_acc_drop, "target": constraints.target_saving,
            "run_dir": str(run_dir), "removed": record.removed_fractions(), "widths": record.kept_counts(),
            "params": pruned["params"], "macs": pruned["macs"], "memory_bytes": mem,
            "memory_saved": 1 - mem["fp32"] / dense_mem["fp32"], "memory_saved_int8": 1 - mem["int8"] / dense_mem["int8"],
            "calib_top1": summary["calib"]["pruned_top1"], "calib_drop": checks["acc_drop_calib"],
            "acc_ok": checks["acc_ok"], "memory_ok": checks["memory_ok"], "constraints_met": summary["constraints_met"],
            "test": {"top1": pruned["top1"], "top5": pruned.get("top5"), "n": n_test},
            "finetuned": None,
            "cost": {"own_wall_s": cost["policy_wall_s"], "own_calib_images": cost["policy_calib_images"],
                     "own_calib_passes": cost["policy_calib_passes"], "shared": shared,
                     "search_wall_s": cost["policy_wall_s"] + shared["wall_s"],
                     "calib_images": cost["policy_calib_images"] + shared["calib_images"],
                     "finetune_wall_s": cost.get("finetune_wall_s"), "run_wall_s": summary["wall_time_s"]},
            "resumed": summary.get("resumed", False),
        }
        if ft:
            rec["finetuned"] = {"top1": ft["top1"], "top5": ft.get("top5"), "n": n_test,
                                "calib_top1": summary["calib"].get("finetuned_top1"),
                                "train_images": self.S["finetune"]["epochs"] * self.split_sizes["train"]}
        final = ft or pruned
        rec["activity"] = {"sops": final.get("sops"), "energy_mj": final.get("energy_mj"),
                           "of": "finetuned" if ft else "pruned"}
        log(f"{name}: memory saved {rec['memory_saved']:.2%}, calib drop {rec['calib_drop']:.2f} points, test top-1 "
            f"{rec['test']['top1']:.2%}" + (f" -> {ft['top1']:.2%} fine-tuned" if ft else "")
            + f" ({rec['cost']['search_wall_s']:.1f} s search incl. shared; report {run_dir / 'report.md'})")
        return rec

    def final_model(self, run_dir: Path):
        """The run's final model (fine-tuned when the run fine-tuned), as the run saved it."""
        from spikeprune.serialization import load_model

        return load_model(run_dir / "model").eval()


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def floor_ratios(dense, record) -> dict[str, float]:
    """Ratios that keep, in one spikeprune.prune call on `dense`, the per-group unit counts of the
    pruning record `record` (`record.kept_counts()`, against the same dense model): the random floor
    at PrimeSVT's widths. Per-head channel groups (qk, v) take their ratio per head dim: the heads
    group removes whole heads and qk / v keep the same number of dims in every head that stays."""
    from spikeprune.coupling import groups

    kept = record.kept_counts()
    out = {}
    for g in groups(dense):
        if g.heads > 1:  # per-head channel group: kept dims per kept head, against the dense head dim
            before, now = g.size // g.heads, kept[g.name] // max(kept[g.head_group], 1)
        else:
            before, now = g.size, kept[g.name]
        if now < before:
            out[g.name] = (before - now) / before  # kept = before - floor(r * before + 0.5) = now
    return out


def interleaved_latency(models: dict, shape: tuple, batches: list[int], repeats: int, warmup: int,
                        device: str, progress: bool) -> dict:
    """{batch: {name: {"median_ms", "min_ms", "times_ms"}}}: for each repeat, one timed forward of
    every model, the order rotated by one each repeat so no model always follows the same one."""
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    names = list(models)
    out = {}
    for b in batches:
        x = torch.rand(b, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
        times = {n: [] for n in names}
        with torch.no_grad():
            for n in names:
                models[n].to(dev).eval()
                for _ in range(warmup):
                    models[n](x)
            it = range(repeats)
            if progress:
                from tqdm import tqdm

                it = tqdm(it, desc=f"latency batch {b}", leave=False)
            for r in it:
                for n in names[r % len(names):] + names[:r % len(names)]:
                    sync()
                    t0 = time.perf_counter()
                    models[n](x)
                    sync()
                    times[n].append(1e3 * (time.perf_counter() - t0))
        out[b] = {n: {"median_ms": statistics.median(t), "min_ms": min(t), "times_ms": [round(v, 4) for v in t]}
                  for n, t in times.items()}
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not callable(v) and not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj if not callable(v)]
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    m = {"platform": platform.platform(), "processor": _cpu_name(),
         "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "device": device}
    if hasattr(os, "getloadavg"):
        m["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cuda" and torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    return m


def describe(model, spec: str) -> str:
    from spikeprune.costs import count_params
    from spikeprune.models import get_family

    c = model.cfg
    return (f"{spec} ({get_family(model).name}, {count_params(model):,} parameters, T={c.T}, "
            f"{c.img_size}x{c.img_size}x{c.in_channels})")


def settings_hash(S: dict, model_hash: str) -> str:
    keep = {k: v for k, v in S.items() if k not in ("out", "latency", "quick")}
    return hashlib.sha256(json.dumps({**keep, "model_hash": model_hash, "version": VERSION},
                                     sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------
# Results: JSON, markdown, plot
# ------------------------------------------------------------------------------------------------
def _se_points(top1: float | None, n: int) -> float | None:
    from spikeprune.stats import top1_standard_error

    return None if top1 is None else 100 * top1_standard_error(top1, n)


def _top1_cell(top1: float | None, n: int) -> str:
    """'98.60% ±0.37': the top-1 and its standard error in points (n images)."""
    return "-" if top1 is None else f"{format_percent(top1)} ±{_se_points(top1, n):.2f}"


def final_top1(r: dict) -> tuple[str, float]:
    """Which test top-1 a result is compared on: after fine-tuning when it ran, else before."""
    return ("fine-tuned", r["finetuned"]["top1"]) if r.get("finetuned") else ("pruned", r["test"]["top1"])


def indistinguishable(doc: dict, limit: float) -> list[str]:
    """A line for every pair of results at `limit` whose test top-1 (fine-tuned where it ran) differ
    by less than two standard errors of their difference (spikeprune.stats.differ)."""
    from spikeprune.stats import differ

    n = doc["split_sizes"]["test"]
    rows = [r for r in doc["results"] if r["limit"] == limit]
    out = []
    for a, b in itertools.combinations(rows, 2):
        (ka, ta), (kb, tb) = final_top1(a), final_top1(b)
        if not differ(ta, tb, n, n):
            out.append(f"{LABELS.get(a['policy'], a['policy'])} ({ka} {format_percent(ta)}) and "
                       f"{LABELS.get(b['policy'], b['policy'])} ({kb} {format_percent(tb)})")
    return out


def main_table(doc: dict, limit: float) -> str:
    from spikeprune.report import markdown_table

    batches = doc["settings"]["latency"]["batches"]
    n = doc["split_sizes"]["test"]
    d = doc["dense"]
    rows = [{"policy": "dense", "saved": 0.0, "fp32": d["memory_bytes"]["fp32"], "int8": d["memory_bytes"]["int8"],
             "params": d["params"], "macs": d["macs"], "sops": d["sops"], "energy": d["energy_mj"], "drop": 0.0,
             "test": d["test"]["top1"], "ft": None, "met": "", "search": None, "images": None,
             **{f"b{b}": 1.0 for b in batches}}]
    for r in doc["results"]:
        if r["limit"] != limit:
            continue
        rows.append({"policy": LABELS.get(r["policy"], r["policy"]), "saved": r["memory_saved"],
                     "fp32": r["memory_bytes"]["fp32"], "int8": r["memory_bytes"]["int8"], "params": r["params"],
                     "macs": r["macs"], "sops": r["activity"]["sops"], "energy": r["activity"]["energy_mj"],
                     "drop": r["calib_drop"], "test": r["test"]["top1"],
                     "ft": r["finetuned"]["top1"] if r["finetuned"] else None,
                     "met": "yes" if r["constraints_met"] else "no",
                     "search": r["cost"]["search_wall_s"], "images": r["cost"]["calib_images"],
                     **{f"b{b}": r["speedup"].get(str(b)) for b in batches}})
    cols = [("policy", "policy", str), ("memory saved", "saved", format_percent), ("fp32", "fp32", format_bytes),
            ("int8", "int8", format_bytes), ("params", "params", format_count), ("MACs", "macs", format_count),
            ("SOPs", "sops", format_count), ("energy mJ", "energy", lambda x: "-" if x is None else f"{x:.4g}"),
            ("calib drop", "drop", lambda x: f"{x:.2f}"), ("test top-1 ±se", "test", lambda x: _top1_cell(x, n)),
            ("fine-tuned ±se", "ft", lambda x: _top1_cell(x, n))]
    cols += [(f"speedup b{b}", f"b{b}", lambda x: "-" if x is None else f"{x:.2f}x") for b in batches]
    cols += [("search s", "search", lambda x: "-" if x is None else f"{x:.1f}"),
             ("calib fwd", "images", lambda x: "-" if x is None else f"{x:,.0f}"), ("within limit", "met", str)]
    return markdown_table(rows, cols)


def frontier_table(doc: dict) -> str:
    pols = doc["settings"]["policies"]
    lines = ["| target | " + " | ".join(LABELS.get(p, p) for p in pols) + " |", "|---|" + "---|" * len(pols)]
    for t in doc["settings"]["targets"]:
        cells = []
        for p in pols:
            pt = next((x for x in doc["frontier"] if x["policy"] == p and abs(x["target"] - t) < 1e-12), None)
            if pt is None:
                cells.append("-")
            elif pt.get("error"):
                cells.append("error")
            else:
                mark = "" if pt["constraints_met"] else " (not met)"
                ft = pt.get("finetuned_test_top1")
                top1 = format_percent(pt["test_top1"]) + (f" -> **{format_percent(ft)}**" if ft is not None else "")
                cells.append(f"{top1} at {format_percent(pt['memory_saved'], 1)}{mark}")
        lines.append(f"| {format_percent(t, 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_ranking(doc: dict, n_test: int) -> list[str]:
    """Per target, the policies by fine-tuned test top-1, and which of them the test split cannot
    tell from the best (less than two standard errors apart)."""
    from spikeprune.stats import differ

    out = []
    for t in doc["settings"]["targets"]:
        pts = [x for x in doc["frontier"] if abs(x["target"] - t) < 1e-12 and x.get("finetuned_test_top1") is not None
               and x.get("memory_ok")]
        if not pts:
            continue
        pts.sort(key=lambda x: -x["finetuned_test_top1"])
        best = pts[0]
        tie = [LABELS.get(x["policy"], x["policy"]) for x in pts[1:]
               if not differ(best["finetuned_test_top1"], x["finetuned_test_top1"], n_test)]
        out.append(f"- {format_percent(t, 0)} saved, after fine-tuning: "
                   + ", ".join(f"{LABELS.get(x['policy'], x['policy'])} {format_percent(x['finetuned_test_top1'])}" for x in pts)
                   + (f"; within two standard errors of the best: {', '.join(tie)}" if tie else "; the best by more than two standard errors"))
    return out


def write_markdown(doc: dict, plot_name: str | None, heading: str = "#") -> str:
    from spikeprune.stats import top1_standard_error

    S, d, mach = doc["settings"], doc["dense"], doc["machine"]
    h2 = heading + "#"
    F = S["finetune"]
    ft = (f"{F['epochs']} epoch(s), lr {F['lr']:g}, batch {F['batch_size']}"
          + (f", KD from the dense model (weight {F['kd_weight']:g}, T {F['kd_temperature']:g})" if F["kd"] else ", no KD")
          if F["epochs"] else "none")
    sh = doc["shared"]
    n_test = doc["split_sizes"]["test"]
    lines = [
        f"{heading} Policy benchmark: {doc['model']} on {S['data']}" + (" (quick)" if S["quick"] else ""), "",
        f"- Command: `{doc['command']}`",
        f"- Machine: {mach['platform']}, {mach['processor']}, {mach['cpu_count']} CPUs, torch {mach['torch']} "
        f"({mach['torch_threads']} threads), device {mach['device']}" + (f" ({mach['gpu']})" if mach.get("gpu") else "")
        + (f"; load average {mach['load_average_at_start']} at start, {mach.get('load_average_at_end')} at end"
           if mach.get("load_average_at_start") else ""),
        f"- Date: {doc['date']}; wall time {doc['wall_time_s'] / 60:.1f} min",
        f"- Images: train {doc['split_sizes']['train']:,} / calib {doc['split_sizes']['calib']:,} / test "
        f"{n_test:,}; SOPs and energy from {S['measure_images']} test images",
        f"- Dense: test top-1 {_top1_cell(d['test']['top1'], n_test)}, calibration top-1 "
        f"{format_percent(d['calib_top1'])}, {format_bytes(d['memory_bytes']['fp32'])} fp32",
        f"- Fine-tuning (the same for every policy): {ft}. Importance {S['importance']}, round_to {S['round_to']}, "
        f"sensitivity ratios {S['ratios']}, uniform sweep {S['uniform_ratios']}.",
        f"- Latency: {doc['machine']['device']}, batches {S['latency']['batches']}, {S['latency']['repeats']} "
        "interleaved repeats, median; speedup = dense median / model median.",
        f"- Each policy's own run folder, with its report.md: `{doc['work']}/<policy>-L<limit>/`.", ""]
    for L in S["limits"]:
        lines += [f"{h2} Accuracy limit {L:g} points (calibration split), no memory target", "", main_table(doc, L), ""]
        close = indistinguishable(doc, L)
        if close:
            lines += [f"Within two standard errors of each other on the {n_test:,} test images (the test split "
                      "cannot tell them apart): " + "; ".join(close) + ".", ""]
    se = 100 * top1_standard_error(d["test"]["top1"], n_test)
    lines += ["Memory saved is at fp32 (int8 savings are in policies.json); calib drop is in top-1 points on the "
              "calibration split, where every decision is made; test top-1 is on the test split, before and after "
              "fine-tuning, each with its standard error in points (sqrt(p(1-p)/n), "
              f"{se:.2f} points at the dense model's accuracy); SOPs and energy are of the final model (fine-tuned "
              "when fine-tuning ran). 'search s' and 'calib fwd' (calibration images through the whole model) include "
              "the shared work each policy read; the random floor is charged only its own work, not PrimeSVT's.", ""]
    if doc["frontier"]:
        tuned = bool(S.get("frontier_finetune"))
        lines += [f"{h2} Frontier: test top-1 at each memory target (limit {S['frontier_limit']:g} points, "
                  + ("before -> after the common fine-tuning)" if tuned else "no fine-tuning)"), "",
                  "Each cell: test top-1 of the model the policy chose on the calibration split"
                  + (", then (bold) after the same fine-tuning as the limit runs," if tuned else ",")
                  + " at the memory it saved; 'not met' when it could not reach the target within the limit.", "",
                  frontier_table(doc), ""]
        if tuned:
            lines += frontier_ranking(doc, n_test) + [""]
        if plot_name:
            lines += [f"![accuracy against memory saved]({plot_name})", ""]
    lines += [f"{h2} Shared work (computed once, charged to every policy that read it)", ""]
    readers = {k: ", ".join(LABELS.get(p, p) for p in S["policies"] if k in SHARED_READS.get(p, SHARED))
               for k in SHARED}
    for k in SHARED:
        if k in sh:
            extra = ""
            if k == "sensitivity":
                fc = sh[k]["forward_cost"]
                extra = (f"; {fc['spent']:,.0f} image-block passes, {fc['ratio']:.2f}x fewer than recomputing "
                         f"every candidate")
            if sh[k].get("reused"):
                extra += "; measured when it was computed, in an earlier session of this benchmark"
            lines.append(f"- {k.replace('_', ' ')}: {sh[k]['wall_s']:.1f} s, {sh[k]['calib_images']:,.0f} calibration "
                         f"image forwards{extra} (charged to {readers[k]})")
    if doc["notes"]:
        lines += ["", f"{h2} Notes", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def plot_frontier(path: Path, doc: dict) -> None:
    from spikeprune.plots import new_figure, pyplot, save_figure

    fig, ax = new_figure(figsize=(7.5, 4.6))
    dense = 100 * doc["dense"]["test"]["top1"]
    ax.plot([0], [dense], "k*", ms=13, label="dense", zorder=2)
    colors = pyplot().get_cmap("tab10")
    for i, p in enumerate(doc["settings"]["policies"]):
        pts = sorted((x for x in doc["frontier"] if x["policy"] == p and not x.get("error")),
                     key=lambda x: (x["memory_saved"], x["target"]))  # a curve along the x axis
        if not pts:
            continue
        xs, ys = [100 * x["memory_saved"] for x in pts], [100 * x["test_top1"] for x in pts]
        if all(x.get("finetuned_test_top1") is not None for x in pts):  # the fine-tuned curve; before it, dashed
            ax.plot(xs, ys, "--", color=colors(i), lw=0.8, alpha=0.6)
            ys = [100 * x["finetuned_test_top1"] for x in pts]
        ax.plot(xs, ys, "-", color=colors(i), lw=1.3, label=LABELS.get(p, p))
        for x, y, pt in zip(xs, ys, pts):
            ax.plot([x], [y], "o", color=colors(i), ms=6, mfc=colors(i) if pt["constraints_met"] else "white", zorder=3)
    for t in doc["settings"]["targets"]:
        ax.axvline(100 * t, color="grey", lw=0.6, ls=":")
    L = doc["settings"]["frontier_limit"]
    if L < 100:
        ax.axhline(dense - L, color="tab:red", lw=1, ls="--", label=f"dense - {L:g} pts (the limit, applied on calib)")
    ax.set_xlabel("memory saved (%, fp32)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{doc['model']} on {doc['settings']['data']}: accuracy against memory saved\n"
                 "(targets dotted; hollow = target not met within the limit; "
                 + ("solid: fine-tuned, dashed: before)" if doc["settings"].get("frontier_finetune") else "no fine-tuning)"),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)


def update_readme(readme: Path, doc: dict, out: Path) -> None:
    from spikeprune.serialization import atomic_path

    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SpikepruneError(f"{readme} has no {README_START} ... {README_END} markers to write the table between")
    plot = os.path.relpath(out / "frontier.png", readme.parent) if doc["frontier"] else None
    body = write_markdown(doc, plot, heading="###")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{head}{README_START}\n{body}{README_END}{tail}")


def run_all(bench: Bench, shared: dict) -> tuple[list, list, dict]:
    """Every policy at every limit (fine-tuned), then at every frontier target (not fine-tuned):
    (results, frontier points, the final models of the limit runs for the latency timer)."""
    from spikeprune.policy_api import Constraints

    S, work = bench.S, bench.work
    results, models = [], {"dense": bench.model}
    for L in S["limits"]:
        prime = None
        for p in S["policies"]:
            name = f"{p}-L{L:g}"
            rec = bench.run_policy(name, p, Constraints(L), main=True, shared=shared[bench.importance_of(p)],
                                   primesvt_record=prime)
            if p == "primesvt":
                prime = rec["_record"]
            models[name] = bench.final_model(work / name)
            results.append(rec)

    frontier = []
    for t in S["targets"]:
        cons = Constraints(S["frontier_limit"], target_saving=t)
        prime = None
        for p in S["policies"]:
            name = f"frontier-{t:g}/{p}"
            if p == RANDOM and prime is None:
                frontier.append({"policy": p, "target": t, "error": "PrimeSVT failed at this target"})
                continue
            try:
                rec = bench.run_policy(name, p, cons, main=bool(S.get("frontier_finetune")),
                                       shared=shared[bench.importance_of(p)], primesvt_record=prime)
            except SpikepruneError as e:  # e.g. a target below the smallest model: record it, go on
                log(f"{name}: {e}")
                frontier.append({"policy": p, "target": t, "error": str(e)})
                continue
            if p == "primesvt":
                prime = rec["_record"]
            frontier.append({"policy": p, "target": t, "memory_saved": rec["memory_saved"],
                             "memory_bytes": rec["memory_bytes"], "calib_top1": rec["calib_top1"],
                             "calib_drop": rec["calib_drop"], "test_top1": rec["test"]["top1"],
                             "finetuned_test_top1": rec["finetuned"]["top1"] if rec["finetuned"] else None,
                             "constraints_met": rec["constraints_met"], "memory_ok": rec["memory_ok"],
                             "cost": rec["cost"], "removed": rec["removed"], "run_dir": rec["run_dir"]})
    return results, frontier, models


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def run(args, argv: list[str]) -> dict:
    from spikeprune.cli import resolve_model
    from spikeprune.data import dataset_for_model
    from spikeprune.hashing import model_hash
    from spikeprune.policy_api import register_policy, unregister_policy
    from spikeprune.serialization import atomic_path, write_json
    from spikeprune.stats import calib_resolution

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    S = resolve_settings(args)
    if S["device"] == "cuda" and not torch.cuda.is_available():
        raise SpikepruneError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu")
    progress = not args.quiet
    mach = machine(S["device"])
    model = resolve_model(args).eval()
    mh = model_hash(model)
    work = Path(args.work) if args.work else ROOT / "runs" / "bench-policies" / settings_hash(S, mh)
    out = Path(S["out"]) if os.path.isabs(S["out"]) else ROOT / S["out"]
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "bench.json", {"format": FORMAT, "version": VERSION, "settings": S, "model_hash": mh})
    log(f"work folder {work}; results to {out}")
    sizes = {s: len(dataset_for_model(S["data"], model, s, max_images=S["caps"][s])) for s in ("train", "calib", "test")}
    bench = Bench(S, model, work, progress, sizes)
    notes = []
    register_policy(SHARED_POLICY, help="bench/policies.py's shared work", check=_check_shared_steps)(shared_work)
    try:
        shared = {imp: bench.shared_run(imp) for imp in dict.fromkeys(bench.importance_of(p) for p in S["policies"])}
        results, frontier, models = run_all(bench, shared)
    finally:
        unregister_policy(SHARED_POLICY)
    dense = bench.dense

    # Latency: every final model and the dense one in one interleaved timer.
    cfg = model.cfg
    lat = interleaved_latency(models, (cfg.in_channels, cfg.img_size, cfg.img_size), S["latency"]["batches"],
                              S["latency"]["repeats"], S["latency"]["warmup"], S["device"], progress)
    dense["latency_ms"] = {str(b): lat[b]["dense"]["median_ms"] for b in lat}
    for r in results:
        r["latency_ms"] = {str(b): lat[b][r["name"]]["median_ms"] for b in lat}
        r["speedup"] = {str(b): lat[b]["dense"]["median_ms"] / lat[b][r["name"]]["median_ms"] for b in lat}

    res = calib_resolution(sizes["calib"], dense["calib_top1"], points=min(S["limits"]))
    notes.append(f"the calibration split has {sizes['calib']:,} images: one image is {res['image_points']:.2f} points "
                 f"and the standard error of a calibration top-1 {res['se_points']:.2f} points"
                 + ("" if res["ok"] else f", so decisions at a {min(S['limits']):g}-point limit are noisy (about "
                                         f"{res['needed']:,} images would resolve it)"))
    notes.append("random @ PrimeSVT memory: the per-group widths of PrimeSVT's result at the same limit / target "
                 "(its pruning record's kept counts), channels chosen at random (importance 'random', seed "
                 f"{S['seed']}); its calib drop may break the limit: it is a floor, not a policy")
    notes.append("global L2: Torch-Pruning-style global ranking (spikeprune/policies/global_l2.py): every channel "
                 "scored by the group L2 norm, divided by its group's mean, ranked together")
    if mach.get("load_average_at_start") and mach["load_average_at_start"][0] > (os.cpu_count() or 1):
        notes.append(f"the machine was shared (load average {mach['load_average_at_start'][0]:.1f} on "
                     f"{os.cpu_count()} CPUs at the start): wall times are inflated; speedups come from the "
                     "interleaved timer and are less affected")
    if hasattr(os, "getloadavg"):
        mach["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    doc = {
        "format": FORMAT, "version": VERSION,
        "command": "python bench/policies.py" + ("" if not argv else " " + shlex.join(argv)),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": mach, "model": describe(model, S["model"]), "model_hash": mh, "settings": S, "split_sizes": sizes,
        "work": str(work), "dense": dense, "shared": bench.shared, "results": results, "frontier": frontier,
        "latency": {str(b): {n: v for n, v in lat[b].items()} for b in lat},
        "wall_time_s": time.perf_counter() - t_start, "notes": notes,
    }
    for r in results:  # standard errors of every test top-1, in points (spikeprune.stats)
        r["test"]["se_points"] = _se_points(r["test"]["top1"], sizes["test"])
        if r["finetuned"]:
            r["finetuned"]["se_points"] = _se_points(r["finetuned"]["top1"], sizes["test"])
    dense["test"]["se_points"] = _se_points(dense["test"]["top1"], sizes["test"])
    doc["indistinguishable"] = {f"{L:g}": indistinguishable(doc, L) for L in S["limits"]}
    doc = _jsonable(doc)
    out.mkdir(parents=True, exist_ok=True)
    plot = None
    if frontier:
        plot_frontier(out / "frontier.png", doc)
        plot = "frontier.png"
    write_json(out / "policies.json", doc)
    with atomic_path(out / "policies.md") as tmp:
        tmp.write_text(write_markdown(doc, plot))
    if args.update_readme:
        update_readme(ROOT / "bench" / "README.md", doc, out)
    log(f"wrote {out / 'policies.json'}, {out / 'policies.md'}" + (f", {out / 'frontier.png'}" if plot else "")
        + f" in {doc['wall_time_s'] / 60:.1f} min")
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        run(args, argv)
    except SpikepruneError as e:
        print(f"bench/policies.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
